"""``membuilder eval`` under a protocol: its flags, how they resolve, and what the outputs say.

The protocol (:mod:`membuilder.protocol`) fixes every choice that decides what a number means; each
choice the evaluation uses also has its own flag, ``None`` by default (= the protocol's value). A
flag that changes a value is recorded as an override, so ``summary.json`` never calls a run
``paper`` when it is not quite. The table of every setting is in ``eval/README.md``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from membuilder._core import InvalidArgumentError
from membuilder.cli import positive_int
from membuilder.protocol import Protocol, add_protocol_argument, get_protocol

#: Default benchmark files under ``$MEMBUILDER_DATA``, per dataset; LongMemEval per history file
#: (the first that exists is taken: the cleaned release, then the copy beside this project).
LONGMEMEVAL_FILES: dict[str, tuple[str, ...]] = {
    "s": (
        "longmemeval_s_cleaned.json",
        "longmemeval_s_cleaned.json.xz",
        "longmemeval_s_cleaned.json.gz",
        "longmemeval_s.json",
        "longmemeval_s_498.json.xz",
    ),
    "oracle": ("longmemeval_oracle.json", "longmemeval_oracle.json.xz", "longmemeval_oracle.json.gz"),
    "m": ("longmemeval_m_cleaned.json", "longmemeval_m_cleaned.json.xz", "longmemeval_m.json"),
}
OTHER_FILES = {"locomo": Path("locomo") / "locomo10.json", "perltqa": Path("perltqa")}
#: ``--vector-store`` values. The reference's ``faiss`` is a flat inner-product index over
#: normalised vectors: exact cosine search, which is what the memory state does for every bank of
#: up to 20,000 entries (no benchmark memory comes near). Both names give that search.
VECTOR_STORES = ("exact", "faiss")

_LME_KIND = re.compile(r"longmemeval_(s|m|oracle)(?:_|\.|$)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The protocol flag and one flag per protocol setting the evaluation uses."""
    g = p.add_argument_group("protocol (each flag overrides one setting; default: the protocol's)")
    add_protocol_argument(g)
    g.add_argument(
        "--locomo-questions",
        choices=("all", "cat1-4"),
        help="LoCoMo questions in the headline: all 1,986 (paper) or categories 1-4 (membuilder)",
    )
    g.add_argument(
        "--locomo-category5-gold",
        choices=("release", "not_mentioned"),
        help="gold of LoCoMo category 5: the release's answer field, mostly empty (paper), or "
        "'Not mentioned in the conversation' (membuilder)",
    )
    g.add_argument(
        "--locomo-category-labels",
        choices=("reference", "locomo"),
        help="LoCoMo category names in reports: the reference code's (paper) or LoCoMo's (membuilder)",
    )
    g.add_argument(
        "--longmemeval-file",
        choices=tuple(LONGMEMEVAL_FILES),
        help="LongMemEval history file when --data-path is not given: s (~48 sessions per "
        "question, paper and membuilder), oracle (evidence sessions only) or m",
    )
    g.add_argument(
        "--judge-style",
        choices=("generous", "strict"),
        help="judge wording and reading: generous, reason then JSON label (paper); strict, JSON only",
    )
    g.add_argument(
        "--judge-unreadable",
        choices=("wrong", "excluded"),
        help="an unreadable verdict or failed judge call counts as WRONG (paper) or leaves the "
        "denominator (membuilder)",
    )
    g.add_argument(
        "--judge-attempts",
        type=positive_int,
        metavar="N",
        help="judge calls per question while the verdict is unreadable (paper 1, membuilder 3)",
    )
    g.add_argument(
        "--agent-retrieval",
        choices=("global_then_filter", "per_kind"),
        help="existing memories shown to each agent: top-k over all kinds, then its own kind "
        "(paper), or top-k of its own kind (membuilder)",
    )
    g.add_argument("--agent-top-k", type=positive_int, metavar="K", help="k of --agent-retrieval (20)")
    g.add_argument(
        "--answer-max-tokens",
        type=positive_int,
        metavar="N",
        help="cap on an answer's tokens (paper 4096, the reference client's default; membuilder 256)",
    )
    g.add_argument(
        "--json-mode-fallback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send a JSON-mode call again without response_format when the endpoint refuses it (on)",
    )


