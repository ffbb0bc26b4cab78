"""``membuilder qa-gen``: synthetic questions for every recorded session (the dense RL reward).

A strong model sees the memory as it was before a session (core block + stored memories) and the
session itself, and writes ``--per-session`` questions about what the session added, phrased as
the user would ask them, answerable from memory alone, each with a short gold answer and a type
(:data:`~membuilder.data.schemas.QA_TYPES`). Items are validated (shape, type, lengths,
duplicates); when fewer than asked survive, the model is asked again with the reasons, up to
``--max-attempts`` calls per session. Output: ``conversations/<id>/qa.jsonl`` beside the
trajectories, one :class:`~membuilder.data.schemas.SessionQA` line per session in session order,
rewritten atomically after each conversation. LLM calls carry the tag ``qa-gen``.

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
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from membuilder._core import MembuilderError
from membuilder._text import TooDeep, clean_json, loads_shallow
from membuilder.data._common import add_endpoint_arguments, make_llm, resolve_cache_dir, setup_logging
from membuilder.data._io import append_run_log, atomic_write_bytes
from membuilder.data.schemas import (
    QA_TYPES,
    QA_VERSION,
    QAItem,
    QARejection,
    SessionMeta,
    SessionQA,
    Usage,
    encode_json,
    read_jsonl,
)
from membuilder.data.trajectories import QA_FILE, RecordedConversation, iter_conversations, load_state

log = logging.getLogger("membuilder.data.qagen")

QA_TAG = "qa-gen"
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


def render_memory(core: str, memories: Sequence[tuple[str, str]], limit: int) -> str:
    """The ``<memory_before>`` block: the core block, then the newest ``limit`` memories."""
    shown = list(memories)[-limit:] if limit > 0 else []
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
    max_memories: int = 200,
) -> list[dict[str, str]]:
    """The qa-gen prompt for one session. ``memories`` are ``(kind, text)`` in id order."""
    from membuilder.agents.prompts import render_session

    user = "\n\n".join(
        [
            render_memory(core, memories, max_memories),
            render_session(session_messages, timestamp),
            f"Write exactly {n} questions about this session, following the rules.",
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
    max_memories: int = 200,
    temperature: float = 0.0,
) -> SessionQA:
    """Questions for one recorded session. Endpoint failures raise ``LLMError``; a model that
    never produces ``n`` valid items gives a record with ``error`` set."""
    state = load_state(root, session.state_before)
    memories = [(e.kind, e.text) for e in state.entries()]
    messages = build_qa_messages(
        core=state.core,
        memories=memories,
        session_messages=[_message_dict(m) for m in session.messages],
        timestamp=session.timestamp,
        n=n,
        max_memories=max_memories,
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


async def generate_qa(
    root: str | Path,
    llm: Any,
    *,
    n: int,
    model: str,
    max_attempts: int = 2,
    max_memories: int = 200,
    skip_existing: bool = False,
    overwrite: bool = False,
    workers: int = 4,
    conversation_ids: Sequence[str] | None = None,
) -> dict[str, int]:
    """QA for every committed session of every conversation under ``root``.

    Returns counts: sessions generated, sessions kept from an earlier run, questions, sessions
    with an error. Raises MembuilderError when QA already exists and neither ``skip_existing``
    nor ``overwrite`` is set.
    """
    root = Path(root)
    if n < 1:
        raise MembuilderError(f"--per-session must be at least 1, got {n}")
    convs = iter_conversations(root)
    if conversation_ids is not None:
        wanted = set(conversation_ids)
        convs = [c for c in convs if c.meta.conversation_id in wanted]
    counts = {"generated": 0, "kept": 0, "questions": 0, "sessions_with_error": 0}
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
        append_run_log(root, "qa-gen", conversation=conv.meta.conversation_id, generated=len(made))

    await asyncio.gather(*(one(c) for c in convs))
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write synthetic QA (question, gold answer, type) for every recorded session."
    parser.add_argument("--trajectories", type=Path, required=True, help="a trajectory directory")
    parser.add_argument("--per-session", type=int, default=5, help="questions per session (default 5)")
    add_endpoint_arguments(parser, model_flag="--model", model_help="the model that writes the questions")
    parser.add_argument(
        "--max-attempts", type=int, default=2, help="calls per session when items are invalid"
    )
    parser.add_argument("--max-memories", type=int, default=200, help="newest memories shown in the prompt")
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


def run(args: argparse.Namespace) -> int:
    from membuilder._errors import os_error_line
    from membuilder._lock import DirectoryLock
    from membuilder.data.trajectories import read_manifest

    setup_logging(getattr(args, "verbose", False))
    root = Path(args.trajectories)
    try:
        # Refuse before anything is created: a wrong path must not become a new directory.
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is a file, not a directory"
            raise MembuilderError(f"--trajectories {root} {what}")
        read_manifest(root)  # the same manifest checks as the exports (truncated, other version)
    except MembuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache_dir = resolve_cache_dir(args.cache_dir, root / ".llm_cache")

    async def main() -> dict[str, int]:
        llm = make_llm(args, cache_dir)
        try:
            with DirectoryLock(root, "trajectory directory"):
                return await generate_qa(
                    root,
                    llm,
                    n=args.per_session,
                    model=args.model,
                    max_attempts=args.max_attempts,
                    max_memories=args.max_memories,
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
    print(json.dumps(counts, sort_keys=True))
    return 0
