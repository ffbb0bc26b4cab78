"""Runs the paper's own reward function on a batch written by ``bench_reward_reference.py``.

This file is ours and holds none of the paper's code: it is started by the benchmark with the
interpreter of a separate environment that has the paper's dependencies (from PyPI: ``openai``,
``numpy``, ``faiss-cpu``, ``flask``, ``requests``, ``jinja2``, ``pyyaml``) and is given the path of
an unmodified checkout of the paper's repository (GitHub Zh1yuShen/MemBuilder), which it imports.

    python reference_reward_driver.py CHECKOUT BATCH.json OUT.json [--states-only]

1. writes every base state of the batch in the layout the paper's memory system loads (a core
   block file and a flat inner-product index with its texts and metadata; every entry's metadata
   names the conversation's user id, as the paper's memory system tags what it adds);
2. unless ``--states-only``: calls the paper's ``compute_score_batch`` on the samples, in the
   batch's order, and writes the rewards and the seconds that call took.

The reward function reads its settings from the checkout's own config file and the environment
(``MEMBUILDER_MEMORY_API_URL``: the paper's reward server, ``REWARD_MAX_CONCURRENT``: requests at
once); the benchmark sets both.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def write_state(spec: dict) -> None:
    import faiss
    import numpy as np

    root = Path(spec["dir"])
    store = root / "vector_store"
    store.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(np.asarray(spec["vectors"], dtype=np.float32))
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(store / "index.faiss"))
    payload = {"dimension": int(vectors.shape[1]), "memories": spec["texts"], "metadata": spec["metadata"]}
    (store / "payload.json").write_text(json.dumps(payload), encoding="utf-8")
    (root / "core_memory.json").write_text(json.dumps({"human": spec["core"]}), encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        usage = "usage: reference_reward_driver.py CHECKOUT BATCH.json OUT.json [--states-only]"
        print(usage, file=sys.stderr)
        return 2
    checkout, batch_path, out_path = argv[:3]
    batch = json.loads(Path(batch_path).read_text(encoding="utf-8"))
    for spec in batch["states"]:
        write_state(spec)
    if argv[3:] == ["--states-only"]:
        return 0
    sys.path.insert(0, checkout)
    from training.reward_server.reward_function import compute_score_batch

    samples = batch["samples"]
    n = len(samples)
    t0 = time.perf_counter()
    rewards = compute_score_batch(
        ["memory_management"] * n,
        [s["solution"] for s in samples],
        [s["ground_truth"] for s in samples],
        [{} for _ in samples],
    )
    seconds = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps({"rewards": [float(r) for r in rewards], "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
