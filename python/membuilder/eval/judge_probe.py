"""``membuilder judge-probe``: how lenient is the judge? Measured, not assumed.

The LoCoMo audit ships two sets of deliberately **wrong** answers to the 1,540 category 1-4
questions (``judge_probe_specific_wrong.json``: every fact shifted to a plausible alternative;
``judge_probe_vague_wrong.json``: on topic, nothing checkable). This command sends the configured
judge — the same prompt and parsing as ``membuilder eval`` — every item of both sets, and the gold
answers themselves, and reports per category and overall, each with its Wilson 95% interval:

* **false-accept rate** on each wrong set (share labelled CORRECT; a sound judge is near 0%);
* **true-accept rate** on the gold answers (share labelled CORRECT; a sound judge is near 100%).

An item the judge could not label is counted as failed and left out of the rates (never guessed).
Every probe item is matched to its LoCoMo question by ``locomo_<i>_qa<j>`` and its question text
checked, like the audit. The result (``judge_probe.json``, with the judge model and prompt
version) is what ``membuilder eval`` looks for in its output and cache directories, to show the
judge's measured leniency beside its accuracy; write it there with ``--output-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from membuilder.cli import positive_int
from membuilder.endpoint import add_endpoint_arguments, endpoint_from_args
from membuilder.errors import ProbeError
from membuilder.eval.stats import proportion
from membuilder.judge import JUDGE_STYLES
from membuilder.protocol import add_protocol_argument, get_protocol

__all__ = ["PROBE_SETS", "add_arguments", "load_probe_items", "probe_judge", "run", "summarize"]

#: Probe set name -> (file in the audit directory, what a CORRECT label means there).
PROBE_SETS: dict[str, tuple[str | None, str]] = {
    "specific_wrong": ("judge_probe_specific_wrong.json", "false accept"),
    "vague_wrong": ("judge_probe_vague_wrong.json", "false accept"),
    "gold": (None, "true accept"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-path", type=Path, required=True, help="LoCoMo locomo10.json")
    p.add_argument(
        "--audit-dir",
        type=Path,
        help="directory of the audit's probe files (default: locomo_audit beside the dataset's directory)",
    )
    p.add_argument("--judge-model", required=True, help="the judge model to measure")
    add_protocol_argument(p)
    p.add_argument(
        "--judge-style",
        choices=JUDGE_STYLES,
        help="judge wording (default: the protocol's: generous for paper, strict for membuilder)",
    )
    add_endpoint_arguments(p)
    p.add_argument(
        "--judge-rounds", type=positive_int, default=1, metavar="K", help="majority of K rounds per item"
    )
    p.add_argument("--conv-id", action="append", help="only these LoCoMo samples (repeat or comma-separate)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="at most N items per set (in file order)")
    p.add_argument(
        "--sets", default="specific_wrong,vague_wrong,gold", help="which sets (default: all three)"
    )
    p.add_argument(
        "--output-dir", type=Path, help="where judge_probe.json/.md go (default: runs/judge-probe/<model>)"
    )
    p.add_argument("--cache-dir", type=Path, help="LLM response cache (default: <output-dir>/llm_cache)")
    p.add_argument("--no-cache", action="store_true", help="do not cache judge replies")
    p.add_argument("--max-concurrent-requests", type=positive_int, default=16, help="requests in flight")


def load_probe_items(
    audit_dir: Path,
    locomo_path: Path,
    sets: Sequence[str],
    conv_ids: Sequence[str] = (),
    limit: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The items of each probe set: ``{question_id, question, gold, answer, category}``; the
    ``gold`` set answers every category 1-4 question with its own gold answer."""
    from membuilder.datasets._io import read_json
    from membuilder.datasets.locomo import CATEGORIES
    from membuilder.eval.audit import locate_question, locomo_question_id

    data = read_json(locomo_path)
    if not isinstance(data, list):
        raise ProbeError(f"{locomo_path}: expected a list of LoCoMo samples")
    wanted = set(conv_ids)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in sets:
        if name not in PROBE_SETS:
            raise ProbeError(f"--sets: unknown set {name!r} (choose from {', '.join(PROBE_SETS)})")
        fname = PROBE_SETS[name][0]
        items: list[dict[str, Any]] = []
        if fname is None:
            for sample in data:
                for j, q in enumerate(sample.get("qa", [])):
                    if q.get("category") in (1, 2, 3, 4) and (
                        not wanted or sample.get("sample_id") in wanted
                    ):
                        items.append(
                            {
                                "question_id": locomo_question_id(str(sample.get("sample_id")), j),
                                "question": q.get("question", ""),
                                "gold": q.get("answer", ""),
                                "answer": str(q.get("answer", "")),
                                "category": CATEGORIES[q["category"]],
                            }
                        )
        else:
            path = audit_dir / fname
            raw = read_json(path)
            groups = raw.get("detailed_results") if isinstance(raw, Mapping) else None
            if not isinstance(groups, Mapping):
                raise ProbeError(f"{path}: expected an object with 'detailed_results'")
            for key, group in groups.items():
                for n, e in enumerate(group if isinstance(group, list) else []):
                    where = f"detailed_results.{key}[{n}]"
                    sample, j, q = locate_question(e.get("question_id"), data, locomo_path, path, where)
                    if " ".join(str(q.get("question", "")).split()) != " ".join(
                        str(e.get("question", "")).split()
                    ):
                        raise ProbeError(f"{path}: {where}: question text differs from {locomo_path}")
                    if wanted and sample.get("sample_id") not in wanted:
                        continue
                    items.append(
                        {
                            "question_id": locomo_question_id(str(sample.get("sample_id")), j),
                            "question": q.get("question", ""),
                            "gold": q.get("answer", ""),
                            "answer": str(e.get("generated_answer", "")),
                            "category": CATEGORIES.get(q.get("category"), str(q.get("category"))),
                        }
                    )
        out[name] = items[:limit] if limit else items
    return out


