"""Rewards: the Rust functions and kernel against the pure-Python reference, the configuration
surface, and the caller mistakes that must raise InvalidArgumentError."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from membuilder import _core
from reference import reward_ref as ref

AGENTS = ("core", "episodic", "semantic", "procedural")
FLOAT_FIELDS = (
    "length_lambda",
    "core_theta_min",
    "core_theta_max",
    "ratio_lower",
    "ratio_upper",
    "ratio_upper_full",
    "ratio_lower_full",
    "min_abs_diff",
    "attribution_alpha",
)
BOOL_FIELDS = ("length_penalty_enabled", "attribution_enabled")
TOKENS = st.floats(0, 5000, allow_nan=False) | st.integers(0, 5000).map(float)


@st.composite
def configs(draw):
    theta_min = draw(st.floats(0, 500))
    lower_full = draw(st.floats(0, 0.9))
    lower = draw(st.floats(lower_full + 0.01, 1.5))
    upper = draw(st.floats(lower, 3.0))
    return {
        "length_lambda": draw(st.floats(0, 1)),
        "core_theta_min": theta_min,
        "core_theta_max": draw(st.floats(theta_min + 1, 2000)),
        "ratio_lower_full": lower_full,
        "ratio_lower": lower,
        "ratio_upper": upper,
        "ratio_upper_full": draw(st.floats(upper + 0.01, 6.0)),
        "min_abs_diff": draw(st.floats(0, 500)),
        "attribution_alpha": draw(st.floats(0.1, 10)),
        "length_penalty_enabled": draw(st.booleans()),
        "attribution_enabled": draw(st.booleans()),
    }


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    cfg = _core.RewardConfig()
    assert cfg.to_dict() == ref.Config().to_dict()
    assert (cfg.length_lambda, cfg.core_theta_min, cfg.core_theta_max) == (0.8, 150.0, 400.0)
    assert (cfg.ratio_lower, cfg.ratio_upper, cfg.ratio_upper_full, cfg.ratio_lower_full) == (
        0.5,
        1.3,
        2.0,
        0.2,
    )
    assert (cfg.min_abs_diff, cfg.attribution_alpha) == (200.0, 4.0)
    assert cfg.length_penalty_enabled and cfg.attribution_enabled
    assert "length_lambda=0.8" in repr(cfg)


@settings(max_examples=100, deadline=None)
@given(configs())
def test_config_round_trips(fields):
    cfg = _core.RewardConfig(**fields)
    assert cfg.to_dict() == fields
    assert _core.RewardConfig.from_dict(cfg.to_dict()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    for name in FLOAT_FIELDS + BOOL_FIELDS:
        assert getattr(cfg, name) == fields[name]


def test_every_field_can_be_set():
    cfg = _core.RewardConfig()
    cfg.length_lambda = 0.5
    cfg.core_theta_max = 600
    cfg.core_theta_min = 200
    cfg.ratio_upper_full = 3.0
    cfg.ratio_upper = 1.5
    cfg.ratio_lower_full = 0.1
    cfg.ratio_lower = 0.4
    cfg.min_abs_diff = 0
    cfg.attribution_alpha = 2.0
    cfg.length_penalty_enabled = False
    cfg.attribution_enabled = False
    assert cfg.to_dict() == {
        "length_lambda": 0.5,
        "core_theta_min": 200.0,
        "core_theta_max": 600.0,
        "ratio_lower": 0.4,
        "ratio_upper": 1.5,
        "ratio_upper_full": 3.0,
        "ratio_lower_full": 0.1,
        "min_abs_diff": 0.0,
        "attribution_alpha": 2.0,
        "length_penalty_enabled": False,
        "attribution_enabled": False,
    }


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"length_lambda": 1.5}, "length_lambda"),
        ({"length_lambda": -0.1}, "length_lambda"),
        ({"core_theta_max": 100}, "core_theta_max"),
        ({"core_theta_min": -1}, "core_theta_min"),
        ({"ratio_lower_full": 0.6}, "ratio_lower_full"),
        ({"ratio_upper": 0.4}, "ratio_lower"),
        ({"ratio_upper_full": 1.0}, "ratio_upper_full"),
        ({"min_abs_diff": -5}, "min_abs_diff"),
        ({"attribution_alpha": 0}, "attribution_alpha"),
        ({"attribution_alpha": float("nan")}, "finite"),
        ({"core_theta_max": float("inf")}, "finite"),
        ({"lambda": 0.8}, "unknown reward config field"),
        ({"length_lambda": "high"}, "must be a number"),
        ({"attribution_enabled": 1}, "must be a bool"),
    ],
)
def test_bad_config_raises(fields, fragment):
    with pytest.raises(_core.InvalidArgumentError, match=fragment):
        _core.RewardConfig(**fields)
    with pytest.raises(_core.InvalidArgumentError, match=fragment):
        _core.RewardConfig.from_dict(fields)


def test_bad_setter_raises_and_leaves_config_unchanged():
    cfg = _core.RewardConfig()
    with pytest.raises(_core.InvalidArgumentError, match="core_theta_max"):
        cfg.core_theta_max = 10
    assert cfg.core_theta_max == 400.0
    with pytest.raises(ValueError):
        cfg.length_lambda = 2.0
    assert cfg.length_lambda == 0.8
    with pytest.raises(_core.InvalidArgumentError):
        _core.RewardConfig.from_dict([("length_lambda", 0.5)])


# ---------------------------------------------------------------------------------------------
# Scalar functions == reference
# ---------------------------------------------------------------------------------------------


def test_known_points():
    assert _core.core_length_penalty(150) == 0.0
    assert _core.core_length_penalty(275) == 0.5
    assert _core.core_length_penalty(400) == 1.0
    assert _core.ratio_length_penalty(500, 0) == 0.0
    assert _core.ratio_length_penalty(1000, 850) == 0.0  # difference under 200 tokens
    assert _core.ratio_length_penalty(1200, 1000) == 0.0  # inside the band
    assert close(_core.ratio_length_penalty(1650, 1000), 0.5)
    assert close(_core.ratio_length_penalty(350, 1000), 0.5)
    assert _core.length_penalty("core", 400, 0) == 1.0
    assert close(_core.final_reward(True, 0.5, 0.5), 0.3)
    assert _core.final_reward(False, 1.0, 0.0) == 0.0
    assert _core.approx_tokens("héllo wörld!") == 3
    assert _core.dominant_kind((2, 2, 1)) == "episodic"
    assert _core.dominant_kind([0, 0, 0]) is None
    assert _core.attribution_weight("core", "episodic") == 1.0
    assert _core.attribution_weight("episodic", "episodic") == 4.0


@settings(max_examples=300, deadline=None)
@given(configs(), st.sampled_from(AGENTS), TOKENS, TOKENS, st.floats(0, 1), st.booleans())
def test_scalar_functions_match_reference(fields, agent, tokens, expert, task, ok):
    cfg = _core.RewardConfig(**fields)
    rc = ref.Config(**fields)
    core = _core.core_length_penalty(tokens, cfg)
    ratio = _core.ratio_length_penalty(tokens, expert, cfg)
    pen = _core.length_penalty(agent, tokens, expert, cfg)
    assert close(core, ref.core_length_penalty(tokens, rc))
    assert close(ratio, ref.ratio_length_penalty(tokens, expert, rc))
    assert close(pen, ref.length_penalty(agent, tokens, expert, rc))
    assert 0.0 <= core <= 1.0 and 0.0 <= ratio <= 1.0 and 0.0 <= pen <= 1.0
    reward = _core.final_reward(ok, task, pen, cfg)
    assert close(reward, ref.final_reward(ok, task, pen, rc))
    assert 0.0 <= reward <= task + 1e-12


@settings(max_examples=200, deadline=None)
@given(TOKENS, TOKENS, TOKENS)
def test_penalties_are_monotone(a, b, expert):
    lo, hi = sorted((a, b))
    assert _core.core_length_penalty(lo) <= _core.core_length_penalty(hi)
    if lo >= expert:
        assert _core.ratio_length_penalty(lo, expert) <= _core.ratio_length_penalty(hi, expert)
    if hi <= expert:
        assert _core.ratio_length_penalty(hi, expert) <= _core.ratio_length_penalty(lo, expert)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 2), max_size=30), st.sampled_from(AGENTS), st.booleans())
def test_attribution_matches_reference(kinds, agent, enabled):
    counts = _core.retrieval_counts(np.array(kinds, dtype=np.int8))
    assert counts == ref.retrieval_counts(kinds)
    dom = _core.dominant_kind(counts)
    assert dom == ref.dominant_kind(counts)
    cfg = _core.RewardConfig(attribution_enabled=enabled)
    assert _core.attribution_weight(agent, dom, cfg) == ref.attribution_weight(
        agent, dom, ref.Config(attribution_enabled=enabled)
    )


def test_approx_tokens_counts_code_points():
    for text in ["", "abc", "abcd", "😀" * 8, "é" * 9]:
        assert _core.approx_tokens(text) == ref.approx_tokens(text)


@pytest.mark.parametrize(
    "call",
    [
        lambda: _core.core_length_penalty(float("nan")),
        lambda: _core.core_length_penalty(-1),
        lambda: _core.ratio_length_penalty(10, float("inf")),
        lambda: _core.length_penalty("nobody", 1, 1),
        lambda: _core.final_reward(True, float("nan"), 0.0),
        lambda: _core.final_reward(True, 1.0, 1.5),
        lambda: _core.retrieval_counts(np.array([0, 3], dtype=np.int8)),
        lambda: _core.retrieval_counts(np.array([0.5])),
        lambda: _core.dominant_kind((1, 2)),
        lambda: _core.dominant_kind((1, -2, 0)),
        lambda: _core.attribution_weight("core", "nowhere"),
    ],
)
def test_caller_mistakes_raise(call):
    with pytest.raises(_core.InvalidArgumentError):
        call()


# ---------------------------------------------------------------------------------------------
# RewardKernel
# ---------------------------------------------------------------------------------------------


@st.composite
def batches(draw):
    n = draw(st.integers(0, 40))
    m = draw(st.integers(0, 6))
    return {
        "agents": draw(st.lists(st.sampled_from(AGENTS), min_size=n, max_size=n)),
        "format_ok": np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool),
        "task": np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)), dtype=np.float64),
        "policy_tokens": np.array(draw(st.lists(TOKENS, min_size=n, max_size=n)), dtype=np.float64),
        "expert_tokens": np.array(draw(st.lists(TOKENS, min_size=n, max_size=n)), dtype=np.float64),
        "retrieved_kinds": np.array(
            draw(st.lists(st.lists(st.integers(-1, 2), min_size=m, max_size=m), min_size=n, max_size=n)),
            dtype=np.int8,
        ).reshape(n, m),
        "valid": np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool),
    }


@settings(max_examples=150, deadline=None)
@given(configs(), batches(), st.booleans())
def test_kernel_matches_reference(fields, batch, with_extras):
    kernel = _core.RewardKernel(_core.RewardConfig(**fields))
    extras = {"retrieved_kinds": batch["retrieved_kinds"], "valid": batch["valid"]} if with_extras else {}
    out = kernel.score(
        batch["agents"],
        batch["format_ok"],
        batch["task"],
        batch["policy_tokens"],
        batch["expert_tokens"],
        **extras,
    )
    pens, rewards, weights, doms = ref.score(
        batch["agents"],
        batch["format_ok"],
        batch["task"],
        batch["policy_tokens"],
        batch["expert_tokens"],
        ref.Config(**fields),
        retrieved_kinds=batch["retrieved_kinds"] if with_extras else None,
        valid=batch["valid"] if with_extras else None,
    )
    n = len(batch["agents"])
    assert len(out) == n
    for arr, dtype in [
        (out.reward, np.float64),
        (out.weight, np.float64),
        (out.length_penalty, np.float64),
        (out.policy_tokens, np.float64),
        (out.format_ok, np.bool_),
    ]:
        assert arr.dtype == dtype and arr.shape == (n,)
    np.testing.assert_allclose(out.length_penalty, pens, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.reward, rewards, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out.weight, weights)
    assert out.dominant == doms
    np.testing.assert_array_equal(out.format_ok, batch["format_ok"])
    np.testing.assert_array_equal(out.policy_tokens, batch["policy_tokens"])
    np.testing.assert_allclose(
        kernel.length_penalties(batch["agents"], batch["policy_tokens"], batch["expert_tokens"]),
        pens,
        rtol=1e-12,
        atol=1e-12,
    )


@settings(max_examples=150, deadline=None)
@given(batches(), st.booleans())
def test_kernel_counts_are_retrieval_counts(batch, with_kinds):
    """The counts the kernel takes the dominant kind from are what retrieval_counts gives per row."""
    n = len(batch["agents"])
    args = [batch[k] for k in ("agents", "format_ok", "task", "policy_tokens", "expert_tokens")]
    kinds = batch["retrieved_kinds"] if with_kinds else None
    out = _core.RewardKernel().score(*args, retrieved_kinds=kinds)
    assert out.retrieved.dtype == np.int64 and out.retrieved.shape == (n, 3)
    for i in range(n):
        counts = _core.retrieval_counts(kinds[i]) if with_kinds else (0, 0, 0)
        if with_kinds:
            assert counts == ref.retrieval_counts(kinds[i])
        assert tuple(out.retrieved[i].tolist()) == counts
        assert out.dominant[i] == _core.dominant_kind(counts)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet=st.sampled_from("ab é😀\n\t"), max_size=40), max_size=6),
    st.sampled_from(AGENTS),
    st.booleans(),
)
def test_approx_content_tokens_is_approx_tokens_of_the_content_text(texts, agent, broken):
    """What the scorer passes as the policy's length when no tokenizer is given."""
    if agent == "core":
        raw = json.dumps({"operation": "APPEND", "content": " ".join(texts)})
    else:
        raw = json.dumps({"operations": [{"action": "ADD", "memory": t} for t in texts]})
    raws = [raw[: len(raw) // 2] if broken else raw, "not json", ""]
    parses = _core.parse_actions_batch([agent] * len(raws), raws)
    got = _core.approx_content_tokens(parses)
    assert got.dtype == np.float64
    assert got.tolist() == [float(_core.approx_tokens(p.content_text())) for p in parses]


def test_invalid_sample_gets_reward_and_weight_zero():
    kernel = _core.RewardKernel()
    out = kernel.score(
        ["semantic", "semantic"],
        np.array([True, True]),
        np.array([1.0, 1.0]),
        np.array([10.0, 10.0]),
        np.array([10.0, 10.0]),
        retrieved_kinds=np.array([[1, 1], [1, 1]], dtype=np.int8),
        valid=np.array([True, False]),
    )
    assert list(out.reward) == [1.0, 0.0]
    assert list(out.weight) == [4.0, 0.0]


def test_kernel_accepts_array_likes_and_exposes_config():
    cfg = _core.RewardConfig(length_lambda=0.5)
    kernel = _core.RewardKernel(cfg)
    assert kernel.config == cfg
    out = kernel.score(["core"], [True], [1.0], [275], [0], retrieved_kinds=[[0, 1]])
    assert close(float(out.reward[0]), 1.0 - 0.5 * 0.5)
    kernel.config = _core.RewardConfig(length_penalty_enabled=False)
    assert kernel.score(["core"], [True], [1.0], [275], [0]).reward[0] == 1.0
    assert "RewardKernel" in repr(kernel)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"task": np.array([1.0])}, "task has 1"),
        ({"policy_tokens": np.array([1.0, np.nan])}, "finite"),
        ({"expert_tokens": np.array([1.0, -1.0])}, ">= 0"),
        ({"task": np.array([np.inf, 1.0])}, "finite"),
        ({"format_ok": np.array([1.0, 0.0])}, "booleans"),
        ({"retrieved_kinds": np.array([[0], [5]], dtype=np.int8)}, "kind code 5"),
        ({"retrieved_kinds": np.array([0, 1], dtype=np.int8)}, "shape"),
        ({"valid": np.array([True])}, "valid has 1"),
        ({"agents": ["core", "nobody"]}, "unknown agent"),
    ],
)
def test_kernel_caller_mistakes_raise(kwargs, fragment):
    args = {
        "agents": ["core", "episodic"],
        "format_ok": np.array([True, True]),
        "task": np.array([1.0, 0.5]),
        "policy_tokens": np.array([10.0, 10.0]),
        "expert_tokens": np.array([10.0, 10.0]),
    }
    args.update(kwargs)
    with pytest.raises(_core.InvalidArgumentError, match=fragment):
        _core.RewardKernel().score(**args)


