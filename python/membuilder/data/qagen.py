"""``membuilder qa-gen``: synthetic questions for every recorded session (the dense RL reward).

A strong model sees the memory as it was before a session (core block + stored memories) and the
session itself, and writes ``--per-session`` questions about what the session added, phrased as
the user would ask them, answerable from memory alone, each with a short gold answer and a type
(:data:`~membuilder.data.schemas.QA_TYPES`). Items are validated (shape, type, lengths,
duplicates); when fewer than asked survive, the model is asked again with the reasons, up to
``--max-attempts`` calls per session. Output: ``conversations/<id>/qa.jsonl`` beside the
trajectories, one :class:`~membuilder.data.schemas.SessionQA` line per session in session order,
rewritten atomically after each conversation; ``qa_manifest.json`` beside the trajectories
records the settings and the protocol. LLM calls carry the tag ``qa-gen``.

Under the ``paper`` protocol (the default) this follows the paper's code (``prepare_rl_data.py
--add-qa``): 5 questions per session, temperature 0, every memory of the state before the session,
the 50/30/20 single-session / multi-session / temporal mix asked for in the prompt (and, as there,
not counted), one call per session. ``membuilder`` shows the newest 200 memories, asks for no mix
and asks again for missing questions.

Expected model output (JSON mode)::

    {"questions": [{"question": "...", "answer": "...", "type": "single-session",
                    "evidence": ["<turn id>", ...]}]}

``evidence`` is optional and kept when given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from membuilder._core import BANK_KINDS, MembuilderError
from membuilder._files import atomic_write_bytes
from membuilder._text import TooDeep, clean_json, loads_shallow
from membuilder.data._common import add_model_arguments, make_llm, resolve_cache_dir, setup_logging
from membuilder.data._io import append_run_log
from membuilder.data.schemas import (
    QA_TYPES,
    QA_VERSION,
    QAItem,
    QAManifest,
    QARejection,
    SessionMeta,
    SessionQA,
    Usage,
    decode_versioned,
    encode_json,
    read_jsonl,
)
from membuilder.data.trajectories import QA_FILE, RecordedConversation, iter_conversations, load_state
from membuilder.protocol import Protocol, add_protocol_argument, get_protocol

log = logging.getLogger("membuilder.data.qagen")

QA_TAG = "qa-gen"
QA_MANIFEST_FILE = "qa_manifest.json"
MAX_QUESTION_CHARS = 400
MAX_ANSWER_CHARS = 400

QA_SYSTEM = """\
You write test questions for a personal assistant's long-term memory.

The assistant keeps memories of its conversations with one user: a core block about the user, \
and stored memories that it searches with the question as the query. It will later be asked \
your questions WITHOUT the conversation transcript: only what it stored, found by search. Your \
questions check that the conversation session shown to you was remembered well.

Rules for every question:
1. Write it as the user would ask the assistant, in the first person ("When did I ...?", \
"What is my ...?"), never "the user".
2. It must be about something this session says: new information, or something that changes \
what the memory already held. It may combine the session with earlier memories.
3. It must carry concrete anchors (names, places, things, activities, dates) so that a search \
over the memories can find the answer.
4. It asks for a fact with one short, clear answer: not an opinion, a feeling or a yes/no.
5. The gold answer is short (a few words or one sentence); write dates as absolute dates.
6. Its type is one of:
   - "single-session": answered by this session alone;
   - "multi-session": needs this session together with earlier memories (counting, comparing, \
combining);
   - "temporal-reasoning": needs reasoning about dates, durations or the order of events;
   - "knowledge-update": asks for the current value of something this session changed.
7. "evidence" lists the ids (in square brackets in the transcript) of the turns that support \
the answer.

