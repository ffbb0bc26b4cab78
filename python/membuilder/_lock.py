"""One writer per output directory: an exclusive advisory lock held for a whole run.

Two runs writing one directory used to interleave their lines (``agent_calls.jsonl`` with every
session twice) and repeat every model call. Each command that writes a directory takes
:class:`DirectoryLock` on it first. The lock is ``flock(2)`` on ``<dir>/.membuilder.lock``: the
kernel drops it when the process ends, however it ends (``kill -9`` included), so there is never
a stale lock to clear by hand. The holder writes its pid and command into the file so that a
refused run can say who holds it; the text is cleared on a clean exit.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from types import TracebackType

from membuilder.errors import DirectoryBusyError

LOCK_FILE = ".membuilder.lock"


class DirectoryLock:
    """``with DirectoryLock(path): ...`` — create ``path`` if needed and lock it, or raise
    :class:`DirectoryBusyError` naming the holder. Raises ``OSError`` when the directory cannot be
    created or written (a file in the way, a read-only mount)."""

    def __init__(self, directory: str | Path, what: str = "output directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise DirectoryBusyError(
                f"{self.directory}: {self.what} is in use by another membuilder process "
                f"(pid {holder}); wait for it to finish, or choose another directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        # Program and subcommand only: a later argument may be a key (--api-key=...).
        words = [os.path.basename(sys.argv[0])] if sys.argv and sys.argv[0] else []
        words += [a for a in sys.argv[1:2] if not a.startswith("-")]
        command = " ".join(words) or "python"
        os.pwrite(fd, f"{os.getpid()} ({command})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a finished run leaves an empty file: no stale pid to mislead
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> DirectoryLock:  # noqa: PYI034 (typing.Self needs 3.11; we support 3.10)
        return self.acquire()

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
