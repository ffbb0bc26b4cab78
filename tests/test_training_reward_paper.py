"""The reward under the ``paper`` protocol, on a scene whose rewards are worked out by hand.

No verl here (default suite); ``test_training_reward_on_cpu.py`` runs the paper protocol through
verl's reward loop too. The embedder is a lookup whose scores against every question are chosen,
so the reference's QA scope can be followed by hand:

* the base state holds four episodic memories scoring 0.99, 0.98, 0.97 and 0.10 against every
  question; the rollout adds "needle" (0.96) and "straw" (0.50); top-k is 2, so 2k = 4;
* whole index ranked: b1 b2 b3 needle straw b4. The top 4 hold one new memory, needle: under
  ``rollout_only`` the QA sees the core block and needle alone (fewer than k), straw is cut off;
* under ``whole_state`` the top 2 are b1 and b2: neither new memory is seen.

Questions: one answerable from needle, one from straw. So the task reward is 1/2 under the paper
protocol and 0 under membuilder's scope, and the retrieval counts are 1 (paper) and 2
(membuilder) episodic memories per question.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from membuilder import MemoryState, Provenance
from membuilder.testing import ScriptedOpenAIServer
from membuilder.training import GroundTruth, RewardSample, RewardScorer, ScorerConfig
from membuilder.training.format_gate import strict_format_ok

AGENTS = ("core", "episodic", "semantic", "procedural")
NO_ANSWER = "NO-ANSWER-19c"
DIM = 4
# word in the text -> cosine with every question
SCORES = {"b1": 0.99, "b2": 0.98, "b3": 0.97, "b4": 0.10, "needle": 0.96, "straw": 0.50}
BASE = ["b1: Bob lives in Oslo", "b2: Bob has a dog", "b3: Bob likes tea", "b4: Bob once met Eve"]
NEEDLE = "needle: the locker code is 4412"
STRAW = "straw: the bike is blue"
QUESTIONS = [
    {"question": "What is the locker code?", "answer": "4412", "type": "single-session"},
    {"question": "What colour is the bike?", "answer": "blue", "type": "single-session"},
]
GOOD = {
    "core": json.dumps({"operation": "APPEND", "content": "Bob uses a locker."}),
    "episodic": json.dumps(
        {"operations": [{"action": "ADD", "memory": NEEDLE}, {"action": "ADD", "memory": STRAW}]}
    ),
    "semantic": json.dumps({"operations": []}),
    "procedural": json.dumps({"operations": []}),
}


class LookupEmbedder:
    """Every question embeds to e0; a memory to the direction at its keyword's chosen cosine."""

    name = "lookup-4"
    dim = DIM

    def _one(self, text: str) -> np.ndarray:
        for word, score in SCORES.items():
            if word in text:
                v = np.zeros(DIM, np.float32)
                v[0], v[1] = score, math.sqrt(1.0 - score * score)
                return v
        return np.eye(DIM, dtype=np.float32)[0]  # a question

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._one(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)

    embed_queries = embed_passages

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_passages(texts)

    aembed_queries = aembed_passages


def responder(request: Any) -> str:
    text = "\n".join(str(m.get("content", "")) for m in request.messages)
    if request.tag == "answer":
        question = request.messages[-1]["content"].split("<question>")[-1]
        if "locker" in question and "code is 4412" in text:
            return "4412"
        if "bike" in question and "bike is blue" in text:
            return "blue"
        return NO_ANSWER
    if request.tag == "judge":
        return json.dumps({"label": "WRONG" if NO_ANSWER in text else "CORRECT"})
    raise AssertionError(f"unexpected call {request.tag}")


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    emb = LookupEmbedder()
    state = MemoryState(DIM)
    state.set_core("User is Bob.")
    state.add_entries("episodic", BASE, emb.embed_passages(BASE), [Provenance("c9", 0)] * len(BASE))
    (tmp_path / "states").mkdir()
    state.save(tmp_path / "states" / "s0.mbstate")
    return tmp_path


def batch(outputs: dict[str, list[str]]) -> list[RewardSample]:
    out = []
    for agent in AGENTS:
        gt = GroundTruth.from_obj(
            {
                "conversation_id": "c9",
                "session_index": 1,
                "agent": agent,
                "state_before": "states/s0.mbstate",
                "qa": QUESTIONS,
                "expert_outputs": GOOD,
                "timestamp": "2024-02-01",
            }
        )
        out += [RewardSample(gt, raw, r) for r, raw in enumerate(outputs[agent])]
    return out


