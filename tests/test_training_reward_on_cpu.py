"""The reward function inside verl's own reward loop, against the scripted server.

A small RL parquet is made by the real data pipeline (``membuilder trajectories`` -> ``qa-gen`` ->
``export-rl``, with a scripted expert) for a two-session conversation; session 1's four rows, with
two rollouts each, are scored by verl's ``RewardLoopManager`` workers (Ray actors, local Ray with 2
CPUs), one request per sample as verl's agent loop sends them, in both pairing modes. The script is
chosen so that every reward and weight can be worked out by hand (see ``test_training_scorer.py``):

* the base state holds one episodic memory; the session's two questions are answerable only from
  "...cat named Tom" (an episodic ADD) and "Alice works at Acme" (a semantic ADD);
* the answer model answers the gold only when the memory it needs is in the prompt, and the judge
  marks an answer correct unless it is the "no answer" sentinel;
* with top-k 10 every live memory is retrieved for every question, so retrieval counts are the
  bank sizes times the number of questions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.train,
    # verl announces its optional engines (torchtitan, megatron, ...) as warnings when imported.
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
]

verl = pytest.importorskip("verl")
ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from membuilder.testing import ScriptedOpenAIServer

# The scenario (script, outputs, rewards worked out by hand) is shared with the scorer's own tests.
from test_training_scorer import (
    AGENTS,
    CORE_PENALTY,
    EMBEDDER,
    EXPECTED,
    EXPERT,
    QUESTIONS,
    ROLLOUTS,
    responder,
)

SESSION_1 = "I adopted a cat named Tom last week, and I started working at Acme."
TINY_LONGMEMEVAL = [
    {
        "question_id": "c1",
        "question_type": "single-session-user",
        "question": "Where does Alice work?",
        "answer": "Acme",
        "question_date": "2024/03/01 (Fri) 10:00",
        "haystack_session_ids": ["s0", "s1"],
        "haystack_dates": ["2024/01/01 (Mon) 10:00", "2024/02/01 (Thu) 10:00"],
        "haystack_sessions": [
            [
                {"role": "user", "content": "I just moved to Paris."},
                {"role": "assistant", "content": "Welcome!"},
            ],
            [{"role": "user", "content": SESSION_1}, {"role": "assistant", "content": "Congratulations!"}],
        ],
        "answer_session_ids": ["s1"],
    }
]
SESSION_0_EXPERT = {
    "core": json.dumps({"operation": "APPEND", "content": "User is Alice."}),
    "episodic": json.dumps({"operations": [{"action": "ADD", "memory": "2024-01-01: Alice moved to Paris"}]}),
    "semantic": json.dumps({"operations": []}),
    "procedural": json.dumps({"operations": []}),
}


def expert_responder(request: Any) -> str:
    """The 'expert' of the recording: session 0 gives the base state, session 1 the scenario's experts."""
    text = "\n".join(str(m.get("content", "")) for m in request.messages)
    session_1 = "adopted a cat named Tom last week" in text
    if str(request.tag).startswith("agent:"):
        agent = request.tag.split(":", 1)[1]
        return EXPERT[agent] if session_1 else SESSION_0_EXPERT[agent]
    if request.tag == "qa-gen":
        items = (
            QUESTIONS
            if session_1
            else [
                {"question": "Which city did I move to?", "answer": "Paris", "type": "single-session"},
                {"question": "When did I move?", "answer": "January 2024", "type": "temporal-reasoning"},
            ]
        )
        return json.dumps({"questions": [{k: q[k] for k in ("question", "answer", "type")} for q in items]})
    raise AssertionError(f"unexpected call {request.tag}")


