//! Binding of the memory state: Provenance, Entry, Unmatched, Plan, CommitReport, SearchHits,
//! MemoryState, StateView, plan_views, commit_views, search_views.
//!
//! `MemoryState` and `StateView` are frozen Python classes around an `RwLock` of the core type,
//! so that batch calls can borrow many of them at once with the interpreter released. Methods
//! shared by both come from one macro (`store_methods!`), so the two cannot drift apart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use membuilder_core::kinds::{Action, BankKind};
use membuilder_core::overlay::{self, StateView};
use membuilder_core::persist::{self, PersistError};
use membuilder_core::search::search_layers;
use membuilder_core::vectors::{check_vectors, prepare_vectors};
use membuilder_core::{
    CommitReport, Entry, Hit, Layers, MemoryState, Plan, Provenance, StateConfig, StateError,
    Store, UpdateMode,
};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::actions::{PyAction, PyParseResult};
use crate::errors::{invalid_argument, state_file_error};
use crate::util::{detach, extract_ids, F32Array};

// =============================================================================================
// Errors and small conversions
// =============================================================================================

fn state_err(py: Python<'_>, e: StateError) -> PyErr {
    match e {
        StateError::UnknownId(id) => PyKeyError::new_err(id),
        StateError::Index(m) => PyRuntimeError::new_err(format!("graph index failed: {m}")),
        other => invalid_argument(py, other.to_string()),
    }
}

fn persist_err(py: Python<'_>, e: PersistError) -> PyErr {
    state_file_error(
        py,
        &e.path.to_string_lossy(),
        e.problem.as_str(),
        e.to_string(),
    )
}

fn parse_kind(py: Python<'_>, kind: Option<&str>) -> PyResult<Option<BankKind>> {
    match kind {
        None => Ok(None),
        Some(k) => BankKind::parse(k).map(Some).ok_or_else(|| {
            invalid_argument(
                py,
                format!("unknown bank kind {k:?}; expected 'episodic', 'semantic' or 'procedural'"),
            )
        }),
    }
}

