"""A deterministic hashed bag-of-words embedder: no model, no download, instant.

It is not a semantic model — two texts are close when they share words — but it is stable across
processes and platforms, which makes it the embedder of choice for tests and for the scripted server's
``/v1/embeddings``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from membuilder.embed.base import as_text_list

__all__ = ["HashingEmbedder", "hashed_bow_matrix", "hashed_bow_vector"]

_WORD = re.compile(r"\w+", re.UNICODE)


def hashed_bow_vector(text: str, dim: int) -> np.ndarray:
    """The L2-normalised float32 vector of ``text``: each lower-cased word adds ±1 at a hashed index.

    A text without words maps to the vector of a fixed placeholder token, so every output has unit norm.
    Raises ``ValueError`` for ``dim < 1``.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    vec = np.zeros(dim, dtype=np.float32)
    words = _WORD.findall(text.lower()) or ["\x00empty"]
    for word in words:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        h = int.from_bytes(digest, "little")
        vec[h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:  # every word cancelled out: fall back to the placeholder direction
        return hashed_bow_vector("", dim)
    vec /= norm
    return vec


def hashed_bow_matrix(texts: Sequence[str], dim: int) -> np.ndarray:
    """Stack :func:`hashed_bow_vector` for each text: shape ``(len(texts), dim)``, float32."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i] = hashed_bow_vector(text, dim)
    return out


class HashingEmbedder:
    """:class:`~membuilder.embed.Embedder` over :func:`hashed_bow_vector` (queries and passages alike)."""

    def __init__(self, dim: int = 256) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.name = f"hash-bow-{dim}"

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return hashed_bow_matrix(as_text_list(texts), self.dim)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return hashed_bow_matrix(as_text_list(texts), self.dim)

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_passages(texts)

    async def aembed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_queries(texts)

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"
