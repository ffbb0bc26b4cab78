"""Pure-Python reference of the Rust action parser and validator (``membuilder._core.parse_actions``).

Written to be obviously correct rather than fast; the property tests check that the Rust parser
gives the same actions, the same rejection codes (and indexes) and the same content length on
generated outputs and on random mutations of them. The pipeline and the alias tables are the ones
documented in the Rust module ``actions``.

Differences from plain ``json`` that the reference takes care of, because serde_json (used by the
Rust side) refuses them: lone surrogate escapes, NaN/Infinity, and numbers out of the float range.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

MAX_INPUT_BYTES = 512 * 1024
MAX_DEPTH = 64
MAX_TEXT_CHARS = 16_384
MAX_OPERATIONS = 1_024
MAX_CANDIDATES = 64

AGENTS = ("core", "episodic", "semantic", "procedural")
OPS = ("APPEND", "REPLACE", "REWRITE", "ADD", "UPDATE", "MERGE", "SKIP")
ALLOWED = {
    "core": ("APPEND", "REPLACE", "REWRITE", "SKIP"),
    "episodic": ("ADD", "UPDATE", "MERGE"),
    "semantic": ("ADD", "UPDATE", "SKIP"),
    "procedural": ("ADD", "UPDATE"),
}

OP_KEYS = ("operation", "action", "op")
OPS_KEYS = ("operations", "actions", "ops")
CONTENT = ("content", "text", "memory", "new_content")
REPLACE_OLD = ("old_text", "old", "old_content", "old_memory")
REPLACE_NEW = ("new_text", "new", "new_content", "content", "new_memory")
ADD_MEMORY = ("memory", "content", "text", "new_memory")
UPDATE_OLD = ("old_memory", "old", "old_text")
NEW_MEMORY = ("new_memory", "new", "new_text", "memory", "content")
MERGE_OLDS = ("old_memories", "olds", "old_memory", "old", "old_texts")

# Rust's `str::trim` strips the Unicode White_Space property; Python's `str.strip()` strips a
# slightly different set (it includes U+001C..U+001F), so strip this exact set.
RUST_WS = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
JSON_WS = " \t\n\r"
_TAG = re.compile(r"<(/?)think(ing)?>", re.IGNORECASE | re.ASCII)
_CLOSE = re.compile(r"</think(ing)?>", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class Action:
    agent: str
    op: str
    text: str | None = None
    old: tuple[str, ...] = ()
    reason: str | None = None


@dataclass(frozen=True)
class Rejection:
    code: str
    index: int | None = None


@dataclass
class Result:
    agent: str
    actions: list[Action] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejections

    @property
    def content_chars(self) -> int:
        return sum(len(a.text) for a in self.actions if a.text is not None)

    def content_text(self) -> str:
        return "\n".join(a.text for a in self.actions if a.text is not None)

    def to_json(self) -> str:
        return json.dumps(
            {"operations": [action_to_dict(a) for a in self.actions]},
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )


class Refused(Exception):
    def __init__(self, code: str, index: int | None = None) -> None:
        super().__init__(code)
        self.rejection = Rejection(code, index)


def ascii_lower(s: str) -> str:
    return "".join(c.lower() if c.isascii() else c for c in s)


def ascii_upper(s: str) -> str:
    return "".join(c.upper() if c.isascii() else c for c in s)


def op_of(name: str) -> str | None:
    name = ascii_upper(name.strip(RUST_WS))
    return name if name in OPS else None


def action_to_dict(a: Action) -> dict:
    core = a.agent == "core"
    d: dict = {"operation" if core else "action": a.op}
    if core and a.op in ("APPEND", "REWRITE"):
        d["content"] = a.text
    elif core and a.op == "REPLACE":
        d["old_text"], d["new_text"] = a.old[0], a.text
    elif not core and a.op == "ADD":
        d["memory"] = a.text
    elif not core and a.op == "UPDATE":
        d["old_memory"], d["new_memory"] = a.old[0], a.text
    elif not core and a.op == "MERGE":
        d["old_memories"], d["new_memory"] = list(a.old), a.text
    if a.reason is not None:
        d["reason"] = a.reason
    return d


# ---------------------------------------------------------------------------------------------
# Text -> one JSON value
# ---------------------------------------------------------------------------------------------


def strip_reasoning(s: str) -> tuple[str, str | None]:
    """Leading reasoning blocks go; without one, everything up to the first closing tag goes (and
    the whole text is kept as a fallback)."""
    rest, stripped = s, False
    while True:
        t = rest.lstrip(RUST_WS)
        m = _TAG.match(t)
        if m is None or m.group(1) == "/":
            break
        close = re.compile(r"</think" + ("ing" if m.group(2) else "") + ">", re.IGNORECASE | re.ASCII)
        m2 = close.search(t, m.end())
        if m2 is None:
            return "", None
        rest, stripped = t[m2.end() :], True
    if not stripped:
        m = _CLOSE.search(rest)
        if m is not None:
            return rest[m.end() :], rest
    return rest, None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _has_surrogate(v) -> bool:
    if isinstance(v, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    if isinstance(v, list):
        return any(_has_surrogate(x) for x in v)
    if isinstance(v, dict):
        return any(_has_surrogate(k) or _has_surrogate(x) for k, x in v.items())
    return False


def loads(text: str):
    """json.loads restricted to what serde_json accepts."""
    value = json.loads(text, parse_constant=_reject_constant, parse_float=_float)
    if _has_surrogate(value):
        raise ValueError("lone surrogate")
    return value


def _int_overflow_ok(v) -> bool:
    # serde_json reads integers beyond 64 bits as floats; out of the float range it fails.
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        try:
            float(v)
        except OverflowError:
            return False
        return True
    if isinstance(v, list):
        return all(_int_overflow_ok(x) for x in v)
    if isinstance(v, dict):
        return all(_int_overflow_ok(x) for x in v.values())
    return True


def parses(text: str):
    v = loads(text)
    if not _int_overflow_ok(v):
        raise ValueError("number out of range")
    return v


def scan_span(s: str, start: int):
    """('closed', end) | ('open', None) | ('deep', None)."""
    stack: list[str] = []
    in_string = escaped = False
    for i in range(start, len(s)):
        c = s[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
            if len(stack) > MAX_DEPTH:
                return "deep", None
        elif c in "}]":
            expected = stack.pop() if stack else None
            if expected != c or not stack:
                return "closed", i + 1
    return "open", None


def next_non_ws(s: str, i: int) -> str | None:
    while i < len(s):
        if s[i] not in JSON_WS:
            return s[i]
        i += 1
    return None


def json_looking(s: str, start: int) -> bool:
    nxt = next_non_ws(s, start + 1)
    if s[start] == "{":
        return nxt in ('"', "}")
    return nxt in ("{", "[", '"', "]")


def remove_trailing_commas(s: str) -> str:
    out = []
    in_string = escaped = False
    for i, c in enumerate(s):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "," and next_non_ws(s, i + 1) in ("}", "]"):
            continue
        out.append(c)
    return "".join(out)


def norm_key(k: str) -> str:
    return ascii_lower(k).replace("-", "_").replace(" ", "_")


def has_key(d: dict, aliases) -> bool:
    return any(norm_key(k) in aliases for k in d)


def looks_like_answer(v) -> bool:
    if isinstance(v, dict):
        return has_key(v, OP_KEYS) or has_key(v, OPS_KEYS) or has_key(v, AGENTS)
    if isinstance(v, list):
        if not v:
            return True
        first = v[0]
        if isinstance(first, (dict, list)):
            return True
        return isinstance(first, str) and op_of(first) is not None
    return False


def find_answer(text: str):
    i = tried = answers = 0
    answer = None
    parsed: list = []
    invalid = truncated = False
    while i < len(text):
        starts = [p for p in (text.find("{", i), text.find("[", i)) if p >= 0]
        if not starts:
            break
        start = min(starts)
        if tried == MAX_CANDIDATES:
            break
        tried += 1
        kind, end = scan_span(text, start)
        if kind == "deep":
            raise Refused("too_deep")
        if kind == "open":
            if json_looking(text, start):
                truncated = True
                break
            i = start + 1
            continue
        try:
            v = parses(remove_trailing_commas(text[start:end]))
        except (ValueError, RecursionError):
            if json_looking(text, start):
                invalid = True
                i = end
            else:
                i = start + 1
            continue
        if looks_like_answer(v):
            answers += 1
            if answers == 1:
                answer = v
        else:
            parsed.append(v)
        i = end
    if answers >= 2:
        raise Refused("multiple_json")
    if truncated:
        raise Refused("truncated_json")
    if answers == 1:
        return answer, True
    if invalid:
        raise Refused("invalid_json")
    if parsed:
        return parsed[0], False
    raise Refused("no_json")


def extract(raw: str):
    if len(raw.encode("utf-8")) > MAX_INPUT_BYTES:
        raise Refused("too_large")
    if not raw.strip(RUST_WS):
        raise Refused("empty_output")
    text, whole = strip_reasoning(raw)
    try:
        first = answer_of(text.strip(RUST_WS))
    except Refused as e:
        first = e
    if whole is not None and not (isinstance(first, tuple) and first[1]):
        # The cut-at closing tag may have been inside the JSON: the whole text gets a second chance.
        try:
            second = answer_of(whole.strip(RUST_WS))
        except Refused:
            second = None
        if second is not None and second[1]:
            first = second
    if isinstance(first, Refused):
        raise first
    return first[0]


def answer_of(text: str):
    if not text:
        raise Refused("no_json")
    if text[0] in '"-tfn' or text[0] in "0123456789":
        try:
            v = parses(text)
        except (ValueError, RecursionError):
            v = None
        else:
            if not isinstance(v, (dict, list)):
                raise Refused("wrong_shape")
    return find_answer(text)


# ---------------------------------------------------------------------------------------------
# Value -> operations -> actions
# ---------------------------------------------------------------------------------------------


_MISSING = object()


def lookup(d: dict, aliases):
    """The value under the first alias present with a non-null value (smallest raw key on ties)."""
    for alias in aliases:
        hits = [(k, v) for k, v in d.items() if v is not None and norm_key(k) == alias]
        if hits:
            return min(hits, key=lambda kv: kv[0])[1]
    return _MISSING


def list_or_compact(items: list, whole):
    if items and isinstance(items[0], str):
        return [whole]
    return list(items)


def operations_of(agent: str, v):
    if isinstance(v, dict) and not has_key(v, OP_KEYS) and not has_key(v, OPS_KEYS):
        inner = lookup(v, (agent,))
        if inner is not _MISSING:
            v = inner
        elif any(norm_key(k) in AGENTS and norm_key(k) != agent for k in v):
            raise Refused("wrong_shape")
    if isinstance(v, list):
        ops = list_or_compact(v, v)
    elif isinstance(v, dict):
        lst = lookup(v, OPS_KEYS)
        if lst is not _MISSING:
            if isinstance(lst, list):
                ops = list_or_compact(lst, lst)
            elif isinstance(lst, dict):
                ops = [lst]
            else:
                raise Refused("wrong_shape")
        elif has_key(v, OPS_KEYS):
            raise Refused("wrong_shape")
        elif has_key(v, OP_KEYS):
            ops = [v]
        else:
            raise Refused("missing_operations")
    else:
        raise Refused("wrong_shape")
    if len(ops) > MAX_OPERATIONS:
        raise Refused("too_large")
    return ops


def check_text(idx: int, s: str) -> str:
    t = s.strip(RUST_WS)
    if not t:
        raise Refused("empty_field", idx)
    if len(t) > MAX_TEXT_CHARS:
        raise Refused("text_too_long", idx)
    return t


def text_field(idx: int, v) -> str:
    if v is _MISSING or v is None:
        raise Refused("missing_field", idx)
    if not isinstance(v, str):
        raise Refused("wrong_type", idx)
    return check_text(idx, v)


def olds_field(idx: int, v) -> tuple[str, ...]:
    if v is _MISSING or v is None:
        raise Refused("missing_field", idx)
    if isinstance(v, str):
        return (check_text(idx, v),)
    if not isinstance(v, list):
        raise Refused("wrong_type", idx)
    if not v:
        raise Refused("empty_field", idx)
    out = []
    for item in v:
        if not isinstance(item, str):
            raise Refused("wrong_type", idx)
        out.append(check_text(idx, item))
    return tuple(out)


def reason_field(idx: int, v) -> str | None:
    if v is _MISSING or v is None:
        return None
    if not isinstance(v, str):
        raise Refused("wrong_type", idx)
    if not v.strip(RUST_WS):
        return None
    return check_text(idx, v)


def op_name(agent: str, idx: int, v) -> str:
    if v is _MISSING or v is None:
        raise Refused("missing_field", idx)
    if not isinstance(v, str):
        raise Refused("wrong_type", idx)
    op = op_of(v)
    if op is None:
        raise Refused("unknown_action", idx)
    if op not in ALLOWED[agent]:
        raise Refused("action_not_allowed", idx)
    return op


ARITY = {
    "APPEND": (2, 2),
    "REWRITE": (2, 2),
    "ADD": (2, 2),
    "REPLACE": (3, 3),
    "UPDATE": (3, 3),
    "MERGE": (3, 3),
    "SKIP": (1, 2),
}


def validate_operation(agent: str, idx: int, v) -> Action:
    if isinstance(v, dict):
        op = op_name(agent, idx, lookup(v, OP_KEYS))
        if op in ("APPEND", "REWRITE"):
            return Action(agent, op, text_field(idx, lookup(v, CONTENT)))
        if op == "REPLACE":
            old = text_field(idx, lookup(v, REPLACE_OLD))
            return Action(agent, op, text_field(idx, lookup(v, REPLACE_NEW)), (old,))
        if op == "ADD":
            return Action(agent, op, text_field(idx, lookup(v, ADD_MEMORY)))
        if op == "UPDATE":
            old = text_field(idx, lookup(v, UPDATE_OLD))
            return Action(agent, op, text_field(idx, lookup(v, NEW_MEMORY)), (old,))
        if op == "MERGE":
            olds = olds_field(idx, lookup(v, MERGE_OLDS))
            return Action(agent, op, text_field(idx, lookup(v, NEW_MEMORY)), olds)
        return Action(agent, op, reason=reason_field(idx, lookup(v, ("reason",))))
    if isinstance(v, list):
        op = op_name(agent, idx, v[0] if v else _MISSING)
        lo, hi = ARITY[op]
        if len(v) < lo:
            raise Refused("missing_field", idx)
        if len(v) > hi:
            raise Refused("wrong_shape", idx)
        if op in ("APPEND", "REWRITE", "ADD"):
            return Action(agent, op, text_field(idx, v[1]))
        if op in ("REPLACE", "UPDATE"):
            old = text_field(idx, v[1])
            return Action(agent, op, text_field(idx, v[2]), (old,))
        if op == "MERGE":
            olds = olds_field(idx, v[1])
            return Action(agent, op, text_field(idx, v[2]), olds)
        return Action(agent, op, reason=reason_field(idx, v[1] if len(v) > 1 else _MISSING))
    raise Refused("wrong_type", idx)


def lossy(raw: str) -> str:
    """What the binding does to a Python str with lone surrogates (U+FFFD replacement)."""
    return raw.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def parse(agent: str, raw: str) -> Result:
    raw = lossy(raw)
    result = Result(agent)
    try:
        value = extract(raw)
        ops = operations_of(agent, value)
    except Refused as e:
        result.rejections.append(e.rejection)
        return result
    for idx, op in enumerate(ops):
        try:
            result.actions.append(validate_operation(agent, idx, op))
        except Refused as e:
            result.rejections.append(e.rejection)
    return result
