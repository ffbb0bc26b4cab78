"""Audited gold for LoCoMo: apply an independent audit's corrections beside the original gold.

The audit file (``errors.json``, an input like the dataset, never part of the project) lists
questions of LoCoMo categories 1-4 whose gold is faulty. Each entry names its question as
``locomo_<i>_qa<j>`` — the j-th item of the i-th sample's ``qa`` list in ``locomo10.json``, all
categories counted, both 0-based — which is the loader's question ``<sample_id>/q<j>``.
:func:`join_audit` matches every entry to its question and checks the question text; any entry
that does not match fails the whole join (a silently skipped correction would be a wrong number).

What a correction changes:

* ``error_type == "WRONG_CITATION"``: only the evidence — the gold answer stands;
* every other type (HALLUCINATION, TEMPORAL_ERROR, ATTRIBUTION_ERROR, INCOMPLETE): the gold
  answer becomes ``correct_answer`` (these change the score) and the evidence ``correct_evidence``;
* ``AMBIGUOUS``: the audit could not settle the gold. These questions are taken out of the
  audited metrics and reported on their own (original gold and the audit's suggestion), never
  silently dropped.

Audited evidence recall is computed from the retrieved memories' provenance against
``correct_evidence``; audited accuracy needs the answer judged against ``correct_answer`` (the
runner does that for the score-changing questions when the audited gold is requested).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membuilder.datasets import Conversation
from membuilder.datasets._io import read_json
from membuilder.datasets.locomo import normalize_evidence
from membuilder.errors import AuditError

__all__ = [
    "AMBIGUOUS",
    "AUDIT_FILE",
    "CITATION_ONLY",
    "GOLD_CHOICES",
    "AuditEntry",
    "AuditError",
    "audited_evidence",
    "audited_records",
    "default_audit_path",
    "join_audit",
    "load_joined_audit",
    "locomo_question_id",
]

AUDIT_FILE = "errors.json"
AUDIT_DIR = "locomo_audit"
CITATION_ONLY = "WRONG_CITATION"
AMBIGUOUS = "AMBIGUOUS"
GOLD_CHOICES = ("original", "audited", "both")

_AUDIT_ID = re.compile(r"^locomo_(\d+)_qa(\d+)$")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit correction, joined to its question (``question_id`` is the loader's id)."""

    audit_id: str
    question_id: str
    conversation_id: str
    error_type: str
    question: str
    golden_answer: str
    correct_answer: str
    cited_evidence: tuple[str, ...]
    correct_evidence: tuple[str, ...]

    @property
    def ambiguous(self) -> bool:
        return self.error_type == AMBIGUOUS

    @property
    def changes_answer(self) -> bool:
        """True for the entries that change the score (all but citation-only ones)."""
        return self.error_type != CITATION_ONLY

    @property
    def changes_evidence(self) -> bool:
        return set(self.correct_evidence) != set(self.cited_evidence)


def locomo_question_id(sample_id: str, j: int) -> str:
    """The loader's id of the j-th ``qa`` item of a LoCoMo sample."""
    return f"{sample_id}/q{j}"


def default_audit_path(data_path: str | Path) -> Path:
    """Where the audit is looked for when no path is given: ``locomo_audit/errors.json`` in the
    data directory that holds ``locomo/`` (the shared data layout), else beside the dataset."""
    data_path = Path(data_path)
    candidates = [
        data_path.parent.parent / AUDIT_DIR / AUDIT_FILE,
        data_path.parent / AUDIT_DIR / AUDIT_FILE,
        data_path.parent / AUDIT_FILE,
    ]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _norm(text: object) -> str:
    return " ".join(str(text).split())


