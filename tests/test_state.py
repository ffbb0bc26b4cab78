"""MemoryState: core operations, banks, update modes, matching, search and argument errors."""

from __future__ import annotations

import numpy as np
import pytest
from membuilder import _core as c
from reference.state_ref import normalize_text

DIM = 8
PROV = c.Provenance("conv", 2, "2023-05-08 13:56", ["D3:1", "D3:2"])


def vec(i: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.full(DIM, 0.01, dtype=np.float32)
    v[i % DIM] = 1.0
    if noise:
        v += noise * np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v


def apply(store, actions, vectors=None):
    plan = store.plan(actions, PROV)
    if vectors is None:
        vectors = (
            np.stack([vec(i) for i in range(len(plan.texts))])
            if plan.texts
            else np.zeros((0, DIM), np.float32)
        )
    return store.commit(plan, np.asarray(vectors, dtype=np.float32))


def add(agent, text):
    return c.Action(agent, "ADD", text=text)


# -- core block ---------------------------------------------------------------------------------


def test_core_append_replace_rewrite_skip():
    s = c.MemoryState(DIM, core_limit=30)
    r = apply(s, [c.Action("core", "APPEND", text="Name: Ana.")])
    assert s.core == "Name: Ana." and r.core_changed and r.core_before == ""
    apply(s, [c.Action("core", "APPEND", text="Lives in Lima.")])
    assert s.core == "Name: Ana.\nLives in Lima."
    r = apply(s, [c.Action("core", "REPLACE", text="Cusco", old=["Lima"])])
    assert s.core == "Name: Ana.\nLives in Cusco." and r.unmatched == []
    r = apply(s, [c.Action("core", "REPLACE", text="x", old=["Berlin"])])
    assert s.core == "Name: Ana.\nLives in Cusco." and not r.core_changed
    assert [(u.action_index, u.agent, u.old_text, u.best_score) for u in r.unmatched] == [
        (0, "core", "Berlin", None)
    ]
    r = apply(s, [c.Action("core", "SKIP"), c.Action("core", "APPEND", text="Has a cat named Miso.")])
    assert r.skipped == 1 and r.compression_due and s.compression_due
    r = apply(s, [c.Action("core", "REWRITE", text="Ana, Cusco, cat Miso.")])
    assert s.core == "Ana, Cusco, cat Miso." and not r.compression_due


def test_replace_only_first_occurrence():
    s = c.MemoryState(DIM)
    s.set_core("tea tea")
    apply(s, [c.Action("core", "REPLACE", text="coffee", old=["tea"])])
    assert s.core == "coffee tea"


# -- banks ----------------------------------------------------------------------------------------


def test_add_assigns_ids_kinds_and_provenance():
    s = c.MemoryState(DIM)
    plan = s.plan([add("episodic", "2023-05-08: went hiking"), add("semantic", "Ana is a nurse")], PROV)
    assert plan.texts == ["2023-05-08: went hiking", "Ana is a nurse"] and len(plan) == 2
    r = s.commit(plan, np.stack([vec(0), vec(1)]))
    assert r.added == [0, 1]
    e = s.get(1)
    assert (e.id, e.kind, e.text, e.retired) == (1, "semantic", "Ana is a nurse", False)
    assert e.provenance == PROV and e.provenance.turn_ids == ["D3:1", "D3:2"]
    assert s.count() == 2 and s.count("episodic") == 1 and s.count("procedural") == 0
    assert s.texts(np.array([1, -1, 0])) == ["Ana is a nurse", None, "2023-05-08: went hiking"]
    with pytest.raises(KeyError):
        s.get(99)
    with pytest.raises(KeyError):
        s.texts([5])


def test_duplicate_add_is_skipped_and_counted():
    s = c.MemoryState(DIM)
    apply(s, [add("semantic", "Ana likes tea")])
    r = apply(s, [add("semantic", '  "ANA likes   tea."  '), add("episodic", "Ana likes tea")])
    assert r.duplicates == 1 and r.added == [1]  # other bank: not a duplicate
    assert len(s) == 2


def test_history_mode_keeps_old_entries():
    s = c.MemoryState(DIM)
    apply(s, [add("semantic", "Ana lives in Lima")])
    r = apply(s, [c.Action("semantic", "UPDATE", text="Ana lives in Cusco", old=["Ana lives in Lima"])])
    assert r.retired == [] and r.added == [1] and r.unmatched == []
    assert [e.text for e in s.entries()] == ["Ana lives in Lima", "Ana lives in Cusco"]


def test_replace_mode_retires_exact_and_near_matches_and_reports_the_rest():
    s = c.MemoryState(DIM, update_mode="replace", match_threshold=0.9)
    apply(
        s,
        [add("episodic", "a: hiking"), add("episodic", "b: concert"), add("semantic", "c: fact")],
        np.stack([vec(0), vec(1), vec(2)]),
    )
    # Exact (normalised) match retires without an embedding.
    plan = s.plan([c.Action("episodic", "UPDATE", text="a: hiking twice", old=["A: Hiking!"])], PROV)
    assert plan.texts == ["a: hiking twice"]
    r = s.commit(plan, vec(3)[None])
    assert r.retired == [0] and r.added == [3] and s.get(0).retired
    # No exact match: the old text is embedded and matched by cosine within its own bank.
    plan = s.plan([c.Action("episodic", "MERGE", text="merged", old=["the concert", "something else"])], PROV)
    assert plan.texts == ["merged", "the concert", "something else"]
    r = s.commit(plan, np.stack([vec(4), vec(1, 0.05), vec(2)]))  # vec(2) is semantic's, not episodic's
    assert r.retired == [1] and r.added == [4]
    assert [(u.action_index, u.old_text) for u in r.unmatched] == [(0, "something else")]
    assert r.unmatched[0].best_score is not None and r.unmatched[0].best_score < 0.9
    assert s.count("semantic") == 1 and not s.get(2).retired
    assert [e.id for e in s.entries(include_retired=True) if e.retired] == [0, 1]


def test_plan_is_tied_to_its_store_and_version():
    s = c.MemoryState(DIM)
    other = c.MemoryState(DIM)
    plan = s.plan([add("semantic", "x")], PROV)
    with pytest.raises(c.InvalidArgumentError, match="plan"):
        other.commit(plan, vec(0)[None])
    s.commit(plan, vec(0)[None])
    with pytest.raises(c.InvalidArgumentError):
        s.commit(plan, vec(0)[None])  # already committed: stale
    plan = s.plan([add("semantic", "y")], PROV)
    s.set_core("changed")
    with pytest.raises(c.InvalidArgumentError):
        s.commit(plan, vec(1)[None])


def test_plan_accepts_parse_results():
    s = c.MemoryState(DIM)
    pr1 = c.parse_actions("semantic", '{"operations": [{"action": "ADD", "memory": "Ana is a nurse"}]}')
    pr2 = c.parse_actions("core", '{"operation": "APPEND", "content": "Ana"}')
    assert s.plan(pr1, PROV).texts == ["Ana is a nurse"]
    plan = s.plan([pr1, pr2], PROV)
    r = s.commit(plan, vec(0)[None])
    assert r.added == [0] and s.core == "Ana"


def test_bad_arguments_raise_invalid_argument():
    s = c.MemoryState(DIM)
    plan = s.plan([add("semantic", "x")], PROV)
    with pytest.raises(c.InvalidArgumentError, match="rows"):
        s.commit(plan, np.zeros((2, DIM), np.float32))
    with pytest.raises(c.InvalidArgumentError, match="shape"):
        s.commit(plan, np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(c.InvalidArgumentError, match="zero length"):
        s.commit(plan, np.zeros((1, DIM), np.float32))
    with pytest.raises(c.InvalidArgumentError, match="NaN"):
        s.commit(plan, np.full((1, DIM), np.nan, np.float32))
    assert len(s) == 0  # nothing was applied by the failed commits
    with pytest.raises(c.InvalidArgumentError, match="string"):
        s.plan("ADD x", PROV)
    with pytest.raises(c.InvalidArgumentError, match="kind"):
        s.search(vec(0), 3, kind="core")
    with pytest.raises(c.InvalidArgumentError, match="k must"):
        s.search(vec(0), -1)
    with pytest.raises(c.InvalidArgumentError, match="update_mode"):
        c.MemoryState(DIM, update_mode="overwrite")
    with pytest.raises(c.InvalidArgumentError):
        c.MemoryState(0)
    with pytest.raises(ValueError):  # InvalidArgumentError is also a ValueError
        c.MemoryState(DIM, match_threshold=2.0)


# -- search ---------------------------------------------------------------------------------------


def test_search_orders_by_score_then_id_and_pads():
    s = c.MemoryState(DIM)
    ids = s.add_entries("semantic", ["a", "b", "c"], np.stack([vec(0), vec(0), vec(1)]), [PROV] * 3)
    s.add_entries("episodic", ["d"], vec(0)[None] * 3.0, [PROV])  # same direction after normalising
    assert ids == [0, 1, 2]
    hits = s.search(vec(0), 10)
    assert list(hits.ids) == [0, 1, 3, 2] and len(hits) == 4
    assert hits.scores[0] == hits.scores[1] == hits.scores[2] > hits.scores[3]
    assert list(hits.kinds) == [1, 1, 0, 1]
    assert [e.text for e in hits.entries()] == ["a", "b", "d", "c"]
    assert hits.ids.dtype == np.int64 and hits.scores.dtype == np.float32 and hits.kinds.dtype == np.int8
    ids, scores, kinds = s.search_batch(np.stack([vec(0), vec(1)]), 5, kind="semantic")
    assert ids.shape == (2, 5) and list(ids[1]) == [2, 0, 1, -1, -1]
    assert np.isneginf(scores[1, 3:]).all() and list(kinds[1, 3:]) == [-1, -1]
    # float64 input is converted; 2-D single query accepted by search().
    assert list(s.search(vec(1).astype(np.float64)[None], 1).ids) == [2]


def test_graph_search_above_the_exact_limit_agrees_with_exact():
    rng = np.random.default_rng(0)
    n, dim = 3000, 16
    data = rng.standard_normal((n, dim)).astype(np.float32)
    graph = c.MemoryState(dim, exact_search_limit=500)
    exact = c.MemoryState(dim)
    for st in (graph, exact):
        st.add_entries("episodic", [f"m{i}" for i in range(n)], data, [PROV] * n)
    q = rng.standard_normal((50, dim)).astype(np.float32)
    gi, gs, _ = graph.search_batch(q, 10)
    ei, es, _ = exact.search_batch(q, 10)
    recall = np.mean([len(set(gi[r]) & set(ei[r])) / 10 for r in range(len(q))])
    assert recall > 0.9
    # Scores always come from the exact kernel, so shared hits have identical scores.
    for r in range(len(q)):
        common = set(gi[r]) & set(ei[r])
        for i in common:
            assert gs[r][list(gi[r]).index(i)] == es[r][list(ei[r]).index(i)]


def test_to_dict_and_copy():
    s = c.MemoryState(DIM, update_mode="replace")
    apply(s, [add("procedural", "1. boil water 2. add tea"), c.Action("core", "APPEND", text="Ana")])
    d = s.to_dict()
    assert d["core"] == "Ana" and d["update_mode"] == "replace" and d["dim"] == DIM
    assert d["entries"][0]["kind"] == "procedural" and d["entries"][0]["provenance"]["session"] == 2
    cp = s.copy()
    apply(cp, [add("procedural", "another")])
    assert len(cp) == 2 and len(s) == 1


def test_normalize_text_reference_examples():
    assert normalize_text('  "The User\'s dog is   Rex."  ') == "the user's dog is rex"
    assert normalize_text("«Tea…»") == "tea"