@pytest.fixture(scope="module")
def rl_parquet(tmp_path_factory) -> Path:
    """A real RL export: trajectories -> qa-gen -> export-rl on a two-session conversation."""
    from membuilder.cli import main as cli_main

    root = tmp_path_factory.mktemp("rl")
    data = root / "tiny_longmemeval.json"
    data.write_text(json.dumps(TINY_LONGMEMEVAL))
    traj = root / "traj"
    endpoint = ["--provider", "compatible", "--api-key", "k", "--max-retries", "0"]
    with ScriptedOpenAIServer(expert_responder) as server:
        endpoint += ["--base-url", server.base_url]
        rc = cli_main(
            ["trajectories", "--dataset", "longmemeval", "--data-path", str(data), "--expert-model", "expert-m",
             "--embedder", EMBEDDER, "--output-dir", str(traj), *endpoint]
        )  # fmt: skip
        assert rc == 0
        rc = cli_main(
            ["qa-gen", "--trajectories", str(traj), "--per-session", "2", "--model", "qa-m", *endpoint]
        )
        assert rc == 0
        assert not server.errors, server.errors
    out = root / "rl" / "train.parquet"
    assert cli_main(["export-rl", "--trajectories", str(traj), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level tokenizer built here (no download): decode(encode(text)) == text."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    assert fast.decode(fast.encode("Tom — ümlaut {json}")) == "Tom — ümlaut {json}"
    return out


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    started = not ray.is_initialized()
    if started:
        # The workers run this interpreter with this environment, so they import membuilder as we do.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _config(
    tokenizer_dir: Path,
    parquet: Path,
    server: ScriptedOpenAIServer,
    pairing: str,
    protocol: str = "membuilder",
    extra: tuple[str, ...] = (),
):
    from hydra import compose, initialize_config_dir

    rk = "+reward.custom_reward_function.reward_kwargs"
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={tokenizer_dir}",
                f"reward.num_workers={1 if pairing == 'joint' else 2}",
                "reward.custom_reward_function.path=pkg://membuilder.training.reward",
                "reward.custom_reward_function.name=compute_score",
                "reward.reward_manager.source=importlib",
                "reward.reward_manager.name=MembuilderRewardManager",
                "reward.reward_manager.module.path=pkg://membuilder.training.reward_manager",
                f"{rk}.protocol={protocol}",
                f"{rk}.pairing={pairing}",
                f"{rk}.answer_model=answer-m",
                f"{rk}.judge_model=judge-m",
                f"{rk}.base_url='{server.base_url}'",
                f"{rk}.api_key=test-key",
                f"{rk}.embedder='{EMBEDDER}'",
                f"{rk}.state_root='{parquet.parent}'",
                f"{rk}.max_retries=0",
                *(f"{rk}.{kv}" for kv in extra),
            ],
        )


def _sample(tokenizer, row: dict, response: str, rollout: int):
    """One sample as verl's agent loop hands it to a reward-loop worker."""
    from tensordict import TensorDict
    from verl.protocol import DataProto

    prompt = torch.tensor(tokenizer.encode(row["prompt"][0]["content"]), dtype=torch.int64)
    resp = torch.tensor(tokenizer.encode(response), dtype=torch.int64)
    ids = torch.cat([prompt, resp])
    batch = TensorDict(
        {
            "prompts": prompt[None],
            "responses": resp[None],
            "attention_mask": torch.ones_like(ids)[None],
            "input_ids": ids[None],
            "position_ids": torch.arange(len(ids))[None],
        },
        batch_size=1,
    )
    kwargs = {
        "data_source": row["data_source"],
        "reward_model": row["reward_model"],
        "extra_info": row["extra_info"],
        "uid": f"uid-{row['extra_info']['index']}",
        "session_id": rollout,
    }
    ntb = {k: np.array([v], dtype=object) for k, v in kwargs.items()}
    ntb["__num_turns__"] = np.array([2])
    ntb["tool_extra_fields"] = np.array([{}], dtype=object)
    return DataProto(batch=batch, non_tensor_batch=ntb)


def _run(
    pairing: str,
    tokenizer_dir: Path,
    rl_parquet: Path,
    protocol: str = "membuilder",
    rollouts: dict[str, list[str]] = ROLLOUTS,
    extra: tuple[str, ...] = (),
) -> tuple[dict, ScriptedOpenAIServer]:
    from transformers import AutoTokenizer
    from verl.experimental.reward_loop import RewardLoopManager

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [r for r in pq.read_table(rl_parquet).to_pylist() if r["extra_info"]["session_index"] == 1]
    assert [r["extra_info"]["agent"] for r in rows] == list(AGENTS)
    with ScriptedOpenAIServer(responder) as server:
        manager = RewardLoopManager(_config(tokenizer_dir, rl_parquet, server, pairing, protocol, extra))
        workers = manager.reward_loop_worker_handles
        refs, keys = [], []
        for i, row in enumerate(rows):
            agent = row["extra_info"]["agent"]
            for r, response in enumerate(rollouts[agent]):
                worker = workers[(i * 2 + r) % len(workers)]  # verl picks at random; spread them
                refs.append(worker.compute_score.remote(_sample(tokenizer, row, response, r)))
                keys.append((agent, r))
        results = dict(zip(keys, ray.get(refs, timeout=120)))
        for w in workers:
            ray.kill(w)
        assert not server.errors, server.errors
    return results, server


