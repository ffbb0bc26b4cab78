//! Reads of a store through its layers: a base snapshot and, for views, a delta on top. States
//! and views read through the same [`Layers`], so matching and lookups have one implementation;
//! the cross-layer search is in [`crate::search`].

use std::sync::Arc;

use crate::bank::Bank;
use crate::config::StateConfig;
use crate::kinds::BankKind;
use crate::records::Entry;
use crate::snapshot::{Delta, Snapshot};

/// A state as seen through an optional view delta; every read goes through here so that states
/// and views share one implementation of matching and search.
#[derive(Clone, Copy)]
pub struct Layers<'a> {
    pub base: &'a Snapshot,
    pub delta: Option<&'a Delta>,
}

impl<'a> Layers<'a> {
    pub fn config(&self) -> &'a StateConfig {
        &self.base.config
    }

    pub fn core(&self) -> &'a str {
        match self.delta.and_then(|d| d.core.as_deref()) {
            Some(c) => c,
            None => &self.base.core,
        }
    }

    pub fn compression_due(&self) -> bool {
        self.core().chars().count() > self.config().core_limit
    }

    fn retired_in_view(&self, id: u64) -> bool {
        self.delta.is_some_and(|d| d.retired.contains(&id))
    }

    /// Live entries in one bank, or all.
    pub fn count(&self, kind: Option<BankKind>) -> usize {
        let kinds: Vec<BankKind> = kind.map_or(BankKind::ALL.to_vec(), |k| vec![k]);
        kinds
            .into_iter()
            .map(|k| {
                let i = k as usize;
                let base = self.base.banks[i].n_live;
                match self.delta {
                    Some(d) => base - d.retired_by_bank[i] + d.banks[i].n_live,
                    None => base,
                }
            })
            .sum()
    }

    /// Locate an id: (bank, row, in_delta).
    fn locate(&self, id: u64) -> Option<(&'a Bank, usize, bool)> {
        if let Some(d) = self.delta {
            if id >= d.first_id {
                for b in d.banks.iter() {
                    if let Some(r) = b.row_of(id) {
                        return Some((b, r, true));
                    }
                }
                return None;
            }
        }
        for b in self.base.banks.iter() {
            if let Some(r) = b.row_of(id) {
                return Some((b, r, false));
            }
        }
        None
    }

    pub fn get(&self, id: u64) -> Option<Entry> {
        let (bank, row, in_delta) = self.locate(id)?;
        let r = &bank.rows[row];
        let live = bank.live[row] && (in_delta || !self.retired_in_view(id));
        Some(Entry {
            id,
            kind: bank.kind,
            text: r.text.clone(),
            provenance: Arc::clone(&r.provenance),
            retired: !live,
        })
    }

    pub fn is_live(&self, id: u64) -> bool {
        match self.locate(id) {
            Some((bank, row, in_delta)) => {
                bank.live[row] && (in_delta || !self.retired_in_view(id))
            }
            None => false,
        }
    }

    /// Entries in id order.
    pub fn entries(&self, kind: Option<BankKind>, include_retired: bool) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut push_bank = |bank: &Bank, in_delta: bool| {
            if kind.is_some_and(|k| k != bank.kind) {
                return;
            }
            for (row, r) in bank.rows.iter().enumerate() {
                let live = bank.live[row] && (in_delta || !self.retired_in_view(r.id));
                if live || include_retired {
                    out.push(Entry {
                        id: r.id,
                        kind: bank.kind,
                        text: r.text.clone(),
                        provenance: Arc::clone(&r.provenance),
                        retired: !live,
                    });
                }
            }
        };
        for b in self.base.banks.iter() {
            push_bank(b, false);
        }
        if let Some(d) = self.delta {
            for b in d.banks.iter() {
                push_bank(b, true);
            }
        }
        out.sort_by_key(|e| e.id);
        out
    }

    /// Lowest-id live entry of `kind` whose normalised text is `norm`.
    pub fn find_exact(&self, kind: BankKind, norm: &str) -> Option<u64> {
        let i = kind as usize;
        let b = &self.base.banks[i];
        for &row in b.rows_with_text(norm) {
            let row = row as usize;
            if b.live[row] && !self.retired_in_view(b.rows[row].id) {
                return Some(b.rows[row].id);
            }
        }
        if let Some(d) = self.delta {
            let b = &d.banks[i];
            for &row in b.rows_with_text(norm) {
                if b.live[row as usize] {
                    return Some(b.rows[row as usize].id);
                }
            }
        }
        None
    }
}
