"""The raw-turn baseline: every turn is stored verbatim as one episodic memory, no LLM involved.

It answers the question "how much do the agents add over plain retrieval of the dialogue?" and is
the cheapest way to get a searchable state from a conversation. Each entry reads
``"<session timestamp> | <speaker>: <text> [shares an image: <caption>]"`` and carries the turn's
id in its provenance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from membuilder._core import InvalidArgumentError, Provenance
from membuilder.agents.builder import SessionResult, check_session_messages
from membuilder.agents.prompts import message_speaker


def raw_turn_text(message: Mapping[str, Any], timestamp: str | None) -> str:
    """The memory text for one turn, prefixed with the session's timestamp when there is one."""
    text = " ".join(str(message.get("content", "")).split())
    caption = message.get("image_caption")
    if caption:
        text = f"{text} [shares an image: {' '.join(str(caption).split())}]".strip()
    body = f"{message_speaker(message)}: {text}"
    return f"{timestamp} | {body}" if timestamp else body


def _kept(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [m for m in messages if m["content"].strip() or m.get("image_caption")]


class RawTurnBuilder:
    """Stores each turn as one episodic entry; one embedder call per session, or one for many
    sessions with :meth:`prefetch`.

    Same ``build_session`` signature as :class:`MemoryBuilder`. Turns whose content (and caption)
    is empty are left out.
    """

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self._ready: dict[str, np.ndarray] = {}  # prefetched turn text -> vector

    async def prefetch(self, sessions: Iterable[tuple[Sequence[Mapping[str, Any]], str | None]]) -> None:
        """Embed the turns of many ``(messages, timestamp)`` sessions in one call, for the
        ``build_session`` calls that follow. One call lets the embedder sort the turns of all
        those sessions by length: on LongMemEval's long turns, a history's ~1,000 turns embed ~2x
        faster than session by session. Raises InvalidArgumentError for malformed messages."""
        texts = [
            raw_turn_text(m, ts) for messages, ts in sessions for m in _kept(check_session_messages(messages))
        ]
        new = [t for t in dict.fromkeys(texts) if t not in self._ready]
        if new:
            vectors = np.asarray(await self.embedder.aembed_passages(new), dtype=np.float32)
            self._ready.update(zip(new, vectors))

    async def build_session(
        self,
        state: Any,
        session_messages: Sequence[Mapping[str, Any]],
        *,
        conversation_id: str,
        session_index: int,
        timestamp: str | None,
    ) -> SessionResult:
        """Insert the session's turns into ``state``; raises InvalidArgumentError for malformed
        messages or an embedder whose dimension differs from the state's."""
        messages = check_session_messages(session_messages)
        if getattr(self.embedder, "dim", state.dim) != state.dim:
            raise InvalidArgumentError(f"embedder has dim {self.embedder.dim}, the state has dim {state.dim}")
        result = SessionResult(
            conversation_id=str(conversation_id),
            session_index=int(session_index),
            timestamp=timestamp,
            core_before=state.core,
        )
        kept = _kept(messages)
        if not kept:
            return result
        texts = [raw_turn_text(m, timestamp) for m in kept]
        provenances = [
            Provenance(
                str(conversation_id),
                int(session_index),
                timestamp,
                [str(m["turn_id"])] if m.get("turn_id") else [],
            )
            for m in kept
        ]
        if all(t in self._ready for t in texts):
            vectors = np.stack([self._ready[t] for t in texts])
            for t in texts:  # used: keep the memo no larger than what is still to come
                self._ready.pop(t, None)
        else:
            vectors = np.asarray(await self.embedder.aembed_passages(texts), dtype=np.float32)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        result.added = list(state.add_entries("episodic", texts, vectors, provenances))
        return result