Reply with JSON only, in this shape:
{"questions": [{"question": "...", "answer": "...", "type": "single-session", "evidence": ["..."]}]}"""


#: The protocol's type-mix keys (:attr:`membuilder.protocol.Protocol.qa_type_mix`) as QA types.
MIX_TYPES: dict[str, str] = {
    "single_session": "single-session",
    "multi_session": "multi-session",
    "temporal": "temporal-reasoning",
    "knowledge_update": "knowledge-update",
}


def mix_targets(mix: Mapping[str, float], n: int) -> dict[str, tuple[int, int]]:
    """``{qa type: (fewest, most)}`` questions of each type out of ``n`` for a target ``mix`` of
    shares: the share's count rounded down and up (5 at 50/30/20 gives 2-3, 1-2 and 1)."""
    out = {}
    for key, share in mix.items():
        exact = n * float(share)
        out[MIX_TYPES.get(key, key)] = (math.floor(exact + 1e-9), math.ceil(exact - 1e-9))
    return out


def _mix_by_type(mix: Mapping[str, float] | None) -> dict[str, float]:
    """A mix keyed by QA type name (what the records hold), from protocol keys."""
    return {MIX_TYPES.get(k, k): float(v) for k, v in (mix or {}).items()}


def describe_type_mix(mix: Mapping[str, float] | None, n: int) -> str:
    """The sentence asking for the target mix, or ``""`` when there is none.

    The mix is asked for in the prompt only, and the reply is not counted against it: the reference
    (``qa_generator.py``) states its target distribution in the prompt and keeps whatever types
    come back, so a model that strays from the mix produces a set that strays too (recorded in
    each session's ``type_counts``)."""
    if not mix:
        return ""
    parts = []
    for (qa_type, (lo, hi)), share in zip(mix_targets(mix, n).items(), mix.values()):
        count = str(lo) if lo == hi else f"{lo} to {hi}"
        parts.append(f"{count} {qa_type} ({round(float(share) * 100)}%)")
    return f"Spread the {n} questions over the types roughly like this: " + ", ".join(parts) + "."


