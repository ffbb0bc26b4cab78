"""Crash-safe files for the runner: atomic JSON, and JSONL appended one durable line at a time.

A run may be killed at any instant (SIGKILL included). The invariants:

* a JSON file written with :func:`write_json_atomic` is either the old or the new version, never
  a mix (temp file + fsync + rename + fsync of the directory);
* a line appended with :class:`JsonlAppender` is on disk when ``append`` returns (flush + fsync);
  a kill during the write can leave at most one torn last line, which :func:`read_jsonl` drops
  and :class:`JsonlAppender` cuts off before appending again. A damaged *complete* line is
  refused with :class:`DamagedFileError` (naming the file and line), never cut off with the
  lines after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from membuilder._text import clean_text, loads_shallow
from membuilder.errors import DamagedFileError


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (readers see the old or the new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2, sort_keys=False, default=_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
