//! Random action sequences on a state (and on a view) against a brute-force model: the
//! semantics of `membuilder_core::store` (two-phase apply, exact and nearest matching, replace
//! and history modes), for both stores through the one `Store` trait.

use std::collections::HashSet;

use membuilder_core::kinds::{Action, Agent, BankKind, Op};
use membuilder_core::retrieval::{self, dot};
use membuilder_core::{normalize_text, MemoryState, Provenance, StateConfig, Store, UpdateMode};
use proptest::prelude::*;

const DIM: usize = 8;

/// A deterministic embedding: texts about one topic (first word) are close.
fn embed(text: &str) -> Vec<f32> {
    let norm = normalize_text(text);
    let topic = norm.split(' ').next().unwrap_or("").to_string();
    let h = |s: &str, salt: u64| {
        let mut x = salt ^ 0x9E37_79B9_7F4A_7C15;
        for b in s.bytes() {
            x = (x ^ b as u64).wrapping_mul(0x100_0000_01B3);
        }
        x
    };
    let mut v = Vec::with_capacity(DIM);
    let (mut a, mut b) = (h(&topic, 1), h(&norm, 2));
    for _ in 0..DIM {
        a = a
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        b = b
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ta = ((a >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        let tb = ((b >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        v.push(ta + 0.3 * tb);
    }
    retrieval::normalize(&mut v).unwrap();
    v
}

#[derive(Clone, Debug)]
struct ModelEntry {
    id: u64,
    kind: BankKind,
    text: String,
    vec: Vec<f32>,
    retired: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    core: String,
    entries: Vec<ModelEntry>,
    next: u64,
}

impl Model {
    fn exact(&self, kind: BankKind, norm: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| !e.retired && e.kind == kind && normalize_text(&e.text) == norm)
    }
    fn nearest(&self, kind: BankKind, v: &[f32]) -> Option<(usize, f32)> {
        let mut best: Option<(usize, f32)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.retired || e.kind != kind {
                continue;
            }
            let s = dot(v, &e.vec);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        best
    }
    /// Applies the documented semantics; `embedded(i, j)` says whether plan embedded old j
    /// of action i.
    fn apply(&mut self, actions: &[Action], mode: UpdateMode, thr: f32) -> (Vec<u64>, Vec<u64>) {
        // Decide embeddings the way the plan does (before any change).
        let mut pending: Vec<(BankKind, String)> = Vec::new();
        let mut embedded = HashSet::new();
        for (i, a) in actions.iter().enumerate() {
            let Some(kind) = a.agent.bank() else { continue };
            if !matches!(a.op, Op::Add | Op::Update | Op::Merge) {
                continue;
            }
            if mode == UpdateMode::Replace && a.op != Op::Add {
                for (j, o) in a.old.iter().enumerate() {
                    let n = normalize_text(o);
                    if self.exact(kind, &n).is_none() && !pending.contains(&(kind, n)) {
                        embedded.insert((i, j));
                    }
                }
            }
            pending.push((kind, normalize_text(a.text.as_deref().unwrap())));
        }
        let (mut added, mut retired) = (Vec::new(), Vec::new());
        for (i, a) in actions.iter().enumerate() {
            match (a.agent.bank(), a.op) {
                (_, Op::Skip) => {}
                (None, Op::Append) => {
                    let t = a.text.clone().unwrap();
                    self.core = if self.core.is_empty() {
                        t
                    } else {
                        format!("{}\n{}", self.core, t)
                    };
                }
                (None, Op::Rewrite) => self.core = a.text.clone().unwrap(),
                (None, Op::Replace) => {
                    let o = &a.old[0];
                    if !o.is_empty() && self.core.contains(o.as_str()) {
                        self.core = self
                            .core
                            .replacen(o.as_str(), a.text.as_deref().unwrap(), 1);
                    }
                }
                (None, _) => unreachable!("generated core ops only"),
                (Some(kind), _) => {
                    if mode == UpdateMode::Replace && a.op != Op::Add {
                        for (j, o) in a.old.iter().enumerate() {
                            if let Some(p) = self.exact(kind, &normalize_text(o)) {
                                self.entries[p].retired = true;
                                retired.push(self.entries[p].id);
                            } else if embedded.contains(&(i, j)) {
                                if let Some((p, s)) = self.nearest(kind, &embed(o)) {
                                    if s >= thr {
                                        self.entries[p].retired = true;
                                        retired.push(self.entries[p].id);
                                    }
                                }
                            }
                        }
                    }
                    let t = a.text.clone().unwrap();
                    if self.exact(kind, &normalize_text(&t)).is_none() {
                        let vec = embed(&t);
                        self.entries.push(ModelEntry {
                            id: self.next,
                            kind,
                            text: t,
                            vec,
                            retired: false,
                        });
                        added.push(self.next);
                        self.next += 1;
                    }
                }
            }
        }
        (added, retired)
    }
}

fn action_strategy() -> impl Strategy<Value = Action> {
    let text = (0..3usize, 0..4usize, 0..3usize).prop_map(|(t, o, d)| {
        let base = format!(
            "{} likes {}",
            ["ana", "bo", "cy"][t],
            ["tea", "jazz", "chess", "rain"][o]
        );
        match d {
            0 => base,
            1 => format!("  {}!", base.to_uppercase()),
            _ => format!("{base} a lot"),
        }
    });
    let agent = prop_oneof![
        Just(Agent::Core),
        Just(Agent::Episodic),
        Just(Agent::Semantic),
        Just(Agent::Procedural)
    ];
    (
        agent,
        0..4usize,
        text.clone(),
        proptest::collection::vec(text, 1..3),
    )
        .prop_map(|(agent, op, t, olds)| {
            let (op, text, old) = match (agent, op) {
                (Agent::Core, 0) => (Op::Append, Some(t), vec![]),
                (Agent::Core, 1) => (Op::Replace, Some("x".into()), vec![t]),
                (Agent::Core, 2) => (Op::Rewrite, Some(t), vec![]),
                (Agent::Core, _) => (Op::Skip, None, vec![]),
                (_, 0) => (Op::Add, Some(t), vec![]),
                (_, 1) => (Op::Update, Some(t), olds[..1].to_vec()),
                (_, 2) => (Op::Merge, Some(t), olds),
                (_, _) => (Op::Skip, None, vec![]),
            };
            Action {
                agent,
                op,
                text,
                old,
                reason: None,
            }
        })
}

fn run_sessions<T: Store>(
    t: &mut T,
    model: &mut Model,
    sessions: &[Vec<Action>],
    mode: UpdateMode,
) {
    for actions in sessions {
        let plan = t
            .plan_owned(actions.clone(), Provenance::default())
            .unwrap();
        let vecs: Vec<f32> = plan.texts.iter().flat_map(|s| embed(s)).collect();
        let rep = t.commit(&plan, &vecs).unwrap();
        let (added, retired) = model.apply(actions, mode, 0.92);
        assert_eq!(rep.added, added);
        assert_eq!(rep.retired, retired);
        assert_eq!(t.layers().core(), model.core);
        let got: Vec<(u64, BankKind, String, bool)> = t
            .layers()
            .entries(None, true)
            .into_iter()
            .map(|e| (e.id, e.kind, e.text, e.retired))
            .collect();
        let want: Vec<(u64, BankKind, String, bool)> = model
            .entries
            .iter()
            .map(|e| (e.id, e.kind, e.text.clone(), e.retired))
            .collect();
        assert_eq!(got, want);
    }
}

fn config(mode: UpdateMode) -> StateConfig {
    let mut c = StateConfig::new(DIM);
    c.update_mode = mode;
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn state_and_views_follow_the_model(
        replace in any::<bool>(),
        base in proptest::collection::vec(proptest::collection::vec(action_strategy(), 0..6), 1..4),
        more in proptest::collection::vec(proptest::collection::vec(action_strategy(), 0..6), 1..4),
    ) {
        let mode = if replace { UpdateMode::Replace } else { UpdateMode::History };
        let mut st = MemoryState::new(config(mode)).unwrap();
        let mut model = Model::default();
        run_sessions(&mut st, &mut model, &base, mode);
        // A view follows the model from the base's state, and never changes the base.
        let before = (st.core().to_string(), st.layers().entries(None, true));
        let mut view = st.view();
        let mut vmodel = model.clone();
        run_sessions(&mut view, &mut vmodel, &more, mode);
        prop_assert_eq!(&before, &(st.core().to_string(), st.layers().entries(None, true)));
        // The state changing afterwards does not change the view.
        let vbefore = (view.core().to_string(), view.layers().entries(None, true));
        run_sessions(&mut st, &mut model, &more, mode);
        prop_assert_eq!(&vbefore, &(view.core().to_string(), view.layers().entries(None, true)));
        // Materialised view == view.
        let m = view.materialize().unwrap();
        prop_assert_eq!(&vbefore, &(m.core().to_string(), m.layers().entries(None, true)));
    }
}

/// `search`, `add_entries`, `set_core` and `check_plan` were written twice (state and view) and
/// had started to differ in form; now both come from `Store`. Pin that the two stores answer
/// alike: the same hits, the same errors for a ragged query batch, stale plans refused.
#[test]
fn state_and_view_share_store_behaviour() {
    let mut st = MemoryState::new(config(UpdateMode::History)).unwrap();
    let texts: Vec<String> = ["alpha one", "beta two", "gamma three"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let vecs: Vec<f32> = texts.iter().flat_map(|t| embed(t)).collect();
    let provs = vec![Provenance::default(); texts.len()];
    st.add_entries(BankKind::Semantic, &texts, &vecs, &provs)
        .unwrap();
    let mut view = st.view();
    let q = embed("beta two");
    assert_eq!(
        st.search(&q, 2, None).unwrap(),
        view.search(&q, 2, None).unwrap()
    );
    let ragged = &q[..DIM - 1];
    let (a, b) = (st.search(ragged, 2, None), view.search(ragged, 2, None));
    assert!(a.is_err());
    assert_eq!(a, b);
    // set_core bumps the version: a plan made before it is refused by both.
    let ps = st.plan(&[], Provenance::default()).unwrap();
    let pv = view.plan(&[], Provenance::default()).unwrap();
    st.set_core("c".into());
    view.set_core("c".into());
    assert_eq!(st.core(), view.core());
    assert!(st.check_plan(&ps).is_err());
    assert_eq!(st.check_plan(&ps), view.check_plan(&pv));
}