def score(root: Path, server: ScriptedOpenAIServer, samples: list[RewardSample], **kw: Any) -> list:
    cfg = ScorerConfig(
        base_url=server.base_url, api_key="k", state_root=str(root), top_k=2, max_retries=0, **kw
    )
    scorer = RewardScorer(cfg, embedder=LookupEmbedder())
    return scorer.score_sync(samples), scorer


def test_rollout_only_scope_follows_the_reference_user_id_filter(root: Path) -> None:
    samples = batch({a: [GOOD[a]] for a in AGENTS})
    with ScriptedOpenAIServer(responder) as server:
        paper, scorer = score(root, server, samples)
        prompts = [r.messages[-1]["content"] for r in server.requests if r.tag == "answer"]
    assert scorer.config.resolved.label == "paper" and scorer.config.pairing == "joint"
    # 1/2: needle is seen, straw is cut off at 2k; nothing penalised; episodic dominates (alpha 4).
    assert [(r.reward, r.weight) for r in paper] == [(0.5, 1.0), (0.5, 4.0), (0.5, 1.0), (0.5, 1.0)]
    assert all(r.retrieved == (2, 0, 0) and r.valid for r in paper)  # one memory per question
    # the answer sees the core block and the new memory with its kind tag, no base memory
    assert prompts and all("[EPISODIC] " + NEEDLE in p for p in prompts)
    assert not any("Bob lives in Oslo" in p or STRAW in p for p in prompts)

    with ScriptedOpenAIServer(responder) as server:
        ours, _ = score(root, server, samples, protocol="membuilder", pairing="joint")
    assert [r.reward for r in ours] == [0.0, 0.0, 0.0, 0.0]  # top 2 of the whole state: b1, b2
    assert all(r.retrieved == (4, 0, 0) for r in ours)


def test_strict_format_gate(root: Path) -> None:
    bad = {
        "core": '{"operation": "SKIP"}',  # not a core operation in the reference: scores 0
        "episodic": GOOD["episodic"],
        "semantic": '{"operations": [{"action": "SKIP"}]}',  # a semantic SKIP needs a reason
        "procedural": "```json\n" + GOOD["procedural"] + "\n```",
    }
    samples = batch({a: [bad[a]] for a in AGENTS})
    with ScriptedOpenAIServer(responder) as server:
        paper, _ = score(root, server, samples)
    assert [r.format_ok for r in paper] == [False, True, False, True]
    assert [r.reward for r in paper] == [0.0, 0.5, 0.0, 0.5]
    with ScriptedOpenAIServer(responder) as server:
        lenient, _ = score(root, server, samples, format_gate="lenient")
    assert [r.format_ok for r in lenient] == [True, True, True, True]
    assert [r.reward for r in lenient] == [0.5, 0.5, 0.5, 0.5]


def test_an_output_through_the_gate_that_our_parser_cannot_apply_adds_nothing_in_both_pairings(
    root: Path,
) -> None:
    """The strict gate passes a core APPEND whose content is an object (it checks that the field is
    there, not its value); our parser cannot apply it. It is scored as adding nothing to the
    memory, whatever the pairing: the rest of the memory is still answered."""
    outputs = {a: [GOOD[a]] for a in AGENTS}
    outputs["core"] = ['{"operation": "APPEND", "content": {"title": "Swimming"}}']
    samples = batch(outputs)
    rewards = {}
    for pairing in ("joint", "expert"):
        with ScriptedOpenAIServer(responder) as server:
            got, _ = score(root, server, samples, pairing=pairing)
        assert got[0].format_ok and got[0].valid, pairing
        rewards[pairing] = got[0].reward
    assert rewards["expert"] == rewards["joint"] == 0.5  # the expert's episodic needle answers 1 of 2


@pytest.mark.parametrize(
    ("agent", "raw", "ok"),
    [
        ("core", '<think>plan</think>{"operation": "REPLACE", "old_text": "a", "new_text": "b"}', True),
        ("core", '{"operation": "REPLACE", "old_text": "a"}', False),
        ("core", '{"operation": "rewrite", "content": ""}', True),  # presence, not value, as the reference
        ("episodic", '{"operations": [{"action": "MERGE", "old_memories": [], "new_memory": "x"}]}', True),
        ("episodic", '{"operations": [{"action": "SKIP", "reason": "r"}]}', False),
        ("procedural", '{"operations": [{"action": "UPDATE", "new_memory": "x"}]}', False),
        ("semantic", '{"operations": {"action": "ADD"}}', False),
        ("semantic", "no json here", False),
    ],
)
def test_strict_gate_rules(agent: str, raw: str, ok: bool) -> None:
    assert strict_format_ok(agent, raw) is ok