fn check_k(py: Python<'_>, k: i64) -> PyResult<usize> {
    if k < 0 {
        return Err(invalid_argument(py, format!("k must be >= 0, got {k}")));
    }
    Ok(k as usize)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic inside a call is turned into a Python exception by PyO3; the data is still
    // consistent (every mutation validates before it changes anything), so ignore poisoning.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Actions from a list of Action, a ParseResult, or a list of ParseResult (or a mix). The
/// actions of several ParseResults are concatenated; `Unmatched.action_index` counts in that
/// concatenation.
fn extract_actions(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Action>> {
    let sources = action_sources(obj)?;
    Ok(action_segments(&sources).concat())
}

/// The Action / ParseResult objects that [`extract_actions`] reads, type-checked (same errors),
/// kept alive so that [`action_segments`] can borrow their actions without copying them.
fn action_sources<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let py = obj.py();
    if obj.cast::<PyParseResult>().is_ok() {
        return Ok(vec![obj.clone()]);
    }
    if obj.is_instance_of::<PyString>() {
        return Err(invalid_argument(
            py,
            "plan() takes Action objects or ParseResults, not a string; parse model output with parse_actions() first",
        ));
    }
    let mut out = Vec::new();
    let iter = obj.try_iter().map_err(|_| {
        invalid_argument(
            py,
            "actions must be a list of Action, a ParseResult or a list of ParseResult",
        )
    })?;
    for item in iter {
        let item = item?;
        if item.cast::<PyAction>().is_err() && item.cast::<PyParseResult>().is_err() {
            return Err(invalid_argument(
                py,
                format!(
                    "actions must contain Action or ParseResult objects, found {}",
                    item.get_type().name()?
                ),
            ));
        }
        out.push(item);
    }
    Ok(out)
}

/// Borrow the actions of checked sources (both classes are frozen, so their contents can be read
/// with the interpreter released while the objects are kept alive).
fn action_segments<'a>(sources: &'a [Bound<'_, PyAny>]) -> Vec<&'a [Action]> {
    sources
        .iter()
        .map(|src| match src.cast::<PyAction>() {
            Ok(a) => std::slice::from_ref(&a.get().inner),
            Err(_) => src
                .cast::<PyParseResult>()
                .map(|pr| pr.get().inner.actions.as_slice())
                .expect("checked by action_sources"),
        })
        .collect()
}

// =============================================================================================
// Value classes
// =============================================================================================

/// Where a memory came from. ``session`` is the 0-based session index in its conversation.
#[pyclass(
    name = "Provenance",
    module = "membuilder._core",
    frozen,
    eq,
    from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyProvenance {
    pub inner: Provenance,
}

#[pymethods]
impl PyProvenance {
    #[new]
    #[pyo3(signature = (conversation, session, timestamp=None, turn_ids=Vec::new()))]
    fn new(
        conversation: String,
        session: i64,
        timestamp: Option<String>,
        turn_ids: Vec<String>,
    ) -> Self {
        PyProvenance {
            inner: Provenance {
                conversation,
                session,
                timestamp,
                turn_ids,
            },
        }
    }
    #[getter]
    fn conversation(&self) -> &str {
        &self.inner.conversation
    }
    #[getter]
    fn session(&self) -> i64 {
        self.inner.session
    }
    #[getter]
    fn timestamp(&self) -> Option<&str> {
        self.inner.timestamp.as_deref()
    }
    #[getter]
    fn turn_ids(&self) -> Vec<String> {
        self.inner.turn_ids.clone()
    }
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        prov_dict(py, &self.inner)
    }
    fn __repr__(&self) -> String {
        format!(
            "Provenance(conversation={}, session={}, timestamp={}, turn_ids=[{}])",
            py_str(&self.inner.conversation),
            self.inner.session,
            self.inner
                .timestamp
                .as_deref()
                .map_or("None".to_string(), py_str),
            self.inner
                .turn_ids
                .iter()
                .map(|t| py_str(t))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// A string the way Python's repr() would usually show it (for reprs only).
fn py_str(s: &str) -> String {
    format!(
        "'{}'",
        s.replace('\\', "\\\\")
            .replace('\'', "\\'")
            .replace('\n', "\\n")
    )
}

fn prov_dict<'py>(py: Python<'py>, p: &Provenance) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("conversation", &p.conversation)?;
    d.set_item("session", p.session)?;
    d.set_item("timestamp", &p.timestamp)?;
    d.set_item("turn_ids", &p.turn_ids)?;
    Ok(d)
}

#[pyclass(
    name = "Entry",
    module = "membuilder._core",
    frozen,
    eq,
    skip_from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyEntry {
    inner: Entry,
}

#[pymethods]
impl PyEntry {
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind.as_str()
    }
    #[getter]
    fn text(&self) -> &str {
        &self.inner.text
    }
    #[getter]
    fn provenance(&self) -> PyProvenance {
        PyProvenance {
            inner: (*self.inner.provenance).clone(),
        }
    }
    #[getter]
    fn retired(&self) -> bool {
        self.inner.retired
    }
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        entry_dict(py, &self.inner)
    }
    fn __repr__(&self) -> String {
        format!(
            "Entry(id={}, kind={}, text={}, retired={})",
            self.inner.id,
            py_str(self.inner.kind.as_str()),
            py_str(&self.inner.text),
            if self.inner.retired { "True" } else { "False" }
        )
    }
}

fn entry_dict<'py>(py: Python<'py>, e: &Entry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", e.id)?;
    d.set_item("kind", e.kind.as_str())?;
    d.set_item("text", &e.text)?;
    d.set_item("retired", e.retired)?;
    d.set_item("provenance", prov_dict(py, &e.provenance)?)?;
    Ok(d)
}

/// An UPDATE/MERGE/REPLACE reference that named no existing memory (reported, never guessed).
#[pyclass(
    name = "Unmatched",
    module = "membuilder._core",
    frozen,
    get_all,
    skip_from_py_object
)]
#[derive(Clone)]
pub struct PyUnmatched {
    action_index: usize,
    agent: String,
    old_text: String,
    best_score: Option<f32>,
}

#[pymethods]
impl PyUnmatched {
    fn __repr__(&self) -> String {
        format!(
            "Unmatched(action_index={}, agent={}, old_text={}, best_score={})",
            self.action_index,
            py_str(&self.agent),
            py_str(&self.old_text),
            self.best_score
                .map_or("None".to_string(), |s| s.to_string())
        )
    }
}

