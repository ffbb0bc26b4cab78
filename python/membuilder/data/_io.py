"""File helpers shared by the data tools: atomic writes and content-addressed state files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from membuilder.data.schemas import state_path

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is; not every platform lets us open one.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename: a crash leaves either the old
    file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_state(state: Any, root: str | Path) -> str:
    """Save ``state`` (a ``MemoryState``) under ``root/states/`` named by the sha256 of its bytes.

    Returns the digest. A state whose bytes are already stored is not written twice, which is what
    makes the (identical) empty start of every conversation cost one file.
    """
    states = Path(root) / "states"
    states.mkdir(parents=True, exist_ok=True)
    tmp = states / f".{uuid.uuid4().hex}.tmp.mbstate"
    try:
        state.save(tmp)
        digest = sha256_file(tmp)
        target = state_path(root, digest)
        if target.exists():
            tmp.unlink()
        else:
            os.replace(tmp, target)
            fsync_dir(states)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def check_id(conversation_id: str) -> str:
    """A conversation id used as a directory name must be a plain file name."""
    if not _SAFE_ID.match(conversation_id) or conversation_id in {".", ".."}:
        raise ValueError(
            f"conversation id {conversation_id!r} cannot be used as a directory name "
            "(allowed: letters, digits, '.', '_', '-'; at most 200 characters)"
        )
    return conversation_id


def append_run_log(root: str | Path, event: str, **fields: Any) -> None:
    """Append one line to ``root/run_log.jsonl``; the only output that carries wall-clock times."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    path = Path(root) / "run_log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
