"""Content-addressed on-disk cache of chat responses.

The key is the SHA-256 of the canonical JSON (sorted keys, no whitespace, UTF-8) of the model, the
messages and every parameter that can change the answer (temperature, top_p, max_tokens, json_mode,
seed). The call's ``tag`` is not part of it: the same prompt gives the same answer whoever asks.

Layout: ``<cache_dir>/<key[:2]>/<key>.json``, one small JSON file per response. Files are written to a
temporary name in the same directory and renamed, so a crash never leaves a half-written entry under a
real key, and several processes may share one directory. A file that cannot be read back (truncated by a
full disk, edited by hand) is logged, ignored and rewritten by the next call.

Note on sampling: with ``temperature > 0`` the cache returns the first sample again. Calls that need
independent draws must differ in ``seed`` or pass ``use_cache=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from membuilder._files import atomic_write_bytes

__all__ = ["CACHE_FORMAT", "ResponseCache", "cache_key"]

logger = logging.getLogger("membuilder.llm")

# Bumped when the key material or the stored record changes shape; old entries are then simply missed.
CACHE_FORMAT = 1


def cache_key(model: str, messages: list[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``(format, model, messages, params)``.

    ``params`` entries whose value is ``None`` are dropped, so leaving a parameter out and passing
    ``None`` for it give the same key. Raises ``TypeError`` for values JSON cannot encode.
    """
    material = {
        "format": CACHE_FORMAT,
        "model": model,
        "messages": [dict(m) for m in messages],
        "params": {k: v for k, v in params.items() if v is not None},
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """A directory of cached responses. ``get``/``put`` are synchronous and cheap (one small file)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record for ``key``, or ``None`` if absent or unreadable (logged as a warning)."""
        path = self.path_for(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("response cache: cannot read %s (%s); calling the endpoint instead", path, exc)
            return None
        try:
            record = json.loads(raw)
            if (
                not isinstance(record, dict)
                or record.get("key") != key
                or not isinstance(record.get("text"), str)
            ):
                raise ValueError("record does not match its key or lacks the response text")
        except ValueError as exc:
            logger.warning("response cache: ignoring corrupt entry %s (%s); it will be rewritten", path, exc)
            return None
        return record

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        """Store ``record`` (must be JSON-serialisable) under ``key`` atomically.

        A failure to write is logged and swallowed: losing a cache entry costs one more call later,
        while raising would lose an answer that was already paid for.
        """
        path = self.path_for(key)
        data = dict(record)
        data["key"] = key
        try:
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            atomic_write_bytes(path, text.encode("utf-8"))
        except (OSError, TypeError, ValueError) as exc:
            logger.warning("response cache: could not store %s (%s)", path, exc)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("??/*.json"))

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.directory)!r})"
