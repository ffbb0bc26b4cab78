"""LoCoMo (``locomo10.json``, the official release of snap-research/LoCoMo).

File layout: a list of samples ``{"sample_id", "conversation", "qa", ...}``. ``conversation`` has
``speaker_a``, ``speaker_b`` and, for each session ``N``, ``session_N`` (a list of turns
``{"speaker", "dia_id": "DN:M", "text"}``, where a turn that shares a photo also has ``img_url``
and ``blip_caption``) and ``session_N_date_time`` (``"1:56 pm on 8 May, 2023"``). Some samples
list date-times for sessions they do not contain; those are ignored. ``qa`` items have
``question``, ``answer`` (categories 1-4), ``evidence`` (dialogue ids), ``category`` (1-5) and, for
category 5, ``adversarial_answer``.

Category 5 (adversarial) questions cannot be answered from the conversation: the correct reply is
that it is not mentioned, and ``adversarial_answer`` is the trap. They are loaded with
``is_abstention=True`` and ``answer = NOT_MENTIONED``; the runner reports them separately and
leaves them out of the headline accuracy unless asked.

A handful of evidence ids in the release are malformed (``"D8:6; D9:17"``, ``"D:11:26"``,
``"D30:05"``, ``"D"``); they are split and normalised, and the few that still name no turn are
kept in ``Question.meta["unresolved_evidence"]`` rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from membuilder.datasets._dates import require_date
from membuilder.datasets._io import Fields, read_json
from membuilder.datasets._types import (
    Conversation,
    Dataset,
    Question,
    Session,
    Turn,
)
from membuilder.errors import DatasetError

#: LoCoMo's category numbers and the names used in reports.
CATEGORIES: dict[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}
#: The names the reference code gives the same numbers (``scripts/process_locomo.py``); it has no
#: name for category 5. Used in reports under the ``paper`` protocol so that per-category rows can
#: be set beside the paper's.
REFERENCE_CATEGORIES: dict[int, str] = {
    1: "single-session",
    2: "temporal-reasoning",
    3: "multi-session",
    4: "knowledge-update",
    5: "unknown",
}
#: Gold answer given to category-5 questions (the official file has none for most of them).
NOT_MENTIONED = "Not mentioned in the conversation"

_SESSION_KEY = re.compile(r"session_(\d+)")
_DIA_ID = re.compile(r"D:?(\d+):0*(\d+)")


def parse_locomo_datetime(text: str) -> datetime | None:
    """``"1:56 pm on 8 May, 2023"`` -> ``datetime(2023, 5, 8, 13, 56)``; ``None`` if unparseable."""
    for fmt in ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y"):
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


def normalize_evidence(raw: str) -> list[str]:
    """Split and normalise one evidence string into ``"D<session>:<turn>"`` ids (may be empty)."""
    return [f"D{m.group(1)}:{int(m.group(2))}" for m in _DIA_ID.finditer(raw)]


def load_locomo(path: str | Path) -> Dataset:
    """Load ``locomo10.json``.

    Raises DatasetError naming the file and the JSON field for a missing file or a sample that
    does not have the official layout.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, None, "expected a list of LoCoMo samples at the top level")
    conversations: list[Conversation] = []
    questions: list[Question] = []
    seen: set[str] = set()
    for i, raw in enumerate(data):
        sample = Fields(raw, path, f"[{i}]")
        conv_id = sample.text("sample_id")
        assert conv_id is not None
        if conv_id in seen:
            raise DatasetError(path, sample.at("sample_id"), f"duplicate sample id {conv_id!r}")
        seen.add(conv_id)
        conv = _load_conversation(sample, conv_id)
        conversations.append(conv)
        questions.extend(_load_questions(sample, conv))
    return Dataset("locomo", tuple(conversations), tuple(questions), str(path))


def _load_conversation(sample: Fields, conv_id: str) -> Conversation:
    c = sample.child("conversation")
    speaker_a = c.text("speaker_a")
    speaker_b = c.text("speaker_b")
    numbers = sorted(int(m.group(1)) for k in c.obj if (m := _SESSION_KEY.fullmatch(k)))
    if not numbers:
        raise DatasetError(c.path, c.at("session_1"), "no sessions in this conversation")
    sessions: list[Session] = []
    for index, n in enumerate(numbers):
        key = f"session_{n}"
        turns_raw = c.get(key, list)
        timestamp = require_date(
            c.text(f"{key}_date_time"),
            parse_locomo_datetime,
            c.path,
            c.at(f"{key}_date_time"),
            "1:56 pm on 8 May, 2023",
        )
        turns: list[Turn] = []
        for j, t_raw in enumerate(turns_raw):
            t = Fields(t_raw, c.path, f"{c.at(key)}[{j}]")
            speaker = t.text("speaker")
            role = "user" if speaker == speaker_a else "assistant"
            caption = t.text("blip_caption", required=False)
            turns.append(
                Turn(
                    id=t.text("dia_id") or "",
                    speaker=speaker or "",
                    role=role,
                    text=t.text("text") or "",
                    image_caption=caption or None,
                )
            )
        sessions.append(Session(index=index, id=key, timestamp=timestamp, turns=tuple(turns)))
    meta = {"speaker_a": speaker_a, "speaker_b": speaker_b}
    return Conversation(conv_id, tuple(sessions), meta)


