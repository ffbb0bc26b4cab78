"""Rollout states: views over a shared base vs copying the state per rollout.

Base: a state whose semantic bank holds n random normalised 384-d entries (n = 10k, 100k;
``replace`` mode). One session's actions per rollout: 3 ADDs, 1 UPDATE naming an existing entry
(exact text), 1 core APPEND.

* ``create_views``: 1,000 ``state.view()`` calls (should not depend on n).
* ``views_apply``: 1,000 views created, planned with ``plan_views`` and committed with
  ``commit_views`` (vectors for all plans in one array).
* ``copy_apply``: the peer: ``state.copy()`` per rollout, then plan/commit on the copy. Copies
  are slow, so this runs ``BENCH_COPIES`` rollouts (default 100) and the report divides by the
  rollout count; compare per-rollout times.

Both paths must produce the same reports and the same resulting entries for a rollout. Run:

    pytest benches/bench_views.py --benchmark-enable --benchmark-group-by=group \\
        --benchmark-columns=mean,min,rounds -q
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from membuilder import _core as c

DIM = 384
SIZES = [int(s) for s in os.environ.get("BENCH_VIEW_SIZES", "10000,100000").split(",")]
ROLLOUTS = 1000
COPIES = int(os.environ.get("BENCH_COPIES", "100"))
PROV = c.Provenance("bench", 1)

_cache: dict[int, tuple] = {}


def base(n: int):
    if n not in _cache:
        _cache.clear()
        rng = np.random.default_rng(n)
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        s = c.MemoryState(DIM, update_mode="replace")
        s.add_entries("semantic", [f"fact {i}" for i in range(n)], x, [PROV] * n)
        s.set_core("User: Ana.")
        _cache[n] = (s, rng)
    return _cache[n]


def session(i: int) -> list:
    return [
        c.Action("semantic", "ADD", text=f"rollout {i} fact a"),
        c.Action("semantic", "ADD", text=f"rollout {i} fact b"),
        c.Action("episodic", "ADD", text=f"2023-05-0{i % 9 + 1}: rollout {i} event"),
        c.Action("semantic", "UPDATE", text=f"fact {i} revised", old=[f"fact {i}"]),
        c.Action("core", "APPEND", text=f"Rollout {i}."),
    ]


def vectors(i: int) -> np.ndarray:
    return np.random.default_rng(10_000 + i).standard_normal((4, DIM), dtype=np.float32)


@pytest.mark.benchmark
@pytest.mark.parametrize("n", SIZES)
def test_create_views(benchmark, n):
    s, _ = base(n)
    benchmark.group = "create 1,000 views"
    views = benchmark(lambda: [s.view() for _ in range(ROLLOUTS)])
    assert len(views) == ROLLOUTS and all(len(v) == n for v in views[:3])


@pytest.mark.benchmark
@pytest.mark.parametrize("n", SIZES)
def test_views_apply(benchmark, n):
    s, _ = base(n)
    actions = [session(i) for i in range(ROLLOUTS)]
    vecs = np.concatenate([vectors(i) for i in range(ROLLOUTS)])

    def run():
        views = [s.view() for _ in range(ROLLOUTS)]
        plans = c.plan_views(views, actions, [PROV] * ROLLOUTS)
        reports = c.commit_views(views, plans, vecs)
        return views, reports

    benchmark.group = f"apply one session per rollout, n={n} (per-rollout: divide by rounds' rollouts)"
    benchmark.extra_info["rollouts"] = ROLLOUTS
    views, reports = benchmark.pedantic(run, rounds=3, iterations=1)
    # The peer must agree: copy + plan + commit gives the same report and entries.
    for i in (0, 1, ROLLOUTS - 1):
        cp = s.copy()
        p = cp.plan(actions[i], PROV)
        r = cp.commit(p, vectors(i))
        assert (r.added, r.retired, r.core_after) == (
            reports[i].added,
            reports[i].retired,
            reports[i].core_after,
        )
        assert [e.text for e in cp.entries()[-4:]] == [e.text for e in views[i].entries()[-4:]]
    assert len(s) == n  # the base never changed


@pytest.mark.benchmark
@pytest.mark.parametrize("n", SIZES)
def test_copy_apply(benchmark, n):
    s, _ = base(n)
    actions = [session(i) for i in range(COPIES)]

    def run():
        out = []
        for i in range(COPIES):
            cp = s.copy()
            p = cp.plan(actions[i], PROV)
            out.append(cp.commit(p, vectors(i)))
        return out

    benchmark.group = f"apply one session per rollout, n={n} (per-rollout: divide by rounds' rollouts)"
    benchmark.extra_info["rollouts"] = COPIES
    reports = benchmark.pedantic(run, rounds=1, iterations=1)
    assert all(len(r.added) == 4 and len(r.retired) == 1 for r in reports)
