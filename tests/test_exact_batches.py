"""Large exact batches against one query at a time and against numpy.

A batch of at least 64 queries scans a tile-major copy of the bank that the bank keeps until it
changes; a single query scans the bank's own matrix. Both must give bit-identical hits (scores
come from one canonical kernel either way), also with exact ties (duplicated vectors), entries
retired in the base or in a view, a kind filter, and rows appended after the copy was made.
"""

from __future__ import annotations

import numpy as np
import pytest
from membuilder import _core as c

DIM = 48
PROV = c.Provenance("conv", 1)
K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def build(n: int = 900, distinct: int = 150) -> tuple[c.MemoryState, np.ndarray, np.ndarray]:
    """A replace-mode state whose semantic bank repeats `distinct` directions (exact ties), plus
    a smaller episodic bank, and 130 queries near some of those directions."""
    rng = np.random.default_rng(7)
    protos = unit(rng.standard_normal((distinct, DIM)))
    sem = protos[np.arange(n) % distinct]
    epi = unit(rng.standard_normal((n // 3, DIM)))
    s = c.MemoryState(DIM, update_mode="replace")
    s.add_entries("semantic", [f"s{i}" for i in range(n)], sem, [PROV] * n)
    s.add_entries("episodic", [f"e{i}" for i in range(len(epi))], epi, [PROV] * len(epi))
    queries = unit(protos[rng.integers(0, distinct, 130)] + 0.3 * rng.standard_normal((130, DIM)))
    return s, np.concatenate([sem, epi]), queries.astype(np.float32)


def one_by_one(store, queries: np.ndarray, k: int, kind: str | None = None):
    hits = [store.search(q, k, kind=kind) for q in queries]
    return [list(h.ids) for h in hits], [list(h.scores) for h in hits]


def assert_batch_equals_singles(store, queries: np.ndarray, k: int, kind: str | None = None) -> None:
    ids, scores, _ = store.search_batch(queries, k, kind=kind)
    want_ids, want_scores = one_by_one(store, queries, k, kind)
    for r in range(len(queries)):
        n = len(want_ids[r])
        assert list(ids[r][:n]) == want_ids[r]
        np.testing.assert_array_equal(scores[r][:n], np.asarray(want_scores[r], np.float32))


@pytest.mark.parametrize("kind", [None, "semantic", "episodic"])
def test_large_batch_equals_single_queries_with_ties(kind):
    s, _, q = build()
    assert_batch_equals_singles(s, q, K, kind)
    # Twice: the second batch runs over the copy the first one left in the bank.
    assert_batch_equals_singles(s, q, K, kind)


def test_large_batch_matches_numpy_and_breaks_ties_by_id():
    s, data, q = build()
    ids, scores, _ = s.search_batch(q, K)
    exact = q @ data.T
    for r in range(len(q)):
        best = np.sort(exact[r])[::-1][:K]
        np.testing.assert_allclose(scores[r], best, atol=1e-5)
        # Within a group of equal scores, ids ascend.
        for a in range(K - 1):
            if scores[r][a] == scores[r][a + 1]:
                assert ids[r][a] < ids[r][a + 1]
    # Duplicated directions really tie: for most queries the best hit has siblings at its score.
    assert (scores[:, 0] == scores[:, 1]).mean() > 0.5


def test_rows_appended_after_a_batch_are_found_by_the_next_batch():
    s, _, q = build()
    s.search_batch(q, K)
    new = unit(q[:5] * 1.0)
    ids_new = s.add_entries("semantic", [f"new{i}" for i in range(5)], new, [PROV] * 5)
    ids, scores, _ = s.search_batch(q, K)
    assert list(ids[:5, 0]) == ids_new
    np.testing.assert_allclose(scores[:5, 0], 1.0, atol=1e-5)
    assert_batch_equals_singles(s, q, K)


def test_views_retire_base_rows_in_large_batches():
    s, _, q = build()
    top = s.search_batch(q, 1)[0][:, 0]
    victims = sorted({int(i) for i in top[:20]})
    views = []
    for j in range(4):
        v = s.view()
        text = s.get(victims[j]).text
        plan = v.plan([c.Action("semantic", "UPDATE", text=f"{text} revised", old=[text])], PROV)
        r = v.commit(plan, unit(np.random.default_rng(j).standard_normal((1, DIM))))
        assert r.retired == [victims[j]]
        views.append(v)
    idx = np.arange(len(q)) % len(views)
    ids, scores, _ = c.search_views(views, idx, q, K)
    for r in range(len(q)):
        v = views[idx[r]]
        h = v.search(q[r], K)
        assert list(ids[r]) == list(h.ids)
        np.testing.assert_array_equal(scores[r], h.scores)
        assert v.retired_ids()[0] not in set(ids[r])
    for v in views:
        assert_batch_equals_singles(v, q, K)


@pytest.fixture
def restore_kernel():
    yield
    c.set_exact_kernel(None)


def test_every_kernel_this_cpu_has_gives_identical_hits(restore_kernel):
    """Batches (tile-major copy), small batches (bank matrix) and single queries through each
    exact-search kernel this CPU can run: identical ids and scores, bit for bit."""
    info = c.cpu_info()
    kernels = info["exact_search_available"]
    assert "portable" in kernels and info["exact_search"] == kernels[0]
    s, _, q = build(n=1300, distinct=200)
    results = {}
    for name in kernels:
        assert c.set_exact_kernel(name) == name
        assert c.cpu_info()["exact_search"] == name
        # One bank for all: the copy the first batch leaves (float32 tiles for both fused
        # kernels, bf16 tiles for AMX) is read by the later ones.
        batch = s.search_batch(q, K)
        small = s.search_batch(q[:20], K)
        single = one_by_one(s, q[:7], K)
        results[name] = (batch, small, single)
    ref = results["portable"]
    for name, (batch, small, single) in results.items():
        for got, want in zip(batch, ref[0]):
            np.testing.assert_array_equal(got, want, err_msg=name)
        for got, want in zip(small, ref[1]):
            np.testing.assert_array_equal(got, want, err_msg=name)
        assert single == ref[2], name
    assert c.set_exact_kernel("auto") == kernels[0]


def test_unknown_or_unavailable_kernel_is_refused(restore_kernel):
    with pytest.raises(c.InvalidArgumentError, match="sse9"):
        c.set_exact_kernel("sse9")
    for name in ("amx", "avx512", "avx2"):
        if name not in c.cpu_info()["exact_search_available"]:
            with pytest.raises(c.InvalidArgumentError, match=name):
                c.set_exact_kernel(name)
