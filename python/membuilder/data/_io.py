"""File helpers of the data tools: content-addressed state files, conversation ids, the run log.

The crash-safe primitives (atomic writes, fsync of a directory) are :mod:`membuilder._files`."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from membuilder._files import fsync_dir, sha256_file
from membuilder.data.schemas import state_path

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


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
