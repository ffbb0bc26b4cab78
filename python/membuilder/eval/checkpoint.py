"""Per-conversation memory checkpoints in a ``--db-path`` directory.

After every session the runner saves the conversation's state to a new file
``<conv>.s<NNNN>.state`` (``NNNN`` = sessions built) and then atomically rewrites
``<conv>.progress.json`` to point at it; only then is the previous state file removed. A run
killed at any instant therefore finds a progress file that names a complete state whose sessions
are exactly those it records, and resumes with the next session. A state file newer than the
progress file (killed between the two writes) is simply overwritten on resume.

A session whose agent call failed for good at the endpoint is never checkpointed: building that
conversation stops, ``<conv>.failed.json`` says which session failed and why, and a resumed
build starts again after the last checkpoint (the note is removed once that session is built).

The progress file also records how the memory was built (builder, model, embedder, dimension,
update mode); resuming or answering with an incompatible setup raises InvalidArgumentError.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from membuilder._core import InvalidArgumentError, MemoryState
from membuilder._files import read_jsonl, write_json_atomic  # noqa: F401  (re-exported for callers)

PROGRESS_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

#: Fingerprint keys that must agree to resume a build.
BUILD_KEYS = ("dataset", "builder", "build_model", "embedder", "dim", "update_mode")
#: Keys that must agree to answer from a built memory (the question embedder must match).
ANSWER_KEYS = ("dataset", "embedder", "dim")


def safe_name(conversation_id: str) -> str:
    """A file-name-safe, collision-free stem for a conversation id."""
    clean = _UNSAFE.sub("_", conversation_id)
    if clean != conversation_id or not clean:
        clean = f"{clean}-{hashlib.sha256(conversation_id.encode()).hexdigest()[:8]}"
    return clean


class MemoryStore:
    """The checkpoints of one memory build (one directory, one file pair per conversation)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def progress_path(self, conversation_id: str) -> Path:
        return self.root / f"{safe_name(conversation_id)}.progress.json"

    def failed_path(self, conversation_id: str) -> Path:
        return self.root / f"{safe_name(conversation_id)}.failed.json"

    def mark_failed(self, conversation_id: str, info: Mapping[str, Any]) -> None:
        """Record that building stopped at a failed session (``info``: session_index, reason...).

        The checkpoint itself is untouched: it still holds the sessions before the failure.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.failed_path(conversation_id), {"version": PROGRESS_VERSION, **info})

    def failure(self, conversation_id: str) -> dict[str, Any] | None:
        """What :meth:`mark_failed` recorded, or ``None`` (also for an unreadable record: the
        progress file, not this note, decides what is built)."""
        from membuilder.datasets import DatasetError, read_json

        path = self.failed_path(conversation_id)
        if not path.exists():
            return None
        try:
            data = read_json(path)
        except DatasetError:
            return {"reason": f"unreadable failure record {path.name}"}
        return data if isinstance(data, dict) else None

    def state_path(self, conversation_id: str, sessions_done: int) -> Path:
        return self.root / f"{safe_name(conversation_id)}.s{sessions_done:04d}.state"

    def progress(self, conversation_id: str) -> dict[str, Any] | None:
        """The progress record, or ``None`` when this conversation was never checkpointed."""
        from membuilder.datasets import read_json

        path = self.progress_path(conversation_id)
        if not path.exists():
            return None
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != PROGRESS_VERSION:
            raise InvalidArgumentError(f"{path}: not a membuilder progress file (version {PROGRESS_VERSION})")
        return data

    def any_progress(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("*.progress.json"))

    @staticmethod
    def check_fingerprint(
        recorded: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str], where: str
    ) -> None:
        diffs = [
            f"{k}: built with {recorded.get(k)!r}, now {current.get(k)!r}"
            for k in keys
            if recorded.get(k) != current.get(k)
        ]
        if diffs:
            raise InvalidArgumentError(
                f"{where} was built with a different setup ({'; '.join(diffs)}); use another "
                "--db-path or the same settings"
            )

    def load(
        self, conversation_id: str, fingerprint: Mapping[str, Any], keys: Sequence[str] = BUILD_KEYS
    ) -> tuple[MemoryState, int, dict[str, Any]] | None:
        """``(state, sessions_done, progress)`` of the last checkpoint, or ``None`` if none.

        Raises InvalidArgumentError when it was built with another setup and StateFileError
        (naming the file) when the state file is missing or damaged.
        """
        prog = self.progress(conversation_id)
        if prog is None:
            return None
        self.check_fingerprint(
            prog.get("fingerprint", {}), fingerprint, keys, f"memory of {conversation_id!r} in {self.root}"
        )
        state = MemoryState.load(self.root / prog["state_file"])
        return state, int(prog["sessions_done"]), prog

    def save(
        self,
        conversation_id: str,
        state: MemoryState,
        sessions_done: int,
        session_ids: Sequence[str],
        fingerprint: Mapping[str, Any],
        sessions_total: int,
    ) -> None:
        """Checkpoint ``state`` after ``sessions_done`` sessions (see the module docstring)."""
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.progress(conversation_id)
        path = self.state_path(conversation_id, sessions_done)
        state.save(path)
        write_json_atomic(
            self.progress_path(conversation_id),
            {
                "version": PROGRESS_VERSION,
                "conversation_id": conversation_id,
                "sessions_done": sessions_done,
                "sessions_total": sessions_total,
                "session_ids": list(session_ids),
                "state_file": path.name,
                "fingerprint": dict(fingerprint),
                "entries": len(state),
            },
        )
        failure = self.failure(conversation_id)
        if failure is not None and sessions_done > int(failure.get("session_index") or 0):
            # The session that failed has been built since.
            self.failed_path(conversation_id).unlink(missing_ok=True)
        if previous and previous.get("state_file") != path.name:
            old = self.root / previous["state_file"]
            try:
                old.unlink()
            except FileNotFoundError:
                pass
