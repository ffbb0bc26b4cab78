"""Action parsing and validation: tolerated forms, the Python surface, and the Rust parser checked
against the pure-Python reference on generated outputs and random mutations of them."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from membuilder import _core
from reference import actions_ref as ref

AGENTS = ("core", "episodic", "semantic", "procedural")


def summary(result):
    """Everything the Rust result and the reference result must agree on."""
    return (
        result.ok,
        [(r.code, r.index) for r in result.rejections],
        [(a.agent, a.op, a.text, tuple(a.old), a.reason) for a in result.actions],
        result.content_chars,
        result.to_json(),
        result.content_text(),
    )


def assert_same(agent: str, raw: str):
    rust = _core.parse_actions(agent, raw)
    python = ref.parse(agent, raw)
    assert summary(rust) == summary(python), raw
    return rust


# ---------------------------------------------------------------------------------------------
# Tolerated forms
# ---------------------------------------------------------------------------------------------

BANK_BODY = '{"operations": [{"action": "ADD", "memory": "went hiking"}]}'
TOLERATED_BANK = [
    BANK_BODY,
    f"<think>The user said {{something}} [maybe]</think>\n{BANK_BODY}",
    f"<thinking>hmm</thinking>{BANK_BODY}",
    f"The chat template opened the block, so no opening tag here.</think>\n{BANK_BODY}",
    f"```json\n{BANK_BODY}\n```",
    f"Sure, here are the operations:\n\n{BANK_BODY}\n\nLet me know if you need more.",
    '{"operations": [{"action": "ADD", "memory": "went hiking"},],}',
    '[{"action": "ADD", "memory": "went hiking"}]',
    '{"episodic": {"operations": [{"action": "ADD", "memory": "went hiking"}]}}',
    '[["ADD", "went hiking"]]',
    '["ADD", "went hiking"]',
    '{"operations": [["add", "went hiking"]]}',
    '{"Operations": [{"Action": " Add ", "Memory": "  went hiking "}]}',
    '{"ops": [{"op": "ADD", "content": "went hiking"}]}',
    '{"action": "ADD", "memory": "went hiking"}',
]


@pytest.mark.parametrize("raw", TOLERATED_BANK)
def test_tolerated_bank_forms(raw):
    result = assert_same("episodic", raw)
    assert result.ok, result.rejections
    assert [(a.op, a.text) for a in result.actions] == [("ADD", "went hiking")]
    assert result.content_chars == len("went hiking")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('{"operation": "APPEND", "content": "Likes tea."}', [("APPEND", "Likes tea.", [])]),
        (
            '{"operation": "replace", "old_text": "tea", "new_text": "coffee"}',
            [("REPLACE", "coffee", ["tea"])],
        ),
        ('{"operation": "REWRITE", "content": "All new."}', [("REWRITE", "All new.", [])]),
        ('{"operation": "SKIP"}', [("SKIP", None, [])]),
        (
            '{"operations": [["APPEND", "a"], ["REPLACE", "a", "b"]]}',
            [("APPEND", "a", []), ("REPLACE", "b", ["a"])],
        ),
        ('{"core": {"operation": "APPEND", "content": "x"}}', [("APPEND", "x", [])]),
    ],
)
def test_tolerated_core_forms(raw, expected):
    result = assert_same("core", raw)
    assert result.ok
    assert [(a.op, a.text, a.old) for a in result.actions] == expected


def test_compact_merge_and_skip_forms():
    result = assert_same("episodic", '[["MERGE", ["a", "b"], "ab"], ["UPDATE", "x", "y"]]')
    assert [(a.op, a.old, a.text) for a in result.actions] == [
        ("MERGE", ["a", "b"], "ab"),
        ("UPDATE", ["x"], "y"),
    ]
    result = assert_same("semantic", '[["SKIP", "nothing new"], ["SKIP"]]')
    assert [(a.op, a.reason) for a in result.actions] == [("SKIP", "nothing new"), ("SKIP", None)]


def test_empty_list_is_valid_nothing_to_do():
    for agent in AGENTS:
        result = assert_same(agent, '{"operations": []}')
        assert result.ok and result.actions == [] and result.content_chars == 0


def test_valid_operations_are_kept_beside_rejected_ones():
    raw = json.dumps(
        {
            "operations": [
                {"action": "ADD", "memory": "kept"},
                {"action": "MERGE", "old_memories": ["a"], "new_memory": "b"},
                {"action": "UPDATE", "old_memory": "o"},
                {"action": "ADD", "memory": "also kept"},
            ]
        }
    )
    result = assert_same("semantic", raw)
    assert not result.ok
    assert [a.text for a in result.actions] == ["kept", "also kept"]
    assert [(r.code, r.index) for r in result.rejections] == [("action_not_allowed", 1), ("missing_field", 2)]
    assert "MERGE" in result.rejections[0].message and "ADD, UPDATE, SKIP" in result.rejections[0].message
    assert result.content_chars == len("kept") + len("also kept")


def test_content_chars_counts_new_text_in_unicode_scalars():
    raw = json.dumps(
        {
            "operations": [
                {"action": "ADD", "memory": "héllo"},
                {"action": "UPDATE", "old_memory": "not counted", "new_memory": "😀😀"},
                {"action": "MERGE", "old_memories": ["x", "y"], "new_memory": "xy"},
            ]
        }
    )
    result = assert_same("episodic", raw)
    assert result.content_chars == 5 + 2 + 2
    assert result.content_text() == "héllo\n😀😀\nxy"


def test_lone_surrogate_in_python_string_never_raises():
    result = _core.parse_actions("core", '{"operation": "APPEND", "content": "a\ud800b"}')
    assert result.ok
    text = result.actions[0].text
    assert text.startswith("a") and text.endswith("b") and "\ufffd" in text


# ---------------------------------------------------------------------------------------------
# The Python surface
# ---------------------------------------------------------------------------------------------


def test_action_init_validates_and_normalises():
    a = _core.Action("episodic", "add", "  went hiking ")
    assert (a.agent, a.op, a.text, a.old, a.reason) == ("episodic", "ADD", "went hiking", [], None)
    assert a == _core.Action("episodic", "ADD", "went hiking")
    assert a != _core.Action("semantic", "ADD", "went hiking")
    assert hash(a) == hash(_core.Action("episodic", "ADD", "went hiking"))
    assert a.to_dict() == {"action": "ADD", "memory": "went hiking"}
    assert "went hiking" in repr(a) and "ADD" in repr(a)
    m = _core.Action("episodic", "MERGE", "ab", old=["a", "b"])
    assert m.to_dict() == {"action": "MERGE", "old_memories": ["a", "b"], "new_memory": "ab"}
    r = _core.Action("core", "REPLACE", "coffee", old=("tea",))
    assert r.to_dict() == {"operation": "REPLACE", "old_text": "tea", "new_text": "coffee"}
    s = _core.Action("semantic", "SKIP", reason="nothing new")
    assert s.to_dict() == {"action": "SKIP", "reason": "nothing new"}


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("nobody", "ADD", "x"), {}, "unknown agent"),
        (("episodic", "DELETE", "x"), {}, "unknown op"),
        (("procedural", "SKIP"), {}, "cannot SKIP"),
        (("core", "ADD", "x"), {}, "cannot ADD"),
        (("episodic", "ADD"), {}, "memory"),
        (("episodic", "ADD", "  "), {}, "empty"),
        (("episodic", "ADD", "x"), {"old": ["y"]}, "no old"),
        (("episodic", "UPDATE", "x"), {"old": ["a", "b"]}, "exactly one"),
        (("episodic", "ADD", "x"), {"reason": "r"}, "reason"),
        (("episodic", "UPDATE", "x"), {"old": "a"}, "not a single str"),
    ],
)
def test_action_init_refuses_bad_fields(args, kwargs, fragment):
    with pytest.raises(_core.InvalidArgumentError, match=fragment):
        _core.Action(*args, **kwargs)


def test_parse_result_surface():
    result = _core.parse_actions("episodic", '[["ADD", "a"], ["ADD", 1]]')
    assert result.agent == "episodic" and not result.ok
    rej = result.rejections[0]
    assert (rej.code, rej.index) == ("wrong_type", 1)
    assert "wrong_type" in repr(rej) and "ParseResult" in repr(result)
    whole = _core.parse_actions("core", "no json here")
    assert whole.rejections[0].index is None
    assert json.loads(result.to_json()) == {"operations": [{"action": "ADD", "memory": "a"}]}


def test_to_json_is_canonical_and_reparses_to_the_same_actions():
    raw = '{"operations": [{"Memory": "a", "ACTION": "add"}, ["update", " o ", "n"]]}'
    first = _core.parse_actions("semantic", raw)
    again = _core.parse_actions("semantic", first.to_json())
    assert again.actions == first.actions and again.to_json() == first.to_json()
    assert (
        first.to_json()
        == '{"operations":[{"action":"ADD","memory":"a"},{"action":"UPDATE","new_memory":"n","old_memory":"o"}]}'
    )


def test_batch_matches_single_and_checks_arguments():
    agents = ["core", "episodic", "semantic", "procedural"] * 5
    raws = [
        '{"operation": "APPEND", "content": "x"}',
        BANK_BODY,
        "nothing",
        '{"operations": [["ADD", "steps"]]}',
    ] * 5
    assert _core.parse_actions_batch(agents, raws) == [
        _core.parse_actions(a, r) for a, r in zip(agents, raws)
    ]
    assert _core.parse_actions_batch([], []) == []
    with pytest.raises(_core.InvalidArgumentError, match="raws has"):
        _core.parse_actions_batch(["core"], [])
    with pytest.raises(_core.InvalidArgumentError, match="unknown agent"):
        _core.parse_actions_batch(["nobody"], ["{}"])
    with pytest.raises(_core.InvalidArgumentError):
        _core.parse_actions("nobody", "{}")
    with pytest.raises(ValueError):  # InvalidArgumentError is also a ValueError
        _core.parse_actions_batch("core", ["{}"])


def test_module_constants():
    assert _core.AGENTS == ("core", "episodic", "semantic", "procedural")
    assert _core.BANK_KINDS == ("episodic", "semantic", "procedural")


# ---------------------------------------------------------------------------------------------
# Rust == reference on generated outputs and mutations
# ---------------------------------------------------------------------------------------------

_TEXT_ALPHABET = st.characters(blacklist_categories=("Cs",), max_codepoint=0x1F64F)
_NASTY = st.sampled_from(
    ['"', "\\", "{", "}", "[", "]", ",", "<think>", "</think>", "```", "\n", " ", "é", "😀"]
)
TEXTS = (
    st.lists(st.one_of(st.text(_TEXT_ALPHABET, min_size=1, max_size=12), _NASTY), min_size=1, max_size=4)
    .map("".join)
    .filter(lambda t: t.strip(ref.RUST_WS) != "")
)


def _case(name: str, draw) -> str:
    return draw(st.sampled_from([name, name.lower(), name.upper(), name.title(), f" {name} "]))


@st.composite
def operation(draw, agent: str):
    op = draw(st.sampled_from(ref.ALLOWED[agent]))
    form = draw(st.sampled_from(["object", "compact"]))
    core = agent == "core"
    name = _case(op, draw)
    if form == "compact":
        if op in ("APPEND", "REWRITE", "ADD"):
            return [name, draw(TEXTS)]
        if op in ("REPLACE", "UPDATE"):
            return [name, draw(TEXTS), draw(TEXTS)]
        if op == "MERGE":
            return [name, draw(st.lists(TEXTS, min_size=1, max_size=3)), draw(TEXTS)]
        return [name] + draw(st.lists(TEXTS, max_size=1))
    op_key = draw(
        st.sampled_from(
            ["operation", "action", "op", "Action"] if not core else ["operation", "Operation", "action"]
        )
    )
    d: dict = {op_key: name}
    if op in ("APPEND", "REWRITE"):
        d[draw(st.sampled_from(["content", "text", "Content"]))] = draw(TEXTS)
    elif op == "REPLACE":
        d["old_text"], d["new_text"] = draw(TEXTS), draw(TEXTS)
    elif op == "ADD":
        d[draw(st.sampled_from(["memory", "content", "Memory"]))] = draw(TEXTS)
    elif op == "UPDATE":
        d[draw(st.sampled_from(["old_memory", "old", "old-memory"]))] = draw(TEXTS)
        d["new_memory"] = draw(TEXTS)
    elif op == "MERGE":
        d["old_memories"] = draw(st.lists(TEXTS, min_size=1, max_size=3))
        d["new_memory"] = draw(TEXTS)
    elif draw(st.booleans()):
        d["reason"] = draw(TEXTS)
    if draw(st.booleans()):
        d["note"] = draw(st.sampled_from([1, None, "extra", [1, 2], {"k": "v"}]))
    return d


@st.composite
def valid_output(draw):
    agent = draw(st.sampled_from(AGENTS))
    ops = draw(st.lists(operation(agent), min_size=0 if agent != "core" else 1, max_size=4))
    shape = draw(st.sampled_from(["operations", "bare_list", "wrapper", "single"]))
    if shape == "single" and len(ops) == 1 and isinstance(ops[0], dict):
        value = ops[0]
    elif shape == "bare_list" and ops:
        value = ops
    elif shape == "wrapper":
        value = {agent: {"operations": ops}}
    else:
        value = {"operations": ops}
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    if draw(st.booleans()):
        # A trailing comma before the last closing bracket.
        text = text[:-1].rstrip() + ",\n" + text[-1]
    prefix = draw(
        st.sampled_from(
            ["", "<think>plan: {ADD} [1]</think>\n", "Here you go:\n", "```json\n", "thinking...</think>"]
        )
    )
    suffix = draw(st.sampled_from(["", "\n```", "\nDone.", "  \n"]))
    return agent, prefix + text + suffix


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_output())
def test_generated_valid_outputs_match_reference_and_pass(case):
    agent, raw = case
    result = assert_same(agent, raw)
    assert result.ok, (raw, result.rejections)


@st.composite
def mutated_output(draw):
    agent, raw = draw(valid_output())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "truncate", "duplicate", "replace"]))
        i = draw(st.integers(0, len(raw)))
        if kind == "delete":
            raw = raw[:i] + raw[i + draw(st.integers(1, 8)) :]
        elif kind == "insert":
            piece = draw(
                st.sampled_from(
                    [
                        '"',
                        "\\",
                        "{",
                        "}",
                        "[",
                        "]",
                        ",",
                        ":",
                        "\\u",
                        "\\ud800",
                        "null",
                        "1e999",
                        "NaN",
                        '"ADD"',
                        '"operations":',
                        "<think>",
                        "</think>",
                        "\x00",
                        "\ud800",
                    ]
                )
            )
            raw = raw[:i] + piece + raw[i:]
        elif kind == "truncate":
            raw = raw[:i]
        elif kind == "duplicate":
            raw = raw + "\n" + raw
        else:
            raw = raw[:i] + draw(st.text(max_size=3)) + raw[i + 1 :]
    return agent, raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_output())
def test_mutated_outputs_match_reference_and_never_raise(case):
    agent, raw = case
    assert_same(agent, raw)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(AGENTS), st.text(max_size=200))
def test_arbitrary_text_matches_reference(agent, raw):
    assert_same(agent, raw)


def test_non_str_raw_is_a_caller_mistake_and_large_outputs_parse():
    with pytest.raises(_core.InvalidArgumentError, match="must be a str"):
        _core.parse_actions("core", b'{"operation": "SKIP"}')
    with pytest.raises(_core.InvalidArgumentError, match="must hold str"):
        _core.parse_actions_batch(["core"], [None])
    # Over 64 KiB the single parse runs with the GIL released; the result is the same.
    ops = [{"action": "ADD", "memory": f"memory {i} " + "x" * 200} for i in range(400)]
    raw = json.dumps({"operations": ops})
    assert len(raw) > 64 * 1024
    result = assert_same("episodic", raw)
    assert result.ok and len(result.actions) == 400
