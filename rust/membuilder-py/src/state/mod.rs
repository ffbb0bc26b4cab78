//! Binding of the memory state, one module per concept:
//! - `values`: Provenance, Entry, Unmatched, Plan, CommitReport, SearchHits.
//! - `stores`: MemoryState and StateView (one macro over the core's `Store` trait).
//! - `batch`: plan_views, commit_views, search_views over many stores at once.
//! - `inputs`: actions and query rows as the store methods accept them.
//! - `locks`: poison-tolerant guards and the one lock order for calls that lock several stores.

use membuilder_core::persist;
use pyo3::prelude::*;

mod batch;
mod inputs;
mod locks;
mod stores;
mod values;

use stores::{PyMemoryState, PyStateView};
use values::{PyCommitReport, PyEntry, PyPlan, PyProvenance, PySearchHits, PyUnmatched};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("STATE_FORMAT_VERSION", persist::FORMAT_VERSION)?;
    m.add_class::<PyProvenance>()?;
    m.add_class::<PyEntry>()?;
    m.add_class::<PyUnmatched>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<PyCommitReport>()?;
    m.add_class::<PySearchHits>()?;
    m.add_class::<PyMemoryState>()?;
    m.add_class::<PyStateView>()?;
    m.add_function(wrap_pyfunction!(batch::plan_views, m)?)?;
    m.add_function(wrap_pyfunction!(batch::commit_views, m)?)?;
    m.add_function(wrap_pyfunction!(batch::search_views, m)?)?;
    Ok(())
}
