"""An embedding cache: on disk (SQLite) and in memory (LRU), keyed by model name, mode and text.

Only texts found in neither layer are sent to the wrapped embedder, each distinct text once per call.
The on-disk layer is one SQLite file, ``<cache_dir>/embeddings.sqlite3`` (WAL mode), so several
processes can share it and a crash loses at most the batch being written. A file SQLite cannot read is
moved aside (``.corrupt-<unix time>``), logged, and replaced by an empty cache; a stored vector of the
wrong size is logged and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from membuilder._core import InvalidArgumentError
from membuilder.embed.base import Embedder, as_text_list

__all__ = ["CachedEmbedder"]

logger = logging.getLogger("membuilder.embed")

_DB_NAME = "embeddings.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    model TEXT NOT NULL,
    mode TEXT NOT NULL,
    text_sha256 BLOB NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, mode, text_sha256)
) WITHOUT ROWID
"""
_SELECT_CHUNK = 500  # stays under SQLite's bound-parameter limit


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class CachedEmbedder:
    """Wraps an :class:`~membuilder.embed.Embedder`; same protocol, same vectors, fewer calls.

    Args:
        inner: the embedder that computes misses. Its ``name`` is part of every key, so caches of
            different models never mix.
        cache_dir: directory for ``embeddings.sqlite3`` (created if missing); ``None`` keeps only the
            in-memory layer.
        memory_items: capacity of the in-memory LRU (vectors), >= 0.

    Attributes ``hits`` and ``misses`` count texts (not calls) served from cache / sent to ``inner``.
    """

    def __init__(
        self, inner: Embedder, cache_dir: str | os.PathLike[str] | None, *, memory_items: int = 50_000
    ):
        if not isinstance(memory_items, int) or memory_items < 0:
            raise InvalidArgumentError(f"memory_items must be an int >= 0, got {memory_items!r}")
        self.inner = inner
        self.name = inner.name
        self.memory_items = memory_items
        self.hits = 0
        self.misses = 0
        self._lru: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self.path: Path | None = None
        if cache_dir is not None:
            directory = Path(cache_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / _DB_NAME
            self._open()

    @property
    def dim(self) -> int:
        return self.inner.dim

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r}, path={str(self.path) if self.path else None!r})"

    # -- the database ------------------------------------------------------------------------------

    def _open(self) -> None:
        assert self.path is not None
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            logger.warning(
                "embedding cache %s is unreadable (%s); moved to %s, starting empty", self.path, exc, aside
            )
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM embeddings LIMIT 1").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _close_db(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def close(self) -> None:
        """Close the database and the wrapped embedder's connections (if it has any).

        The embedder keeps working afterwards with its memory layer only.
        """
        self._close_db()
        inner_close = getattr(self.inner, "close", None)
        if callable(inner_close):
            inner_close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close` (closes the wrapped embedder's async connections too)."""
        self._close_db()
        inner_aclose = getattr(self.inner, "aclose", None)
        if callable(inner_aclose):
            await inner_aclose()
        else:
            inner_close = getattr(self.inner, "close", None)
            if callable(inner_close):
                inner_close()

    def __del__(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._close_db()

    def _db_get(self, mode: str, digests: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        if self._db is None or not digests:
            return found
        try:
            for start in range(0, len(digests), _SELECT_CHUNK):
                chunk = digests[start : start + _SELECT_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT text_sha256, dim, vector FROM embeddings WHERE model = ? AND mode = ? "
                    f"AND text_sha256 IN ({marks})",
                    (self.name, mode, *chunk),
                ).fetchall()
                for digest, dim, blob in rows:
                    if len(blob) != 4 * dim or dim < 1:
                        logger.warning(
                            "embedding cache: damaged vector for model %s; recomputing it", self.name
                        )
                        continue
                    found[bytes(digest)] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        except sqlite3.DatabaseError as exc:
            logger.warning("embedding cache %s: read failed (%s); recomputing", self.path, exc)
        return found

    def _db_put(self, mode: str, items: list[tuple[bytes, np.ndarray]]) -> None:
        if self._db is None or not items:
            return
        rows = [
            (self.name, mode, digest, int(vec.shape[0]), np.ascontiguousarray(vec, dtype="<f4").tobytes())
            for digest, vec in items
        ]
        try:
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO embeddings (model, mode, text_sha256, dim, vector) VALUES (?,?,?,?,?)",
                    rows,
                )
        except sqlite3.DatabaseError as exc:
            logger.warning(
                "embedding cache %s: write failed (%s); vectors kept in memory only", self.path, exc
            )

    # -- lookup ------------------------------------------------------------------------------------

    def _remember(self, mode: str, digest: bytes, vec: np.ndarray) -> None:
        if self.memory_items == 0:
            return
        key = (mode, digest)
        self._lru[key] = vec
        self._lru.move_to_end(key)
        while len(self._lru) > self.memory_items:
            self._lru.popitem(last=False)

    def _lookup(self, texts: list[str], mode: str) -> tuple[list[np.ndarray | None], list[str], list[bytes]]:
        """Vectors found (None where missing) and the distinct missing texts with their digests."""
        digests = [_digest(t) for t in texts]
        found: list[np.ndarray | None] = [None] * len(texts)
        with self._lock:
            unresolved: dict[bytes, list[int]] = {}
            for i, digest in enumerate(digests):
                vec = self._lru.get((mode, digest))
                if vec is not None:
                    self._lru.move_to_end((mode, digest))
                    found[i] = vec
                else:
                    unresolved.setdefault(digest, []).append(i)
            from_db = self._db_get(mode, list(unresolved))
            missing_texts: list[str] = []
            missing_digests: list[bytes] = []
            for digest, positions in unresolved.items():
                vec = from_db.get(digest)
                if vec is not None:
                    self._remember(mode, digest, vec)
                    for i in positions:
                        found[i] = vec
                else:
                    missing_texts.append(texts[positions[0]])
                    missing_digests.append(digest)
            self.hits += sum(1 for v in found if v is not None)
        return found, missing_texts, missing_digests

    def _store(
        self, mode: str, texts: list[str], digests: list[bytes], vectors: np.ndarray
    ) -> dict[bytes, np.ndarray]:
        if vectors.shape[0] != len(texts):
            raise RuntimeError(f"{self.inner!r} returned {vectors.shape[0]} vectors for {len(texts)} texts")
        fresh = {d: np.array(vectors[i], dtype=np.float32) for i, d in enumerate(digests)}
        with self._lock:
            self.misses += len(texts)
            for digest, vec in fresh.items():
                self._remember(mode, digest, vec)
            self._db_put(mode, list(fresh.items()))
        return fresh

    def _assemble(
        self, texts: list[str], found: list[np.ndarray | None], fresh: dict[bytes, np.ndarray]
    ) -> np.ndarray:
        dim = None
        for vec in found:
            if vec is not None:
                dim = vec.shape[0]
                break
        if dim is None:
            dim = next(iter(fresh.values())).shape[0] if fresh else self.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, text in enumerate(texts):
            vec = found[i]
            if vec is None:
                vec = fresh[_digest(text)]
            if vec.shape[0] != dim:
                raise RuntimeError(
                    f"cached vectors of {self.name} disagree in size ({vec.shape[0]} vs {dim})"
                )
            out[i] = vec
        return out

    def _embed_sync(self, texts: Sequence[str], mode: str) -> np.ndarray:
        items = as_text_list(texts)
        found, missing, digests = self._lookup(items, mode)
        fresh: dict[bytes, np.ndarray] = {}
        if missing:
            compute = self.inner.embed_queries if mode == "query" else self.inner.embed_passages
            fresh = self._store(mode, missing, digests, np.asarray(compute(missing), dtype=np.float32))
        return self._assemble(items, found, fresh)

    async def _embed_async(self, texts: Sequence[str], mode: str) -> np.ndarray:
        items = as_text_list(texts)
        found, missing, digests = self._lookup(items, mode)
        fresh: dict[bytes, np.ndarray] = {}
        if missing:
            compute = self.inner.aembed_queries if mode == "query" else self.inner.aembed_passages
            fresh = self._store(mode, missing, digests, np.asarray(await compute(missing), dtype=np.float32))
        return self._assemble(items, found, fresh)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed_sync(texts, "passage")

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed_sync(texts, "query")

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return await self._embed_async(texts, "passage")

    async def aembed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return await self._embed_async(texts, "query")
