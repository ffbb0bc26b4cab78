"""Reading dataset files: plain or compressed JSON, with errors that name the file and field."""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from membuilder.errors import DatasetError


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; ``.xz`` and ``.gz`` files are decompressed on the fly.

    Raises DatasetError (naming the file) when it is missing, truncated or not JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(p, None, "file not found" if not p.exists() else "not a regular file")
    opener: Any
    if p.name.endswith(".xz"):
        opener = lzma.open
    elif p.name.endswith(".gz"):
        opener = gzip.open
    else:
        opener = open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(p, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
        raise DatasetError(p, None, f"compressed stream is corrupt or truncated ({e})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(p, None, f"not UTF-8 text ({e})") from e
    except RecursionError:
        raise DatasetError(p, None, "JSON nested too deeply to read (no benchmark file nests so)") from None


class Fields:
    """Typed access to one JSON object, raising DatasetError with the object's JSON path.

    ``where`` is the path of the object inside the file, e.g. ``[3].conversation.session_2[5]``.
    """

    __slots__ = ("obj", "path", "where")

    def __init__(self, obj: Any, path: str | Path, where: str) -> None:
        if not isinstance(obj, Mapping):
            raise DatasetError(path, where or "<root>", f"expected an object, got {_kind(obj)}")
        self.obj = obj
        self.path = path
        self.where = where

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.obj

    def get(self, key: str, *types: type, required: bool = True, default: Any = None) -> Any:
        if key not in self.obj:
            if required:
                raise DatasetError(self.path, self.at(key), "missing")
            return default
        value = self.obj[key]
        # bool is an int subclass in Python; a JSON true/false is never a count or a text
        bad = bool(types) and (
            not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        )
        if bad:
            want = " or ".join(_type_name(t) for t in types)
            raise DatasetError(self.path, self.at(key), f"expected {want}, got {_kind(value)}")
        return value

    def text(self, key: str, *, required: bool = True, allow_number: bool = False) -> str | None:
        """A string field; numbers are accepted (and turned into text) when ``allow_number``."""
        types: tuple[type, ...] = (str, int, float) if allow_number else (str,)
        value = self.get(key, *types, required=required)
        if value is None:
            return None
        return value if isinstance(value, str) else _number_text(value)

    def child(self, key: str) -> Fields:
        return Fields(self.get(key, Mapping), self.path, self.at(key))


def _number_text(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _type_name(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        Mapping: "an object",
        dict: "an object",
        bool: "true/false",
    }.get(t, t.__name__)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, Mapping):
        return "an object"
    return type(v).__name__
