//! Batch functions over many stores at once, with the interpreter released: plan_views,
//! commit_views, search_views.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use membuilder_core::kinds::Action;
use membuilder_core::overlay;
use membuilder_core::search::search_layers;
use membuilder_core::vectors::check_vectors;
use membuilder_core::{Layers, MemoryState, Plan, Provenance, StateError, StateView, Store};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use super::inputs::{action_segments, action_sources, prepare_queries};
use super::locks::{lock_slots, read, read_distinct, write};
use super::stores::{PyMemoryState, PyStateView};
use super::values::{hits_to_arrays, BatchArrays, PyCommitReport, PyPlan, PyProvenance};
use crate::convert::{check_k, extract_ids, parse_kind, F32Array};
use crate::errors::{core_err, invalid_argument};
use crate::util::detach;

fn extract_views<'a, 'py>(views: &'a [Bound<'py, PyAny>]) -> PyResult<Vec<&'a RwLock<StateView>>> {
    views
        .iter()
        .map(|v| {
            v.cast::<PyStateView>()
                .map(|b| &b.get().inner)
                .map_err(|_| PyTypeError::new_err("expected StateView objects"))
        })
        .collect()
}

/// Plan many views at once (interpreter released, parallel).
#[pyfunction]
pub(crate) fn plan_views(
    py: Python<'_>,
    views: Vec<Bound<'_, PyAny>>,
    actions: Vec<Bound<'_, PyAny>>,
    provenances: Vec<PyProvenance>,
) -> PyResult<Vec<PyPlan>> {
    if views.len() != actions.len() || views.len() != provenances.len() {
        return Err(invalid_argument(
            py,
            format!(
                "plan_views: {} views, {} action lists and {} provenances (need one of each per view)",
                views.len(),
                actions.len(),
                provenances.len()
            ),
        ));
    }
    let locks = extract_views(&views)?;
    // Under the interpreter only check types and borrow: each view copies its actions into its
    // plan itself, in parallel, with the interpreter released.
    let sources: Vec<Vec<Bound<'_, PyAny>>> = actions
        .iter()
        .map(action_sources)
        .collect::<PyResult<_>>()?;
    let segments: Vec<Vec<&[Action]>> = sources.iter().map(|s| action_segments(s)).collect();
    let provs: Vec<Provenance> = provenances.into_iter().map(|p| p.inner).collect();
    let results = detach(py, || {
        // Lock each distinct view once (the same view may be planned twice).
        let (order, guards) = read_distinct(&locks);
        let refs: Vec<&StateView> = order.iter().map(|&g| &*guards[g]).collect();
        overlay::plan_views_segments(&refs, &segments, &provs)
    });
    results
        .into_iter()
        .map(|r| r.map(|inner| PyPlan { inner }).map_err(|e| core_err(py, e)))
        .collect()
}

/// Why `commit_views` refused a batch before changing anything.
enum CommitFail {
    /// Bad vectors.
    State(StateError),
    /// Plan `i` does not belong to its view (or is stale).
    Plan(usize, StateError),
}

/// Commit many plans at once; ``vectors`` stacks every plan's rows in order.
#[pyfunction]
pub(crate) fn commit_views(
    py: Python<'_>,
    views: Vec<Bound<'_, PyAny>>,
    plans: Vec<PyRef<'_, PyPlan>>,
    vectors: &Bound<'_, PyAny>,
) -> PyResult<Vec<PyCommitReport>> {
    if views.len() != plans.len() {
        return Err(invalid_argument(
            py,
            format!(
                "commit_views: {} views but {} plans",
                views.len(),
                plans.len()
            ),
        ));
    }
    let locks = extract_views(&views)?;
    let mut seen = std::collections::HashSet::new();
    if !locks
        .iter()
        .all(|&l| seen.insert(l as *const RwLock<StateView>))
    {
        return Err(invalid_argument(
            py,
            "commit_views: a view appears twice (commit its plans one after the other)",
        ));
    }
    let total: usize = plans.iter().map(|p| p.inner.texts.len()).sum();
    let dim = match locks.first() {
        Some(l) => read(l).config().dim,
        None => return Ok(Vec::new()),
    };
    let arr = F32Array::extract(vectors, "vectors")?;
    arr.check_vectors_for(dim, total, || format!("the plans have {total} texts"), py)?;
    let data = arr.data();
    let plan_refs: Vec<&Plan> = plans.iter().map(|p| &p.inner).collect();
    let results = detach(py, || {
        // Refuse everything up front (stale plan, bad vector) so that no view is half-committed.
        // Only check here: each view normalises its own rows when it commits (in parallel).
        check_vectors(&data, total, dim, "commit_views").map_err(CommitFail::State)?;
        // Views are distinct (checked above); lock them in address order (see `lock_slots`).
        let keys: Vec<usize> = locks
            .iter()
            .map(|&l| l as *const RwLock<StateView> as usize)
            .collect();
        let (slots, order) = lock_slots(&keys);
        let mut sorted: Vec<Option<RwLockWriteGuard<'_, StateView>>> =
            order.iter().map(|&i| Some(write(locks[i]))).collect();
        let mut guards: Vec<RwLockWriteGuard<'_, StateView>> = slots
            .iter()
            .map(|&s| sorted[s].take().expect("distinct views"))
            .collect();
        for (i, (g, p)) in guards.iter().zip(&plan_refs).enumerate() {
            if let Err(e) = g.check_plan(p) {
                return Err(CommitFail::Plan(i, e));
            }
        }
        let mut refs: Vec<&mut StateView> = guards.iter_mut().map(|g| &mut **g).collect();
        Ok(overlay::commit_views(&mut refs, &plan_refs, &data))
    });
    let results = results.map_err(|f| match f {
        CommitFail::State(e) => core_err(py, e),
        CommitFail::Plan(i, e) => invalid_argument(py, format!("commit_views: plan {i}: {e}")),
    })?;
    results
        .into_iter()
        .map(|r| {
            r.map(|inner| PyCommitReport { inner })
                .map_err(|e| core_err(py, e))
        })
        .collect()
}

