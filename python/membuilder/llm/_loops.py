"""Async SDK clients bound to the event loop that uses them.

An ``httpx`` connection pool belongs to the loop that opened it. Library code is often driven by
successive ``asyncio.run`` calls (a synchronous facade, a notebook), so a client object must not reuse
one loop's pool in the next loop, and it must close each pool *before* its loop goes away — otherwise
the SDK's finaliser later tries to close it on a dead loop and logs errors.

:class:`PerLoop` keeps one client per running loop and parks a suspended async generator next to it.
``asyncio.run`` finalises every live async generator at shutdown (``loop.shutdown_asyncgens()``), which
runs the generator's ``finally`` and closes the client while its loop still runs. Loops driven by hand
must call ``loop.shutdown_asyncgens()`` before ``loop.close()`` for the same effect.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

C = TypeVar("C")

__all__ = ["PerLoop"]


async def _close_at_shutdown(client: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await client.close()


class PerLoop(Generic[C]):
    """``await per_loop.get()`` returns this loop's client, creating it with ``factory()`` first."""

    def __init__(self, factory: Callable[[], C]) -> None:
        self._factory = factory
        self._entries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[C, AsyncIterator[None]]]
        self._entries = weakref.WeakKeyDictionary()

    async def get(self) -> C:
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is None:
            client = self._factory()
            closer = _close_at_shutdown(client)
            self._entries[loop] = entry = (client, closer)
            await closer.__anext__()  # runs to the yield at once; registers with the loop's hooks
        return entry[0]

    async def aclose_current(self) -> None:
        """Close the client of the running loop, if there is one."""
        entry = self._entries.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()  # type: ignore[attr-defined]

    def forget_all(self) -> None:
        """Drop clients of other loops; their loops' shutdown still closes them."""
        self._entries = weakref.WeakKeyDictionary()
