"""The per-rollout hot path of ADRPO, Rust batch path vs. the pure-Python reference.

Batch: ``BENCH_ROLLOUTS`` rollouts (default 4,096) x 4 agents, realistic 1-6 KB outputs (reasoning
blocks, code fences, prose, a few malformed ones), one shared base state (200 entries per bank).

Steps, both paths, same data, same process:

1. parse and validate every output;
2. apply: one view per rollout over the shared base, the four agents' actions planned and
   committed with precomputed random vectors (Python: an overlay of added entries per rollout,
   vectors normalised and stacked, core edited as a string);
3. length penalty (content characters / 4 against the expert's tokens) and reward.

* ``rust``: ``parse_actions_batch`` -> ``MemoryState.view()`` -> ``plan_views`` / ``commit_views``
  -> ``RewardKernel.score``; rayon limited to ``RAYON_NUM_THREADS`` (default 2).
* ``python``: ``tests/reference/actions_ref.py`` and ``reward_ref.py`` plus a plain overlay.

Both must give the same rewards and the same number of new entries per rollout; the benchmark
checks that and reports the ratio. The Rust path runs once untimed first (rayon's pool starts and
the allocator takes its pages once per process, not per batch); the timed run gets new string
objects for the outputs, so it pays for reading them (UTF-8 encoding) as a fresh batch would.
The vectors for all views go to ``commit_views`` as one stacked float32 array (read in place).
Run:

    pytest benches/bench_pipeline.py --benchmark-enable -s
    BENCH_ROLLOUTS=512 python benches/bench_pipeline.py      # prints the numbers
"""

from __future__ import annotations

import os

# The rayon pool is sized once, at its first use in the process: set the thread count before.
os.environ.setdefault("RAYON_NUM_THREADS", "2")

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from membuilder import AGENTS, MemoryState, Provenance, RewardKernel, parse_actions_batch
from membuilder._core import commit_views, plan_views
from real_texts import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import actions_ref, reward_ref

ROLLOUTS = int(os.environ.get("BENCH_ROLLOUTS", "4096"))
BANK_OPS = {
    "episodic": ("ADD", "UPDATE", "MERGE"),
    "semantic": ("ADD", "UPDATE", "SKIP"),
    "procedural": ("ADD", "UPDATE"),
}
DIM = 64
BASE_PER_BANK = 200
WORDS = [
    "the",
    "user",
    "mentioned",
    "that",
    "she",
    "moved",
    "to",
    "Lisbon",
    "last",
    "spring",
    "and",
    "started",
    "a",
    "new",
    "job",
    "at",
    "a",
    "design",
    "studio",
    "her",
    "sister",
    "Maria",
    "visits",
    "every",
    "other",
    "weekend",
    "they",
    "went",
    "hiking",
    "in",
    "Sintra",
    "on",
    "Saturday",
    "and",
    "planned",
    "a",
    "trip",
    "to",
    "Porto",
    "for",
    "the",
    "summer",
    "he",
    "prefers",
    "green",
    "tea",
    "over",
    "coffee",
    "and",
    "runs",
    "five",
    "kilometres",
    "before",
    "work",
    "to",
    "bake",
    "sourdough",
    "first",
    "feed",
    "the",
    "starter",
    "then",
    "mix",
    "flour",
    "water",
    "and",
    "salt",
    "rest",
    "overnight",
    "and",
    "bake",
    "at",
    "two",
    "hundred",
    "and",
    "fifty",
    "degrees",
    "café",
    "naïve",
    "東京",
    "😀",
]


# -- synthetic batch ---------------------------------------------------------------------------


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _bank_output(rng: random.Random, agent: str, base_texts: list[str]) -> str:
    ops = []
    for _ in range(rng.randint(3, 12)):
        op = rng.choice(BANK_OPS[agent])
        if op == "ADD":
            ops.append(
                {"action": "ADD", "memory": f"2024-05-{rng.randint(1, 28):02d}: " + _sentence(rng, 25, 70)}
            )
        elif op == "UPDATE":
            ops.append(
                {
                    "action": "UPDATE",
                    "old_memory": rng.choice(base_texts),
                    "new_memory": _sentence(rng, 25, 70),
                }
            )
        elif op == "MERGE":
            ops.append(
                {
                    "action": "MERGE",
                    "old_memories": rng.sample(base_texts, 2),
                    "new_memory": _sentence(rng, 30, 80),
                }
            )
        else:
            ops.append({"action": "SKIP", "reason": _sentence(rng, 5, 15)})
    return json.dumps({"operations": ops}, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))