def test_sparse_ablation_draws_once_per_session_rollout(root: Path) -> None:
    """Seed 42's draws are 0.639, 0.025, 0.275, 0.223: with drop rate 0.5 the first session-rollout
    keeps its QA reward, the next three get the default reward 1.0 without any QA call."""
    samples = batch({a: [GOOD[a], GOOD[a]] for a in AGENTS})
    with ScriptedOpenAIServer(responder) as server:
        cfg = ScorerConfig(
            base_url=server.base_url, api_key="k", state_root=str(root), top_k=2, max_retries=0,
            sparse_reward=True,
        )  # fmt: skip
        scorer = RewardScorer(cfg, embedder=LookupEmbedder())

        async def two_batches() -> tuple[list, list, int]:
            first = await scorer.score(samples)
            calls = server.count("answer")
            second = await scorer.score(samples)
            await scorer.aclose()
            return first, second, calls

        first, second, calls_first = asyncio.run(two_batches())
        calls_second = server.count("answer") - calls_first
    assert cfg.resolved.overrides == {"sparse_reward": cfg.resolved.sparse_reward}
    assert cfg.resolved.sparse_reward.default_reward == 1.0 and cfg.resolved.sparse_reward.seed == 42
    got = {(s.agent, s.rollout_index): r for s, r in zip(samples, first)}
    for a in AGENTS:
        assert got[(a, 0)].reward == 0.5 and not got[(a, 0)].sparse_dropped
        assert got[(a, 1)].reward == 1.0 and got[(a, 1)].weight == 1.0 and got[(a, 1)].sparse_dropped
        assert got[(a, 1)].dominant is None
    assert calls_first == 2  # rollout 0's two questions (rollout 1 shares its memory but is dropped)
    assert all(r.reward == 1.0 and r.sparse_dropped for r in second) and calls_second == 0
    assert scorer.stats.sparse_dropped == 3
    assert scorer.stats.as_dict()["protocol"]["label"] == "paper+overrides"
    verl = first[0].to_verl()
    assert (verl["protocol_id"], verl["protocol_overridden"], verl["sparse_dropped"]) == (0.0, 1.0, 0.0)


def test_paper_uses_the_first_five_questions(root: Path) -> None:
    qa = [dict(QUESTIONS[0], question=f"What is the locker code ({i})?") for i in range(7)]
    gt = {
        "conversation_id": "c9", "session_index": 1, "state_before": "states/s0.mbstate", "qa": qa,
        "expert_outputs": GOOD, "timestamp": "2024-02-01",
    }  # fmt: skip
    samples = [RewardSample(GroundTruth.from_obj(dict(gt, agent=a)), GOOD[a], 0) for a in AGENTS]
    with ScriptedOpenAIServer(responder) as server:
        score(root, server, samples)
        assert server.count("answer") == 5
    with ScriptedOpenAIServer(responder) as server:
        score(root, server, samples, max_questions=0)
        assert server.count("answer") == 7


def test_unreadable_verdict_counts_as_wrong_under_paper(root: Path) -> None:
    """The paper's judge scores a verdict it cannot read as WRONG; membuilder leaves the sample out."""

    def mumbling(request: Any) -> str:
        return "hmm, hard to say" if request.tag == "judge" else responder(request)

    samples = batch({a: [GOOD[a]] for a in AGENTS})
    with ScriptedOpenAIServer(mumbling) as server:
        paper, scorer = score(root, server, samples)
    assert all(r.valid and r.task == 0.0 and r.reward == 0.0 for r in paper)
    assert scorer.stats.failures == {"judge_unreadable_as_wrong": 2}
    with ScriptedOpenAIServer(mumbling) as server:
        ours, _ = score(root, server, samples, protocol="membuilder", pairing="joint")
    assert not any(r.valid for r in ours) and all(r.weight == 0.0 for r in ours)


def test_reward_judge_wording_follows_the_protocol(root: Path) -> None:
    """Under paper the reward judges with the generous evaluation wording (the reference's reward
    server calls its eval judge); under membuilder with the strict one."""
    from membuilder.judge import JUDGE_GENEROUS_SYSTEM

    samples = batch({a: [GOOD[a]] for a in AGENTS})
    systems = {}
    for name in ("paper", "membuilder"):
        with ScriptedOpenAIServer(responder) as server:
            score(root, server, samples, protocol=name, pairing="joint")
            systems[name] = {r.messages[0]["content"] for r in server.requests if r.tag == "judge"}
    assert systems["paper"] == {JUDGE_GENEROUS_SYSTEM}
    assert systems["membuilder"] and JUDGE_GENEROUS_SYSTEM not in systems["membuilder"]
