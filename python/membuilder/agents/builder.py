"""Building memory one session at a time with the four LLM agents.

For each session :class:`MemoryBuilder`:

1. embeds the session text once (as a query) and retrieves, for each bank, the ``retrieve_k``
   existing memories of that kind most similar to it;
2. runs the four agents concurrently (JSON mode, tag ``agent:<name>``); an output that fails the
   format gate is sent back with the rejection reasons, up to ``max_attempts`` calls in all; an
   agent whose last attempt still fails, or whose endpoint fails for good, is *skipped* and the
   reason recorded — a build never stops because one agent misbehaved;
3. plans all agents' actions against the state in one go (provenance: conversation, session index,
   timestamp, the session's turn ids), embeds every new text in one batch and commits once;
4. if the core block is now over its limit, condenses it (:mod:`membuilder.agents.compress`).

Nothing from a session reaches the state before step 3, so an exception (e.g. cancellation) in
steps 1-2 leaves the state exactly as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from membuilder._core import AGENTS, BANK_KINDS, InvalidArgumentError, ParseResult, Provenance, parse_actions
from membuilder.agents.compress import CompressionResult, compress_core
from membuilder.agents.prompts import (
    DEFAULT_CORE_LIMIT,
    render_agent_messages,
    render_rejection_feedback,
    session_query_text,
)


@dataclass
class AgentCall:
    """One agent's work on one session.

    ``messages`` is the prompt of the first attempt (what a trajectory records as the input);
    ``raw_output`` the last model reply (``None`` when no reply came back); ``parse`` the parse of
    that reply; ``attempts`` the number of model calls made; ``skipped`` true when none of them
    gave a usable output, with ``skip_reason`` saying why (``"format: ..."`` or ``"llm_error: ..."``);
    ``history`` one dict per attempt (raw output and rejection codes); ``usage`` summed tokens and
    how many replies came from the response cache.
    """

    agent: str
    messages: list[dict[str, str]]
    raw_output: str | None = None
    parse: ParseResult | None = None
    attempts: int = 0
    skipped: bool = False
    skip_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "cached_calls": 0}
    )

    @property
    def ok(self) -> bool:
        """True when the agent produced an output that passed the format gate."""
        return not self.skipped and self.parse is not None and self.parse.ok

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON files (the parse as its canonical actions JSON)."""
        return {
            "agent": self.agent,
            "messages": [dict(m) for m in self.messages],
            "raw_output": self.raw_output,
            "actions": self.parse.to_json() if self.parse is not None else None,
            "format_ok": self.ok,
            "attempts": self.attempts,
            "skipped": self.skipped,
            "skip_reason": self.skip_reason,
            "history": [dict(h) for h in self.history],
            "usage": dict(self.usage),
        }


@dataclass
class SessionResult:
    """What building one session did.

    ``calls`` has one :class:`AgentCall` per agent in the order core, episodic, semantic,
    procedural (empty for the raw-turn builder); ``report`` the state's commit report (``None``
    for the raw-turn builder, which inserts directly); ``added`` the ids of the new entries;
    ``compression`` set when the core block was condensed after the commit; ``retrieved`` the
    memories shown to each bank agent.
    """

    conversation_id: str
    session_index: int
    timestamp: str | None
    calls: list[AgentCall] = field(default_factory=list)
    report: Any = None
    added: list[int] = field(default_factory=list)
    compression: CompressionResult | None = None
    retrieved: dict[str, list[str]] = field(default_factory=dict)
    core_before: str = ""

    @property
    def skipped_agents(self) -> list[str]:
        return [c.agent for c in self.calls if c.skipped]

    def endpoint_failure(self) -> str | None:
        """Why this session must not count as built, or ``None``.

        An agent whose endpoint failed for good (after the client's retries), or a core compression
        that could not be made, leaves the memory short of what the model would have written: the
        session has to be built again once the endpoint is back. An agent whose *output* failed
        the format gate is different: that is the model's answer, recorded as data.
        """
        for call in self.calls:
            if call.skipped and (call.skip_reason or "").startswith("llm_error"):
                return f"agent {call.agent}: {call.skip_reason}"
        if self.compression is not None and self.compression.error:
            return f"core compression: {self.compression.error}"
        return None

    def call(self, agent: str) -> AgentCall:
        """The call of ``agent``; raises KeyError when this result has none."""
        for c in self.calls:
            if c.agent == agent:
                return c
        raise KeyError(agent)

    def to_dict(self) -> dict[str, Any]:
        report = None
        if self.report is not None:
            report = {
                "added": list(self.report.added),
                "retired": list(self.report.retired),
                "unmatched": [
                    {"agent": u.agent, "action_index": u.action_index, "old_text": u.old_text}
                    for u in self.report.unmatched
                ],
                "skipped": self.report.skipped,
                "core_changed": self.report.core_changed,
                "compression_due": self.report.compression_due,
            }
        return {
            "conversation_id": self.conversation_id,
            "session_index": self.session_index,
            "timestamp": self.timestamp,
            "calls": [c.to_dict() for c in self.calls],
            "report": report,
            "added": list(self.added),
            "compression": self.compression.to_dict() if self.compression else None,
            "retrieved": {k: list(v) for k, v in self.retrieved.items()},
            "core_before": self.core_before,
        }


