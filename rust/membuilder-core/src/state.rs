//! [`MemoryState`]: a mutable memory that owns its body (one core block and three banks of
//! entries). How it is planned, committed and searched is the [`Store`] trait's (see
//! [`crate::store`] for the semantics); views of it are in [`crate::overlay`], files in
//! [`crate::persist`].
//!
//! Entry ids are assigned from one counter shared by the three banks, in commit order, and are
//! never reused in a state.

use std::sync::Arc;

use crate::config::StateConfig;
use crate::error::Result;
use crate::kinds::BankKind;
use crate::layers::Layers;
use crate::records::Provenance;
use crate::snapshot::Snapshot;
use crate::store::{new_owner, sealed::Mutate, Store};

/// A mutable memory. Its body is behind an `Arc` so that views share it; changing a state that
/// has views first copies the body (copy on write), so views never see later changes.
#[derive(Debug)]
pub struct MemoryState {
    pub(crate) snap: Arc<Snapshot>,
    owner: u64,
    version: u64,
}

impl Clone for MemoryState {
    /// A deep, independent copy (new identity: plans of the original do not apply to it).
    fn clone(&self) -> Self {
        MemoryState {
            snap: Arc::new((*self.snap).clone()),
            owner: new_owner(),
            version: 0,
        }
    }
}

impl MemoryState {
    pub fn new(config: StateConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::from_snapshot(Snapshot::new(config)))
    }

    pub fn from_snapshot(snap: Snapshot) -> Self {
        MemoryState {
            snap: Arc::new(snap),
            owner: new_owner(),
            version: 0,
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    pub fn shared_snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snap)
    }
}

impl Store for MemoryState {
    fn layers(&self) -> Layers<'_> {
        Layers {
            base: &self.snap,
            delta: None,
        }
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Mutate for MemoryState {
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
        let snap = Arc::make_mut(&mut self.snap);
        let id = snap.next_id;
        snap.next_id += 1;
        snap.banks[kind as usize].push_normalized(id, text, norm, provenance, vector, true);
        id
    }
    fn retire(&mut self, id: u64) -> bool {
        let Some((bi, row)) = self
            .snap
            .banks
            .iter()
            .enumerate()
            .find_map(|(bi, b)| b.row_of(id).map(|r| (bi, r)))
        else {
            return false;
        };
        if !self.snap.banks[bi].live[row] {
            return false;
        }
        Arc::make_mut(&mut self.snap).banks[bi].retire_row(row)
    }
    fn set_core_text(&mut self, text: String) {
        if self.snap.core != text {
            Arc::make_mut(&mut self.snap).core = text;
        }
    }
    fn finish(&mut self) -> Result<()> {
        // Only touch (and so possibly copy) the body when a bank's graph is out of step.
        let limit = self.snap.config.exact_search_limit;
        let stale = self.snap.banks.iter().any(|b| b.graph_needs_work(limit));
        if stale {
            Arc::make_mut(&mut self.snap).maintain_graphs()?;
        }
        Ok(())
    }
}
