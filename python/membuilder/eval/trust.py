"""The parts of an eval report that make its numbers checkable.

* options: ``--gold original|audited|both`` (LoCoMo audit, see :mod:`membuilder.eval.audit`),
  ``--audit-file``, ``--judge-rounds``;
* per result line: the retrieved memories' provenance, tokens, cost and wall time, the judge's
  rounds, and the answer judged against the audited gold where the audit changes it;
* in ``summary.json``: audited metrics beside the original ones, the AMBIGUOUS questions apart,
  per-unit rows (conversation, character or question type), per-question cost and time, the judge
  (model, prompt version, rounds and agreement, its probe result when one is found);
* in ``report.md``: the sections that show all of that, every proportion with its Wilson 95%
  interval and its n.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from membuilder.eval.stats import proportion

__all__ = [
    "add_trust_arguments",
    "extend_summary",
    "finish_answer_record",
    "pct_ci",
    "provenance_record",
    "trust_sections",
    "unit_metrics",
]

#: The unit a per-unit row stands for, per dataset (LongMemEval has one history per question,
#: so its natural unit is the question type, which is already its category).
UNITS = {"locomo": "conversation", "perltqa": "character", "longmemeval": "question_type"}


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` options of this module."""
    from membuilder.cli import positive_int
    from membuilder.eval.audit import GOLD_CHOICES

    g = p.add_argument_group("gold and judge checks")
    g.add_argument(
        "--gold",
        choices=GOLD_CHOICES,
        default="both",
        help="LoCoMo: original (no audit), both (default: the audited columns beside the original ones "
        "when the audit file is found) or audited (the same, but a missing audit file is an error)",
    )
    g.add_argument(
        "--audit-file",
        type=Path,
        help="LoCoMo audit corrections (default: locomo_audit/errors.json in the data directory)",
    )
    g.add_argument(
        "--judge-rounds",
        type=positive_int,
        default=1,
        metavar="K",
        help="ask the judge K times per answer and take the majority (agreement is reported; odd K avoids ties)",
    )


def pct_ci(p: float | None, ci: Sequence[float] | None) -> str:
    """``"72.3 [69.1, 75.2]"`` (percent), or ``"–"`` when there is no value."""
    if p is None:
        return "–"
    if not ci:
        return f"{100 * p:.1f}"
    return f"{100 * p:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def provenance_record(p: Any) -> dict[str, Any]:
    """A retrieved memory's provenance as a result line keeps it."""
    return {"session": int(p.session), "turns": list(p.turn_ids)}


# ---------------------------------------------------------------------------------------------
# Per result line
# ---------------------------------------------------------------------------------------------


def _cost(client: Any, usage: Mapping[str, int]) -> float | None:
    from membuilder.llm.usage import lookup_price

    if client is None:
        return None
    config = getattr(client, "config", None)
    model = getattr(config, "model", None) or getattr(client, "model", None)
    price = lookup_price(str(model), getattr(config, "prices", None)) if model else None
    if price is None:
        return None
    return (usage.get("prompt_tokens", 0) * price[0] + usage.get("completion_tokens", 0) * price[1]) / 1e6


async def finish_answer_record(
    rec: dict[str, Any], q: Any, answer: Any, judge: Any, verdict: Any, runner: Any, t0: float
) -> None:
    """Add the judge's rounds, the audited-gold verdict, tokens, cost and wall time to ``rec``."""
    from membuilder.metrics import exact_match, token_f1

    if verdict is not None and getattr(verdict, "rounds", None) is not None and len(verdict.rounds) > 1:
        rec["judge_rounds"] = list(verdict.rounds)
        rec["judge_agreement"] = bool(verdict.agreement)
    usages = {"answer": dict(getattr(answer, "usage", {}) or {})}
    if verdict is not None:
        usages["judge"] = dict(verdict.usage)
    entry = (runner.audit or {}).get(q.id)
    if entry is not None and entry.changes_answer and runner.cfg.gold != "original":
        audited: dict[str, Any] = {
            "gold": entry.correct_answer,
            "error_type": entry.error_type,
            "exact_match": exact_match(answer.answer, entry.correct_answer),
            "f1": token_f1(answer.answer, entry.correct_answer),
            "judge_correct": None,
        }
        if judge is not None:
            v = await judge.judge(q.question, entry.correct_answer, answer.answer)
            audited.update(judge_correct=v.correct, judge_raw=v.raw, judge_error=v.error)
            u = usages.setdefault("judge", {"prompt_tokens": 0, "completion_tokens": 0})
            for k in ("prompt_tokens", "completion_tokens"):
                u[k] = int(u.get(k, 0)) + int(v.usage.get(k, 0))
        rec["audited"] = audited
    costs = {role: _cost(runner.clients.get(role), u) for role, u in usages.items()}
    rec["usage"] = {
        "prompt_tokens": sum(int(u.get("prompt_tokens", 0)) for u in usages.values()),
        "completion_tokens": sum(int(u.get("completion_tokens", 0)) for u in usages.values()),
        "by_stage": usages,
        # At list price of the tokens used (a cached reply's tokens included); None if a price is unknown.
        "cost_usd": None if any(c is None for c in costs.values()) else round(sum(costs.values()), 8),
        "answer_cached": bool(getattr(answer, "cached", False)),
    }
    rec["wall_s"] = round(time.perf_counter() - t0, 4)


