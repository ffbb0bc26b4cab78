"""The paper's real reward server beside our scorer, on ``bench_reward_scorer``'s batch.

Not a pytest benchmark: it needs what this repository never ships, an unmodified checkout of the
paper's code (GitHub Zh1yuShen/MemBuilder) and a Python environment with that code's dependencies
from PyPI (``openai numpy faiss-cpu flask requests jinja2 pyyaml``; no torch or transformers: the
paper's reward then counts log lengths in characters, which changes no reward). Run:

    python benches/bench_reward_reference.py --reference CHECKOUT --reference-python VENV/bin/python

Both sides get the same 1,024 samples (32 sessions x 4 agents x 8 rollouts x 5 questions, joint
pairing: the paper's reward pairs the r-th rollouts of a session's four agents), the same base
states (written in each side's own format from the same texts and vectors: hashed bag-of-words of
the kind-tagged texts, dimension 64) and the same scripted OpenAI-compatible server on 127.0.0.1,
which answers every chat call after 300 ms and every embedding call at once with the same hashed
vectors our ``hash:64`` embedder computes. The paper's side: its reward server
(``training.reward_server.server``, Flask) started from the checkout and pointed at the scripted
server, and its ``compute_score_batch`` called in a second process (``reference_reward_driver.py``)
with ``REWARD_MAX_CONCURRENT`` requests at once. Ours: :class:`RewardScorer` under the ``paper``
protocol with ``max_concurrency`` LLM calls at once.

``--sparse`` checks the sparse-reward ablation the same way: the paper's side reads its own
ablation config (``reward_config_sparse_ablation.json``) when a copy of it sits beside it as
``reward_config_internal.json``, the file name its config loader tries first; one request at a
time (``--concurrency 1``) makes its generator's draws follow the batch order.

Printed: wall time and chat calls of each side at each concurrency, the share of samples whose
rewards agree (to 1e-9) with the paper's under our ``paper`` protocol and, for comparison, under
``membuilder``, and the disagreeing samples by agent. Timings share a 2-core machine: run it more
than once and compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reward_scorer import DELAY, EMBEDDER, build_batch, kind_tagged, responder
from membuilder import MemoryState
from membuilder.embed import hashed_bow_vector
from membuilder.testing import ScriptedOpenAIServer
from membuilder.training import RewardSample, RewardScorer, ScorerConfig

DRIVER = Path(__file__).resolve().parent / "reference_reward_driver.py"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slow_chat(request: Any) -> str:
    """The benchmark's script, each chat call held for DELAY seconds; embeddings are instant (ours
    are computed locally, the paper's are asked for: holding them would time the wrong thing)."""
    time.sleep(DELAY)
    return responder(request)


def _memories(agent: str, raw: str) -> list[str]:
    obj = json.loads(raw)
    if agent == "core":
        return [obj.get("content", "")]
    return [op.get("memory") or op.get("new_memory") or "" for op in obj.get("operations", [])]


def reference_batch(root: Path, batch: list[RewardSample]) -> dict:
    """The same states and samples in the paper's formats (its ground-truth fields, its state layout)."""
    states: dict[str, dict] = {}
    samples = []
    for s in batch:
        gt = s.ground_truth
        path = gt.resolve_state(root)
        ref_dir = root / "reference_states" / path.stem
        if str(path) not in states:
            state = MemoryState.load(path)
            entries = state.entries()
            texts = [kind_tagged(str(e.kind), e.text) for e in entries]
            states[str(path)] = {
                "dir": str(ref_dir),
                "core": state.core,
                "texts": texts,
                "vectors": [hashed_bow_vector(t, state.dim).tolist() for t in texts],
                # the paper's memory system tags what it adds with the conversation's user id
                "metadata": [{"user_id": gt.conversation_id, "type": "memory"} for _ in texts],
            }
        samples.append(
            {
                "solution": s.output,
                "ground_truth": {
                    "conversation_id": gt.conversation_id,
                    "session_index": gt.session_index,
                    "agent_type": gt.agent,
                    "qa_questions": [{"question": q.question, "answer": q.answer} for q in gt.qa],
                    "state_before_path": str(ref_dir),
                    "expert_output": {"memories_added": _memories(gt.agent, gt.expert_outputs[gt.agent])},
                },
            }
        )
    return {"states": list(states.values()), "samples": samples}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_reference(
    args: argparse.Namespace, work: Path, batch_file: Path, llm: ScriptedOpenAIServer, concurrency: int
) -> tuple[list[float], float, int]:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    log = open(work / f"reference_server_{concurrency}.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [args.reference_python, "-m", "training.reward_server.server", "--host", "127.0.0.1",
         "--port", str(port), "--api-key", "k", "--base-url", llm.base_url],
        cwd=args.reference, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the paper's reward server did not start; see {log.name}") from None
                time.sleep(0.3)
        before = llm.count(path="/chat/completions")
        out = work / f"reference_rewards_{concurrency}.json"
        denv = dict(
            env, MEMBUILDER_MEMORY_API_URL=f"http://127.0.0.1:{port}", REWARD_MAX_CONCURRENT=str(concurrency)
        )
        with open(work / f"reference_driver_{concurrency}.log", "w") as dlog:
            rc = subprocess.run(
                [args.reference_python, str(DRIVER), args.reference, str(batch_file), str(out)],
                cwd=work, env=denv, stdout=dlog, stderr=subprocess.STDOUT, check=False,
            ).returncode  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"the reference driver failed (exit {rc}); see {dlog.name}")
        result = json.loads(out.read_text())
        return result["rewards"], result["seconds"], llm.count(path="/chat/completions") - before
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def run_ours(
    root: Path,
    llm: ScriptedOpenAIServer,
    batch: list[RewardSample],
    protocol: str,
    concurrency: int,
    sparse: bool = False,
) -> tuple[list[float], float, int]:
    cfg = ScorerConfig(
        protocol=protocol, pairing="joint", answer_model="answer-m", judge_model="judge-m",
        base_url=llm.base_url, api_key="k", embedder=EMBEDDER, state_root=str(root),
        max_concurrency=concurrency, sparse_reward=True if sparse else None,
    )  # fmt: skip
    before = llm.count(path="/chat/completions")
    scorer = RewardScorer(cfg)
    t0 = time.perf_counter()
    results = scorer.score_sync(batch)
    seconds = time.perf_counter() - t0
    bad = [r.error for r in results if not r.valid]
    if bad:
        raise RuntimeError(f"{len(bad)} rewards could not be computed, e.g. {bad[0]}")
    return [r.reward for r in results], seconds, llm.count(path="/chat/completions") - before


