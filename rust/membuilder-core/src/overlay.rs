//! Views: a shared, immutable base state plus a private delta, for RL rollouts.
//!
//! A [`StateView`] holds an `Arc` of its base [`Snapshot`] and a [`Delta`]: the entries it added
//! (with their vectors, in small banks of its own), the base ids it retired, and its core block
//! if it changed it. Creating one clones an `Arc` and allocates three empty banks: nothing that
//! grows with the base. The base is never written through a view; the state it came from copies
//! its body before changing it while views share it (see [`crate::state::MemoryState`]). Views
//! are `Send + Sync`, so many views of one base can be searched from many threads at once.
//! Planning, committing and searching are the [`Store`] trait's, shared with states.
//!
//! Ids of entries a view adds start at the base's next id; two views of one base may give the
//! same id to different entries (each view is its own world).

use std::sync::Arc;

use crate::error::{Result, StateError};
use crate::kinds::{Action, BankKind};
use crate::layers::Layers;
use crate::records::{CommitReport, Provenance};
use crate::snapshot::{Delta, Snapshot};
use crate::state::MemoryState;
use crate::store::{new_owner, sealed::Mutate, Plan, Store};

#[derive(Debug)]
pub struct StateView {
    base: Arc<Snapshot>,
    delta: Delta,
    owner: u64,
    version: u64,
}

impl Clone for StateView {
    /// An independent copy of the view (same base, copied delta, new identity).
    fn clone(&self) -> Self {
        StateView {
            base: Arc::clone(&self.base),
            delta: self.delta.clone(),
            owner: new_owner(),
            version: 0,
        }
    }
}

impl StateView {
    pub fn new(base: Arc<Snapshot>) -> Self {
        let delta = Delta::new(&base);
        StateView {
            base,
            delta,
            owner: new_owner(),
            version: 0,
        }
    }

    pub fn base(&self) -> &Arc<Snapshot> {
        &self.base
    }

    pub fn delta(&self) -> &Delta {
        &self.delta
    }

    /// Ids this view added (live or since retired), ascending.
    pub fn added_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .delta
            .banks
            .iter()
            .flat_map(|b| b.rows.iter().map(|r| r.id))
            .collect();
        v.sort_unstable();
        v
    }

    /// Ids this view retired (base entries and its own), ascending.
    pub fn retired_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.delta.retired.iter().copied().collect();
        for b in self.delta.banks.iter() {
            v.extend(
                b.rows
                    .iter()
                    .enumerate()
                    .filter(|(r, _)| !b.live[*r])
                    .map(|(_, row)| row.id),
            );
        }
        v.sort_unstable();
        v
    }

    /// A standalone state equal to base + delta (same ids; graphs rebuilt as needed).
    pub fn materialize(&self) -> Result<MemoryState> {
        let mut snap: Snapshot = (*self.base).clone();
        for &id in &self.delta.retired {
            for b in snap.banks.iter_mut() {
                if let Some(r) = b.row_of(id) {
                    b.retire_row(r);
                }
            }
        }
        for (bi, db) in self.delta.banks.iter().enumerate() {
            for (r, row) in db.rows.iter().enumerate() {
                snap.banks[bi].push(
                    row.id,
                    row.text.clone(),
                    Arc::clone(&row.provenance),
                    db.vector(r),
                    db.live[r],
                );
            }
        }
        if let Some(c) = &self.delta.core {
            snap.core = c.clone();
        }
        snap.next_id = self.delta.next_id;
        snap.maintain_graphs()?;
        Ok(MemoryState::from_snapshot(snap))
    }
}

impl MemoryState {
    /// A view of the state as it is now (O(1): shares the body). Defined here, with views, so
    /// that the state module does not depend on the overlay that depends on it.
    pub fn view(&self) -> StateView {
        StateView::new(Arc::clone(&self.snap))
    }
}