# ---------------------------------------------------------------------------------------------
# summary.json
# ---------------------------------------------------------------------------------------------


def unit_metrics(
    records: Sequence[Mapping[str, Any]], dataset: str, ks: Sequence[int], level: str
) -> dict[str, Any]:
    """Per-unit blocks (headline questions of each conversation / character), or a pointer to
    ``by_category`` for LongMemEval, whose unit is the question type."""
    from membuilder.eval.reports import compute_metrics

    unit = UNITS.get(dataset, "conversation")
    if unit == "question_type":
        return {"unit": unit, "same_as": "by_category"}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r.get("conversation_id")), []).append(r)
    rows = {u: compute_metrics(rs, ks=ks, level=level)["overall"] for u, rs in groups.items()}
    return {"unit": unit, "rows": rows}


def _dist(xs: Sequence[float]) -> dict[str, float] | None:
    if not xs:
        return None
    s = sorted(xs)
    return {
        "n": len(s),
        "mean": round(statistics.fmean(s), 6),
        "p50": round(s[len(s) // 2], 6),
        "p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 6),
        "max": round(s[-1], 6),
        "total": round(sum(s), 6),
    }


def per_question_usage(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with_usage = [r["usage"] for r in records if isinstance(r.get("usage"), Mapping)]
    if with_usage:
        out["prompt_tokens"] = _dist([u["prompt_tokens"] for u in with_usage])
        out["completion_tokens"] = _dist([u["completion_tokens"] for u in with_usage])
        costs = [u.get("cost_usd") for u in with_usage]
        out["cost_usd"] = _dist([c for c in costs if c is not None])
        out["cost_complete"] = all(c is not None for c in costs)
    walls = [float(r["wall_s"]) for r in records if r.get("wall_s") is not None]
    if walls:
        out["wall_s"] = _dist(walls)
    rets = [float(r["retrieval_s"]) for r in records if r.get("retrieval_s") is not None]
    if rets:
        out["retrieval_s"] = _dist(rets)
    return out


def extend_summary(summary: dict[str, Any], records: Sequence[Mapping[str, Any]], runner: Any) -> None:
    """Add audited metrics, per-unit rows, per-question usage and the judge to ``summary``."""
    from membuilder.eval.audit import audit_summary, audited_records
    from membuilder.eval.judging import find_probe, judge_prompt_version
    from membuilder.eval.reports import compute_metrics

    cfg = runner.cfg
    ks, level = cfg.recall_k, cfg.primary_level
    m = summary["metrics"]
    m["interval"] = "Wilson score interval, 95%, over the n questions of each proportion"
    m["by_unit"] = unit_metrics(records, cfg.dataset, ks, level)
    summary["gold"] = cfg.gold if cfg.dataset == "locomo" else "original"
    if runner.audit is not None:
        kept, ambiguous = audited_records(records, runner.audit)
        audited = compute_metrics(kept, ks=ks, level=level)
        audited["interval"] = m["interval"]
        audited["by_unit"] = unit_metrics(kept, cfg.dataset, ks, level)
        summary["metrics_audited"] = audited
        info = audit_summary(runner.audit, runner.audit_path, records)
        amb_ids = {r["question_id"] for r in ambiguous}
        if ambiguous:
            original = [r for r in records if r.get("question_id") in amb_ids]
            info["ambiguous"] = {
                "original": compute_metrics(original, ks=ks, level=level)["all_questions"],
                "audited": compute_metrics(ambiguous, ks=ks, level=level)["all_questions"],
            }
        summary["audit"] = info
    elif runner.audit_note:
        summary["audit"] = {"note": runner.audit_note}
    usage = per_question_usage(records)
    if usage:
        summary["per_question"] = usage
    if cfg.needs_answer and cfg.judge == "llm":
        agree = [r["judge_agreement"] for r in records if "judge_agreement" in r]
        version = judge_prompt_version(cfg.protocol.judge_style)
        probe = find_probe([cfg.output_dir, cfg.llm_cache_dir], cfg.the_judge_model, version)
        summary["judge"] = {
            "model": cfg.the_judge_model,
            "prompt_version": version,
            "rounds": cfg.judge_rounds,
            "agreement": proportion(sum(agree), len(agree)) if agree else None,
            "probe": None if probe is None else {"path": probe["path"], "rates": probe.get("rates")},
        }


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------


def _recall_cells(rec: Mapping[str, Any] | None, ks: Sequence[int]) -> list[str]:
    if not rec or not rec.get("n"):
        return ["0"] + ["–"] * len(ks)
    ci = rec.get("ci95") or {}
    return [str(rec["n"])] + [pct_ci(rec.get(f"recall@{k}"), ci.get(f"recall@{k}")) for k in ks]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _blocks(m: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [*m["by_category"].items(), ("**overall (headline)**", m["overall"])]


def _recall_section(summary: Mapping[str, Any]) -> list[str]:
    from membuilder.eval.evidence import LEVELS

    m, a = summary["metrics"], summary.get("metrics_audited")
    ks = m["ks"]
    lines: list[str] = []
    for lv in LEVELS:
        if not m["overall"]["recall"][lv]["n"]:
            continue
        head = ["category", "n"] + [f"R@{k} %" for k in ks]
        if a is not None:
            head += ["n (audited)"] + [f"R@{k} % audited" for k in ks]
        rows = []
        audited_cats = dict(_blocks(a)) if a is not None else {}
        for name, b in _blocks(m):
            row = [name, *_recall_cells(b["recall"][lv], ks)]
            if a is not None:
                ab = audited_cats.get(name)
                row += _recall_cells(ab["recall"][lv] if ab else None, ks)
            rows.append(row)
        lines += [f"### {lv.capitalize()}-level evidence recall", "", *_table(head, rows), ""]
    return lines


def _answer_section(summary: Mapping[str, Any]) -> list[str]:
    m, a = summary["metrics"], summary.get("metrics_audited")
    if "answer" not in m["overall"] or a is None:
        return []
    head = ["category", "judged", "accuracy %", "judged (audited)", "accuracy % audited"]
    audited_cats = dict(_blocks(a))
    rows = []
    for name, b in _blocks(m):
        ab = audited_cats.get(name, {}).get("answer") or {}
        x = b["answer"]
        rows.append(
            [
                name,
                str(x["judged"]),
                pct_ci(x["accuracy"], x.get("accuracy_ci95")),
                str(ab.get("judged", 0)),
                pct_ci(ab.get("accuracy"), ab.get("accuracy_ci95")),
            ]
        )
    return ["### Judge accuracy", "", *_table(head, rows), ""]


def _audit_lines(summary: Mapping[str, Any]) -> list[str]:
    info = summary.get("audit")
    if not info:
        return []
    if "note" in info:
        return [f"Audited gold: {info['note']}.", ""]
    types = ", ".join(f"{k} {v}" for k, v in sorted(info["in_run_by_type"].items()))
    lines = [
        (
            f"Audit: `{Path(str(info['file'])).name}`, {info['entries']} entries, all joined to their questions; "
            f"{info['in_run']} concern this run's questions ({types or 'none'}). The audited columns use the "
            f"corrected evidence for {info['in_run_evidence_changed']} questions and the corrected answer for "
            f"{info['in_run_answer_changed']}."
        ),
        "",
    ]
    n_amb = len(info["in_run_ambiguous"])
    if n_amb:
        lines[-2] += (
            f" The {n_amb} questions the audit marks AMBIGUOUS are left out of the audited columns and "
            "shown here on their own:"
        )
    amb = info.get("ambiguous")
    if amb:
        m = summary["metrics"]
        ks, lv = m["ks"], m["evidence_level"]
        head = ["AMBIGUOUS questions", "n"] + [f"R@{k} % ({lv})" for k in ks]
        answered = "answer" in amb["original"]
        if answered:
            head += ["judged", "accuracy %"]
        rows = []
        for name in ("original", "audited"):
            b = amb[name]
            row = [f"{name} gold", *_recall_cells(b["recall"][lv], ks)]
            if answered:
                x = b["answer"]
                row += [str(x["judged"]), pct_ci(x["accuracy"], x.get("accuracy_ci95"))]
            rows.append(row)
        lines += [*_table(head, rows), "", "Their ids: " + ", ".join(info["in_run_ambiguous"]), ""]
    return lines


def _unit_section(summary: Mapping[str, Any]) -> list[str]:
    m, a = summary["metrics"], summary.get("metrics_audited")
    bu = m.get("by_unit") or {}
    if "rows" not in bu:
        return []
    ks, lv = m["ks"], m["evidence_level"]
    answered = "answer" in m["overall"]
    head = [bu["unit"], "n"] + [f"R@{k} % ({lv})" for k in ks]
    if a is not None:
        head += ["n (audited)"] + [f"R@{k} % audited" for k in ks]
    if answered:
        head += ["accuracy %"] + (["accuracy % audited"] if a is not None else [])
    arows = (a.get("by_unit") or {}).get("rows", {}) if a is not None else {}
    rows = []
    for unit, b in bu["rows"].items():
        row = [unit, *_recall_cells(b["recall"][lv], ks)]
        if a is not None:
            ab = arows.get(unit)
            row += _recall_cells(ab["recall"][lv] if ab else None, ks)
        if answered:
            x = b["answer"]
            row.append(pct_ci(x["accuracy"], x.get("accuracy_ci95")))
            if a is not None:
                y = (arows.get(unit) or {}).get("answer") or {}
                row.append(pct_ci(y.get("accuracy"), y.get("accuracy_ci95")))
        rows.append(row)
    return [f"## Per {bu['unit']} (headline questions)", "", *_table(head, rows), ""]


def _judge_section(summary: Mapping[str, Any]) -> list[str]:
    j = summary.get("judge")
    if not j:
        return []
    lines = ["## Judge", "", f"- model `{j['model']}`, prompt version `{j['prompt_version']}`"]
    if j["rounds"] > 1:
        ag = j.get("agreement") or {}
        lines.append(
            f"- {j['rounds']} rounds per answer, majority vote; all rounds agree on "
            f"{pct_ci(ag.get('p'), ag.get('ci95'))}% of {ag.get('n', 0)} answers"
        )
    probe = j.get("probe")
    if probe is None:
        lines.append(
            "- no `membuilder judge-probe` result for this judge and prompt in the output or cache "
            "directory: its leniency is not measured"
        )
    else:
        lines.append(f"- probe result (`{probe['path']}`), overall over categories 1-4:")
        for name, r in (probe.get("rates") or {}).items():
            lines.append(f"  - {name}: {pct_ci(r.get('p'), r.get('ci95'))}% accepted (n={r.get('n')})")
    return [*lines, ""]


def _usage_section(summary: Mapping[str, Any]) -> list[str]:
    u = summary.get("per_question")
    if not u:
        return []
    lines = ["## Per question", ""]
    names = {
        "prompt_tokens": "prompt tokens",
        "completion_tokens": "completion tokens",
        "cost_usd": "cost USD (list price)",
        "wall_s": "wall time s (answer + judge)",
        "retrieval_s": "retrieval s (share of a batch)",
    }
    rows = []
    for key, name in names.items():
        d = u.get(key)
        if d:
            rows.append(
                [
                    name,
                    str(d["n"]),
                    f"{d['mean']:.4g}",
                    f"{d['p50']:.4g}",
                    f"{d['p95']:.4g}",
                    f"{d['total']:.4g}",
                ]
            )
    if not rows:
        return []
    lines += _table(["", "n", "mean", "median", "p95", "total"], rows)
    if u.get("cost_complete") is False:
        lines.append("")
        lines.append("Some model's price is unknown: those questions have no cost.")
    return [*lines, ""]


def trust_sections(summary: Mapping[str, Any]) -> str:
    """The Markdown added after the main table of ``report.md``."""
    lines: list[str] = ["", "## Original and audited gold", ""]
    lines.append(
        "Every proportion is shown as `value [low, high]` in %, the Wilson score 95% interval over its "
        "n questions."
    )
    lines.append("")
    lines += _audit_lines(summary)
    lines += _recall_section(summary)
    lines += _answer_section(summary)
    lines += _unit_section(summary)
    lines += _judge_section(summary)
    lines += _usage_section(summary)
    return "\n".join(lines)