def test_score_outputs_parses_gates_and_counts_content():
    memory = "x" * 1000
    raws = [
        json.dumps({"operations": [{"action": "ADD", "memory": memory}]}),
        "not json at all",
        json.dumps({"operation": "APPEND", "content": "y" * 1200}),
    ]
    agents = ["episodic", "semantic", "core"]
    kernel = _core.RewardKernel()
    results, out = kernel.score_outputs(agents, raws, np.array([1.0, 1.0, 1.0]), np.array([10.0, 10.0, 0.0]))
    assert [r.ok for r in results] == [True, False, True]
    assert list(out.format_ok) == [True, False, True]
    assert list(out.policy_tokens) == [250.0, 0.0, 300.0]
    assert out.reward[1] == 0.0
    # 250 tokens against an expert's 10: ratio 25, full penalty.
    assert close(float(out.reward[0]), 1.0 - 0.8)
    assert close(float(out.reward[2]), 1.0 - 0.8 * (300 - 150) / 250)
    # Several texts: counted as their content text (joined with newlines) is, like the scorer does.
    two = [
        json.dumps({"operations": [{"action": "ADD", "memory": "abcd"}, {"action": "ADD", "memory": "efg"}]})
    ]
    parsed, out_two = kernel.score_outputs(["semantic"], two, [1.0], [1.0])
    assert list(out_two.policy_tokens) == [_core.approx_tokens("abcd\nefg")] == [2]
    assert list(out_two.policy_tokens) == list(_core.approx_content_tokens(parsed))
    # Given policy tokens (from a real tokenizer) replace the approximate count.
    _, out2 = kernel.score_outputs(
        agents, raws, [1.0, 1.0, 1.0], [10.0, 10.0, 0.0], policy_tokens=[10.0, 10.0, 10.0]
    )
    assert list(out2.reward) == [1.0, 0.0, 1.0]
    with pytest.raises(_core.InvalidArgumentError):
        kernel.score_outputs(agents, raws[:2], [1.0] * 3, [1.0] * 3)
