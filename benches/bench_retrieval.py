"""Batched top-10 retrieval: membuilder vs faiss-cpu, numpy and the usearch Python package.

Workload: 1,000 queries, top-10 by inner product over one bank of n L2-normalised float32 vectors
(n = 1k, 10k, 100k; dim = 384, 1,536; random points around n/100 random centres, fixed seed), all
engines in this process on the same data.

* ``membuilder-exact``: ``MemoryState.search_batch`` below ``exact_search_limit`` (bf16 tile
  products on AMX admitted within a proven bound, or a fused AVX-512 or AVX2/FMA scan that selects
  each query's candidates while the scores are still in registers, then re-scores them with one
  canonical kernel; a portable GEMM + selection on other CPUs). Run once per kernel in
  ``BENCH_KERNELS`` (default: every AMX or fused kernel this CPU has, else ``portable``), each
  test id naming its kernel.
* ``membuilder-graph``: the same call with ``exact_search_limit`` below n, so the bank is searched
  through its usearch HNSW graph (over-fetch, exact re-scoring).
* ``faiss-flat``: ``faiss.IndexFlatIP.search`` (BLAS sgemm + heap selection).
* ``numpy``: ``X @ Q.T`` then ``argpartition``/``argsort``.
* ``usearch-hnsw``: the usearch Python package's ``Index(metric="ip")``, default settings.

Every exact engine must return the same top-10 as numpy (up to ties closer than 1e-5); graph
engines report recall@10 against it and must reach 0.9. Graph indexes are built only up to
``BENCH_GRAPH_MAX`` entries (default 100k) and only at dim 384 unless ``BENCH_GRAPH_1536=1``
(building HNSW on 100k x 1,536 on a small machine takes minutes). Run:

    pytest benches/bench_retrieval.py --benchmark-enable --benchmark-group-by=group \\
        --benchmark-columns=mean,min,rounds -q
    BENCH_SIZES=1000,10000 pytest benches/bench_retrieval.py --benchmark-enable   # smaller
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from membuilder import _core as c

SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "1000,10000,100000").split(",")]
DIMS = [int(s) for s in os.environ.get("BENCH_DIMS", "384,1536").split(",")]
GRAPH_MAX = int(os.environ.get("BENCH_GRAPH_MAX", "100000"))
GRAPH_1536 = os.environ.get("BENCH_GRAPH_1536") == "1"
_INFO = c.cpu_info()
KERNELS = (
    os.environ.get("BENCH_KERNELS", "").split(",")
    if os.environ.get("BENCH_KERNELS")
    else [k for k in _INFO["exact_search_available"] if k != "portable"] or ["portable"]
)
N_QUERIES = 1000
K = 10
PROV = c.Provenance("bench", 0)

_cache: dict[tuple[int, int], dict] = {}


def dataset(n: int, dim: int) -> dict:
    """Random normalised bank + queries, fixed seed; only the latest size is kept in memory."""
    key = (n, dim)
    if key not in _cache:
        _cache.clear()
        rng = np.random.default_rng(n * 7 + dim)
        # Clustered, like real sentence embeddings (uniform random points on a 384-d sphere are
        # all nearly equidistant, which no graph index handles and no embedder produces).
        centers = rng.standard_normal((max(n // 100, 10), dim), dtype=np.float32)
        x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = centers[rng.integers(0, len(centers), N_QUERIES)] + 0.6 * rng.standard_normal(
            (N_QUERIES, dim), dtype=np.float32
        )
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ x.T
        truth = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        _cache[key] = {"x": x, "q": q, "truth": truth, "truth_scores": np.take_along_axis(scores, truth, 1)}
    return _cache[key]


def check_exact(d: dict, ids: np.ndarray, scores: np.ndarray) -> None:
    """Same top-10 as numpy, except where scores tie within 1e-5 (order among near-ties)."""
    np.testing.assert_allclose(scores, d["truth_scores"], atol=1e-5)
    mismatch = ids != d["truth"]
    assert (np.abs(scores - d["truth_scores"])[mismatch] < 1e-5).all()


def recall(d: dict, ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, d["truth"])]))


def state(d: dict, limit: int) -> c.MemoryState:
    n, dim = d["x"].shape
    s = c.MemoryState(dim, exact_search_limit=limit)
    s.add_entries("semantic", [""] * n, d["x"], [PROV] * n)
    return s


GRID = [(n, dim) for dim in DIMS for n in SIZES]


@pytest.fixture(scope="module", autouse=True)
def _machine(request):
    """Say what this ran on, whatever the capture and verbosity settings."""
    line = (
        f"CPU: {_INFO['cpu']} ({' '.join(_INFO['features'])}); exact-search kernels benched: "
        f"{', '.join(KERNELS)} (default here: {_INFO['exact_search']}); re-scoring: {_INFO['rescore']}"
    )
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n" + line)
    else:
        print(line)
    yield
    c.set_exact_kernel(None)


def _id(p):
    return f"n{p[0]}-d{p[1]}"


@pytest.mark.benchmark
@pytest.mark.parametrize("size", GRID, ids=_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_membuilder_exact(benchmark, size, kernel):
    d = dataset(*size)
    s = state(d, limit=10**9)
    c.set_exact_kernel(kernel)
    benchmark.group = f"retrieval {_id(size)}"
    benchmark.extra_info.update(kernel=kernel, cpu=_INFO["cpu"])
    ids, scores, _ = benchmark.pedantic(
        s.search_batch, args=(d["q"], K), rounds=3, iterations=1, warmup_rounds=1
    )
    check_exact(d, ids, scores)


@pytest.mark.benchmark
@pytest.mark.parametrize("size", GRID, ids=_id)
def test_faiss_flat(benchmark, size):
    faiss = pytest.importorskip("faiss")
    d = dataset(*size)
    index = faiss.IndexFlatIP(size[1])
    index.add(d["x"])
    benchmark.group = f"retrieval {_id(size)}"
    scores, ids = benchmark.pedantic(index.search, args=(d["q"], K), rounds=3, iterations=1, warmup_rounds=1)
    check_exact(d, ids, scores)


@pytest.mark.benchmark
@pytest.mark.parametrize("size", GRID, ids=_id)
def test_numpy(benchmark, size):
    d = dataset(*size)
    x = d["x"]

    def run(q):
        s = q @ x.T
        top = np.argpartition(-s, K, axis=1)[:, :K]
        ts = np.take_along_axis(s, top, 1)
        order = np.argsort(-ts, axis=1, kind="stable")
        return np.take_along_axis(top, order, 1), np.take_along_axis(ts, order, 1)

    benchmark.group = f"retrieval {_id(size)}"
    ids, scores = benchmark.pedantic(run, args=(d["q"],), rounds=3, iterations=1, warmup_rounds=1)
    check_exact(d, ids, scores)


def _graph_sizes():
    return [p for p in GRID if p[0] <= GRAPH_MAX and p[0] >= 10000 and (p[1] == 384 or GRAPH_1536)]


@pytest.mark.benchmark
@pytest.mark.parametrize("size", _graph_sizes(), ids=_id)
def test_membuilder_graph(benchmark, size):
    d = dataset(*size)
    s = state(d, limit=size[0] // 2)  # above the limit: the bank gets an HNSW graph
    c.set_exact_kernel(None)
    benchmark.group = f"retrieval {_id(size)}"
    ids, _, _ = benchmark.pedantic(s.search_batch, args=(d["q"], K), rounds=3, iterations=1, warmup_rounds=1)
    r = recall(d, ids)
    benchmark.extra_info["recall@10"] = r
    print(f"\nmembuilder-graph {_id(size)} recall@10 = {r:.4f}")
    assert r >= 0.9


@pytest.mark.benchmark
@pytest.mark.parametrize("size", _graph_sizes(), ids=_id)
def test_usearch_hnsw(benchmark, size):
    usearch_index = pytest.importorskip("usearch.index")
    d = dataset(*size)
    index = usearch_index.Index(ndim=size[1], metric="ip", dtype="f32")
    index.add(np.arange(size[0]), d["x"])
    benchmark.group = f"retrieval {_id(size)}"
    matches = benchmark.pedantic(index.search, args=(d["q"], K), rounds=3, iterations=1, warmup_rounds=1)
    r = recall(d, matches.keys.astype(np.int64))
    benchmark.extra_info["recall@10"] = r
    print(f"\nusearch-hnsw {_id(size)} recall@10 = {r:.4f}")
    assert r >= 0.9
