"""Model text is data: make any string safe to store, send and parse.

Two things in a model's reply used to escape as exceptions: a lone UTF-16 surrogate (``"\\ud800"``
is valid JSON, but no UTF-8 encoder accepts the string it decodes to) and JSON nested so deeply
that Python's recursive parser and encoder overflow the stack. :func:`clean_text` replaces the
first with U+FFFD; :func:`loads_shallow` refuses the second before parsing, with a reason the
caller records against the item.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deepest JSON nesting accepted from a model reply or a data file. Real replies and the benchmark
#: files nest fewer than ten levels; Python's recursion limit is reached around 1,000.
MAX_JSON_DEPTH = 200

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (a no-op for valid text)."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def json_depth(text: str | bytes) -> int:
    """The deepest ``[``/``{`` nesting of ``text`` read as JSON, strings skipped (no parsing, no
    recursion; works on invalid JSON too)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


class TooDeep(ValueError):
    """JSON nested deeper than :data:`MAX_JSON_DEPTH`."""


def loads_shallow(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that raises :class:`TooDeep` (a ValueError) instead of overflowing the stack."""
    depth = json_depth(text)
    if depth > limit:
        raise TooDeep(f"JSON nested {depth} levels deep (the limit is {limit})")
    try:
        return json.loads(text)
    except RecursionError:  # a limit above what this interpreter's stack allows
        raise TooDeep(f"JSON nested too deeply to parse (more than {limit} levels)") from None


def clean_json(value: Any) -> Any:
    """``value`` (parsed JSON) with :func:`clean_text` applied to every string, keys included.

    Parsing ``"\\ud800"`` (escaped, so plain ASCII in the reply) yields a lone surrogate that the
    reply's own cleaning could not see. Recursion is bounded by the depth check of
    :func:`loads_shallow`.
    """
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean_json(v) for k, v in value.items()}
    return value
