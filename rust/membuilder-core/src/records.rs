//! The values a store takes and gives back: provenance, entries, search hits, commit reports.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::kinds::{Agent, BankKind};

/// Where a memory came from. `session` is the 0-based session index in its conversation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub conversation: String,
    pub session: i64,
    pub timestamp: Option<String>,
    pub turn_ids: Vec<String>,
}

/// An entry as returned to callers.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub id: u64,
    pub kind: BankKind,
    pub text: String,
    pub provenance: Arc<Provenance>,
    pub retired: bool,
}

/// An UPDATE/MERGE/REPLACE reference that named nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Unmatched {
    pub action_index: usize,
    pub agent: Agent,
    pub old_text: String,
    /// Best cosine among live entries of the bank (None: not embedded, core, or empty bank).
    pub best_score: Option<f32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitReport {
    pub added: Vec<u64>,
    pub retired: Vec<u64>,
    pub unmatched: Vec<Unmatched>,
    pub skipped: usize,
    pub duplicates: usize,
    pub core_before: String,
    pub core_after: String,
    pub compression_due: bool,
}

impl CommitReport {
    pub fn core_changed(&self) -> bool {
        self.core_before != self.core_after
    }
}

/// One search result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
    pub kind: BankKind,
}