def _load_questions(sample: Fields, conv: Conversation) -> list[Question]:
    qa = sample.get("qa", list)
    turn_session = conv.turn_session()
    session_ids = {s.index: s.id for s in conv.sessions}
    by_number = {int(s.id.split("_")[1]): s.id for s in conv.sessions}
    last_ts = conv.sessions[-1].timestamp
    out: list[Question] = []
    for j, q_raw in enumerate(qa):
        q = Fields(q_raw, sample.path, f"{sample.at('qa')}[{j}]")
        category_id = q.get("category", int)
        if category_id not in CATEGORIES:
            raise DatasetError(q.path, q.at("category"), f"expected 1-5, got {category_id}")
        adversarial = category_id == 5
        evidence_raw = q.get("evidence", list)
        turns: list[str] = []
        unresolved: list[str] = []
        for k, e in enumerate(evidence_raw):
            if not isinstance(e, str):
                raise DatasetError(q.path, f"{q.at('evidence')}[{k}]", "expected a string")
            ids = normalize_evidence(e)
            if not ids:
                unresolved.append(e)
            for tid in ids:
                if tid not in turns:
                    turns.append(tid)
                if tid not in turn_session:
                    unresolved.append(tid)
        sessions: list[str] = []
        for tid in turns:
            if tid in turn_session:
                sid = session_ids[turn_session[tid]]
            else:
                # A turn the release does not contain still names its session ("D10:19").
                sid = by_number.get(int(tid[1:].split(":")[0]), "")
            if sid and sid not in sessions:
                sessions.append(sid)
        if adversarial:
            answer = NOT_MENTIONED
            trap = q.text("adversarial_answer", required=False, allow_number=True)
        else:
            answer = q.text("answer", allow_number=True) or ""
            trap = None
        meta: dict[str, object] = {}
        if unresolved:
            meta["unresolved_evidence"] = unresolved
        if adversarial and q.has("answer"):
            meta["release_answer"] = q.text("answer", allow_number=True)
        out.append(
            Question(
                id=f"{conv.id}/q{j}",
                conversation_id=conv.id,
                question=q.text("question") or "",
                answer=answer,
                category=CATEGORIES[category_id],
                category_id=category_id,
                evidence_turns=tuple(turns),
                evidence_sessions=tuple(sessions),
                asked_at=last_ts,
                is_abstention=adversarial,
                adversarial_answer=trap,
                meta=meta,
            )
        )
    return out


def apply_conventions(ds: Dataset, *, category5_gold: str, labels: str) -> Dataset:
    """The same LoCoMo questions under a protocol's conventions.

    ``category5_gold``: ``not_mentioned`` (the loader's :data:`NOT_MENTIONED`) or ``release`` (the
    file's own ``answer`` field, ``""`` where it has none — 444 of the 446 — which is what the
    reference code hands its judge). ``labels``: ``locomo`` (:data:`CATEGORIES`) or ``reference``
    (:data:`REFERENCE_CATEGORIES`). Question ids, evidence and the ``is_abstention`` flag stay.
    """
    if category5_gold not in ("not_mentioned", "release"):
        raise ValueError(f"category5_gold must be 'not_mentioned' or 'release', got {category5_gold!r}")
    if labels not in ("locomo", "reference"):
        raise ValueError(f"labels must be 'locomo' or 'reference', got {labels!r}")
    names = CATEGORIES if labels == "locomo" else REFERENCE_CATEGORIES
    out: list[Question] = []
    for q in ds.questions:
        changes: dict[str, object] = {}
        if q.category_id in names:
            changes["category"] = names[q.category_id]
        if q.category_id == 5 and category5_gold == "release":
            changes["answer"] = str(q.meta.get("release_answer") or "")
        out.append(replace(q, **changes) if changes else q)
    return Dataset(ds.name, ds.conversations, tuple(out), ds.source, ds.meta)
