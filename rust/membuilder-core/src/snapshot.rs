//! The data a store is made of: a [`Snapshot`] (core block, three banks, id counter: what
//! states own, views share and files hold) and a view's [`Delta`] on top of one.

use std::collections::HashSet;

use crate::bank::Bank;
use crate::config::StateConfig;
use crate::error::{Result, StateError};
use crate::kinds::BankKind;

/// The immutable-when-shared body of a state: what views share and what files hold.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub config: StateConfig,
    pub core: String,
    pub banks: [Bank; 3],
    pub next_id: u64,
}

impl Snapshot {
    pub fn new(config: StateConfig) -> Self {
        let dim = config.dim;
        Snapshot {
            config,
            core: String::new(),
            banks: BankKind::ALL.map(|k| Bank::new(k, dim)),
            next_id: 0,
        }
    }

    pub fn maintain_graphs(&mut self) -> Result<()> {
        let limit = self.config.exact_search_limit;
        for b in self.banks.iter_mut() {
            b.maintain_graph(limit).map_err(StateError::Index)?;
        }
        Ok(())
    }
}

/// A view's own changes on top of its base.
#[derive(Clone, Debug)]
pub struct Delta {
    pub core: Option<String>,
    pub banks: [Bank; 3],
    /// Base ids this view retired.
    pub retired: HashSet<u64>,
    pub retired_by_bank: [usize; 3],
    /// First id this view assigns (the base's next id).
    pub first_id: u64,
    pub next_id: u64,
}

impl Delta {
    pub(crate) fn new(base: &Snapshot) -> Self {
        let dim = base.config.dim;
        Delta {
            core: None,
            banks: BankKind::ALL.map(|k| Bank::new(k, dim)),
            retired: HashSet::new(),
            retired_by_bank: [0; 3],
            first_id: base.next_id,
            next_id: base.next_id,
        }
    }
}