/// First phase of an apply: which texts must be embedded before ``commit``.
#[pyclass(name = "Plan", module = "membuilder._core", frozen)]
pub struct PyPlan {
    inner: Plan,
}

#[pymethods]
impl PyPlan {
    #[getter]
    fn texts(&self) -> Vec<String> {
        self.inner.texts.clone()
    }
    fn __len__(&self) -> usize {
        self.inner.texts.len()
    }
    fn __repr__(&self) -> String {
        format!(
            "Plan(actions={}, texts={})",
            self.inner.actions().len(),
            self.inner.texts.len()
        )
    }
}

#[pyclass(name = "CommitReport", module = "membuilder._core", frozen)]
pub struct PyCommitReport {
    inner: CommitReport,
}

#[pymethods]
impl PyCommitReport {
    #[getter]
    fn added(&self) -> Vec<u64> {
        self.inner.added.clone()
    }
    #[getter]
    fn retired(&self) -> Vec<u64> {
        self.inner.retired.clone()
    }
    #[getter]
    fn unmatched(&self) -> Vec<PyUnmatched> {
        self.inner
            .unmatched
            .iter()
            .map(|u| PyUnmatched {
                action_index: u.action_index,
                agent: u.agent.as_str().to_string(),
                old_text: u.old_text.clone(),
                best_score: u.best_score,
            })
            .collect()
    }
    #[getter]
    fn skipped(&self) -> usize {
        self.inner.skipped
    }
    /// ADDs (and UPDATE/MERGE new texts) dropped because a live entry of the bank already had
    /// the same normalised text.
    #[getter]
    fn duplicates(&self) -> usize {
        self.inner.duplicates
    }
    #[getter]
    fn core_before(&self) -> &str {
        &self.inner.core_before
    }
    #[getter]
    fn core_after(&self) -> &str {
        &self.inner.core_after
    }
    #[getter]
    fn core_changed(&self) -> bool {
        self.inner.core_changed()
    }
    #[getter]
    fn compression_due(&self) -> bool {
        self.inner.compression_due
    }
    fn __repr__(&self) -> String {
        format!(
            "CommitReport(added={:?}, retired={:?}, unmatched={}, skipped={}, duplicates={}, core_changed={}, \
             compression_due={})",
            self.inner.added,
            self.inner.retired,
            self.inner.unmatched.len(),
            self.inner.skipped,
            self.inner.duplicates,
            self.inner.core_changed(),
            self.inner.compression_due
        )
    }
}

/// Top-k result of one query, best first; ties broken by ascending id.
#[pyclass(name = "SearchHits", module = "membuilder._core", frozen)]
pub struct PySearchHits {
    ids: Py<PyArray1<i64>>,
    scores: Py<PyArray1<f32>>,
    kinds: Py<PyArray1<i8>>,
    entries: Vec<Entry>,
}

#[pymethods]
impl PySearchHits {
    #[getter]
    fn ids(&self, py: Python<'_>) -> Py<PyArray1<i64>> {
        self.ids.clone_ref(py)
    }
    #[getter]
    fn scores(&self, py: Python<'_>) -> Py<PyArray1<f32>> {
        self.scores.clone_ref(py)
    }
    #[getter]
    fn kinds(&self, py: Python<'_>) -> Py<PyArray1<i8>> {
        self.kinds.clone_ref(py)
    }
    /// The hit entries as they were when the search ran.
    fn entries(&self) -> Vec<PyEntry> {
        self.entries
            .iter()
            .map(|e| PyEntry { inner: e.clone() })
            .collect()
    }
    fn __len__(&self) -> usize {
        self.entries.len()
    }
    fn __repr__(&self) -> String {
        format!("SearchHits(n={})", self.entries.len())
    }
}

/// `(ids, scores, kinds)` arrays of shape `(n, k)`, padded with -1 / -inf / -1.
type BatchArrays<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<i8>>,
);