def _newest(memories: Sequence[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    if limit is None:
        return list(memories)
    return list(memories)[-limit:] if limit > 0 else []


def render_memory(core: str, memories: Sequence[tuple[str, str]], limit: int | None) -> str:
    """The ``<memory_before>`` block: the core block, then the newest ``limit`` memories (``None``:
    all of them)."""
    shown = _newest(memories, limit)
    omitted = len(memories) - len(shown)
    lines = ["<memory_before>", "<core>", core.strip() or "(empty)", "</core>", "<memories>"]
    if omitted:
        lines.append(f"({omitted} older memories not shown)")
    lines.extend(f"- [{kind}] {text}" for kind, text in shown)
    if not shown:
        lines.append("(none)")
    lines += ["</memories>", "</memory_before>"]
    return "\n".join(lines)


def build_qa_messages(
    *,
    core: str,
    memories: Sequence[tuple[str, str]],
    session_messages: Sequence[dict[str, Any]],
    timestamp: str | None,
    n: int,
    max_memories: int | None = 200,
    type_mix: Mapping[str, float] | None = None,
) -> list[dict[str, str]]:
    """The qa-gen prompt for one session. ``memories`` are ``(kind, text)`` in id order;
    ``max_memories`` the newest shown (``None``: all); ``type_mix`` the target mix of types
    (:func:`describe_type_mix`)."""
    from membuilder.agents.prompts import describe_date, format_turn, render_session
    from membuilder.prompt_templates import active_templates, render_template

    mix = describe_type_mix(type_mix, n)
    templates = active_templates()
    if templates is not None and templates.has("qa"):
        shown = _newest(memories, max_memories)
        by_kind = {k: "\n".join(t for kind, t in shown if kind == k) or "(none)" for k in BANK_KINDS}
        custom = render_template(
            "qa",
            {
                "session": "\n".join(format_turn(m, i) for i, m in enumerate(session_messages)),
                "session_date": timestamp or "unknown",
                "session_day": describe_date(timestamp),
                "num_questions": n,
                "core_memory": core,
                "memories": "\n".join(f"- [{kind}] {text}" for kind, text in shown) or "(none)",
                "episodic_memories": by_kind["episodic"],
                "semantic_memories": by_kind["semantic"],
                "procedural_memories": by_kind["procedural"],
                "type_mix": mix,
            },
        )
        if custom is not None:
            return custom
    ask = f"Write exactly {n} questions about this session, following the rules."
    user = "\n\n".join(
        [
            render_memory(core, memories, max_memories),
            render_session(session_messages, timestamp),
            f"{ask} {mix}" if mix else ask,
        ]
    )
    return [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def _extract_json(text: str) -> Any:
    """The reply's JSON, with lone surrogates cleaned; ValueError when there is none or it nests
    too deeply to parse (a reply is data: the caller records the reason)."""
    text = text.strip()
    m = _FENCE.search(text)
    if m:
        text = m.group(1).strip()
    try:
        return clean_json(loads_shallow(text))
    except TooDeep:
        raise
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start >= 0 and end > start:
            return clean_json(loads_shallow(text[start : end + 1]))
        raise


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def validate_items(
    raw: str, *, n: int, seen: set[str]
) -> tuple[list[dict[str, Any]], list[QARejection], str | None]:
    """Validate one model reply. Returns (valid items, rejected items, whole-reply problem).

    ``seen`` holds normalised questions already accepted (updated in place); duplicates of them are
    rejected. At most ``n`` items are accepted in all.
    """
    try:
        data = _extract_json(raw)
    except (json.JSONDecodeError, ValueError) as exc:
        return [], [], f"no JSON object in the reply ({exc})"
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict) and isinstance(data.get("questions"), list):
        items = data["questions"]
    else:
        return [], [], "expected an object with a 'questions' list"
    valid: list[dict[str, Any]] = []
    rejected: list[QARejection] = []
    for item in items:
        reason = None
        if not isinstance(item, dict):
            reason = "not an object"
        else:
            q, a, t = item.get("question"), item.get("answer"), item.get("type")
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                a = str(a)
            ev = item.get("evidence", [])
            if not isinstance(q, str) or not q.strip():
                reason = "missing or empty 'question'"
            elif not isinstance(a, str) or not a.strip():
                reason = "missing or empty 'answer'"
            elif t not in QA_TYPES:
                reason = f"'type' must be one of {', '.join(QA_TYPES)}, got {t!r}"
            elif len(q) > MAX_QUESTION_CHARS:
                reason = f"question longer than {MAX_QUESTION_CHARS} characters"
            elif len(a) > MAX_ANSWER_CHARS:
                reason = f"answer longer than {MAX_ANSWER_CHARS} characters"
            elif not isinstance(ev, list) or not all(isinstance(e, (str, int)) for e in ev):
                reason = "'evidence' must be a list of turn ids"
            elif _norm(q) in seen:
                reason = "duplicate question"
            elif len(seen) >= n:
                reason = f"more than {n} questions"
        if reason is not None:
            rejected.append(QARejection(item, reason))
            continue
        seen.add(_norm(item["question"]))
        valid.append(
            {
                "question": item["question"].strip(),
                "answer": str(a).strip(),
                "type": item["type"],
                "evidence": [str(e) for e in item.get("evidence", [])],
            }
        )
    return valid, rejected, None


def _feedback(missing: int, problems: list[str]) -> str:
    listed = "\n".join(f"- {p}" for p in problems[:10]) or "- (none)"
    return (
        f"{missing} more question(s) are needed. Problems with your reply:\n{listed}\n"
        "Reply with the JSON object again, containing only new, valid questions."
    )


async def generate_session_qa(
    llm: Any,
    *,
    root: Path,
    conversation_id: str,
    session: SessionMeta,
    n: int,
    model: str,
    max_attempts: int = 2,
    max_memories: int | None = 200,
    temperature: float = 0.0,
    type_mix: Mapping[str, float] | None = None,
    protocol: str | None = None,
) -> SessionQA:
    """Questions for one recorded session. Endpoint failures raise ``LLMError``; a model that
    never produces ``n`` valid items gives a record with ``error`` set. The memory shown is the
    state before the session (``max_memories`` newest entries, ``None``: all of them)."""
    from membuilder.prompt_templates import templates_record

    state = load_state(root, session.state_before)
    memories = [(e.kind, e.text) for e in state.entries()]
    messages = build_qa_messages(
        core=state.core,
        memories=memories,
        session_messages=[_message_dict(m) for m in session.messages],
        timestamp=session.timestamp,
        n=n,
        max_memories=max_memories,
        type_mix=type_mix,
    )
    seen: set[str] = set()
    accepted: list[dict[str, Any]] = []
    rejected: list[QARejection] = []
    raws: list[str] = []
    usage = Usage()
    attempts = 0
    convo = list(messages)
    while attempts < max_attempts and len(accepted) < n:
        attempts += 1
        reply = await llm.chat(convo, model=model, temperature=temperature, json_mode=True, tag=QA_TAG)
        usage = Usage(
            usage.prompt_tokens + reply.prompt_tokens, usage.completion_tokens + reply.completion_tokens
        )
        raws.append(reply.text)
        valid, bad, problem = validate_items(reply.text, n=n, seen=seen)
        accepted.extend(valid)
        rejected.extend(bad)
        problems = ([problem] if problem else []) + [f"{r.reason}: {json.dumps(r.item)[:200]}" for r in bad]
        convo = [
            *convo,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": _feedback(n - len(accepted), problems)},
        ]
    questions = [
        QAItem(
            id=f"{conversation_id}:{session.index}:{k}",
            question=item["question"],
            answer=item["answer"],
            type=item["type"],
            asked_at=session.timestamp,
            evidence=item["evidence"],
        )
        for k, item in enumerate(accepted)
    ]
    error = (
        None if len(questions) >= n else f"{len(questions)} valid question(s) of {n} after {attempts} call(s)"
    )
    return SessionQA(
        conversation_id=conversation_id,
        session_index=session.index,
        model=model,
        state_before=session.state_before,
        questions=questions,
        rejected=rejected,
        raw_outputs=raws,
        attempts=attempts,
        usage=usage,
        error=error,
        protocol=protocol,
        temperature=temperature,
        memories_shown=len(_newest(memories, max_memories)),
        memories_total=len(memories),
        type_mix=_mix_by_type(type_mix),
        type_counts={t: c for t in QA_TYPES if (c := sum(1 for q in questions if q.type == t))},
        prompt_templates=templates_record(),
    )


def _message_dict(m: Any) -> dict[str, Any]:
    d = {"role": m.role, "content": m.content}
    if m.speaker is not None:
        d["speaker"] = m.speaker
    if m.turn_id is not None:
        d["turn_id"] = m.turn_id
    return d


def read_qa(conv_dir: str | Path) -> list[SessionQA]:
    """The QA records of one conversation (empty when it has none yet)."""
    path = Path(conv_dir) / QA_FILE
    if not path.exists():
        return []
    return read_jsonl(path, SessionQA, QA_VERSION, what="session QA")


def read_qa_manifest(root: str | Path) -> QAManifest | None:
    """The settings the QA under ``root`` was made with (``None``: no QA, or QA made before
    ``qa_manifest.json`` existed)."""
    path = Path(root) / QA_MANIFEST_FILE
    if not path.exists():
        return None
    return decode_versioned(path.read_bytes(), QAManifest, QA_VERSION, what="QA manifest", path=path)


async def generate_qa(
    root: str | Path,
    llm: Any,
    *,
    n: int,
    model: str,
    max_attempts: int = 2,
    max_memories: int | None = 200,
    skip_existing: bool = False,
    overwrite: bool = False,
    workers: int = 4,
    conversation_ids: Sequence[str] | None = None,
    temperature: float = 0.0,
    type_mix: Mapping[str, float] | None = None,
    protocol: Protocol | None = None,
) -> dict[str, Any]:
    """QA for every committed session of every conversation under ``root``.

    Returns counts: sessions generated, sessions kept from an earlier run, questions, sessions
    with an error, and the types of all questions. Raises MembuilderError when QA already exists
    and neither ``skip_existing`` nor ``overwrite`` is set, or when ``skip_existing`` would add
    to QA made with other settings (``qa_manifest.json``). ``protocol`` is recorded (default:
    a ``membuilder`` record overridden by the settings given).
    """
    from membuilder.prompt_templates import templates_record

    root = Path(root)
    if n < 1:
        raise MembuilderError(f"--per-session must be at least 1, got {n}")
    if max_memories is not None and max_memories < 0:
        raise MembuilderError(f"--max-memories must be 'all' or at least 0, got {max_memories}")
    if protocol is None:
        protocol = get_protocol("membuilder").with_overrides(
            qa_per_session=n,
            qa_temperature=temperature,
            qa_memory_scope="all" if max_memories is None else str(max_memories),
            qa_type_mix=dict(type_mix or {}),
        )
    manifest = QAManifest(
        model=model,
        per_session=n,
        temperature=temperature,
        max_attempts=max_attempts,
        max_memories=max_memories,
        type_mix=_mix_by_type(type_mix),
        protocol=protocol.record(),
        prompt_templates=templates_record(),
    )
    manifest_path = root / QA_MANIFEST_FILE
    old = None if overwrite else read_qa_manifest(root)
    if old is not None:
        diff = [f for f in manifest.__struct_fields__ if getattr(old, f) != getattr(manifest, f)]
        if diff:
            raise MembuilderError(
                f"{manifest_path}: the QA there was made with other settings ({', '.join(diff)}); "
                "pass --overwrite to redo it or use the same settings"
            )
    convs = iter_conversations(root)
    if conversation_ids is not None:
        wanted = set(conversation_ids)
        convs = [c for c in convs if c.meta.conversation_id in wanted]
    counts: dict[str, Any] = {"generated": 0, "kept": 0, "questions": 0, "sessions_with_error": 0}
    types: dict[str, int] = {}
    atomic_write_bytes(manifest_path, encode_json(manifest) + b"\n")
    sem = asyncio.Semaphore(max(1, workers))

    async def one(conv: RecordedConversation) -> None:
        existing = read_qa(conv.dir)
        if existing and not (skip_existing or overwrite):
            raise MembuilderError(
                f"{conv.dir / QA_FILE} exists; pass --skip-existing to complete it or --overwrite to redo it"
            )
        have = {} if overwrite else {r.session_index: r for r in existing}
        todo = [s for s in conv.meta.sessions if s.index not in have]
        async with sem:
            made = await asyncio.gather(
                *(
                    generate_session_qa(
                        llm,
                        root=root,
                        conversation_id=conv.meta.conversation_id,
                        session=s,
                        n=n,
                        model=model,
                        max_attempts=max_attempts,
                        max_memories=max_memories,
                        temperature=temperature,
                        type_mix=type_mix,
                        protocol=protocol.label,
                    )
                    for s in todo
                )
            )
        records = dict(have)
        records.update({r.session_index: r for r in made})
        ordered = [records[i] for i in sorted(records)]
        atomic_write_bytes(conv.dir / QA_FILE, b"".join(encode_json(r) + b"\n" for r in ordered))
        counts["generated"] += len(made)
        counts["kept"] += len(ordered) - len(made)
        counts["questions"] += sum(len(r.questions) for r in ordered)
        counts["sessions_with_error"] += sum(1 for r in ordered if r.error)
        for r in ordered:
            for q in r.questions:
                types[q.type] = types.get(q.type, 0) + 1
        append_run_log(root, "qa-gen", conversation=conv.meta.conversation_id, generated=len(made))

    await asyncio.gather(*(one(c) for c in convs))
    counts["types"] = dict(sorted(types.items()))
    return counts


def parse_type_mix(text: str) -> dict[str, float]:
    """``--type-mix``: ``none``, or ``type=share`` pairs separated by commas (``single_session=0.5,
    multi_session=0.3,temporal=0.2``; QA type names such as ``single-session`` work too). Shares
    must be positive and add up to 1. Raises ``ValueError`` with a one-line reason."""
    if text.strip().lower() in ("none", ""):
        return {}
    names = {v: k for k, v in MIX_TYPES.items()}
    mix: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = names.get(key.strip(), key.strip())
        if not sep or key not in MIX_TYPES:
            raise ValueError(
                f"--type-mix: expected type=share with a type of {', '.join(MIX_TYPES)}, got {part!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"--type-mix: {value.strip()!r} is not a number") from None
        if not share > 0:
            raise ValueError(f"--type-mix: the share of {key} must be positive")
        mix[key] = share
    if abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"--type-mix: the shares add up to {sum(mix.values()):g}, not 1")
    return mix


def _memory_scope(value: str) -> str:
    if value != "all" and not (value.isdigit()):
        raise argparse.ArgumentTypeError(f"expected 'all' or a number of memories, got {value!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from membuilder.prompt_templates import add_prompt_templates_argument

    parser.description = "Write synthetic QA (question, gold answer, type) for every recorded session."
    parser.add_argument("--trajectories", type=Path, required=True, help="a trajectory directory")
    add_protocol_argument(parser)
    parser.add_argument(
        "--per-session", type=int, default=None, help="questions per session (default: the protocol's, 5)"
    )
    add_model_arguments(
        parser,
        model_flag="--model",
        model_help="the model that writes the questions (default: the protocol's, claude-opus-4-5)",
        required=False,
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the protocol's, 0)"
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="calls per session when items are invalid (default: the protocol's; paper 1, membuilder 2)",
    )
    parser.add_argument(
        "--max-memories",
        type=_memory_scope,
        default=None,
        metavar="N|all",
        help="memories of the state before the session shown in the prompt: the newest N, or all "
        "(default: the protocol's; paper all, membuilder 200)",
    )
    parser.add_argument(
        "--type-mix",
        default=None,
        metavar="SPEC|none",
        help="target question-type mix asked for in the prompt, e.g. "
        "single_session=0.5,multi_session=0.3,temporal=0.2 (default: the protocol's; paper that, "
        "membuilder none)",
    )
    add_prompt_templates_argument(parser)
    parser.add_argument(
        "--conv-id", action="append", default=None, help="only this conversation (repeatable)"
    )
    parser.add_argument("--workers", type=int, default=4, help="conversations at once")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--skip-existing", action="store_true", help="keep existing QA, generate what is missing"
    )
    group.add_argument("--overwrite", action="store_true", help="regenerate all QA")
    parser.add_argument("-v", "--verbose", action="store_true")


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    """The protocol named by ``--protocol`` with the QA flags given as recorded overrides."""
    mix = None if args.type_mix is None else parse_type_mix(args.type_mix)
    return get_protocol(args.protocol).with_overrides(
        qa_model=args.model,
        qa_per_session=args.per_session,
        qa_temperature=args.temperature,
        qa_max_attempts=args.max_attempts,
        qa_memory_scope=args.max_memories,
        qa_type_mix=mix,
    )


def run(args: argparse.Namespace) -> int:
    from membuilder._lock import DirectoryLock
    from membuilder.data.trajectories import read_manifest
    from membuilder.errors import os_error_line
    from membuilder.prompt_templates import load_prompt_templates, use_templates

    setup_logging(getattr(args, "verbose", False))
    root = Path(args.trajectories)
    try:
        # Refuse before anything is created: a wrong path must not become a new directory.
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is a file, not a directory"
            raise MembuilderError(f"--trajectories {root} {what}")
        read_manifest(root)  # the same manifest checks as the exports (truncated, other version)
        protocol = resolve_protocol(args)
        templates = load_prompt_templates(args.prompt_templates) if args.prompt_templates else None
    except (ValueError, MembuilderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.model = protocol.qa_model
    scope = protocol.qa_memory_scope
    cache_dir = resolve_cache_dir(args.cache_dir, root / ".llm_cache")

    async def main() -> dict[str, Any]:
        llm = make_llm(args, cache_dir)
        try:
            with DirectoryLock(root, "trajectory directory"), use_templates(templates):
                return await generate_qa(
                    root,
                    llm,
                    n=protocol.qa_per_session,
                    model=protocol.qa_model,
                    max_attempts=protocol.qa_max_attempts,
                    max_memories=None if scope == "all" else int(scope),
                    temperature=protocol.qa_temperature,
                    type_mix=dict(protocol.qa_type_mix),
                    protocol=protocol,
                    skip_existing=args.skip_existing,
                    overwrite=args.overwrite,
                    workers=args.workers,
                    conversation_ids=args.conv_id,
                )
        finally:
            await llm.aclose()

    try:
        counts = asyncio.run(main())
    except MembuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        line, code = os_error_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(
            "interrupted; QA of finished conversations is saved, rerun with --skip-existing",
            file=sys.stderr,
        )
        return 130
    counts["protocol"] = protocol.label
    print(json.dumps(counts, sort_keys=True))
    return 0
