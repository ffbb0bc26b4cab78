"""StateView: overlays over a shared base, batch plan/commit/search, threads and fork safety."""

from __future__ import annotations

import os
import select
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from membuilder import _core as c

DIM = 16
PROV = c.Provenance("conv", 3)


def base_state(n: int = 200, limit: int = 20000, mode: str = "replace") -> tuple[c.MemoryState, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, DIM)).astype(np.float32)
    s = c.MemoryState(DIM, update_mode=mode, exact_search_limit=limit)
    s.add_entries("semantic", [f"fact {i}" for i in range(n)], data, [PROV] * n)
    s.set_core("base core")
    return s, data


def test_view_reads_like_its_base_and_keeps_its_own_changes():
    s, data = base_state()
    v = s.view()
    assert len(v) == len(s) and v.core == "base core" and v.dim == DIM and v.update_mode == "replace"
    plan = v.plan(
        [
            c.Action("semantic", "UPDATE", text="fact 5 revised", old=["fact 5"]),
            c.Action("core", "REWRITE", text="view core"),
        ],
        PROV,
    )
    r = v.commit(plan, data[5:6] + 0.01)
    assert r.retired == [5] and r.added == [200]
    assert v.added_ids() == [200] and v.retired_ids() == [5]
    assert v.get(5).retired and not s.get(5).retired and v.core == "view core" and s.core == "base core"
    hits = v.search(data[5], 2)
    assert list(hits.ids) == [200, *[i for i in s.search(data[5], 3).ids if i != 5][:1]]
    assert [e.text for e in v.entries() if e.id >= 199] == ["fact 199", "fact 5 revised"]
    assert len(s) == 200 and len(v) == 200


def test_state_mutation_after_views_does_not_change_them():
    s, data = base_state()
    v = s.view()
    before = v.search_batch(data[:5], 5)
    s.add_entries("semantic", ["late"], data[:1], [PROV])
    plan = s.plan([c.Action("semantic", "UPDATE", text="fact 1 new", old=["fact 1"])], PROV)
    s.commit(plan, data[1:2])
    assert len(v) == 200 and not v.get(1).retired
    for a, b in zip(before, v.search_batch(data[:5], 5)):
        np.testing.assert_array_equal(a, b)


def test_batch_plan_commit_search_equal_one_by_one():
    s, _ = base_state(300)
    rng = np.random.default_rng(1)
    views = [s.view() for _ in range(6)]
    singles = [s.view() for _ in range(6)]
    actions = [
        [
            c.Action("semantic", "UPDATE", text=f"fact {i} v2", old=[f"fact {i}"]),
            c.Action("semantic", "ADD", text=f"new {i}"),
        ]
        for i in range(6)
    ]
    plans = c.plan_views(views, actions, [PROV] * 6)
    vecs = rng.standard_normal((sum(len(p) for p in plans), DIM)).astype(np.float32)
    reports = c.commit_views(views, plans, vecs)
    off = 0
    for v, a, r in zip(singles, actions, reports):
        p = v.plan(a, PROV)
        one = v.commit(p, vecs[off : off + len(p)])
        off += len(p)
        assert (one.added, one.retired) == (r.added, r.retired)
    q = rng.standard_normal((12, DIM)).astype(np.float32)
    idx = np.arange(12) % 6
    ids, scores, kinds = c.search_views(views, idx, q, 5)
    for i in range(12):
        h = singles[idx[i]].search(q[i], 5)
        assert list(ids[i]) == list(h.ids) and list(kinds[i]) == list(h.kinds)
        np.testing.assert_array_equal(scores[i], h.scores)
    # A MemoryState can be mixed in.
    ids2, _, _ = c.search_views([s, views[0]], np.array([0, 1]), q[:2], 3)
    assert list(ids2[0]) == list(s.search(q[0], 3).ids)


def test_batch_errors_leave_views_untouched():
    s, data = base_state()
    a, b = s.view(), s.view()
    pa = a.plan([c.Action("semantic", "ADD", text="x")], PROV)
    pb = b.plan([c.Action("semantic", "ADD", text="y")], PROV)
    with pytest.raises(c.InvalidArgumentError):
        c.commit_views([a, b], [pb, pa], data[:2])  # plans swapped
    with pytest.raises(c.InvalidArgumentError, match="twice"):
        c.commit_views([a, a], [pa, pa], data[:2])
    with pytest.raises(c.InvalidArgumentError, match="rows"):
        c.commit_views([a, b], [pa, pb], data[:3])
    assert a.added_ids() == [] and b.added_ids() == []
    with pytest.raises(c.InvalidArgumentError, match="view_index"):
        c.search_views([a], np.array([1]), data[:1], 3)
    with pytest.raises(c.InvalidArgumentError):
        c.plan_views([a, b], [[]], [PROV, PROV])


@pytest.mark.parametrize("limit", [20000, 50])  # exact base, and a base with a graph index
def test_many_views_searched_from_many_threads(limit):
    s, data = base_state(400, limit)
    views = [s.view() for _ in range(16)]
    for i, v in enumerate(views):
        p = v.plan([c.Action("semantic", "UPDATE", text=f"fact {i} new", old=[f"fact {i}"])], PROV)
        v.commit(p, data[i : i + 1] + 0.05)
    q = np.random.default_rng(3).standard_normal((32, DIM)).astype(np.float32)
    expected = [v.search_batch(q, 8) for v in views]

    def run(i):
        return views[i % 16].search_batch(q, 8)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(64)))
    for i, r in enumerate(results):
        for a, b in zip(expected[i % 16], r):
            np.testing.assert_array_equal(a, b)
    # Each view's own retirement is honoured even on the graph path.
    for i, v in enumerate(views):
        ids, _, _ = v.search_batch(data[i : i + 1], 400)
        assert i not in set(ids[0]) and 400 in set(ids[0])


def test_materialize_equals_view():
    s, data = base_state()
    v = s.view()
    p = v.plan(
        [
            c.Action("semantic", "UPDATE", text="merged", old=["fact 2"]),
            c.Action("core", "APPEND", text="more"),
        ],
        PROV,
    )
    v.commit(p, data[7:8])
    m = v.materialize()
    assert isinstance(m, c.MemoryState)
    assert [(e.id, e.text, e.retired) for e in m.entries(include_retired=True)] == [
        (e.id, e.text, e.retired) for e in v.entries(include_retired=True)
    ]
    assert m.core == v.core == "base core\nmore"
    for a, b in zip(m.search_batch(data[:10], 6), v.search_batch(data[:10], 6)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_does_not_deadlock():
    """The parent used the thread pool; a forked child (whose pool threads did not survive the
    fork) must still be able to search: it runs the same work on its own thread."""
    s, _ = base_state(300)
    q = np.random.default_rng(4).standard_normal((600, DIM)).astype(np.float32)  # several blocks
    want = s.search_batch(q, 5)[0]
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns that forking a process with threads may deadlock: that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child
        try:
            got = s.search_batch(q, 5)[0]
            os.write(w, b"ok" if np.array_equal(got, want) else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    msg = os.read(r, 8) if ready else b"timeout"
    os.waitpid(pid, 0)
    os.close(r)
    assert msg == b"ok", msg
    assert sys.modules["membuilder._core"] is c
