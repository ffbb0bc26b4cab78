"""Every malformed or adversarial output in the corpus is refused with its expected code, and
parsing it never raises.

Corpus lines: ``{"agent", "raw", "expected_code", "note"}``; huge inputs are stored as a template
(``raw`` holding ``{{FILL}}``, replaced by ``fill`` repeated ``fill_times`` times).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from membuilder import _core
from reference import actions_ref

CORPUS = Path(__file__).parent / "data" / "malformed_outputs.jsonl"
CODES = {
    "empty_output",
    "no_json",
    "invalid_json",
    "truncated_json",
    "multiple_json",
    "too_deep",
    "too_large",
    "wrong_shape",
    "missing_operations",
    "unknown_action",
    "action_not_allowed",
    "missing_field",
    "wrong_type",
    "empty_field",
    "text_too_long",
}


def _load() -> list[dict]:
    cases = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        if "fill" in case:
            case["raw"] = case["raw"].replace("{{FILL}}", case["fill"] * case["fill_times"])
        cases.append(case)
    return cases


CASES = _load()


def test_corpus_is_large_and_covers_every_code():
    assert len(CASES) >= 60
    assert {c["expected_code"] for c in CASES} == CODES


@pytest.mark.parametrize("case", CASES, ids=[c["note"] for c in CASES])
def test_malformed_output_is_rejected_with_expected_code(case):
    result = _core.parse_actions(case["agent"], case["raw"])
    codes = [r.code for r in result.rejections]
    assert not result.ok
    assert case["expected_code"] in codes, (codes, [r.message for r in result.rejections])
    for rejection in result.rejections:
        assert rejection.code in CODES
        assert rejection.message  # says what was wrong and what was expected
    # The reference agrees on the codes and on where they apply.
    ref = actions_ref.parse(case["agent"], case["raw"])
    assert [(r.code, r.index) for r in result.rejections] == [(r.code, r.index) for r in ref.rejections]


def test_corpus_batch_matches_single_parses():
    agents = [c["agent"] for c in CASES]
    raws = [c["raw"] for c in CASES]
    batch = _core.parse_actions_batch(agents, raws)
    assert batch == [_core.parse_actions(a, r) for a, r in zip(agents, raws)]