fn hits_to_arrays(py: Python<'_>, hits: Vec<Vec<Hit>>, k: usize) -> PyResult<BatchArrays<'_>> {
    let n = hits.len();
    let mut ids = vec![-1i64; n * k];
    let mut scores = vec![f32::NEG_INFINITY; n * k];
    let mut kinds = vec![-1i8; n * k];
    for (q, hs) in hits.iter().enumerate() {
        for (j, h) in hs.iter().enumerate().take(k) {
            ids[q * k + j] = h.id as i64;
            scores[q * k + j] = h.score;
            kinds[q * k + j] = h.kind.code();
        }
    }
    let shape = (n, k);
    let err = |e: numpy::ndarray::ShapeError| PyRuntimeError::new_err(e.to_string());
    Ok((
        Array2::from_shape_vec(shape, ids)
            .map_err(err)?
            .into_pyarray(py),
        Array2::from_shape_vec(shape, scores)
            .map_err(err)?
            .into_pyarray(py),
        Array2::from_shape_vec(shape, kinds)
            .map_err(err)?
            .into_pyarray(py),
    ))
}

// =============================================================================================
// MemoryState and StateView
// =============================================================================================

/// Normalised copy of `rows` query rows (errors name the bad row).
fn prepare_queries(py: Python<'_>, data: &[f32], rows: usize, dim: usize) -> PyResult<Vec<f32>> {
    prepare_vectors(data, rows, dim, "query").map_err(|e| state_err(py, e))
}

/// Per query: hits, and (for single searches) the hit entries as they were at search time.
type HitsAndEntries = (Vec<Vec<Hit>>, Vec<Vec<Entry>>);

fn search_arrays<'py, S: Store>(
    py: Python<'py>,
    lock: &RwLock<S>,
    dim: usize,
    queries: &Bound<'py, PyAny>,
    k: i64,
    kind: Option<&str>,
    allow_1d: bool,
) -> PyResult<HitsAndEntries> {
    let k = check_k(py, k)?;
    let kind = parse_kind(py, kind)?;
    let arr = F32Array::extract(queries, "queries")?;
    let nq = arr.rows(dim, allow_1d, "queries", py)?;
    let data = arr.data();
    let q = prepare_queries(py, &data, nq, dim)?;
    let want_entries = allow_1d;
    Ok(detach(py, || {
        let s = read(lock);
        let layers = s.layers();
        let hits = layers.search(&q, nq, k, kind, false);
        let entries = if want_entries {
            hits.iter()
                .map(|hs| hs.iter().filter_map(|h| layers.get(h.id)).collect())
                .collect()
        } else {
            Vec::new()
        };
        (hits, entries)
    }))
}

