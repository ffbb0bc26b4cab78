"""The reward scorer against the scripted server, on a session whose rewards are worked out by hand.

This module needs no verl: it runs in the default suite. The same scenario is scored through
verl's own reward loop in ``test_training_reward_on_cpu.py``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from membuilder import MemoryState, Provenance, parse_actions
from membuilder.embed import make_embedder
from membuilder.testing import ScriptedOpenAIServer
from membuilder.training import GroundTruth, GroundTruthError, RewardSample, RewardScorer, ScorerConfig
from membuilder.training.reward import RewardBatcher, compute_score, scorer_config_from_kwargs

EMBEDDER = "hash:64"
NO_ANSWER = "NO-ANSWER-7f3"
AGENTS = ("core", "episodic", "semantic", "procedural")
QUESTIONS = [
    {
        "id": "c1:1:0",
        "question": "What is the name of Alice's cat?",
        "answer": "Tom",
        "type": "single-session",
    },
    {"id": "c1:1:1", "question": "Where does Alice work?", "answer": "Acme", "type": "single-session"},
]
TOM = "2024-02-01: Alice adopted a cat named Tom"
ACME = "Alice works at Acme"
LONG_CORE = "tea " * 249 + "teas"  # 1000 characters = 250 approximate tokens
EXPERT = {
    "core": json.dumps({"operation": "APPEND", "content": "Alice has a cat."}),
    "episodic": json.dumps({"operations": [{"action": "ADD", "memory": TOM}]}),
    "semantic": json.dumps({"operations": [{"action": "ADD", "memory": ACME}]}),
    "procedural": json.dumps({"operations": []}),
}
ROLLOUTS = {  # agent -> [rollout 0, rollout 1]
    "core": [json.dumps({"operation": "APPEND", "content": LONG_CORE}), "I would rather not."],
    "episodic": [
        EXPERT["episodic"],
        json.dumps({"operations": [{"action": "ADD", "memory": "2024-02-01: Alice went shopping"}]}),
    ],
    "semantic": [EXPERT["semantic"], json.dumps({"operations": []})],
    "procedural": [
        json.dumps({"operations": []}),
        json.dumps(
            {"operations": [{"action": "ADD", "memory": "Feeding the cat: open a can, pour the food"}]}
        ),
    ],
}
CORE_PENALTY = (250 - 150) / (400 - 150)  # core: linear between theta_min 150 and theta_max 400 tokens
CORE_R0 = 1.0 * (1 - 0.8 * CORE_PENALTY)  # task 1, lambda 0.8
# By hand. Bank length penalties are 0 (every length within 200 tokens of the expert's); with
# top-k 10 every memory is retrieved for both questions, so episodic (base + 1 new) dominates.
EXPECTED = {
    "expert": {  # each rollout with the expert's actions for the other three agents
        ("core", 0): (CORE_R0, 1.0),
        ("core", 1): (0.0, 1.0),  # format gate
        ("episodic", 0): (1.0, 4.0),  # alpha for the dominant kind's agent
        ("episodic", 1): (0.5, 4.0),  # shopping instead of Tom: only Acme is answerable
        ("semantic", 0): (1.0, 1.0),
        ("semantic", 1): (0.5, 1.0),  # no Acme
        ("procedural", 0): (1.0, 1.0),
        ("procedural", 1): (1.0, 1.0),
    },
    "joint": {  # the r-th rollouts of the four agents together
        ("core", 0): (CORE_R0, 1.0),
        ("episodic", 0): (1.0, 4.0),
        ("semantic", 0): (1.0, 1.0),
        ("procedural", 0): (1.0, 1.0),
        ("core", 1): (0.0, 1.0),
        ("episodic", 1): (0.0, 4.0),  # shopping, no Acme, a procedure: nothing answerable
        ("semantic", 1): (0.0, 1.0),
        ("procedural", 1): (0.0, 1.0),
    },
}


def responder(request: Any) -> str:
    """Answers the gold only when the memory it needs is in the prompt; judges the sentinel WRONG."""
    text = "\n".join(str(m.get("content", "")) for m in request.messages)
    if request.tag == "answer":
        question = request.messages[-1]["content"].split("<question>")[-1]
        if "cat" in question and "named Tom" in text:
            return "Tom"
        if "work" in question and "at Acme" in text:
            return "Acme"
        return NO_ANSWER
    if request.tag == "judge":
        return json.dumps({"label": "WRONG" if NO_ANSWER in text else "CORRECT"})
    raise AssertionError(f"unexpected call {request.tag}")


def write_base_state(root: Path) -> Path:
    emb = make_embedder(EMBEDDER)
    state = MemoryState(emb.dim)
    state.set_core("User is Alice.")
    base = ["2024-01-01: Alice moved to Paris"]
    state.add_entries("episodic", base, emb.embed_passages(base), [Provenance("c1", 0, "2024-01-01")])
    path = root / "states" / "s0.mbstate"
    path.parent.mkdir(parents=True, exist_ok=True)
    state.save(path)
    return path


def ground_truth(agent: str, state_rel: str = "states/s0.mbstate") -> dict[str, Any]:
    """The RL export's ground truth for this scenario (the fields the scorer reads)."""
    experts = []
    for a in AGENTS:
        p = parse_actions(a, EXPERT[a])
        experts.append({"agent": a, "raw_output": EXPERT[a], "ok": p.ok, "content_chars": p.content_chars})
    return {
        "version": 1,
        "conversation_id": "c1",
        "session_index": 1,
        "timestamp": "2024-02-01",
        "agent": agent,
        "state_before": state_rel,
        "embedder": EMBEDDER,
        "expert_content_chars": parse_actions(agent, EXPERT[agent]).content_chars,
        "experts": experts,
        "qa": [dict(q, asked_at="2024-02-01") for q in QUESTIONS],
    }


