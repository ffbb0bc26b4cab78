"""Evidence recall: was a retrieved memory built from the turn or session that holds the answer?

Every memory entry records its provenance (conversation, session index, source turn ids). A
retrieved entry *hits* a question's evidence

* at **turn** level when its turn ids include one of the question's evidence turns — exact for the
  raw-turn builder, whose entries each come from one turn;
* at **session** level when it was built from one of the evidence sessions — the meaningful level
  for LLM-built memories (the agents see a whole session at once) and for LongMemEval, whose
  evidence is given per session.

:func:`evidence_ranks` returns the 1-based rank of the first hit at each level (``None``: no hit
in the retrieved list; the level is absent when the question has no evidence of that kind in the
sessions that were built). Recall@k is then the share of evaluable questions whose rank is <= k.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from membuilder.datasets import Conversation, Question
from membuilder.eval.stats import proportion

LEVELS = ("turn", "session")


def question_evidence(question: Question, conversation: Conversation) -> tuple[set[str], set[int]]:
    """Evidence turn ids and session indices of ``question`` that exist in ``conversation``."""
    turn_session = conversation.turn_session()
    sessions = conversation.session_index()
    turns = {t for t in question.evidence_turns if t in turn_session}
    idx = {sessions[s] for s in question.evidence_sessions if s in sessions}
    return turns, idx


def evidence_ranks(
    provenances: Sequence[Any],
    evidence_turns: set[str],
    evidence_sessions: set[int],
) -> dict[str, int | None]:
    """Rank (1-based) of the first retrieved entry that hits, per level; see the module docstring.

    ``provenances``: the retrieved entries' provenance objects (``.session``, ``.turn_ids``), best
    first.
    """
    out: dict[str, int | None] = {}
    if evidence_turns:
        out["turn"] = next(
            (r for r, p in enumerate(provenances, 1) if evidence_turns.intersection(p.turn_ids)), None
        )
    if evidence_sessions:
        out["session"] = next(
            (r for r, p in enumerate(provenances, 1) if p.session in evidence_sessions), None
        )
    return out


def recall_at(ranks: Iterable[int | None], k: int) -> float | None:
    """Share of ranks <= k (``None`` for an empty set of questions)."""
    ranks = list(ranks)
    if not ranks:
        return None
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def recall_table(records: Iterable[Mapping[str, Any]], ks: Sequence[int], level: str) -> dict[str, Any]:
    """``{"n": evaluable questions, "recall@k": share, ..., "ci95": {"recall@k": [lo, hi]}}`` over
    result records at ``level`` (Wilson 95% intervals)."""
    ranks = [
        r["evidence_ranks"][level]
        for r in records
        if isinstance(r.get("evidence_ranks"), Mapping) and level in r["evidence_ranks"]
    ]
    table: dict[str, Any] = {"n": len(ranks)}
    for k in ks:
        table[f"recall@{k}"] = recall_at(ranks, k)
    # Each recall is a proportion over n questions: its Wilson 95% interval (stats).
    table["ci95"] = {
        f"recall@{k}": proportion(sum(1 for r in ranks if r is not None and r <= k), len(ranks))["ci95"]
        for k in ks
    }
    return table