macro_rules! store_methods {
    ($cls:ident, $core:ty, { $($extra:tt)* }) => {
        #[pymethods]
        impl $cls {
            /// Embedding dimension.
            #[getter]
            fn dim(&self) -> usize {
                read(&self.inner).layers().config().dim
            }
            #[getter]
            fn update_mode(&self) -> &'static str {
                read(&self.inner).layers().config().update_mode.as_str()
            }
            #[getter]
            fn core_limit(&self) -> usize {
                read(&self.inner).layers().config().core_limit
            }
            #[getter]
            fn exact_search_limit(&self) -> usize {
                read(&self.inner).layers().config().exact_search_limit
            }
            #[getter]
            fn match_threshold(&self) -> f32 {
                read(&self.inner).layers().config().match_threshold
            }
            /// The core block.
            #[getter]
            fn core(&self) -> String {
                read(&self.inner).layers().core().to_string()
            }
            /// The core block is over ``core_limit`` characters and should be compressed.
            #[getter]
            fn compression_due(&self) -> bool {
                read(&self.inner).layers().compression_due()
            }
            /// Live (not retired) entries over all banks.
            fn __len__(&self) -> usize {
                read(&self.inner).layers().count(None)
            }
            #[pyo3(signature = (kind=None))]
            fn count(&self, py: Python<'_>, kind: Option<&str>) -> PyResult<usize> {
                let kind = parse_kind(py, kind)?;
                Ok(read(&self.inner).layers().count(kind))
            }
            /// Entries in id order.
            #[pyo3(signature = (kind=None, include_retired=false))]
            fn entries(&self, py: Python<'_>, kind: Option<&str>, include_retired: bool) -> PyResult<Vec<PyEntry>> {
                let kind = parse_kind(py, kind)?;
                let es = detach(py, || read(&self.inner).layers().entries(kind, include_retired));
                Ok(es.into_iter().map(|inner| PyEntry { inner }).collect())
            }
            /// Raises KeyError for an unknown id.
            fn get(&self, id: i64) -> PyResult<PyEntry> {
                let e = if id < 0 { None } else { read(&self.inner).layers().get(id as u64) };
                e.map(|inner| PyEntry { inner }).ok_or_else(|| PyKeyError::new_err(id))
            }
            /// Texts for ids (``None`` for -1 padding); KeyError for an unknown id.
            fn texts(&self, ids: &Bound<'_, PyAny>) -> PyResult<Vec<Option<String>>> {
                let ids = extract_ids(ids)?;
                let s = read(&self.inner);
                let layers = s.layers();
                ids.into_iter()
                    .map(|id| {
                        if id == -1 {
                            return Ok(None);
                        }
                        let e = if id < 0 { None } else { layers.get(id as u64) };
                        e.map(|e| Some(e.text)).ok_or_else(|| PyKeyError::new_err(id))
                    })
                    .collect()
            }
            /// First phase of an apply; see :class:`Plan`.
            fn plan(&self, py: Python<'_>, actions: &Bound<'_, PyAny>, provenance: PyProvenance) -> PyResult<PyPlan> {
                let actions = extract_actions(actions)?;
                let p = detach(py, || read(&self.inner).plan(&actions, provenance.inner))
                    .map_err(|e| state_err(py, e))?;
                Ok(PyPlan { inner: p })
            }
            /// Apply a plan; ``vectors`` has shape ``(len(plan.texts), dim)``.
            fn commit(&self, py: Python<'_>, plan: &PyPlan, vectors: &Bound<'_, PyAny>) -> PyResult<PyCommitReport> {
                let dim = self.dim();
                let arr = F32Array::extract(vectors, "vectors")?;
                let n = plan.inner.texts.len();
                let data = arr.data();
                if !(n == 0 && data.is_empty()) {
                    let rows = arr.rows(dim, false, "vectors", py)?;
                    if rows != n {
                        return Err(invalid_argument(
                            py,
                            format!("vectors has {rows} rows but the plan has {n} texts to embed"),
                        ));
                    }
                }
                let r = detach(py, || write(&self.inner).commit(&plan.inner, &data)).map_err(|e| state_err(py, e))?;
                Ok(PyCommitReport { inner: r })
            }
            /// Insert entries directly (the raw-turn builder); returns their ids.
            fn add_entries(
                &self,
                py: Python<'_>,
                kind: &str,
                texts: Vec<String>,
                vectors: &Bound<'_, PyAny>,
                provenances: Vec<PyProvenance>,
            ) -> PyResult<Vec<u64>> {
                let kind = parse_kind(py, Some(kind))?.expect("given");
                let dim = self.dim();
                let arr = F32Array::extract(vectors, "vectors")?;
                let data = arr.data();
                if !(texts.is_empty() && data.is_empty()) {
                    let rows = arr.rows(dim, false, "vectors", py)?;
                    if rows != texts.len() {
                        return Err(invalid_argument(py, format!("{} texts but {rows} vectors", texts.len())));
                    }
                }
                let provs: Vec<Provenance> = provenances.into_iter().map(|p| p.inner).collect();
                detach(py, || write(&self.inner).add_entries(kind, &texts, &data, &provs)).map_err(|e| state_err(py, e))
            }
            /// Replace the core block (after LLM compression).
            fn set_core(&self, text: String) {
                write(&self.inner).set_core(text);
            }
            /// Top-k live entries by cosine similarity; all banks when ``kind`` is None.
            #[pyo3(signature = (query, k, kind=None))]
            fn search(&self, py: Python<'_>, query: &Bound<'_, PyAny>, k: i64, kind: Option<&str>) -> PyResult<PySearchHits> {
                let dim = self.dim();
                let (mut hits, mut entries) = search_arrays(py, &self.inner, dim, query, k, kind, true)?;
                if hits.len() != 1 {
                    return Err(invalid_argument(py, "search() takes one query; use search_batch() for several"));
                }
                let hs = hits.pop().unwrap_or_default();
                let es = entries.pop().unwrap_or_default();
                Ok(PySearchHits {
                    ids: hs.iter().map(|h| h.id as i64).collect::<Vec<_>>().into_pyarray(py).unbind(),
                    scores: hs.iter().map(|h| h.score).collect::<Vec<_>>().into_pyarray(py).unbind(),
                    kinds: hs.iter().map(|h| h.kind.code()).collect::<Vec<_>>().into_pyarray(py).unbind(),
                    entries: es,
                })
            }
            /// ``(ids, scores, kinds)``, each ``(n_queries, k)``, padded with -1 / -inf / -1.
            #[pyo3(signature = (queries, k, kind=None))]
            fn search_batch<'py>(
                &self,
                py: Python<'py>,
                queries: &Bound<'py, PyAny>,
                k: i64,
                kind: Option<&str>,
            ) -> PyResult<BatchArrays<'py>> {
                let dim = self.dim();
                let (hits, _) = search_arrays(py, &self.inner, dim, queries, k, kind, false)?;
                hits_to_arrays(py, hits, k as usize)
            }
            fn __repr__(&self) -> String {
                let s = read(&self.inner);
                let l = s.layers();
                format!(
                    "{}(dim={}, update_mode={}, entries={}, core_chars={})",
                    stringify!($cls).trim_start_matches("Py"),
                    l.config().dim,
                    py_str(l.config().update_mode.as_str()),
                    l.count(None),
                    l.core().chars().count()
                )
            }
            $($extra)*
        }
    };
}

