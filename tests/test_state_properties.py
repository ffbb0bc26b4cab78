"""Property tests: the Rust state equals the pure-Python reference on random action sequences."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from membuilder import _core as c
from reference.state_ref import RefAction, RefState, normalize_text

DIM = 32
TOPICS = ["alice", "bob", "carol", "dave"]
OBJECTS = ["tea", "chess", "paris", "running", "jazz"]
ALLOWED = {
    "episodic": ["ADD", "UPDATE", "MERGE"],
    "semantic": ["ADD", "UPDATE", "SKIP"],
    "procedural": ["ADD", "UPDATE"],
    "core": ["APPEND", "REPLACE", "REWRITE", "SKIP"],
}
PROV = c.Provenance("conv-1", 0, "2023-05-08 13:56", ["D1:1"])


def _seeded(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def embed(text: str) -> np.ndarray:
    """Texts about one topic are close (cosine around the match threshold), others far apart;
    texts with the same normalised form get the same vector."""
    norm = normalize_text(text)
    topic = norm.split(" ")[0] if norm else ""
    v = _seeded("topic:" + topic).standard_normal(DIM) + 0.3 * _seeded("text:" + norm).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def embed_all(texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    return np.stack([embed(t) for t in texts])


# A memory text: topic + object, with decorations that do not change its normalised form.
memory_text = st.builds(
    lambda t, o, extra, deco: deco(f"{t} likes {o}{extra}"),
    st.sampled_from(TOPICS),
    st.sampled_from(OBJECTS),
    st.sampled_from(["", " a lot", " on sundays"]),
    st.sampled_from(
        [
            lambda s: s,
            str.upper,
            lambda s: f'"{s}."',
            lambda s: s.replace(" ", "   "),
            lambda s: s.capitalize() + "!",
        ]
    ),
)
core_text = st.sampled_from(["Name: Alice.", "Lives in Paris.", "Likes tea", "Works as a nurse.", "tea"])


@st.composite
def action(draw):
    agent = draw(st.sampled_from(list(ALLOWED)))
    op = draw(st.sampled_from(ALLOWED[agent]))
    if agent == "core":
        if op in ("APPEND", "REWRITE"):
            return c.Action(agent, op, text=draw(core_text))
        if op == "REPLACE":
            return c.Action(agent, op, text=draw(core_text), old=[draw(core_text)])
        return c.Action(agent, op)
    if op == "ADD":
        return c.Action(agent, op, text=draw(memory_text))
    if op == "UPDATE":
        return c.Action(agent, op, text=draw(memory_text), old=[draw(memory_text)])
    if op == "MERGE":
        return c.Action(
            agent, op, text=draw(memory_text), old=draw(st.lists(memory_text, min_size=2, max_size=3))
        )
    return c.Action(agent, op)


sessions = st.lists(st.lists(action(), min_size=0, max_size=8), min_size=1, max_size=5)


def to_ref(actions) -> list[RefAction]:
    return [RefAction(a.agent, a.op, a.text, tuple(a.old)) for a in actions]


def assert_same(store, ref: RefState) -> None:
    assert store.core == ref.core
    got = [(e.id, e.kind, e.text, e.retired) for e in store.entries(include_retired=True)]
    want = [(e.id, e.kind, e.text, e.retired) for e in ref.entries]
    assert got == want
    assert len(store) == len(ref.live())


def apply_both(store, ref: RefState, actions) -> None:
    plan = store.plan(actions, PROV)
    ref_actions = to_ref(actions)
    assert plan.texts == ref.plan(ref_actions)
    vectors = embed_all(plan.texts)
    rep = store.commit(plan, vectors)
    want = ref.commit(ref_actions, vectors)
    assert rep.added == want.added
    assert rep.retired == want.retired
    assert rep.skipped == want.skipped
    assert rep.duplicates == want.duplicates
    assert rep.core_before == want.core_before and rep.core_after == want.core_after
    assert rep.compression_due == want.compression_due
    got_un = [(u.action_index, u.agent, u.old_text, u.best_score) for u in rep.unmatched]
    assert [g[:3] for g in got_un] == [w[:3] for w in want.unmatched]
    for g, w in zip(got_un, want.unmatched):
        assert (g[3] is None) == (w[3] is None)
        if g[3] is not None:
            assert g[3] == pytest.approx(w[3], abs=1e-5)


def check_search(store, ref: RefState, seed: int) -> None:
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    for kind in (None, "episodic", "semantic"):
        ids, scores, kinds = store.search_batch(queries, 5, kind)
        for qi, q in enumerate(queries):
            want = ref.search(q, 5, kind)
            n = len(want)
            assert list(ids[qi, :n]) == [w[0] for w in want]
            np.testing.assert_allclose(scores[qi, :n], [w[1] for w in want], atol=1e-5)
            assert (ids[qi, n:] == -1).all() and np.isneginf(scores[qi, n:]).all()
            assert [c.BANK_KINDS[k] for k in kinds[qi, :n]] == [w[2] for w in want]


@pytest.mark.parametrize("mode", ["history", "replace"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=sessions, seed=st.integers(0, 2**31))
def test_state_matches_reference(mode, batches, seed):
    store = c.MemoryState(DIM, update_mode=mode, core_limit=40, match_threshold=0.92)
    ref = RefState(DIM, update_mode=mode, core_limit=40, match_threshold=0.92)
    for actions in batches:
        apply_both(store, ref, actions)
        assert_same(store, ref)
    check_search(store, ref, seed)


@pytest.mark.parametrize("mode", ["history", "replace"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_batches=sessions, view_batches=sessions, later=st.lists(action(), max_size=5))
def test_views_match_reference_and_never_change_their_base(mode, base_batches, view_batches, later):
    store = c.MemoryState(DIM, update_mode=mode, core_limit=40)
    ref = RefState(DIM, update_mode=mode, core_limit=40)
    for actions in base_batches:
        apply_both(store, ref, actions)
    before = store.to_dict()
    view = store.view()
    view_ref = RefState(DIM, update_mode=mode, core_limit=40)
    view_ref.core = ref.core
    view_ref.entries = [type(e)(e.id, e.kind, e.text, e.vector, e.retired) for e in ref.entries]
    for actions in view_batches:
        apply_both(view, view_ref, actions)
        assert_same(view, view_ref)
    assert store.to_dict() == before  # the view never writes through
    check_search(view, view_ref, 7)
    # Changing the state afterwards does not show through to the view.
    snapshot = [(e.id, e.text, e.retired) for e in view.entries(include_retired=True)]
    core = view.core
    apply_both(store, ref, later)
    assert [(e.id, e.text, e.retired) for e in view.entries(include_retired=True)] == snapshot
    assert view.core == core
    # Materialising gives a state equal to the view.
    m = view.materialize()
    assert_same(m, view_ref)
    check_search(m, view_ref, 11)
