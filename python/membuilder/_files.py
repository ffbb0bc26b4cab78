"""Crash-safe files, for every writer in the package: atomic replacement, and JSONL appended one
durable line at a time.

A run may be killed at any instant (SIGKILL included). The invariants:

* a file written with :func:`atomic_write_bytes`, :func:`write_json_atomic` or inside
  :func:`atomic_path` is either the old or the new version, never a mix (temp file + fsync + rename
  + fsync of the directory);
* the temp file is named like the core's (``.<name>.tmp-<pid>-<n>``), so
  :func:`remove_stale_temp_files` can tell a dead writer's leftover from a live one's by its pid;
* a line appended with :class:`JsonlAppender` is on disk when ``append`` returns (flush + fsync);
  a kill during the write can leave at most one torn last line, which :func:`read_jsonl` drops
  and :class:`JsonlAppender` cuts off before appending again. A damaged *complete* line is
  refused with :class:`DamagedFileError` (naming the file and line), never cut off with the
  lines after it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from membuilder._lock import LOCK_FILE
from membuilder._text import clean_text, loads_shallow
from membuilder.errors import DamagedFileError

__all__ = [
    "JsonlAppender",
    "atomic_path",
    "atomic_write_bytes",
    "fsync_dir",
    "read_jsonl",
    "remove_stale_temp_files",
    "sha256_file",
    "temp_path",
    "write_json_atomic",
]

# Distinguishes the temp files of one process (threads, or two writes of one name in a row).
_TEMP_SERIAL = itertools.count()


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (not every file system lets us open one)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """A fresh temp name beside ``path``, in the core's pattern ``.<name>.tmp-<pid>-<n>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_TEMP_SERIAL)}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` (durably), and on a normal exit it replaces ``p``.

    For writers that need a path rather than bytes (a parquet writer, a hard link). The temp file
    is removed whatever happens; the parent directory is created first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename: a crash leaves either the old
    file or the new one, never a torn one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (readers see the old or the new file)."""
    text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False, default=_default)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _valid_prefix(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of the complete lines and the byte length they span."""
    records: list[dict[str, Any]] = []
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # torn last line: no newline was written
        line = data[pos:end]
        if line.strip():
            # Every append writes its line and newline in one call, so a complete line that does
            # not parse was damaged after the fact (a NUL-filled block after a power loss, an
            # edit). Cutting the file there would drop every good line after it: refuse instead.
            try:
                rec = loads_shallow(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                lineno = data.count(b"\n", 0, pos) + 1
                raise DamagedFileError(
                    f"{path}: line {lineno} is not a JSON record ({type(exc).__name__}: "
                    f"{str(exc)[:120]}); remove or repair that line, then resume"
                ) from None
            if isinstance(rec, Mapping):
                records.append(dict(rec))
        pos = end + 1
        good = pos
    return records, good


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (``[]`` when it does not exist); a torn last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    return _valid_prefix(path)[0]


class JsonlAppender:
    """Appends JSON records to a file, each durable before ``append`` returns.

    Opening cuts off a torn last line left by a killed writer, so the file stays valid JSONL.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _, good = _valid_prefix(self.path)
            if good != self.path.stat().st_size:
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        # Held open for the appender's lifetime; closed by close() / __exit__.
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, record: Mapping[str, Any]) -> None:
        # clean_text: a lone surrogate anywhere in a record would make the UTF-8 write fail.
        line = clean_text(json.dumps(record, ensure_ascii=False, default=_default))
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> JsonlAppender:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_temp_files(directory: str | Path, also: tuple[str, ...] = ()) -> list[Path]:
    """Delete temporary files (``.<name>.tmp-<pid>-<n>``, written by the core and by :func:`temp_path`
    before the rename that publishes a file) whose writer is no longer running; returns what was removed.

    A kill or a full disk between the write and the rename leaves one behind. Called by a run that
    holds the directory's lock, so no live writer of this directory can own one either way; the
    pid check is a second guard for directories shared without the lock. ``also``: glob patterns
    of other temporary files (without a pid in their names) that the caller, holding the lock,
    knows to be stale.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.glob(".*.tmp-*"):
        pid_text = p.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or _alive(int(pid_text))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    for pattern in also:
        for p in directory.glob(pattern):
            if p.is_file() and p.name != LOCK_FILE:
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