def agreement(ours: list[float], ref: list[float], batch: list[RewardSample]) -> dict[str, Any]:
    same = np.isclose(np.asarray(ours), np.asarray(ref), atol=1e-9, rtol=0.0)
    by_agent: dict[str, int] = {}
    for s, ok in zip(batch, same):
        if not ok:
            by_agent[s.agent] = by_agent.get(s.agent, 0) + 1
    return {"agree": float(same.mean()), "disagree": int((~same).sum()), "disagree_by_agent": by_agent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of the paper's repository (unmodified)")
    ap.add_argument("--reference-python", required=True, help="interpreter with the paper's dependencies")
    ap.add_argument("--concurrency", default="64,4", help="comma-separated concurrencies (default 64,4)")
    ap.add_argument("--keep", default=None, help="directory to keep the batch, logs and rewards in")
    ap.add_argument(
        "--sparse",
        action="store_true",
        help="ours with the sparse-reward ablation on; give a checkout whose reward_server directory holds "
        "the paper's ablation config under the name its code reads first (reward_config_internal.json), "
        "and --concurrency 1 so that its draws follow the batch order. Our side runs at 64.",
    )
    args = ap.parse_args()
    if not (Path(args.reference) / "training" / "reward_server" / "server.py").is_file():
        print(f"{args.reference}: no training/reward_server/server.py (not a checkout of the paper's code)")
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    print("path: membuilder RewardScorer (Rust core: views, batched retrieval) vs the paper's reward server")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        batch = build_batch(work)
        batch_file = work / "reference_batch.json"
        batch_file.write_text(json.dumps(reference_batch(work, batch)))
        rc = subprocess.run(
            [args.reference_python, str(DRIVER), args.reference, str(batch_file), "-", "--states-only"],
            cwd=work,
            check=False,
        ).returncode
        if rc != 0:
            print("could not write the reference's states")
            return 1
        report: dict[str, Any] = {"samples": len(batch), "delay_s": DELAY, "runs": {}}
        with ScriptedOpenAIServer(slow_chat) as llm:
            paper_rewards = None
            for c in levels:
                ref, t_ref, calls_ref = run_reference(args, work, batch_file, llm, c)
                ours_c = 64 if args.sparse else c
                ours, t_ours, calls_ours = run_ours(work, llm, batch, "paper", ours_c, args.sparse)
                report["runs"][c] = {
                    "reference_s": round(t_ref, 2),
                    "reference_chat_calls": calls_ref,
                    "ours_paper_s": round(t_ours, 2),
                    "ours_chat_calls": calls_ours,
                    # only a like-for-like ratio when both sides ran at the same concurrency
                    ("speedup_equal_concurrency" if ours_c == c else f"ratio_ours_at_{ours_c}"): round(
                        t_ref / t_ours, 2
                    ),
                    "paper_protocol_vs_reference": agreement(ours, ref, batch),
                }
                print(json.dumps({c: report["runs"][c]}), flush=True)
                paper_rewards = ref
            if not args.sparse:
                mine, _, _ = run_ours(work, llm, batch, "membuilder", max(levels))
                report["membuilder_protocol_vs_reference"] = agreement(mine, paper_rewards, batch)
        report["mean_reward_reference"] = float(np.mean(paper_rewards))
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