@pytest.mark.parametrize("pairing", ["expert", "joint"])
def test_rewards_and_weights_through_verl_reward_loop(pairing, local_ray, tokenizer_dir, rl_parquet) -> None:
    results, server = _run(pairing, tokenizer_dir, rl_parquet)
    expected = EXPECTED[pairing]
    assert set(results) == set(expected)
    keysets = {tuple(sorted(res["reward_extra_info"])) for res in results.values()}
    assert len(keysets) == 1  # verl needs the same extra keys for every sample
    for key, (reward, weight) in expected.items():
        res = results[key]
        info = res["reward_extra_info"]
        assert res["reward_score"] == pytest.approx(reward, abs=1e-9), key
        assert info["adrpo_weight"] == pytest.approx(weight), key
        assert info["reward_valid"] == 1.0, key
        assert info["format_ok"] == (0.0 if key == ("core", 1) else 1.0), key
    assert results[("core", 0)]["reward_extra_info"]["length_penalty"] == pytest.approx(CORE_PENALTY)
    if pairing == "joint":
        assert all(res["reward_extra_info"]["paired_with_expert"] == 0.0 for res in results.values())
        # rollout 1: base Paris + shopping (episodic), one procedure -> per question (2, 0, 1)
        info = results[("procedural", 1)]["reward_extra_info"]
        assert (info["retrieved_episodic"], info["retrieved_semantic"], info["retrieved_procedural"]) == (
            4,
            0,
            2,
        )
    else:
        info = results[("procedural", 1)]["reward_extra_info"]
        assert (info["retrieved_episodic"], info["retrieved_semantic"], info["retrieved_procedural"]) == (
            4,
            2,
            2,
        )
    assert server.count("answer") > 0 and server.count("judge") > 0


# The paper protocol (joint pairing, rollout-only QA scope, strict gate) on the same parquet. By hand:
# top-k 10 = 2k 20 holds every entry, so the QA sees the core block and the rollout's new memories
# only (base "Alice moved to Paris" is never counted). Rollout 0: Tom and Acme -> task 1; per
# question one episodic and one semantic memory -> (2, 2, 0), episodic dominates on the tie.
# Rollout 1: the core SKIP and the reason-less semantic SKIP fail the strict gate (0, and the
# semantic adds nothing); shopping and a procedure answer nothing -> task 0; counts (2, 0, 2).
PAPER_ROLLOUTS = {
    "core": [ROLLOUTS["core"][0], json.dumps({"operation": "SKIP"})],
    "episodic": ROLLOUTS["episodic"],
    "semantic": [EXPERT["semantic"], json.dumps({"operations": [{"action": "SKIP"}]})],
    "procedural": ROLLOUTS["procedural"],
}
CORE_R0 = 1.0 * (1 - 0.8 * CORE_PENALTY)
PAPER_EXPECTED = {  # (reward, weight, format_ok)
    ("core", 0): (CORE_R0, 1.0, 1.0),
    ("episodic", 0): (1.0, 4.0, 1.0),
    ("semantic", 0): (1.0, 1.0, 1.0),
    ("procedural", 0): (1.0, 1.0, 1.0),
    ("core", 1): (0.0, 1.0, 0.0),
    ("episodic", 1): (0.0, 4.0, 1.0),
    ("semantic", 1): (0.0, 1.0, 0.0),
    ("procedural", 1): (0.0, 1.0, 1.0),
}
# With the sparse ablation (drop rate 0.5, default 1.0, seed 42: draws 0.639 then 0.025) exactly
# one of the two session-rollouts keeps its QA reward: the one drawn second (verl's workers decide
# which arrives first, as the reference's thread pool does). The dropped one gets the default task
# reward 1.0 (times the length factor) where it passed the gate, with no dominant kind (weight 1).
SPARSE_DROPPED = {  # rollout -> agent -> (reward, weight, format_ok)
    0: {
        "core": (CORE_R0, 1.0, 1.0),
        "episodic": (1.0, 1.0, 1.0),
        "semantic": (1.0, 1.0, 1.0),
        "procedural": (1.0, 1.0, 1.0),
    },
    1: {
        "core": (0.0, 1.0, 0.0),  # the core SKIP fails the strict gate
        "episodic": (1.0, 1.0, 1.0),
        "semantic": (0.0, 1.0, 0.0),  # the reason-less SKIP fails it too
        "procedural": (1.0, 1.0, 1.0),
    },
}


