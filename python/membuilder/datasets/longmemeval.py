"""LongMemEval (xiaowu0162/LongMemEval): the oracle, S and M files, plain or ``.xz`` / ``.gz``.

Each file is a list of question records: ``question_id`` (suffix ``_abs`` = abstention: the
history does not contain the answer and the correct reply says so), ``question_type``,
``question``, ``answer`` (text or a number), ``question_date``, and the question's own history:
``haystack_session_ids``, ``haystack_dates``, ``haystack_sessions`` (lists of
``{"role", "content", "has_answer"?}`` turns) and ``answer_session_ids``.

Every question has its own history, so each becomes one :class:`Conversation` with the question's
id. Sessions are put in chronological order (stable; a few files list them out of order), since
memory must be built in the order things happened; ``Conversation.meta["original_order"]`` keeps
the file's order. Evidence: ``answer_session_ids`` and the turns marked ``has_answer``.

The paper's split file (``{"sft": [...], "rl": [...], "test": [...]}``) selects the 50 / 50 / 400
question ids used for SFT trajectories, RL and held-out evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from membuilder._core import InvalidArgumentError
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

SPLITS = ("sft", "rl", "test")
#: Name of the split file looked for beside the data file when none is given.
DEFAULT_SPLIT_FILE = "longmemeval_splits.json"

_DATE = re.compile(r"(\d{4})/(\d{2})/(\d{2})(?:\s*\([A-Za-z]+\))?\s+(\d{1,2}):(\d{2})")


_EXAMPLE = "2023/05/20 (Sat) 02:21"


def parse_longmemeval_date(text: str) -> datetime | None:
    """``"2023/05/20 (Sat) 02:21"`` -> ``datetime(2023, 5, 20, 2, 21)``; ``None`` if unparseable."""
    m = _DATE.fullmatch(text.strip())
    if not m:
        return None
    y, mo, d, h, mi = (int(g) for g in m.groups())
    try:
        return datetime(y, mo, d, h, mi)
    except ValueError:
        return None


def load_splits(path: str | Path) -> dict[str, list[str]]:
    """Read a split file: ``{"sft": [ids], "rl": [ids], "test": [ids]}`` (other keys ignored)."""
    data = read_json(path)
    f = Fields(data, path, "")
    out: dict[str, list[str]] = {}
    for name in SPLITS:
        if not f.has(name):
            continue
        ids = f.get(name, list)
        for k, v in enumerate(ids):
            if not isinstance(v, str):
                raise DatasetError(path, f"{name}[{k}]", "expected a question id string")
        out[name] = list(ids)
    if not out:
        raise DatasetError(path, None, f"no split found; expected keys {', '.join(SPLITS)}")
    return out


def load_longmemeval(
    path: str | Path,
    *,
    split: str | None = None,
    split_file: str | Path | None = None,
    ids: Iterable[str] | None = None,
    sort_sessions: bool = True,
) -> Dataset:
    """Load a LongMemEval file.

    ``split`` (``"sft"``, ``"rl"`` or ``"test"``) keeps the ids of that split, read from
    ``split_file`` (default: ``longmemeval_splits.json`` beside ``path``). ``ids`` keeps only
    those question ids (after the split). Ids requested but absent from the file are recorded in
    ``Dataset.meta["missing_ids"]`` (the S copy lacks two questions) rather than failing, unless
    nothing at all is left, which raises InvalidArgumentError.

    Raises DatasetError naming the file and field for a missing file or a record without the
    official fields.
    """
    path = Path(path)
    wanted: list[str] | None = None
    meta: dict[str, object] = {}
    if split is not None:
        if split not in SPLITS:
            raise InvalidArgumentError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        sf = Path(split_file) if split_file is not None else path.parent / DEFAULT_SPLIT_FILE
        splits = load_splits(sf)
        if split not in splits:
            raise DatasetError(sf, split, "missing")
        wanted = splits[split]
        meta["split"] = split
        meta["split_file"] = str(sf)
    if ids is not None:
        id_list = list(dict.fromkeys(ids))
        wanted = id_list if wanted is None else [i for i in wanted if i in set(id_list)]
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, None, "expected a list of question records at the top level")
    keep = None if wanted is None else set(wanted)
    conversations: list[Conversation] = []
    questions: list[Question] = []
    found: set[str] = set()
    for i, raw in enumerate(data):
        rec = Fields(raw, path, f"[{i}]")
        qid = rec.text("question_id") or ""
        if keep is not None and qid not in keep:
            continue
        if qid in found:
            raise DatasetError(path, rec.at("question_id"), f"duplicate question id {qid!r}")
        found.add(qid)
        conv, question = _load_record(rec, qid, sort_sessions)
        conversations.append(conv)
        questions.append(question)
    if wanted is not None:
        missing = [i for i in wanted if i not in found]
        if missing:
            meta["missing_ids"] = missing
        if not found:
            raise InvalidArgumentError(
                f"{path}: none of the requested question ids are in this file "
                f"(first requested: {', '.join(wanted[:3])})"
            )
        # Keep the order the caller (or the split file) asked for.
        order = {q: k for k, q in enumerate(wanted)}
        pairs = sorted(zip(conversations, questions), key=lambda cq: order[cq[0].id])
        conversations = [c for c, _ in pairs]
        questions = [q for _, q in pairs]
    return Dataset("longmemeval", tuple(conversations), tuple(questions), str(path), meta)


def _load_record(rec: Fields, qid: str, sort_sessions: bool) -> tuple[Conversation, Question]:
    session_ids: Sequence[object] = rec.get("haystack_session_ids", list)
    dates: Sequence[object] = rec.get("haystack_dates", list)
    sessions_raw: Sequence[object] = rec.get("haystack_sessions", list)
    if not (len(session_ids) == len(dates) == len(sessions_raw)):
        raise DatasetError(
            rec.path,
            rec.at("haystack_sessions"),
            f"haystack_session_ids ({len(session_ids)}), haystack_dates ({len(dates)}) and "
            f"haystack_sessions ({len(sessions_raw)}) must have the same length",
        )
    built: list[tuple[str, str, list[Turn], list[str]]] = []
    for k, (sid, date, turns_raw) in enumerate(zip(session_ids, dates, sessions_raw)):
        where = f"{rec.at('haystack_sessions')}[{k}]"
        if not isinstance(sid, str):
            raise DatasetError(rec.path, f"{rec.at('haystack_session_ids')}[{k}]", "expected a string")
        if not isinstance(date, str):
            raise DatasetError(rec.path, f"{rec.at('haystack_dates')}[{k}]", "expected a string")
        require_date(date, parse_longmemeval_date, rec.path, f"{rec.at('haystack_dates')}[{k}]", _EXAMPLE)
        if not isinstance(turns_raw, list):
            raise DatasetError(rec.path, where, "expected a list of turns")
        turns: list[Turn] = []
        marked: list[str] = []
        for t_i, t_raw in enumerate(turns_raw):
            t = Fields(t_raw, rec.path, f"{where}[{t_i}]")
            role = t.text("role") or ""
            if role not in ("user", "assistant"):
                raise DatasetError(rec.path, t.at("role"), f"expected 'user' or 'assistant', got {role!r}")
            tid = f"{sid}:{t_i}"
            turns.append(Turn(id=tid, speaker=role, role=role, text=t.text("content") or ""))
            if t.get("has_answer", bool, required=False, default=False):
                marked.append(tid)
        built.append((sid, date, turns, marked))
    original = [b[0] for b in built]
    if sort_sessions:
        parsed = [parse_longmemeval_date(b[1]) for b in built]
        if all(p is not None for p in parsed):
            order = sorted(range(len(built)), key=lambda k: (parsed[k], k))
            built = [built[k] for k in order]
    sessions = tuple(
        Session(index=k, id=sid, timestamp=date, turns=tuple(turns))
        for k, (sid, date, turns, _) in enumerate(built)
    )
    evidence_turns = tuple(tid for *_, marked in built for tid in marked)
    answer_sessions = rec.get("answer_session_ids", list, required=False, default=[])
    for k, a in enumerate(answer_sessions):
        if not isinstance(a, str):
            raise DatasetError(rec.path, f"{rec.at('answer_session_ids')}[{k}]", "expected a string")
    question_type = rec.text("question_type") or ""
    question = Question(
        id=qid,
        conversation_id=qid,
        question=rec.text("question") or "",
        answer=rec.text("answer", allow_number=True) or "",
        category=question_type,
        category_id=None,
        evidence_turns=evidence_turns,
        evidence_sessions=tuple(answer_sessions),
        asked_at=require_date(
            rec.text("question_date", required=False),
            parse_longmemeval_date,
            rec.path,
            rec.at("question_date"),
            _EXAMPLE,
        ),
        is_abstention=qid.endswith("_abs"),
    )
    conv = Conversation(qid, sessions, {"original_order": original, "question_type": question_type})
    return conv, question