def _evidence_list(value: Any, path: Path, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise AuditError(path, where, "expected a list of dialogue ids like 'D3:14'")
    out: list[str] = []
    for raw in value:
        for tid in normalize_evidence(raw):
            if tid not in out:
                out.append(tid)
    return tuple(out)


def locate_question(
    audit_id: object, data: Sequence[Any], locomo_path: Path, source: Path, where: str
) -> tuple[Mapping[str, Any], int, Mapping[str, Any]]:
    """The sample, index and ``qa`` item that ``locomo_<i>_qa<j>`` names in the parsed
    ``locomo10.json``; raises :class:`AuditError` (naming ``source`` and ``where``) when the id is
    malformed or points past the dataset."""
    m = _AUDIT_ID.match(audit_id) if isinstance(audit_id, str) else None
    if m is None:
        raise AuditError(source, f"{where}.question_id", f"expected 'locomo_<i>_qa<j>', got {audit_id!r}")
    i, j = int(m.group(1)), int(m.group(2))
    if i >= len(data) or not isinstance(data[i], Mapping):
        raise AuditError(source, f"{where}.question_id", f"{audit_id}: {locomo_path} has {len(data)} samples")
    sample = data[i]
    qa = sample.get("qa") if isinstance(sample.get("qa"), list) else []
    if j >= len(qa) or not isinstance(qa[j], Mapping):
        raise AuditError(
            source, f"{where}.question_id", f"{audit_id}: sample {i} of {locomo_path} has {len(qa)} questions"
        )
    return sample, j, qa[j]


def join_audit(audit_path: str | Path, locomo_path: str | Path) -> dict[str, AuditEntry]:
    """Read the audit and match every entry to its LoCoMo question; ``{question id: entry}``.

    Raises :class:`AuditError` naming the file and entry when an id is malformed or repeated,
    points past the dataset, or names a question whose text differs from the dataset's.
    """
    audit_path, locomo_path = Path(audit_path), Path(locomo_path)
    raw = read_json(audit_path)
    if not isinstance(raw, list):
        raise AuditError(audit_path, None, "expected a JSON list of audit entries")
    data = read_json(locomo_path)
    if not isinstance(data, list):
        raise AuditError(locomo_path, None, "expected a list of LoCoMo samples at the top level")
    out: dict[str, AuditEntry] = {}
    for n, e in enumerate(raw):
        where = f"[{n}]"
        if not isinstance(e, Mapping):
            raise AuditError(audit_path, where, "expected an object")
        aid = e.get("question_id")
        sample, j, q = locate_question(aid, data, locomo_path, audit_path, where)
        if _norm(q.get("question", "")) != _norm(e.get("question", "")):
            raise AuditError(
                audit_path,
                f"{where}.question",
                f"{aid} does not match {locomo_path} qa[{j}] of {sample.get('sample_id')}: "
                f"{e.get('question')!r} vs {q.get('question')!r}",
            )
        if "category" in e and str(e["category"]) != str(q.get("category")):
            raise AuditError(
                audit_path,
                f"{where}.category",
                f"{aid}: category {e['category']} vs {q.get('category')} in the dataset",
            )
        for key in ("error_type", "correct_answer"):
            if not isinstance(e.get(key), (str, int, float)):
                raise AuditError(audit_path, f"{where}.{key}", "missing or not a string")
        sample_id = str(sample.get("sample_id"))
        qid = locomo_question_id(sample_id, j)
        if qid in out:
            raise AuditError(audit_path, f"{where}.question_id", f"{aid} is listed twice")
        out[qid] = AuditEntry(
            audit_id=aid,
            question_id=qid,
            conversation_id=sample_id,
            error_type=str(e["error_type"]),
            question=str(e.get("question", "")),
            golden_answer=str(e.get("golden_answer", q.get("answer", ""))),
            correct_answer=str(e["correct_answer"]),
            cited_evidence=_evidence_list(e.get("cited_evidence", []), audit_path, f"{where}.cited_evidence"),
            correct_evidence=_evidence_list(
                e.get("correct_evidence"), audit_path, f"{where}.correct_evidence"
            ),
        )
    return out


def load_joined_audit(
    gold: str, audit_path: str | Path | None, data_path: str | Path, dataset: str
) -> tuple[dict[str, AuditEntry] | None, Path | None, str | None]:
    """The joined audit for a run, or why there is none: ``(entries, path, note)``.

    ``gold == "original"`` or a non-LoCoMo dataset: no audit. An explicit ``audit_path`` must
    exist and join; the default one is used when it exists, and its absence is a note (the
    report says the audited columns are missing), not an error. ``--gold audited`` without any
    audit file is an error.
    """
    if gold == "original" or dataset != "locomo":
        return None, None, None
    explicit = audit_path is not None
    path = Path(audit_path) if explicit else default_audit_path(data_path)
    if not path.is_file():
        if explicit or gold == "audited":
            raise AuditError(path, None, "audit file not found (pass --audit-file, or --gold original)")
        return None, None, f"no audit file at {path}: audited columns not computed"
    return join_audit(path, data_path), path, None


def audited_evidence(entry: AuditEntry, conversation: Conversation) -> tuple[set[str], set[int]]:
    """The corrected evidence of ``entry`` as (turn ids, session indices) present in the
    conversation (a turn id ``D<s>:<t>`` also names session ``session_<s>``)."""
    turn_session = conversation.turn_session()
    sessions = conversation.session_index()
    turns = {t for t in entry.correct_evidence if t in turn_session}
    idx = {turn_session[t] for t in turns}
    for t in entry.correct_evidence:
        sid = f"session_{t[1:].split(':')[0]}"
        if sid in sessions:
            idx.add(sessions[sid])
    return turns, idx


def audited_records(
    records: Sequence[Mapping[str, Any]], audit: Mapping[str, AuditEntry]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records as they score on audited gold, and the AMBIGUOUS ones set apart.

    For an audited question the record's ``evidence_ranks`` become its ``evidence_ranks_audited``
    and, when it changes the answer and was judged against the corrected answer (``audited``
    field), its judge label, EM and F1 become those. A score-changing question answered but not
    judged on the corrected gold keeps no label (``judge_correct`` None): it is counted as not
    judged rather than scored against a gold the audit rejects.
    """
    kept: list[dict[str, Any]] = []
    ambiguous: list[dict[str, Any]] = []
    for r in records:
        entry = audit.get(str(r.get("question_id")))
        if entry is None:
            kept.append(dict(r))
            continue
        a = dict(r)
        if "evidence_ranks_audited" in r:
            a["evidence_ranks"] = r["evidence_ranks_audited"]
        if entry.changes_answer and "answer" in r:
            a["gold"] = entry.correct_answer
            judged = r.get("audited")
            if isinstance(judged, Mapping):
                for k in ("judge_correct", "exact_match", "f1"):
                    a[k] = judged.get(k)
            else:
                a["judge_correct"] = None
                a["exact_match"] = None
                a["f1"] = None
        (ambiguous if entry.ambiguous else kept).append(a)
    return kept, ambiguous


def audit_summary(
    audit: Mapping[str, AuditEntry], path: Path | None, records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """What the audit changed in this run: entries joined, and those among the run's questions."""
    in_run = [audit[str(r.get("question_id"))] for r in records if str(r.get("question_id")) in audit]
    return {
        "file": None if path is None else str(path),
        "entries": len(audit),
        "joined": len(audit),
        "by_type": dict(Counter(e.error_type for e in audit.values())),
        "in_run": len(in_run),
        "in_run_by_type": dict(Counter(e.error_type for e in in_run)),
        "in_run_answer_changed": sum(1 for e in in_run if e.changes_answer and not e.ambiguous),
        "in_run_evidence_changed": sum(1 for e in in_run if e.changes_evidence and not e.ambiguous),
        "in_run_ambiguous": sorted(e.question_id for e in in_run if e.ambiguous),
    }
