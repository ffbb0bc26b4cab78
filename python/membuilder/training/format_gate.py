"""The strict format gate of the ``paper`` protocol: which raw agent outputs earn a reward at all.

The reference's reward (``training/reward_server/format_checker.py``) accepts an output only when
the JSON object it holds names an allowed operation and carries exactly the fields that operation
needs. Our action parser is more forgiving (it repairs and accepts what it can apply), which is
the ``lenient`` gate of the ``membuilder`` protocol. Under ``strict`` an output passes when:

* after dropping a reasoning block (everything up to the last ``</think>``, any
  ``<thinking>...</thinking>``) and a surrounding code fence, the text from its first ``{`` to its
  last ``}`` is one JSON object;
* ``core``: ``operation`` is APPEND or REWRITE with a ``content`` field, or REPLACE with
  ``old_text`` and ``new_text``. SKIP is not a core operation here, so a core SKIP scores 0;
* ``episodic`` / ``semantic`` / ``procedural``: ``operations`` (absent = none) is a list whose every
  item has an allowed ``action`` (episodic ADD/UPDATE/MERGE, semantic ADD/UPDATE/SKIP, procedural
  ADD/UPDATE) and that action's fields: ADD ``memory``; UPDATE ``old_memory`` and ``new_memory``;
  MERGE ``old_memories`` and ``new_memory``; SKIP a ``reason``.

Only the presence of a field is checked, not its value, as the reference does. Operation names
are compared case-insensitively.

>>> strict_format_ok("core", '{"operation": "SKIP"}')
False
>>> strict_format_ok("semantic", '{"operations": [{"action": "SKIP", "reason": "nothing new"}]}')
True
>>> strict_format_ok("semantic", '{"operations": [{"action": "SKIP"}]}')
False
"""

from __future__ import annotations

import json
import re

FORMAT_GATES = ("strict", "lenient")

_CORE_FIELDS = {"APPEND": ("content",), "REWRITE": ("content",), "REPLACE": ("old_text", "new_text")}
_ACTIONS = {
    "episodic": ("ADD", "UPDATE", "MERGE"),
    "semantic": ("ADD", "UPDATE", "SKIP"),
    "procedural": ("ADD", "UPDATE"),
}
_ACTION_FIELDS = {
    "ADD": ("memory",),
    "UPDATE": ("old_memory", "new_memory"),
    "MERGE": ("old_memories", "new_memory"),
    "SKIP": ("reason",),
}
_THINKING = re.compile(r"<thinking>.*?</thinking>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def _json_object(raw: str) -> dict | None:
    text = raw.strip()
    if "<think>" in text and "</think>" in text:
        text = text.rsplit("</think>", 1)[1].strip()
    text = _THINKING.sub("", text).strip()
    text = _FENCE.sub("", text).strip()
    match = _OBJECT.search(text)
    if match is None:
        return None
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _upper(value: object) -> str | None:
    return value.upper() if isinstance(value, str) else None


def strict_format_ok(agent: str, raw: str) -> bool:
    """Whether ``raw`` passes the strict gate for ``agent`` (see the module doc)."""
    if not raw:
        return False
    obj = _json_object(raw)
    if obj is None:
        return False
    if agent == "core":
        need = _CORE_FIELDS.get(_upper(obj.get("operation", "")) or "")
        return need is not None and all(f in obj for f in need)
    allowed = _ACTIONS.get(agent)
    if allowed is None:
        raise ValueError(f"unknown agent {agent!r}")
    ops = obj.get("operations", [])
    if not isinstance(ops, list):
        return False
    for op in ops:
        if not isinstance(op, dict):
            return False
        action = _upper(op.get("action", ""))
        if action not in allowed or not all(f in op for f in _ACTION_FIELDS[action]):
            return False
    return True
