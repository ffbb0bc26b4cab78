"""The protocol record: names, overrides and differences between two runs' protocols."""

import json

import pytest
from membuilder.protocol import MEMBUILDER, PAPER, PROTOCOLS, get_protocol, protocol_difference


def test_shipped_protocols_are_named_and_serialisable():
    assert set(PROTOCOLS) == {"paper", "membuilder"}
    for p in PROTOCOLS.values():
        rec = json.loads(json.dumps(p.record()))
        assert rec["name"] == p.name and rec["label"] == p.name and rec["overrides"] == {}
        assert rec["settings"]["sparse_reward"]["enabled"] is False


def test_paper_protocol_values_follow_the_reference_code():
    assert PAPER.longmemeval_file == "s"
    assert PAPER.locomo_questions == "all"
    assert (PAPER.answer_model, PAPER.judge_model) == ("gpt-4.1-mini", "gpt-4.1")
    assert PAPER.judge_unreadable == "wrong"
    assert (PAPER.reward_pairing, PAPER.reward_qa_scope, PAPER.format_gate) == (
        "joint",
        "rollout_only",
        "strict",
    )
    assert dict(PAPER.qa_type_mix) == {"single_session": 0.5, "multi_session": 0.3, "temporal": 0.2}
    assert (PAPER.agent_top_k, PAPER.answer_top_k) == (20, 10)


def test_overrides_are_recorded_and_change_the_label():
    p = PAPER.with_overrides(judge_style="strict", answer_top_k=10, reward_pairing=None)
    assert p.judge_style == "strict" and p.label == "paper+overrides"
    assert p.record()["overrides"] == {"judge_style": "strict"}  # same-as-default and None are not overrides
    assert PAPER.with_overrides(answer_top_k=10) is PAPER
    with pytest.raises(ValueError, match="unknown protocol setting"):
        PAPER.with_overrides(judge_stlye="strict")
    with pytest.raises(ValueError, match="choose one of"):
        get_protocol("papr")


def test_difference_names_every_changed_setting():
    assert protocol_difference(PAPER.record(), PAPER.record()) == []
    diff = protocol_difference(PAPER.record(), MEMBUILDER.record())
    assert diff[0] == "protocol paper v1 vs membuilder v2"
    assert any(d.startswith("judge_unreadable:") for d in diff)
    assert protocol_difference(PAPER.record(), None) == ["one run records no protocol"]
    over = protocol_difference(PAPER.record(), PAPER.with_overrides(format_gate="lenient").record())
    assert over == ["format_gate: 'strict' vs 'lenient'"]