def longmemeval_kind(path: Path) -> str | None:
    """``s``, ``m`` or ``oracle`` from a LongMemEval file's name; ``None`` when it does not say."""
    m = _LME_KIND.search(path.name)
    return m.group(1) if m else None


def default_data_path(dataset: str, protocol: Protocol, root: Path) -> Path:
    """The benchmark file under ``root`` (``$MEMBUILDER_DATA``) that ``protocol`` evaluates."""
    if dataset != "longmemeval":
        return root / OTHER_FILES[dataset]
    names = LONGMEMEVAL_FILES[protocol.longmemeval_file]
    for name in names:
        if (root / "longmemeval" / name).is_file():
            return root / "longmemeval" / name
    return root / "longmemeval" / names[0]  # missing: the loader's error names it


def resolve(args: argparse.Namespace) -> Protocol:
    """The protocol of ``--protocol`` with every flag that changes a setting recorded as an
    override. Model names count as settings: the record says which models answered and judged."""
    base = get_protocol(getattr(args, "protocol", "paper"))
    questions = args.locomo_questions
    if args.include_adversarial:
        if questions == "cat1-4":
            raise InvalidArgumentError("--include-adversarial contradicts --locomo-questions cat1-4")
        questions = "all"
    answers = args.mode in ("answer", "full")
    lme_file = args.longmemeval_file
    if args.dataset == "longmemeval" and args.data_path is not None:
        named = longmemeval_kind(Path(args.data_path))
        if named is not None:
            if lme_file is not None and lme_file != named:
                raise InvalidArgumentError(
                    f"--longmemeval-file {lme_file} contradicts --data-path {args.data_path} "
                    f"(a '{named}' file)"
                )
            lme_file = named
    judge_endpoint = None
    if args.provider == "vllm" and args.judge_provider == "vllm":
        judge_endpoint = "same"
    return base.with_overrides(
        embedder=args.embedder,
        answer_top_k=args.top_k,
        answer_model=(args.answer_model or args.model) if answers else None,
        judge_model=args.judge_model if answers and args.judge == "llm" else None,
        judge_endpoint_with_vllm=judge_endpoint,
        judge_style=args.judge_style,
        judge_unreadable=args.judge_unreadable,
        judge_attempts=args.judge_attempts,
        locomo_questions=questions if args.dataset == "locomo" else None,
        locomo_category5_gold=args.locomo_category5_gold if args.dataset == "locomo" else None,
        locomo_category_labels=args.locomo_category_labels if args.dataset == "locomo" else None,
        longmemeval_file=lme_file if args.dataset == "longmemeval" else None,
        agent_retrieval=args.agent_retrieval,
        agent_top_k=args.agent_top_k,
        answer_max_tokens=args.answer_max_tokens,
        json_mode_fallback=args.json_mode_fallback,
    )


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    """Markdown bullet lines naming the protocol and, where a split asked for ids the file lacks,
    those ids."""
    lines: list[str] = []
    rec = summary.get("protocol")
    if rec:
        over = rec.get("overrides") or {}
        text = f"- protocol: **{rec['name']}** (v{rec['version']})"
        if over:
            text += "; overrides: " + ", ".join(f"{k}={v!r}" for k, v in over.items())
        s = rec.get("settings", {})
        text += (
            f"; judge {s.get('judge_style')}, unreadable verdicts {s.get('judge_unreadable')}"
            f"; agent retrieval {s.get('agent_retrieval')}"
        )
        lines.append(text)
    missing = (summary.get("dataset") or {}).get("missing_ids")
    if missing:
        lines.append(
            f"- {len(missing)} requested question id(s) are not in the data file and were not "
            f"evaluated: {', '.join(missing)}"
        )
    return lines
