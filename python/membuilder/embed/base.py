"""The embedder protocol and the small helpers every embedder shares."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Embedder", "as_text_list", "l2_normalize"]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors.

    ``embed_passages`` is for what is stored (memories), ``embed_queries`` for what is searched with;
    asymmetric models (e5) encode the two differently, symmetric ones identically. Both return an array
    of shape ``(len(texts), dim)``, dtype float32, C-contiguous, rows L2-normalised (an all-zero row can
    only come from an endpoint that returned one). An empty list gives shape ``(0, dim)``.
    ``name`` identifies the model (and settings) for caching: two embedders with the same name must
    produce the same vectors.
    """

    name: str
    dim: int

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray: ...

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray: ...

    async def aembed_queries(self, texts: Sequence[str]) -> np.ndarray: ...


class E5Modes:
    """The four embedding methods of an e5 model in terms of one ``_encode(texts, is_query)``:
    passages and queries differ only in e5's prefix, and the async twins run the (GIL-releasing)
    computation in a worker thread. Shared by both local e5 engines."""

    def _encode(self, texts: Sequence[str], is_query: bool) -> np.ndarray:
        raise NotImplementedError

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        """Embed memories/documents (``"passage: "`` mode). Shape ``(n, 384)``, float32, unit rows."""
        return self._encode(texts, False)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed search queries (``"query: "`` mode). Shape ``(n, 384)``, float32, unit rows."""
        return self._encode(texts, True)

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self._encode, as_text_list(texts), False)

    async def aembed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self._encode, as_text_list(texts), True)


def as_text_list(texts: Sequence[str]) -> list[str]:
    """Validate a batch of texts. Raises TypeError for a bare string or a non-string item."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("pass a list of texts, not a single string (wrap it: [text])")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return out


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as C-contiguous float32; zero rows stay zero."""
    out = np.array(matrix, dtype=np.float32, order="C", copy=True)  # never scale the caller's array
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out