/// A mutable memory: the core block and the episodic, semantic and procedural banks.
#[pyclass(name = "MemoryState", module = "membuilder._core", frozen)]
pub struct PyMemoryState {
    inner: RwLock<MemoryState>,
}

store_methods!(PyMemoryState, MemoryState, {
    #[new]
    #[pyo3(signature = (dim, *, update_mode="history", core_limit=5000, exact_search_limit=20000, match_threshold=0.92))]
    fn new(
        py: Python<'_>,
        dim: i64,
        update_mode: &str,
        core_limit: i64,
        exact_search_limit: i64,
        match_threshold: f32,
    ) -> PyResult<Self> {
        let mode = UpdateMode::parse(update_mode).ok_or_else(|| {
            invalid_argument(
                py,
                format!("update_mode must be 'history' or 'replace', got {update_mode:?}"),
            )
        })?;
        if dim <= 0 || core_limit < 0 || exact_search_limit < 0 {
            return Err(invalid_argument(
                py,
                format!(
                    "dim must be > 0 and core_limit, exact_search_limit >= 0 (got dim={dim}, \
                     core_limit={core_limit}, exact_search_limit={exact_search_limit})"
                ),
            ));
        }
        let config = StateConfig {
            dim: dim as usize,
            update_mode: mode,
            core_limit: core_limit as usize,
            exact_search_limit: exact_search_limit as usize,
            match_threshold,
        };
        let st = MemoryState::new(config).map_err(|e| state_err(py, e))?;
        Ok(PyMemoryState {
            inner: RwLock::new(st),
        })
    }

    /// A copy-free view over this state as it is now.
    fn view(&self) -> PyStateView {
        PyStateView {
            inner: RwLock::new(read(&self.inner).view()),
        }
    }

    /// Write atomically (temp file + fsync + rename); raises StateFileError on failure.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detach(py, || read(&self.inner).save(&path)).map_err(|e| persist_err(py, e))
    }

    /// Raises StateFileError naming the file and the problem.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let st = detach(py, || MemoryState::load(&path)).map_err(|e| persist_err(py, e))?;
        Ok(PyMemoryState {
            inner: RwLock::new(st),
        })
    }

    /// A deep copy (what views avoid).
    fn copy(&self, py: Python<'_>) -> Self {
        let st = detach(py, || read(&self.inner).clone());
        PyMemoryState {
            inner: RwLock::new(st),
        }
    }

    fn __copy__(&self, py: Python<'_>) -> Self {
        self.copy(py)
    }

    /// Plain data (core, settings, entries with provenance); vectors left out.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = read(&self.inner);
        let l = s.layers();
        let c = l.config();
        let d = PyDict::new(py);
        d.set_item("format_version", persist::FORMAT_VERSION)?;
        d.set_item("dim", c.dim)?;
        d.set_item("update_mode", c.update_mode.as_str())?;
        d.set_item("core_limit", c.core_limit)?;
        d.set_item("exact_search_limit", c.exact_search_limit)?;
        d.set_item("match_threshold", c.match_threshold)?;
        d.set_item("core", l.core())?;
        let entries = PyList::empty(py);
        for e in l.entries(None, true) {
            entries.append(entry_dict(py, &e)?)?;
        }
        d.set_item("entries", entries)?;
        Ok(d)
    }
});

