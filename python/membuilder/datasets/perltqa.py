"""PerLTQA (Elvin-Yiming-Du/PerLTQA), in its published two-file layout.

``perltmem_*.json`` (PerLT_Mem) holds each protagonist's memory, keyed by name (the ``en_v2``
release; the first release is a list of the same objects, named by ``profile.Protagonist``):

* ``profile`` (fields such as ``Protagonist``, ``Gender``, ``Age``, ``Occupation``...) and
  ``profile_description`` (prose);
* ``social_relationship``: ``{"<rel id>": {"Supporting Characters", "Relationship",
  "Description"}}``;
* ``events``: ``{"<event id>": {"content", "summary", "Characters", "Creation Time", "Theme",
  ...}}``;
* ``dialogues``: ``{"<dialogue id>": {"events": "<event id>", "contents": {"<YYYY-MM-DD HH:MM>":
  ["Speaker: utterance", ...]}}}``.

``perltqa_*.json`` (PerLT_QA) is a list of ``{"<name>": {...}}`` with, per memory type, the QA
records ``{"Question", "Answer", "Reference Memory", "Memory Anchors"}``: ``profile`` is a flat
list (its reference memory names a profile field), the other types are lists of
``{"<memory id>": [records]}`` whose reference memory is a list literal such as ``"['1_0_0']"``.
Memory anchors map a key phrase to its ``[start, end]`` in the reference memory (``-1`` = absent).

Each protagonist becomes one :class:`Conversation` (id ``char_000``, ``char_001``... in file
order; the name is in ``meta["name"]``). Its sessions are the dialogues in time order (one session
per timestamp; ids ``<dialogue id>`` or ``<dialogue id>/<k>``), then, as the paper's evaluation did, each event as a one-turn narrated session
(``include_events``), and optionally first a session that states the profile and relationships
(``include_profile``; off by default, as in the paper). Questions keep their memory type as the
category and point at the sessions built from their reference memory.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from membuilder.datasets._dates import parse_loose_date, require_date
from membuilder.datasets._io import Fields, read_json
from membuilder.datasets._types import (
    Conversation,
    Dataset,
    Question,
    Session,
    Turn,
)
from membuilder.errors import DatasetError

#: Memory types, in the order the QA file lists them; they are the question categories.
MEMORY_TYPES = ("profile", "social_relationship", "events", "dialogues")
PROFILE_SESSION = "profile"

_SPEAKER = re.compile(r"^\s*([^:：\n]{1,60})[:：]\s*(.*)$", re.DOTALL)


def _find(directory: Path, prefix: str) -> Path:
    found = sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(prefix) and p.name.split(".")[1:2] == ["json"] and p.is_file()
    )
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise DatasetError(
            directory,
            None,
            f"expected exactly one {prefix}*.json file, found {what}; pass the files explicitly",
        )
    return found[0]


def load_perltqa(
    path: str | Path,
    *,
    qa_path: str | Path | None = None,
    include_events: bool = True,
    include_profile: bool = False,
) -> Dataset:
    """Load PerLTQA.

    ``path`` is a directory holding one ``perltmem*.json`` and one ``perltqa*.json`` (optionally
    ``.gz``/``.xz``), or the memory file itself with ``qa_path`` naming the QA file. Raises
    DatasetError naming the file and field when either is missing or malformed.
    """
    path = Path(path)
    if path.is_dir():
        mem_path = _find(path, "perltmem")
        qa_file = Path(qa_path) if qa_path is not None else _find(path, "perltqa")
    else:
        mem_path = path
        if qa_path is None:
            if not path.exists():
                raise DatasetError(path, None, "file not found")
            qa_file = _find(path.parent, "perltqa")
        else:
            qa_file = Path(qa_path)
    mem = _memories_by_name(read_json(mem_path), mem_path)
    qa = _qa_by_name(read_json(qa_file), qa_file)
    conversations: list[Conversation] = []
    questions: list[Question] = []
    for n, (name, raw) in enumerate(mem.items()):
        conv_id = f"char_{n:03d}"
        conv = _load_character(
            Fields(raw, mem_path, _key(name)), conv_id, name, include_events, include_profile
        )
        conversations.append(conv)
        if name in qa:
            questions.extend(_load_questions(qa[name], conv, name))
    meta = {
        "memory_file": str(mem_path),
        "qa_file": str(qa_file),
        "characters_without_qa": [n for n in mem if n not in qa],
    }
    return Dataset("perltqa", tuple(conversations), tuple(questions), str(path), meta)


def _key(name: str) -> str:
    return f"[{name!r}]"


def _memories_by_name(data: Any, path: Path) -> dict[str, Any]:
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, list):
        out: dict[str, Any] = {}
        for i, item in enumerate(data):
            f = Fields(item, path, f"[{i}]")
            name = f.child("profile").text("Protagonist") or ""
            out[name] = item
        return out
    raise DatasetError(path, None, "expected an object keyed by protagonist (or a list of them)")


def _qa_by_name(data: Any, path: Path) -> dict[str, Fields]:
    items = [data] if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise DatasetError(path, None, "expected a list of {protagonist: QA} objects")
    out: dict[str, Fields] = {}
    for i, item in enumerate(items):
        f = Fields(item, path, f"[{i}]")
        for name in f.obj:
            out[name] = f.child(name)
    return out


def _parse_ts(text: str) -> datetime | None:
    for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


def _load_character(
    c: Fields, conv_id: str, name: str, include_events: bool, include_profile: bool
) -> Conversation:
    profile = c.get("profile", Mapping)
    description = c.text("profile_description", required=False) or ""
    relations = c.get("social_relationship", Mapping, required=False, default={})
    events = c.get("events", Mapping, required=False, default={})
    dialogues = c.get("dialogues", Mapping, required=False, default={})
    protagonist = str(profile.get("Protagonist", name))

    # (sort key, session id, timestamp, turns, source memory id)
    dialogue_sessions: list[tuple[tuple[int, datetime | None, int], str, str | None, list[Turn], str]] = []
    order = 0
    for d_key, d_raw in dialogues.items():
        d = Fields(d_raw, c.path, f"{c.at('dialogues')}[{d_key!r}]")
        contents = d.get("contents", Mapping)
        stamps = list(contents.items())
        for k_ts, (ts, lines) in enumerate(stamps):
            where = f"{d.at('contents')}[{ts!r}]"
            if not isinstance(lines, list):
                raise DatasetError(c.path, where, "expected a list of 'Speaker: utterance' lines")
            # A dialogue with several timestamps is several sessions: "<dialogue id>/<k>".
            sid = d_key if len(stamps) == 1 else f"{d_key}/{k_ts}"
            turns: list[Turn] = []
            for t_i, line in enumerate(lines):
                if not isinstance(line, str):
                    raise DatasetError(c.path, f"{where}[{t_i}]", "expected a string")
                m = _SPEAKER.match(line)
                speaker, text = (m.group(1).strip(), m.group(2).strip()) if m else ("", line.strip())
                role = "user" if speaker == protagonist or not speaker else "assistant"
                turns.append(Turn(f"{sid}:{t_i}", speaker or protagonist, role, text))
            parsed = _parse_ts(ts)
            require_date(ts, _parse_ts, c.path, where, "2022-03-03 09:00")
            key = (0 if parsed else 1, parsed, order)
            dialogue_sessions.append((key, sid, ts, turns, d_key))
            order += 1
    dialogue_sessions.sort(key=lambda s: (s[0][0], s[0][1] or datetime.min, s[0][2]))

    built: list[tuple[str, str | None, list[Turn]]] = []
    source_of: dict[str, list[str]] = {}  # memory id -> session ids built from it
    if include_profile:
        turns = []
        fields_text = "; ".join(f"{k}: {v}" for k, v in profile.items() if v not in ("", None))
        turns.append(
            Turn(f"{PROFILE_SESSION}:profile", "narrator", "user", f"Profile of {protagonist}. {fields_text}")
        )
        if description:
            turns.append(Turn(f"{PROFILE_SESSION}:description", "narrator", "user", description))
        for rel_id, rel_raw in relations.items():
            r = Fields(rel_raw, c.path, f"{c.at('social_relationship')}[{rel_id!r}]")
            who = r.text("Supporting Characters", required=False) or ""
            rel = r.text("Relationship", required=False) or ""
            desc = r.text("Description", required=False) or ""
            turns.append(
                Turn(
                    f"{PROFILE_SESSION}:{rel_id}",
                    "narrator",
                    "user",
                    f"{who} ({rel} of {protagonist}): {desc}".strip(),
                )
            )
        built.append((PROFILE_SESSION, None, turns))
    for _, sid, ts, turns, d_key in dialogue_sessions:
        built.append((sid, ts, turns))
        source_of.setdefault(d_key, []).append(sid)
        ev = dialogues[d_key].get("events") if isinstance(dialogues[d_key], Mapping) else None
        if isinstance(ev, str):
            source_of.setdefault(ev, []).append(sid)
    if include_events:
        for e_id, e_raw in events.items():
            e = Fields(e_raw, c.path, f"{c.at('events')}[{e_id!r}]")
            content = e.text("content")
            summary = e.text("summary", required=False) or ""
            when = require_date(
                e.text("Creation Time", required=False) or None,
                parse_loose_date,
                c.path,
                e.at("Creation Time"),
                "March 3, 2022",
            )
            text = f"[Event: {summary}] {content}" if summary else (content or "")
            built.append((e_id, when, [Turn(f"{e_id}:0", "narrator", "user", text)]))
            source_of.setdefault(e_id, []).insert(0, e_id)
    sessions = tuple(Session(k, sid, ts, tuple(turns)) for k, (sid, ts, turns) in enumerate(built))
    stamps_parsed = [(p, s.timestamp) for s in sessions if s.timestamp and (p := _parse_ts(s.timestamp))]
    latest = max(stamps_parsed)[1] if stamps_parsed else None
    meta = {
        "name": name,
        "protagonist": protagonist,
        "profile": dict(profile),
        "profile_description": description,
        "social_relationship": dict(relations),
        "events": dict(events),
        "memory_sources": source_of,
        "latest_timestamp": latest,
    }
    return Conversation(conv_id, sessions, meta)


def _reference_ids(ref: Any) -> list[str]:
    """``"['1_0_0', '1_0_1']"`` -> ``["1_0_0", "1_0_1"]``; a bare name (profile field) -> ``[name]``."""
    if isinstance(ref, list):
        return [str(r) for r in ref]
    if not isinstance(ref, str):
        return []
    text = ref.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return re.findall(r"'([^']+)'", text)
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return [text] if text else []


def _load_questions(qa: Fields, conv: Conversation, name: str) -> list[Question]:
    sources: Mapping[str, list[str]] = conv.meta["memory_sources"]
    session_ids = {s.id for s in conv.sessions}
    out: list[Question] = []
    asked_at = conv.meta["latest_timestamp"]
    for mtype in MEMORY_TYPES:
        if not qa.has(mtype):
            continue
        groups = qa.get(mtype, list)
        flat: list[tuple[str | None, str, Any]] = []
        for g_i, group in enumerate(groups):
            where = f"{qa.at(mtype)}[{g_i}]"
            if mtype == "profile":
                flat.append((None, where, group))
                continue
            g = Fields(group, qa.path, where)
            for mem_id, records in g.obj.items():
                if not isinstance(records, list):
                    raise DatasetError(qa.path, g.at(mem_id), "expected a list of QA records")
                for r_i, rec in enumerate(records):
                    flat.append((mem_id, f"{g.at(mem_id)}[{r_i}]", rec))
        for mem_id, where, rec in flat:
            r = Fields(rec, qa.path, where)
            refs = _reference_ids(r.get("Reference Memory", str, list, required=False))
            if not refs and mem_id:
                refs = [mem_id]
            anchors = r.get("Memory Anchors", list, required=False, default=[])
            if mtype in ("profile", "social_relationship"):
                ev_sessions = [PROFILE_SESSION] if PROFILE_SESSION in session_ids else []
                ev_turns = [f"{PROFILE_SESSION}:{x}" for x in refs if mtype == "social_relationship"]
                if mtype == "profile" and ev_sessions:
                    ev_turns = [f"{PROFILE_SESSION}:profile"]
                ev_turns = [t for t in ev_turns if ev_sessions]
            else:
                ev_sessions = list(dict.fromkeys(s for x in refs for s in sources.get(x, [])))
                ev_turns = []
            out.append(
                Question(
                    id=f"{conv.id}/q{len(out)}",
                    conversation_id=conv.id,
                    question=r.text("Question") or "",
                    answer=r.text("Answer", allow_number=True) or "",
                    category=mtype,
                    category_id=None,
                    evidence_turns=tuple(ev_turns),
                    evidence_sessions=tuple(ev_sessions),
                    asked_at=asked_at,
                    meta={"reference_memory": refs, "memory_anchors": anchors, "character": name},
                )
            )
    return out