async def probe_judge(
    judge: Any, items: Mapping[str, Sequence[Mapping[str, Any]]], concurrency: int = 16
) -> dict[str, list[dict[str, Any]]]:
    """Judge every item; per set, the items with ``correct`` (``None``: no readable label)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(item: Mapping[str, Any]) -> dict[str, Any]:
        async with sem:
            v = await judge.judge(item["question"], item["gold"], item["answer"])
        return {**item, "correct": v.correct, "raw": v.raw, "error": v.error, "usage": dict(v.usage)}

    out: dict[str, list[dict[str, Any]]] = {}
    for name, its in items.items():
        out[name] = list(await asyncio.gather(*(one(i) for i in its)))
    return out


def summarize(judged: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per set: accepted share overall and per category (Wilson 95%), and the failed count."""
    sets: dict[str, Any] = {}
    for name, items in judged.items():
        labelled = [i for i in items if i["correct"] is not None]
        cats: dict[str, list[Mapping[str, Any]]] = {}
        for i in labelled:
            cats.setdefault(str(i["category"]), []).append(i)
        sets[name] = {
            "rate": PROBE_SETS[name][1],
            "items": len(items),
            "failed": len(items) - len(labelled),
            "overall": proportion(sum(1 for i in labelled if i["correct"]), len(labelled)),
            "by_category": {
                c: proportion(sum(1 for i in v if i["correct"]), len(v)) for c, v in sorted(cats.items())
            },
        }
    return sets


def markdown(result: Mapping[str, Any]) -> str:
    from membuilder.eval.trust import pct_ci

    j = result["judge"]
    lines = [
        "# membuilder judge-probe",
        "",
        f"- judge model `{j['model']}`, prompt version `{j['prompt_version']}`, rounds {j['rounds']}",
        (
            "- share of items the judge labelled CORRECT, in % with its Wilson 95% interval; on the wrong "
            "sets that is the false-accept rate (sound: ~0%), on the gold answers the true-accept rate "
            "(sound: ~100%)"
        ),
        "",
    ]
    cats = sorted({c for s in result["sets"].values() for c in s["by_category"]})
    head = ["set", "rate", "n", "overall %", *cats, "failed"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for name, s in result["sets"].items():
        cells = [name, s["rate"], str(s["overall"]["n"]), pct_ci(s["overall"]["p"], s["overall"]["ci95"])]
        for c in cats:
            b = s["by_category"].get(c)
            cells.append("–" if b is None else f"{pct_ci(b['p'], b['ci95'])} (n={b['n']})")
        cells.append(str(s["failed"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from membuilder._core import InvalidArgumentError
    from membuilder._files import write_json_atomic
    from membuilder.datasets import DatasetError
    from membuilder.eval.audit import default_audit_path
    from membuilder.eval.judging import RoundsJudge, judge_prompt_version
    from membuilder.judge import Judge
    from membuilder.llm import LLMClient

    model = args.judge_model
    protocol = get_protocol(args.protocol).with_overrides(judge_style=args.judge_style)
    style = protocol.judge_style
    out = args.output_dir or Path("runs") / "judge-probe" / model.replace("/", "_")
    audit_dir = args.audit_dir or default_audit_path(args.data_path).parent
    conv_ids = [x.strip() for v in args.conv_id or [] for x in v.split(",") if x.strip()]
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    try:
        items = load_probe_items(audit_dir, args.data_path, sets, conv_ids, args.limit)
        if not any(items.values()):
            raise ProbeError("nothing to probe: the selection holds no item")
        cache = None if args.no_cache else (args.cache_dir or out / "llm_cache")
        cfg = endpoint_from_args(args, max_concurrency=args.max_concurrent_requests).llm_config(
            model, cache_dir=cache
        )
    except (ProbeError, DatasetError, InvalidArgumentError) as e:
        print(f"membuilder judge-probe: error: {e}", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    async def go() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        client = LLMClient(cfg)
        try:
            judge = RoundsJudge(
                Judge(client, model=model, style=style, max_attempts=protocol.judge_attempts),
                args.judge_rounds,
            )
            judged = await probe_judge(judge, items, args.max_concurrent_requests)
        finally:
            await client.aclose()
        return judged, client.usage.summary()

    judged, usage = asyncio.run(go())
    sets_summary = summarize(judged)
    result = {
        "membuilder_judge_probe": 1,
        "judge": {
            "model": model,
            "provider": args.provider,
            "prompt_version": judge_prompt_version(style),
            "style": style,
            "rounds": args.judge_rounds,
            "protocol": protocol.record(),
        },
        "data": {
            "locomo": str(args.data_path),
            "audit_dir": str(audit_dir),
            "conv_ids": conv_ids,
            "limit": args.limit,
        },
        "sets": sets_summary,
        "rates": {f"{n} ({s['rate']})": s["overall"] for n, s in sets_summary.items()},
        "usage": usage,
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "judge_probe.json", result)
    with open(out / "judge_probe_items.jsonl", "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"set": name, **i}, ensure_ascii=False) + "\n"
            for name, its in judged.items()
            for i in its
        )
    md = markdown(result)
    (out / "judge_probe.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"result: {out / 'judge_probe.json'}")
    return 0