@pytest.mark.parametrize("sparse", [False, True])
def test_paper_protocol_through_verl_reward_loop(sparse, local_ray, tokenizer_dir, rl_parquet) -> None:
    extra = ("sparse_reward=true",) if sparse else ()
    results, server = _run("joint", tokenizer_dir, rl_parquet, "paper", PAPER_ROLLOUTS, extra)
    assert set(results) == set(PAPER_EXPECTED)
    dropped = {k[1] for k, res in results.items() if res["reward_extra_info"]["sparse_dropped"] == 1.0}
    assert len(dropped) == (1 if sparse else 0)
    expected = dict(PAPER_EXPECTED)
    for r in dropped:
        expected.update({(a, r): v for a, v in SPARSE_DROPPED[r].items()})
    for key, (reward, weight, fmt) in expected.items():
        res = results[key]
        info = res["reward_extra_info"]
        assert res["reward_score"] == pytest.approx(reward, abs=1e-9), key
        got = (info["adrpo_weight"], info["format_ok"], info["reward_valid"])
        assert got == pytest.approx((weight, fmt, 1.0)), key
        # models and embedder are set by the test: overrides of the protocol, recorded as such
        assert (info["protocol_id"], info["protocol_overridden"]) == (0.0, 1.0), key
        assert info["sparse_dropped"] == float(key[1] in dropped), key
    counts = {
        k: tuple(res["reward_extra_info"][f"retrieved_{b}"] for b in ("episodic", "semantic", "procedural"))
        for k, res in results.items()
    }
    assert counts[("procedural", 0)] == ((0, 0, 0) if 0 in dropped else (2, 2, 0))
    assert counts[("procedural", 1)] == ((0, 0, 0) if 1 in dropped else (2, 0, 2))
    # a dropped session-rollout asks nothing: two questions per kept one
    assert server.count("answer") == 2 * (2 - len(dropped))


def test_lengths_counted_with_the_policy_tokenizer(tokenizer_dir, rl_parquet) -> None:
    """With a tokenizer, the policy's and the expert's contents are both counted in its tokens.

    The test tokenizer has one token per byte, so the 1000-character core content is 1000 tokens
    (over theta_max: penalty 1, reward 1 - 0.8) and the expert's episodic memory is 41 tokens.
    """
    from membuilder.training import GroundTruth, RewardSample, RewardScorer, ScorerConfig

    rows = [r for r in pq.read_table(rl_parquet).to_pylist() if r["extra_info"]["session_index"] == 1]
    truths = {r["extra_info"]["agent"]: GroundTruth.from_obj(r["reward_model"]["ground_truth"]) for r in rows}
    batch = [
        RewardSample(truths["core"], ROLLOUTS["core"][0], 0),
        RewardSample(truths["episodic"], ROLLOUTS["episodic"][1], 1),
    ]
    with ScriptedOpenAIServer(responder) as server:
        cfg = ScorerConfig(
            answer_model="answer-m",
            base_url=server.base_url,
            api_key="k",
            embedder=EMBEDDER,
            state_root=str(rl_parquet.parent),
            tokenizer=str(tokenizer_dir),
            protocol="membuilder",
        )
        core, eps = RewardScorer(cfg).score_sync(batch)
    assert core.policy_tokens == 1000 and core.length_penalty == 1.0
    assert core.reward == pytest.approx(1.0 * (1 - 0.8))
    assert eps.expert_tokens == len("2024-02-01: Alice adopted a cat named Tom")
    assert eps.policy_tokens == len("2024-02-01: Alice went shopping")
    assert eps.reward == pytest.approx(0.5)  # within 200 tokens of the expert: no penalty