/// A rollout's view: a shared, immutable base plus its own delta.
#[pyclass(name = "StateView", module = "membuilder._core", frozen)]
pub struct PyStateView {
    inner: RwLock<StateView>,
}

store_methods!(PyStateView, StateView, {
    fn added_ids(&self) -> Vec<u64> {
        read(&self.inner).added_ids()
    }

    fn retired_ids(&self) -> Vec<u64> {
        read(&self.inner).retired_ids()
    }

    /// A standalone state equal to base + delta.
    fn materialize(&self, py: Python<'_>) -> PyResult<PyMemoryState> {
        let st = detach(py, || read(&self.inner).materialize()).map_err(|e| state_err(py, e))?;
        Ok(PyMemoryState {
            inner: RwLock::new(st),
        })
    }

    /// An independent copy of this view (same base, copied delta).
    fn copy(&self) -> PyStateView {
        PyStateView {
            inner: RwLock::new(read(&self.inner).clone()),
        }
    }
});

// =============================================================================================
// Batch functions over many views
// =============================================================================================

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
fn plan_views(
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
        .map(|r| {
            r.map(|inner| PyPlan { inner })
                .map_err(|e| state_err(py, e))
        })
        .collect()
}

/// Read-lock each distinct lock once; returns, per input, the index of its guard.
fn read_distinct<'a, T>(locks: &[&'a RwLock<T>]) -> (Vec<usize>, Vec<RwLockReadGuard<'a, T>>) {
    let keys: Vec<usize> = locks
        .iter()
        .map(|&l| l as *const RwLock<T> as usize)
        .collect();
    let (slots, order) = lock_slots(&keys);
    let guards = order.iter().map(|&i| read(locks[i])).collect();
    (slots, guards)
}

/// Deadlock avoidance for calls that lock several stores: every such call takes its locks in
/// ascending address order, so two calls can never wait on each other in a cycle. Given one key
/// (address) per input, returns per input the slot of its (deduplicated) guard, and the input
/// index to lock for each slot, slots in ascending address order.
fn lock_slots(keys: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut distinct: Vec<(usize, usize)> = Vec::new(); // (address, first input index)
    let mut seen: HashMap<usize, ()> = HashMap::new();
    for (i, &k) in keys.iter().enumerate() {
        if seen.insert(k, ()).is_none() {
            distinct.push((k, i));
        }
    }
    distinct.sort_unstable();
    let slot_of: HashMap<usize, usize> = distinct
        .iter()
        .enumerate()
        .map(|(slot, &(k, _))| (k, slot))
        .collect();
    let slots = keys.iter().map(|k| slot_of[k]).collect();
    let order = distinct.into_iter().map(|(_, i)| i).collect();
    (slots, order)
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
fn commit_views(
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
    let data = arr.data();
    if !(total == 0 && data.is_empty()) {
        let rows = arr.rows(dim, false, "vectors", py)?;
        if rows != total {
            return Err(invalid_argument(
                py,
                format!("vectors has {rows} rows but the plans have {total} texts"),
            ));
        }
    }
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
        CommitFail::State(e) => state_err(py, e),
        CommitFail::Plan(i, e) => invalid_argument(py, format!("commit_views: plan {i}: {e}")),
    })?;
    results
        .into_iter()
        .map(|r| {
            r.map(|inner| PyCommitReport { inner })
                .map_err(|e| state_err(py, e))
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
fn search_views<'py>(
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
    m.add_function(wrap_pyfunction!(plan_views, m)?)?;
    m.add_function(wrap_pyfunction!(commit_views, m)?)?;
    m.add_function(wrap_pyfunction!(search_views, m)?)?;
    Ok(())
}