enum AnyLock<'a> {
    State(&'a RwLock<MemoryState>),
    View(&'a RwLock<StateView>),
}

enum AnyGuard<'a> {
    State(RwLockReadGuard<'a, MemoryState>),
    View(RwLockReadGuard<'a, StateView>),
}

impl AnyGuard<'_> {
    fn layers(&self) -> Layers<'_> {
        match self {
            AnyGuard::State(g) => g.layers(),
            AnyGuard::View(g) => g.layers(),
        }
    }
}

/// Batched top-k: query ``i`` runs against ``views[view_index[i]]``. Interpreter released.
#[pyfunction]
#[pyo3(signature = (views, view_index, queries, k, kind=None))]
pub(crate) fn search_views<'py>(
    py: Python<'py>,
    views: Vec<Bound<'py, PyAny>>,
    view_index: &Bound<'py, PyAny>,
    queries: &Bound<'py, PyAny>,
    k: i64,
    kind: Option<&str>,
) -> PyResult<BatchArrays<'py>> {
    let k = check_k(py, k)?;
    let kind = parse_kind(py, kind)?;
    let locks: Vec<AnyLock<'_>> = views
        .iter()
        .map(|v| {
            if let Ok(b) = v.cast::<PyStateView>() {
                Ok(AnyLock::View(&b.get().inner))
            } else if let Ok(b) = v.cast::<PyMemoryState>() {
                Ok(AnyLock::State(&b.get().inner))
            } else {
                Err(PyTypeError::new_err(
                    "search_views: expected StateView or MemoryState objects",
                ))
            }
        })
        .collect::<PyResult<_>>()?;
    let index = extract_ids(view_index)?;
    let dims: Vec<usize> = locks
        .iter()
        .map(|l| match l {
            AnyLock::State(s) => read(s).config().dim,
            AnyLock::View(v) => read(v).config().dim,
        })
        .collect();
    let Some(&dim) = dims.first() else {
        if index.is_empty() {
            return hits_to_arrays(py, Vec::new(), k);
        }
        return Err(invalid_argument(py, "search_views: no views given"));
    };
    if dims.iter().any(|&d| d != dim) {
        return Err(invalid_argument(
            py,
            "search_views: all views must have the same dimension",
        ));
    }
    let arr = F32Array::extract(queries, "queries")?;
    let nq = arr.rows(dim, false, "queries", py)?;
    if index.len() != nq {
        return Err(invalid_argument(
            py,
            format!(
                "view_index has {} entries but there are {nq} queries",
                index.len()
            ),
        ));
    }
    if let Some(bad) = index.iter().find(|&&i| i < 0 || i as usize >= locks.len()) {
        return Err(invalid_argument(
            py,
            format!("view_index {bad} is out of range for {} views", locks.len()),
        ));
    }
    let q = prepare_queries(py, &arr.data(), nq, dim)?;
    let hits = detach(py, || {
        // Lock each distinct store once (in address order, see `lock_slots`), then search every
        // (view, query) pair in one batch.
        let keys: Vec<usize> = locks
            .iter()
            .map(|l| match l {
                AnyLock::State(s) => *s as *const RwLock<MemoryState> as usize,
                AnyLock::View(v) => *v as *const RwLock<StateView> as usize,
            })
            .collect();
        let (view_slot, order) = lock_slots(&keys);
        let guards: Vec<AnyGuard<'_>> = order
            .iter()
            .map(|&i| match &locks[i] {
                AnyLock::State(s) => AnyGuard::State(read(s)),
                AnyLock::View(v) => AnyGuard::View(read(v)),
            })
            .collect();
        let items: Vec<(Layers<'_>, usize)> = index
            .iter()
            .enumerate()
            .map(|(qi, &vi)| (guards[view_slot[vi as usize]].layers(), qi))
            .collect();
        search_layers(&items, &q, k, kind, false)
    });
    hits_to_arrays(py, hits, k)
}