impl Store for StateView {
    fn layers(&self) -> Layers<'_> {
        Layers {
            base: &self.base,
            delta: Some(&self.delta),
        }
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Mutate for StateView {
    fn owner(&self) -> u64 {
        self.owner
    }
    fn bump_version(&mut self) {
        self.version += 1;
    }
    fn push_entry(
        &mut self,
        kind: BankKind,
        text: String,
        norm: String,
        provenance: Arc<Provenance>,
        vector: &[f32],
    ) -> u64 {
        let id = self.delta.next_id;
        self.delta.next_id += 1;
        self.delta.banks[kind as usize].push_normalized(id, text, norm, provenance, vector, true);
        id
    }
    fn retire(&mut self, id: u64) -> bool {
        if id >= self.delta.first_id {
            for b in self.delta.banks.iter_mut() {
                if let Some(r) = b.row_of(id) {
                    return b.retire_row(r);
                }
            }
            return false;
        }
        for (bi, b) in self.base.banks.iter().enumerate() {
            if let Some(r) = b.row_of(id) {
                if b.live[r] && self.delta.retired.insert(id) {
                    self.delta.retired_by_bank[bi] += 1;
                    return true;
                }
                return false;
            }
        }
        false
    }
    fn set_core_text(&mut self, text: String) {
        if self.layers().core() != text {
            self.delta.core = Some(text);
        }
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Plan many views at once (in parallel when allowed). `actions[i]` and `provenances[i]` go to
/// `views[i]`.
pub fn plan_views(
    views: &[&StateView],
    actions: &[Vec<Action>],
    provenances: &[Provenance],
) -> Vec<Result<Plan>> {
    crate::par::map_indices(views.len(), |i| {
        views[i].plan(&actions[i], provenances[i].clone())
    })
}

/// [`plan_views`] where view `i`'s actions are the concatenation of `segments[i]` (e.g. the
/// actions of its four agents' parse results): each view copies its own actions, in parallel,
/// straight into its plan.
pub fn plan_views_segments(
    views: &[&StateView],
    segments: &[Vec<&[Action]>],
    provenances: &[Provenance],
) -> Vec<Result<Plan>> {
    crate::par::map_indices(views.len(), |i| {
        views[i].plan_owned(segments[i].concat(), provenances[i].clone())
    })
}

/// Commit `plans[i]` to `views[i]` with its rows of `vectors` (all plans' rows stacked in
/// order), in parallel when allowed.
pub fn commit_views(
    views: &mut [&mut StateView],
    plans: &[&Plan],
    vectors: &[f32],
) -> Vec<Result<CommitReport>> {
    let dim = views.first().map_or(1, |v| v.config().dim);
    let mut offsets = Vec::with_capacity(plans.len());
    let mut o = 0usize;
    for p in plans {
        offsets.push(o);
        o += p.texts.len();
    }
    let mut out: Vec<Option<Result<CommitReport>>> = (0..views.len()).map(|_| None).collect();
    let mut pairs: Vec<(&mut &mut StateView, &mut Option<Result<CommitReport>>)> =
        views.iter_mut().zip(out.iter_mut()).collect();
    crate::par::for_each_mut(&mut pairs, |i, (view, slot)| {
        let p = plans[i];
        let rows = p.texts.len();
        let start = offsets[i] * dim;
        let end = start + rows * dim;
        **slot = Some(if end <= vectors.len() {
            view.commit(p, &vectors[start..end])
        } else {
            Err(StateError::InvalidArgument(format!(
                "commit_views: vectors has {} floats, plans need {}",
                vectors.len(),
                o * dim
            )))
        });
    });
    out.into_iter()
        .map(|r| r.expect("every view committed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StateConfig;
    use crate::kinds::Agent;
    use crate::kinds::Op;

    fn act(agent: Agent, op: Op, text: Option<&str>, old: &[&str]) -> Action {
        Action {
            agent,
            op,
            text: text.map(str::to_string),
            old: old.iter().map(|s| s.to_string()).collect(),
            reason: None,
        }
    }

    fn unit(dim: usize, i: usize) -> Vec<f32> {
        let mut v = vec![0.01; dim];
        v[i % dim] = 1.0;
        v
    }

    #[test]
    fn view_changes_do_not_touch_base_and_state_changes_do_not_touch_view() {
        let mut cfg = StateConfig::new(4);
        cfg.update_mode = crate::config::UpdateMode::Replace;
        let mut st = MemoryState::new(cfg).unwrap();
        let p = st
            .plan(
                &[act(Agent::Semantic, Op::Add, Some("a"), &[])],
                Provenance::default(),
            )
            .unwrap();
        st.commit(&p, &unit(4, 0)).unwrap();
        let mut v = st.view();
        let p = v
            .plan(
                &[
                    act(Agent::Semantic, Op::Update, Some("b"), &["A."]),
                    act(Agent::Core, Op::Append, Some("hello"), &[]),
                ],
                Provenance::default(),
            )
            .unwrap();
        assert_eq!(p.texts, vec!["b".to_string()]);
        let r = v.commit(&p, &unit(4, 1)).unwrap();
        assert_eq!(r.retired, vec![0]);
        assert_eq!(r.added, vec![1]);
        assert_eq!(st.layers().count(None), 1);
        assert_eq!(st.core(), "");
        assert_eq!(v.layers().count(None), 1);
        assert!(!v.layers().is_live(0));
        // Now change the state: the view keeps its picture.
        let p = st
            .plan(
                &[act(Agent::Semantic, Op::Add, Some("c"), &[])],
                Provenance::default(),
            )
            .unwrap();
        st.commit(&p, &unit(4, 2)).unwrap();
        assert_eq!(st.layers().count(None), 2);
        assert_eq!(v.layers().count(None), 1);
        assert_eq!(v.base().next_id, 1);
        let m = v.materialize().unwrap();
        let texts: Vec<String> = m
            .layers()
            .entries(None, false)
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(texts, vec!["b".to_string()]);
        assert_eq!(m.core(), "hello");
    }

    #[test]
    fn stale_and_foreign_plans_are_refused() {
        let st = MemoryState::new(StateConfig::new(2)).unwrap();
        let mut a = st.view();
        let mut b = st.view();
        let p = a
            .plan(
                &[act(Agent::Episodic, Op::Add, Some("x"), &[])],
                Provenance::default(),
            )
            .unwrap();
        assert_eq!(b.commit(&p, &[1.0, 0.0]), Err(StateError::StalePlan));
        a.commit(&p, &[1.0, 0.0]).unwrap();
        assert_eq!(a.commit(&p, &[1.0, 0.0]), Err(StateError::StalePlan));
    }
}