def samples(agents=AGENTS, rollouts=(0, 1), state_rel: str = "states/s0.mbstate") -> list[RewardSample]:
    return [
        RewardSample(GroundTruth.from_obj(json.dumps(ground_truth(a, state_rel))), ROLLOUTS[a][r], r)
        for a in agents
        for r in rollouts
    ]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    write_base_state(tmp_path)
    return tmp_path


def _scorer(root: Path, server: ScriptedOpenAIServer, **kw: Any) -> RewardScorer:
    # The scenario's hand-computed values are the membuilder protocol's (whole-state QA, lenient
    # gate); the paper protocol's are in test_training_reward_paper.py.
    kw.setdefault("protocol", "membuilder")
    cfg = ScorerConfig(
        answer_model="answer-m",
        judge_model="judge-m",
        base_url=server.base_url,
        api_key="k",
        embedder=EMBEDDER,
        state_root=str(root),
        max_retries=0,
        **kw,
    )
    return RewardScorer(cfg)


@pytest.mark.parametrize("max_concurrency", [64, 1], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("pairing", ["expert", "joint"])
def test_hand_computed_rewards_and_weights(root: Path, pairing: str, max_concurrency: int) -> None:
    # max_concurrency 1 makes the scorer embed, commit and send in chunks of 1, 2, 4... groups:
    # the same rewards, and each distinct call still sent once per batch.
    batch = samples()
    with ScriptedOpenAIServer(responder) as server:
        results = _scorer(root, server, max_concurrency=max_concurrency).score_sync(batch, pairing=pairing)
        answers, judges = server.count("answer"), server.count("judge")
    got = {(s.agent, s.rollout_index): r for s, r in zip(batch, results)}
    for key, (reward, weight) in EXPECTED[pairing].items():
        assert got[key].valid, (key, got[key].error)
        assert got[key].reward == pytest.approx(reward, abs=1e-12), key
        assert got[key].weight == pytest.approx(weight), key
    assert got[("core", 0)].length_penalty == pytest.approx(CORE_PENALTY)
    assert got[("core", 1)].format_ok is False
    if pairing == "expert":
        # groups: core r0 | eps r0 = sem r0 = proc r0 (identical to the experts) | eps r1 | sem r1 | proc r1
        assert answers == 5 * 2
        # judge triples: (cat, Tom), (work, Acme), (cat, sentinel), (work, sentinel)
        assert judges == 4
        assert got[("procedural", 1)].retrieved == (4, 2, 2)
    else:
        assert answers == 2 * 2  # two session-rollouts, two questions
        assert judges == 4  # r0: (cat, Tom), (work, Acme); r1: (cat, sentinel), (work, sentinel)
        assert got[("procedural", 1)].retrieved == (4, 0, 2)
        assert all(r.paired_with_expert == 0 for r in results)
    assert all(r.dominant == "episodic" for r in results if r.format_ok or pairing == "joint")


class _SlowEmbedder:
    """The scenario's embedder, slowed down, noting how many answers the server had when each
    passage batch finished."""

    def __init__(self, server: ScriptedOpenAIServer) -> None:
        self._inner = make_embedder(EMBEDDER)
        self.dim, self.name = self._inner.dim, self._inner.name
        self._server = server
        self.answers_seen: list[int] = []

    async def aembed_passages(self, texts: list[str]) -> np.ndarray:
        await asyncio.sleep(0.3)
        self.answers_seen.append(self._server.count("answer"))
        return self._inner.embed_passages(texts)

    async def aembed_queries(self, texts: list[str]) -> np.ndarray:
        return self._inner.embed_queries(texts)


def test_questions_go_out_while_later_memories_are_embedded(root: Path) -> None:
    """The first chunk's answer calls do not wait for the whole batch's embedding."""
    batch = samples()
    with ScriptedOpenAIServer(responder) as server:
        embedder = _SlowEmbedder(server)
        cfg = _scorer(root, server, max_concurrency=1).config
        results = RewardScorer(cfg, embedder=embedder).score_sync(batch, pairing="expert")
    assert all(r.valid for r in results)
    # 5 groups, 2 questions each, in chunks of 1, 1, 2 and 1 groups; a chunk whose texts an
    # earlier one already embedded sends no passage batch.
    assert len(embedder.answers_seen) >= 2
    assert embedder.answers_seen[0] == 0 and embedder.answers_seen[-1] >= 1


def test_local_judges_need_no_judge_calls(root: Path) -> None:
    batch = samples()
    with ScriptedOpenAIServer(responder) as server:
        results = _scorer(root, server, judge="exact").score_sync(batch, pairing="expert")
        assert server.count("judge") == 0 and server.count("answer") == 10
    got = {(s.agent, s.rollout_index): r.reward for s, r in zip(batch, results)}
    assert got == pytest.approx({k: v[0] for k, v in EXPECTED["expert"].items()})


def test_failed_calls_give_weight_zero_and_are_counted(root: Path) -> None:
    """An unreadable judge label invalidates exactly the samples that needed it; nothing is made up."""

    def unsure_on_work_sentinel(request: Any) -> str:
        text = "\n".join(str(m.get("content", "")) for m in request.messages)
        if request.tag == "judge" and NO_ANSWER in text and "does Alice work" in text:
            return "Hard to say."
        return responder(request)

    batch = samples()
    with ScriptedOpenAIServer(unsure_on_work_sentinel) as server:
        scorer = _scorer(root, server)
        results = scorer.score_sync(batch, pairing="expert")
    got = {(s.agent, s.rollout_index): r for s, r in zip(batch, results)}
    bad = got[("semantic", 1)]  # the only memory without Acme
    assert not bad.valid and bad.reward == 0.0 and bad.weight == 0.0
    assert "judge_unreadable" in bad.error
    for key, (reward, weight) in EXPECTED["expert"].items():
        if key != ("semantic", 1):
            assert got[key].valid and got[key].reward == pytest.approx(reward) and got[key].weight == weight
    assert scorer.stats.failed_samples == 1
    assert scorer.stats.failures == {"judge_unreadable": 1}


def test_http_failures_after_retries_invalidate_samples(root: Path) -> None:
    batch = samples(agents=("episodic",), rollouts=(0,))
    with ScriptedOpenAIServer(responder) as server:
        server.inject("500", times=10, tag="answer")
        scorer = _scorer(root, server)
        (res,) = scorer.score_sync(batch)
    assert not res.valid and res.weight == 0.0 and res.reward == 0.0
    assert "answer_call" in res.error
    assert scorer.stats.failed_samples == 1


def test_missing_state_is_counted_not_guessed(root: Path) -> None:
    batch = samples(agents=("semantic",), rollouts=(0,), state_rel="states/missing.mbstate")
    with ScriptedOpenAIServer(responder) as server:
        scorer = _scorer(root, server)
        (res,) = scorer.score_sync(batch)
        assert server.count() == 0
    assert not res.valid and res.weight == 0.0 and "missing.mbstate" in res.error
    assert scorer.stats.failures == {"state_load": 1}


def test_states_are_loaded_once_and_cached(root: Path) -> None:
    async def run(scorer: RewardScorer) -> None:
        await scorer.score(samples())
        await scorer.score(samples(), pairing="joint")
        await scorer.aclose()

    with ScriptedOpenAIServer(responder) as server:
        scorer = _scorer(root, server)
        asyncio.run(run(scorer))
    assert scorer.stats.states_loaded == 1
    assert scorer.stats.state_cache_hits >= 1


def test_embedder_mismatch_is_refused(root: Path) -> None:
    with ScriptedOpenAIServer(responder) as server:
        scorer = _scorer(root, server)
        scorer.config.embedder = "hash:32"
        with pytest.raises(ValueError, match="embedder"):
            scorer.score_sync(samples(rollouts=(0,)))


def test_joint_batcher_fills_missing_agents_with_the_expert(root: Path) -> None:
    """A session-rollout still incomplete after joint_wait_s is scored with the expert's actions."""
    batch = samples(agents=("episodic", "semantic"), rollouts=(1,))

    async def run(server: ScriptedOpenAIServer) -> list:
        scorer = _scorer(root, server, pairing="joint")
        batcher = RewardBatcher(scorer, pairing="joint", batch_window_s=0.01, joint_wait_s=0.2)
        try:
            return await asyncio.gather(*(batcher.score(s) for s in batch))
        finally:
            await scorer.aclose()

    with ScriptedOpenAIServer(responder) as server:
        results = asyncio.run(run(server))
    for r in results:
        assert r.valid and r.paired_with_expert == 2  # core and procedural from the expert
        assert r.task == 0.0  # shopping and no Acme


def test_compute_score_is_verl_shaped(root: Path) -> None:
    """verl calls compute_score once per sample, concurrently; the batcher scores them together."""

    async def run(server: ScriptedOpenAIServer) -> list[dict]:
        kwargs = {
            "protocol": "membuilder",
            "pairing": "expert",
            "answer_model": "answer-m",
            "base_url": server.base_url,
            "api_key": "k",
            "embedder": EMBEDDER,
            "state_root": str(root),
            "batch_window_s": "0.05",
        }
        calls = [
            compute_score(
                "membuilder/test", ROLLOUTS[a][r], json.dumps(ground_truth(a)), {"rollout_index": r}, **kwargs
            )
            for a in AGENTS
            for r in (0, 1)
        ]
        return await asyncio.gather(*calls)

    with ScriptedOpenAIServer(responder) as server:
        out = asyncio.run(run(server))
        assert server.count("answer") == 10  # one batch: every distinct prompt once
    keys = {tuple(sorted(d)) for d in out}
    assert len(keys) == 1 and "score" in keys.pop()
    rewards = [d["score"] for d in out]
    expected = [EXPECTED["expert"][(a, r)][0] for a in AGENTS for r in (0, 1)]
    np.testing.assert_allclose(rewards, expected, atol=1e-12)


def test_ground_truth_errors_name_the_field() -> None:
    gt = ground_truth("core")
    del gt["qa"]
    with pytest.raises(GroundTruthError, match="'qa'"):
        GroundTruth.from_obj(gt)
    with pytest.raises(GroundTruthError, match="version 2"):
        GroundTruth.from_obj(dict(ground_truth("core"), version=2))
    with pytest.raises(GroundTruthError, match="agent"):
        GroundTruth.from_obj(dict(ground_truth("core"), agent="planner"))
    with pytest.raises(GroundTruthError, match="JSON"):
        GroundTruth.from_obj("{not json")


def test_reward_kwargs_are_checked() -> None:
    cfg = scorer_config_from_kwargs({"pairing": "joint", "top_k": "5", "attribution_enabled": "false"})
    assert cfg.pairing == "joint" and cfg.top_k == 5 and cfg.reward == {"attribution_enabled": False}
    with pytest.raises(ValueError, match="unknown membuilder reward kwarg 'topk'"):
        scorer_config_from_kwargs({"topk": 5})
    with pytest.raises(ValueError, match="pairing"):
        scorer_config_from_kwargs({"pairing": "solo"})