def check_session_messages(session_messages: Any) -> list[Mapping[str, Any]]:
    """Validate session messages; raises InvalidArgumentError naming the first bad one."""
    if isinstance(session_messages, (str, bytes)) or not isinstance(session_messages, Sequence):
        raise InvalidArgumentError(
            "session_messages must be a list of dicts like {'role': 'user', 'content': '...'}, "
            f"got {type(session_messages).__name__}"
        )
    for i, m in enumerate(session_messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"session message {i} is a {type(m).__name__}, expected a dict")
        if not isinstance(m.get("content"), str):
            raise InvalidArgumentError(f"session message {i} has no 'content' string")
        role = m.get("role", "user")
        if role not in ("user", "assistant", "system"):
            raise InvalidArgumentError(
                f"session message {i} has role {role!r}; expected 'user' or 'assistant'"
            )
    return list(session_messages)


def session_turn_ids(session_messages: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(m["turn_id"]) for m in session_messages if m.get("turn_id")]


MAX_QUERY_CHARS = 8000
"""Longest retrieval query (characters) built from a session's text."""


def _core_limit(state: Any, override: int | None) -> int:
    if override is not None:
        return override
    # StateView has no core_limit of its own (it is its base's); fall back to the default.
    return int(getattr(state, "core_limit", DEFAULT_CORE_LIMIT))


def _empty_vectors(dim: int) -> np.ndarray:
    return np.zeros((0, dim), dtype=np.float32)


#: How the bank agents' existing memories are retrieved (see :func:`retrieve_for_agents`).
AGENT_RETRIEVAL = ("per_kind", "global_then_filter")


async def retrieve_for_agents(
    state: Any,
    embedder: Any,
    session_messages: Sequence[Mapping[str, Any]],
    k: int,
    mode: str = "per_kind",
) -> dict[str, list[str]]:
    """Existing memories of each bank kind for a session, best first (one embedder call).

    ``per_kind``: the top ``k`` of each kind. ``global_then_filter``: the top ``k`` over all kinds,
    then each agent keeps its own kind, so an agent often sees fewer than ``k`` (what the
    reference code does, ``memory_system.py``; the ``paper`` protocol).
    """
    if mode not in AGENT_RETRIEVAL:
        raise InvalidArgumentError(
            f"agent retrieval must be one of {', '.join(AGENT_RETRIEVAL)}, got {mode!r}"
        )
    retrieved: dict[str, list[str]] = {kind: [] for kind in BANK_KINDS}
    if k <= 0 or len(state) == 0:
        return retrieved
    # Capped so that a long session stays inside any embedding model's input limit (OpenAI's is
    # 8,191 tokens); the opening of a session says well enough what it is about.
    query_text = session_query_text(session_messages)[:MAX_QUERY_CHARS]
    query = await embedder.aembed_queries([query_text])
    q = np.ascontiguousarray(np.asarray(query, dtype=np.float32)[0])
    if mode == "global_then_filter":
        hits = state.search(q, k)
        found = [(int(i), int(kd)) for i, kd in zip(hits.ids, hits.kinds) if i >= 0]
        for (_, kind_index), text in zip(found, state.texts([i for i, _ in found])):
            if text is not None:
                retrieved[BANK_KINDS[kind_index]].append(text)
        return retrieved
    for kind in BANK_KINDS:
        if state.count(kind) == 0:
            continue
        hits = state.search(q, k, kind=kind)
        retrieved[kind] = [t for t in state.texts(hits.ids) if t is not None]
    return retrieved


