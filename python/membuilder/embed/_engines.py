"""One table of compute engines per process, built at first use and made safe across ``fork``.

The onnxruntime engines (:mod:`membuilder.embed.fast_e5`) and the PyTorch one
(:mod:`membuilder.embed.torch_e5`) each hold weights and a thread pool that is expensive to build
and does not survive ``fork`` as it is. Both keep them in an :class:`EngineTable`: one engine per
key, built under a lock the first time it is asked for. At ``fork`` the table waits for runs in
progress in other threads (every engine's ``lock`` is taken), so the process is copied with every
engine idle; in the child, the table's lock is new and the engine kind's own ``in_child`` hook
decides what happens to the inherited engines (drop them, or keep them with fresh locks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar


class _Lockable(Protocol):
    lock: threading.Lock


E = TypeVar("E", bound=_Lockable)


class EngineTable(Generic[E]):
    """Engines by key, built by ``build(*key)`` at first use; ``in_child(engines)`` runs after a fork."""

    def __init__(self, build: Callable[..., E], in_child: Callable[[dict[Hashable, E]], None]) -> None:
        self._build = build
        self._in_child = in_child
        self.engines: dict[Hashable, E] = {}
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=self._before_fork,
                after_in_parent=self._after_fork_in_parent,
                after_in_child=self._after_fork_in_child,
            )

    def get(self, *key: Hashable) -> E:
        eng = self.engines.get(key)
        if eng is None:
            with self._lock:
                eng = self.engines.get(key)
                if eng is None:
                    eng = self.engines[key] = self._build(*key)
        return eng

    def _before_fork(self) -> None:
        self._lock.acquire()
        for eng in list(self.engines.values()):
            eng.lock.acquire()

    def _after_fork_in_parent(self) -> None:
        for eng in list(self.engines.values()):
            eng.lock.release()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._in_child(self.engines)