def _core_output(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return json.dumps({"operation": "REWRITE", "content": _sentence(rng, 150, 500)})
    return json.dumps({"operation": "APPEND", "content": _sentence(rng, 30, 250)})


def _decorate(rng: random.Random, body: str) -> str:
    r = rng.random()
    if r < 0.3:
        body = f"<think>{_sentence(rng, 40, 200)} {{maybe}} [1]</think>\n{body}"
    elif r < 0.6:
        body = f"```json\n{body}\n```"
    elif r < 0.7:
        body = f"Here are the operations for this session:\n\n{body}\n\nThese capture the new information."
    m = rng.random()
    if m < 0.03:
        body = body[: len(body) * 2 // 3]  # cut off
    elif m < 0.05:
        body = body.replace('"ADD"', '"INSERT"', 1)  # unknown action
    return body


def build_batch(rollouts: int = ROLLOUTS, seed: int = 0) -> dict:
    rng = random.Random(seed)
    base_texts = {
        kind: [f"{kind} note {j}: " + _sentence(rng, 10, 30) for j in range(BASE_PER_BANK)]
        for kind in AGENTS[1:]
    }
    agents, raws = [], []
    for _ in range(rollouts):
        for agent in AGENTS:
            body = _core_output(rng) if agent == "core" else _bank_output(rng, agent, base_texts[agent])
            agents.append(agent)
            raws.append(_decorate(rng, body))
    n_new = sum(r.count('"memory"') + r.count('"new_memory"') for r in raws)  # an upper bound on new texts
    vrng = np.random.default_rng(seed)
    return {
        "agents": agents,
        "raws": raws,
        "base_core": "The user is a designer who lives in Lisbon.",
        "base_texts": base_texts,
        "base_vectors": {
            k: vrng.standard_normal((BASE_PER_BANK, DIM)).astype(np.float32) for k in base_texts
        },
        "pool": vrng.standard_normal((n_new, DIM)).astype(np.float32),
        "task": np.repeat(vrng.random(rollouts), 4),
        "expert_tokens": vrng.integers(50, 1500, size=4 * rollouts).astype(np.float64),
    }


def build_base(batch: dict) -> MemoryState:
    state = MemoryState(DIM)
    state.set_core(batch["base_core"])
    for kind, texts in batch["base_texts"].items():
        state.add_entries(kind, texts, batch["base_vectors"][kind], [Provenance("bench", 0)] * len(texts))
    return state


def fresh_outputs(batch: dict) -> dict:
    """The batch with new (equal) output strings.

    Reading a `str` from Rust makes CPython cache its UTF-8 form inside the object, so a second
    run over the same objects would skip that encoding; a training step always gets new outputs,
    so a timed run after a warm-up run must get new objects too.
    """
    return dict(batch, raws=[r.encode().decode() for r in batch["raws"]])


# -- the two paths ------------------------------------------------------------------------------


def run_rust(batch: dict, base: MemoryState, steps: dict | None = None) -> tuple[np.ndarray, list[int]]:
    """The Rust path; `steps`, when given, receives the seconds spent in each step."""
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        if steps is not None:
            steps[name] = clock[-1] - clock[-2]

    agents, raws = batch["agents"], batch["raws"]
    parsed = parse_actions_batch(agents, raws)
    lap("parse")
    n = len(raws) // 4
    views = [base.view() for _ in range(n)]
    lap("views")
    per_view = [parsed[4 * i : 4 * i + 4] for i in range(n)]
    prov = Provenance("bench", 1)
    plans = plan_views(views, per_view, [prov] * n)
    lap("plan")
    total = sum(len(p) for p in plans)
    commit_views(views, plans, batch["pool"][:total])
    lap("commit")
    policy = np.fromiter((p.content_chars // 4 for p in parsed), dtype=np.float64, count=len(parsed))
    format_ok = np.fromiter((p.ok for p in parsed), dtype=bool, count=len(parsed))
    out = RewardKernel().score(agents, format_ok, batch["task"], policy, batch["expert_tokens"])
    lap("reward")
    return out.reward, [len(v.added_ids()) for v in views]


def run_python(batch: dict) -> tuple[np.ndarray, list[int]]:
    agents, raws = batch["agents"], batch["raws"]
    parsed = [actions_ref.parse(a, r) for a, r in zip(agents, raws)]
    n = len(raws) // 4
    pool, row = batch["pool"], 0
    added_counts = []
    for i in range(n):
        core = batch["base_core"]
        added: list[tuple[str, str]] = []
        for result in parsed[4 * i : 4 * i + 4]:
            for a in result.actions:
                if a.agent == "core":
                    if a.op == "APPEND":
                        core = f"{core}\n{a.text}" if core else a.text
                    elif a.op == "REWRITE":
                        core = a.text
                    elif a.op == "REPLACE" and a.old[0] in core:
                        core = core.replace(a.old[0], a.text, 1)
                elif a.op in ("ADD", "UPDATE", "MERGE"):
                    added.append((a.agent, a.text))
        vectors = pool[row : row + len(added)].astype(np.float32)
        row += len(added)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        _overlay = {"core": core, "added": added, "vectors": np.ascontiguousarray(vectors)}
        added_counts.append(len(added))
    policy = [r.content_chars // 4 for r in parsed]
    ok = [r.ok for r in parsed]
    _, rewards, _, _ = reward_ref.score(
        agents, ok, batch["task"], policy, batch["expert_tokens"], reward_ref.Config()
    )
    return np.asarray(rewards), added_counts


def measure(rollouts: int = ROLLOUTS) -> dict:
    batch = build_batch(rollouts)
    base = build_base(batch)
    # One untimed run first, as the pytest benchmark does: the first call in a process also pays
    # for starting the rayon pool and for the allocator's first page faults, which a training
    # loop pays once, not per batch. The timed run then gets fresh string objects (see
    # `fresh_outputs`).
    run_rust(batch, base)
    batch = fresh_outputs(batch)
    steps: dict = {}
    t0 = time.perf_counter()
    rust_rewards, rust_added = run_rust(batch, base, steps)
    t_rust = time.perf_counter() - t0
    t0 = time.perf_counter()
    py_rewards, py_added = run_python(batch)
    t_py = time.perf_counter() - t0
    return {
        "cpu": cpu_model(),
        "rust_steps_s": steps,
        "rollouts": rollouts,
        "outputs": len(batch["raws"]),
        "mean_output_bytes": float(np.mean([len(r.encode()) for r in batch["raws"]])),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
        "rust_s": t_rust,
        "python_s": t_py,
        "speedup": t_py / t_rust,
        "same_rewards": bool(np.allclose(rust_rewards, py_rewards, rtol=0, atol=1e-12)),
        "same_new_entries": rust_added == py_added,
        "format_ok_rate": float(np.mean([r.ok for r in parse_actions_batch(batch["agents"], batch["raws"])])),
    }


@pytest.mark.benchmark
def test_pipeline_rust_vs_python_reference(benchmark) -> None:
    batch = build_batch()
    base = build_base(batch)
    rust_rewards, rust_added = benchmark.pedantic(run_rust, args=(batch, base), rounds=1, iterations=1)
    batch = fresh_outputs(batch)
    steps: dict = {}
    t0 = time.perf_counter()
    rust_rewards, rust_added = run_rust(batch, base, steps)
    t_rust = time.perf_counter() - t0
    t0 = time.perf_counter()
    py_rewards, py_added = run_python(batch)
    t_py = time.perf_counter() - t0
    benchmark.extra_info.update(
        cpu=cpu_model(),
        rust_steps_s=steps,
        rollouts=ROLLOUTS,
        outputs=len(batch["raws"]),
        rayon_threads=os.environ.get("RAYON_NUM_THREADS"),
        rust_s=t_rust,
        python_s=t_py,
        speedup=t_py / t_rust,
    )
    print(json.dumps(benchmark.extra_info, indent=2))
    np.testing.assert_allclose(rust_rewards, py_rewards, rtol=0, atol=1e-12)
    assert rust_added == py_added, "the Rust views and the Python overlay added different entries"


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
