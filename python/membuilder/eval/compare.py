"""``membuilder compare RUN_A RUN_B``: are two eval runs over the same questions different?

Both runs are output directories of ``membuilder eval`` (``summary.json`` and ``results.jsonl``).
The comparison is **paired**: question by question, each run either got it (judged CORRECT, or an
evidence hit within the top k) or not. Per category and for the headline set it reports both
runs' rates with their Wilson 95% intervals, the difference A − B, its paired bootstrap 95%
interval (questions resampled with replacement, 10,000 replicates, fixed seed) and the exact
McNemar p-value; the difference is called *distinguishable* when the bootstrap interval excludes 0.

It refuses, with one line, runs of different datasets, over different question sets, or with
different ``protocol`` values in their summaries; ``--force`` compares the common questions anyway.
Nothing here calls a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from membuilder.cli import positive_int
from membuilder.errors import CompareError
from membuilder.eval.stats import mcnemar, paired_bootstrap, proportion
from membuilder.protocol import measurement_difference, protocol_difference

__all__ = ["CompareError", "add_arguments", "compare_runs", "load_run", "markdown", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", type=Path, metavar="RUN_A", help="output directory of one eval run")
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="output directory of the other")
    p.add_argument(
        "--metric",
        choices=("auto", "accuracy", "recall"),
        default="auto",
        help="accuracy (judge labels) or recall (evidence hit within top k); auto: accuracy when "
        "both runs were judged, else recall",
    )
    p.add_argument(
        "--level", choices=("turn", "session"), help="evidence level (default: run A's primary level)"
    )
    p.add_argument(
        "--k",
        type=positive_int,
        action="append",
        help="recall@k to compare (repeat; default: every k of both runs)",
    )
    p.add_argument(
        "--gold",
        choices=("original", "audited", "both"),
        default="original",
        help="LoCoMo: compare on the original gold, on the audited gold, or both",
    )
    p.add_argument("--iters", type=positive_int, default=10_000, help="bootstrap replicates (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--force", action="store_true", help="compare the common questions of runs that differ")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="what to print")
    p.add_argument("--output-dir", type=Path, help="also write compare.md and compare.json here")


def load_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``summary.json`` and the result records of an eval output directory."""
    from membuilder._files import read_jsonl

    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise CompareError(f"{summary_path}: not found (is {path} an eval output directory?)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CompareError(f"{summary_path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict) or "metrics" not in summary:
        raise CompareError(f"{summary_path}: holds no metrics (a build-only run cannot be compared)")
    records = read_jsonl(path / "results.jsonl")
    if not records:
        raise CompareError(f"{path / 'results.jsonl'}: no result records")
    return summary, list({r["question_id"]: r for r in records}.values())


def _audited(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records as scored on the audited gold (from the audit fields the runner recorded)."""
    out = []
    for r in records:
        if r.get("audit_error_type") == "AMBIGUOUS":
            continue
        a = dict(r)
        if "evidence_ranks_audited" in r:
            a["evidence_ranks"] = r["evidence_ranks_audited"]
        if isinstance(r.get("audited"), Mapping):
            a["judge_correct"] = r["audited"].get("judge_correct")
        out.append(a)
    return out


def _outcome(r: Mapping[str, Any], metric: str, level: str, k: int | None) -> int | None:
    if metric == "accuracy":
        v = r.get("judge_correct")
        return None if v is None else int(bool(v))
    ranks = r.get("evidence_ranks")
    if not isinstance(ranks, Mapping) or level not in ranks:
        return None
    rank = ranks[level]
    return int(rank is not None and rank <= int(k or 0))


def _check(
    sa: Mapping[str, Any], sb: Mapping[str, Any], ids_a: set[str], ids_b: set[str], force: bool
) -> list[str]:
    """Reasons the runs are not comparable as they are (raises unless ``force``)."""
    problems = []
    da, db = sa.get("dataset", {}).get("name"), sb.get("dataset", {}).get("name")
    if da != db:
        problems.append(f"different datasets ({da} vs {db})")
    if ids_a != ids_b:
        problems.append(
            f"different question sets ({len(ids_a - ids_b)} questions only in RUN_A, {len(ids_b - ids_a)} only in RUN_B)"
        )
    measured = measurement_difference(sa.get("protocol"), sb.get("protocol"))
    if measured:
        problems.append(f"measured under different protocols ({'; '.join(measured)})")
    if problems and not force:
        raise CompareError(
            "runs are not comparable: "
            + "; ".join(problems)
            + " (pass --force to compare their common questions)"
        )
    return problems


def compare_runs(
    a: tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    b: tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    *,
    metric: str = "auto",
    level: str | None = None,
    ks: Sequence[int] | None = None,
    gold: str = "original",
    iters: int = 10_000,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """The paired comparison as a JSON-able dict (see the module docstring)."""
    from membuilder.eval.reports import category_order

    (sa, ra), (sb, rb) = a, b
    by_a = {r["question_id"]: r for r in ra}
    by_b = {r["question_id"]: r for r in rb}
    problems = _check(sa, sb, set(by_a), set(by_b), force)
    common = [q for q in by_a if q in by_b]
    if not common:
        raise CompareError("the runs share no question")
    ma, mb = sa["metrics"], sb["metrics"]
    if metric == "auto":
        judged = all(
            "answer" in m["overall"] and (m["overall"]["answer"].get("judged") or 0) > 0 for m in (ma, mb)
        )
        metric = "accuracy" if judged else "recall"
    level = level or ma.get("evidence_level", "turn")
    if metric == "recall":
        ks = list(ks) if ks else [k for k in ma.get("ks", []) if k in mb.get("ks", [])]
        if not ks:
            raise CompareError("the runs have no recall@k in common; pass --k")
        metrics = [(f"recall@{k}", k) for k in ks]
    else:
        metrics = [("accuracy", None)]
    golds = ["original", "audited"] if gold == "both" else [gold]
    ordered = [by_a[q] for q in common]
    cats = category_order(ordered)
    tables = []
    for g in golds:
        rows_a = [by_a[q] for q in common]
        rows_b = [by_b[q] for q in common]
        if g == "audited":
            if not any("audit_error_type" in r for r in rows_a + rows_b):
                raise CompareError(
                    "--gold audited: these runs recorded no audited gold (run eval with --gold both)"
                )
            rows_a, rows_b = _audited(rows_a), _audited(rows_b)
            keep = {r["question_id"] for r in rows_a} & {r["question_id"] for r in rows_b}
            rows_a = [r for r in rows_a if r["question_id"] in keep]
            rows_b = [r for r in rows_b if r["question_id"] in keep]
        pairs_b = {r["question_id"]: r for r in rows_b}
        groups: list[tuple[str, list[Mapping[str, Any]]]] = [
            (c, [r for r in rows_a if str(r.get("category")) == c]) for c in cats
        ]
        groups.append(("overall (headline)", [r for r in rows_a if r.get("headline", True)]))
        rows = []
        for name, members in groups:
            for mname, k in metrics:
                xa, xb = [], []
                for r in members:
                    oa = _outcome(r, metric, level, k)
                    ob = _outcome(pairs_b[r["question_id"]], metric, level, k)
                    if oa is not None and ob is not None:
                        xa.append(oa)
                        xb.append(ob)
                if not xa:
                    continue
                boot = paired_bootstrap(xa, xb, iters=iters, seed=seed)
                rows.append(
                    {
                        "category": name,
                        "metric": mname,
                        "n": len(xa),
                        "a": proportion(sum(xa), len(xa)),
                        "b": proportion(sum(xb), len(xb)),
                        "diff": boot["diff"],
                        "ci95": boot["ci95"],
                        "mcnemar": mcnemar(xa, xb),
                        "distinguishable": boot["distinguishable"],
                    }
                )
        tables.append({"gold": g, "rows": rows})
    return {
        "run_a": str(sa.get("_path", "")),
        "run_b": str(sb.get("_path", "")),
        "dataset": sa.get("dataset", {}).get("name"),
        "protocol": {"a": sa.get("protocol"), "b": sb.get("protocol")},
        # Settings of the system under test that differ: what the comparison is about.
        "setting_differences": protocol_difference(sa.get("protocol"), sb.get("protocol")),
        "forced_over": problems,
        "questions": len(common),
        "metric": metric,
        "level": level if metric == "recall" else None,
        "method": {
            "interval_per_run": "Wilson score 95%",
            "difference": "A - B, paired percentile bootstrap 95% over questions",
            "iters": iters,
            "seed": seed,
            "test": "exact McNemar (two-sided)",
            "distinguishable": "bootstrap interval excludes 0",
        },
        "embedders": {"a": sa.get("models", {}).get("embedder"), "b": sb.get("models", {}).get("embedder")},
        "tables": tables,
    }


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def markdown(result: Mapping[str, Any]) -> str:
    from membuilder.eval.trust import pct_ci

    lines = [
        "# membuilder compare",
        "",
        f"- A: `{result['run_a']}` (embedder `{result['embedders']['a']}`)",
        f"- B: `{result['run_b']}` (embedder `{result['embedders']['b']}`)",
        f"- dataset {result['dataset']}, {result['questions']} paired questions; metric: {result['metric']}"
        + (f" at {result['level']} level" if result["level"] else ""),
        (
            "- per run: rate in % with its Wilson 95% interval; Δ = A − B in points with its paired "
            f"bootstrap 95% interval ({result['method']['iters']} replicates, seed "
            f"{result['method']['seed']}); McNemar: exact two-sided p; distinguishable: the bootstrap "
            "interval excludes 0"
        ),
    ]
    if result["forced_over"]:
        lines.append("- **forced** over: " + "; ".join(result["forced_over"]))
    if result["setting_differences"]:
        lines.append("- settings that differ between the runs: " + "; ".join(result["setting_differences"]))
    lines.append("")
    for t in result["tables"]:
        lines += [f"## {t['gold']} gold", ""]
        lines.append("| category | metric | n | A % | B % | Δ pp | Δ 95% CI | McNemar p | distinguishable |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in t["rows"]:
            ci = r["ci95"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["category"],
                        r["metric"],
                        str(r["n"]),
                        pct_ci(r["a"]["p"], r["a"]["ci95"]),
                        pct_ci(r["b"]["p"], r["b"]["ci95"]),
                        _pp(r["diff"]),
                        f"[{_pp(ci[0])}, {_pp(ci[1])}]" if ci else "–",
                        f"{r['mcnemar']['p_value']:.3g}",
                        "**yes**" if r["distinguishable"] else "no",
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
        a[0]["_path"], b[0]["_path"] = str(args.run_a), str(args.run_b)
        result = compare_runs(
            a,
            b,
            metric=args.metric,
            level=args.level,
            ks=args.k,
            gold=args.gold,
            iters=args.iters,
            seed=args.seed,
            force=args.force,
        )
    except CompareError as e:
        print(f"membuilder compare: error: {e}", file=sys.stderr)
        return 2
    md = markdown(result)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "compare.md").write_text(md, encoding="utf-8")
        (args.output_dir / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2) if args.format == "json" else md)
    return 0