class MemoryBuilder:
    """Builds memory with the four LLM agents, one session at a time.

    ``llm``: an ``LLMClient`` (or anything with the same async ``chat``); ``embedder``: an
    ``Embedder`` whose ``dim`` matches the state's; ``model``: the model name sent with each call
    (``None``: the client's default); ``max_attempts``: model calls per agent and session, >= 1;
    ``retrieve_k``: existing memories shown to each bank agent; ``core_limit``: the core block's
    limit in characters (default: the state's); ``compress``: condense the core block when over;
    ``retrieval``: ``per_kind`` or ``global_then_filter`` (see :func:`retrieve_for_agents`).
    """

    def __init__(
        self,
        llm: Any,
        embedder: Any,
        *,
        model: str | None = None,
        temperature: float = 0.0,
        max_attempts: int = 3,
        retrieve_k: int = 20,
        core_limit: int | None = None,
        compress: bool = True,
        max_tokens: int | None = None,
        retrieval: str = "per_kind",
    ) -> None:
        if retrieval not in AGENT_RETRIEVAL:
            raise InvalidArgumentError(
                f"retrieval must be one of {', '.join(AGENT_RETRIEVAL)}, got {retrieval!r}"
            )
        if max_attempts < 1:
            raise InvalidArgumentError(f"max_attempts must be at least 1, got {max_attempts}")
        if retrieve_k < 0:
            raise InvalidArgumentError(f"retrieve_k must be >= 0, got {retrieve_k}")
        if core_limit is not None and core_limit <= 0:
            raise InvalidArgumentError(f"core_limit must be positive, got {core_limit}")
        self.llm = llm
        self.embedder = embedder
        self.model = model
        self.temperature = temperature
        self.max_attempts = max_attempts
        self.retrieve_k = retrieve_k
        self.core_limit = core_limit
        self.compress = compress
        self.max_tokens = max_tokens
        self.retrieval = retrieval

    def render(
        self,
        state: Any,
        session_messages: Sequence[Mapping[str, Any]],
        timestamp: str | None,
        retrieved: Mapping[str, Sequence[str]],
    ) -> dict[str, list[dict[str, str]]]:
        """The four agents' prompts for a session, given what was retrieved."""
        limit = _core_limit(state, self.core_limit)
        return {
            agent: render_agent_messages(
                agent,
                core=state.core,
                retrieved=retrieved.get(agent, []),
                session_messages=session_messages,
                timestamp=timestamp,
                core_limit=limit,
            )
            for agent in AGENTS
        }

    async def run_agent(self, agent: str, messages: list[dict[str, str]]) -> AgentCall:
        """One agent's calls with the format gate and retries; never raises for model failures."""
        from membuilder.llm import LLMError

        call = AgentCall(agent=agent, messages=[dict(m) for m in messages])
        convo = list(call.messages)
        for _ in range(self.max_attempts):
            call.attempts += 1
            try:
                reply = await self.llm.chat(
                    convo,
                    model=self.model,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    json_mode=True,
                    tag=f"agent:{agent}",
                )
            except LLMError as exc:
                call.skipped = True
                call.skip_reason = f"llm_error: {exc}"
                call.history.append({"raw_output": None, "error": str(exc)})
                return call
            call.usage["prompt_tokens"] += int(reply.prompt_tokens or 0)
            call.usage["completion_tokens"] += int(reply.completion_tokens or 0)
            call.usage["cached_calls"] += int(bool(getattr(reply, "cached", False)))
            parse = parse_actions(agent, reply.text)
            call.raw_output, call.parse = reply.text, parse
            call.history.append({"raw_output": reply.text, "rejections": [r.code for r in parse.rejections]})
            if parse.ok:
                return call
            reasons = [
                (f"operation {r.index}: " if r.index is not None else "") + f"{r.code}: {r.message}"
                for r in parse.rejections
            ]
            convo = [
                *convo,
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": render_rejection_feedback(reasons)},
            ]
        call.skipped = True
        last = call.parse.rejections if call.parse is not None else []
        call.skip_reason = "format: " + "; ".join(f"{r.code}: {r.message}" for r in last[:5])
        return call

    async def build_session(
        self,
        state: Any,
        session_messages: Sequence[Mapping[str, Any]],
        *,
        conversation_id: str,
        session_index: int,
        timestamp: str | None,
    ) -> SessionResult:
        """Run the four agents on one session and apply their actions to ``state`` (a
        ``MemoryState`` or ``StateView``). Raises InvalidArgumentError for malformed messages or
        an embedder whose dimension differs from the state's, and whatever the embedder raises
        (e.g. LLMError from a remote embedder) — in every such case before anything of the session
        reached the state. Model failures are recorded in the result, never raised."""
        messages = check_session_messages(session_messages)
        if getattr(self.embedder, "dim", state.dim) != state.dim:
            raise InvalidArgumentError(
                f"embedder {getattr(self.embedder, 'name', '?')!r} has dim {self.embedder.dim}, "
                f"the state has dim {state.dim}"
            )
        result = SessionResult(
            conversation_id=str(conversation_id),
            session_index=int(session_index),
            timestamp=timestamp,
            core_before=state.core,
        )
        result.retrieved = await retrieve_for_agents(
            state, self.embedder, messages, self.retrieve_k, self.retrieval
        )
        prompts = self.render(state, messages, timestamp, result.retrieved)
        result.calls = list(await asyncio.gather(*(self.run_agent(a, prompts[a]) for a in AGENTS)))

        parses = [c.parse for c in result.calls if c.ok]
        provenance = Provenance(
            str(conversation_id), int(session_index), timestamp, session_turn_ids(messages)
        )
        plan = state.plan(parses, provenance)
        texts = list(plan.texts)
        vectors = (
            np.ascontiguousarray(await self.embedder.aembed_passages(texts), dtype=np.float32)
            if texts
            else _empty_vectors(state.dim)
        )
        result.report = state.commit(plan, vectors)
        result.added = list(result.report.added)

        limit = _core_limit(state, self.core_limit)
        if self.compress and (state.compression_due or len(state.core) > limit):
            result.compression = await compress_core(
                self.llm,
                state.core,
                limit=limit,
                model=self.model,
                max_attempts=self.max_attempts,
                temperature=self.temperature,
            )
            state.set_core(result.compression.text)
        return result
