//! The value classes of the state binding: Provenance, Entry, Unmatched, Plan, CommitReport,
//! SearchHits, and the `(ids, scores, kinds)` arrays of batch searches.

use membuilder_core::{CommitReport, Entry, Hit, Plan, Provenance};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

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
pub(crate) fn py_str(s: &str) -> String {
    format!(
        "'{}'",
        s.replace('\\', "\\\\")
            .replace('\'', "\\'")
            .replace('\n', "\\n")
    )
}

pub(crate) fn prov_dict<'py>(py: Python<'py>, p: &Provenance) -> PyResult<Bound<'py, PyDict>> {
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
    pub(crate) inner: Entry,
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

pub(crate) fn entry_dict<'py>(py: Python<'py>, e: &Entry) -> PyResult<Bound<'py, PyDict>> {
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
    pub(crate) inner: Plan,
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
    pub(crate) inner: CommitReport,
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
    pub(crate) ids: Py<PyArray1<i64>>,
    pub(crate) scores: Py<PyArray1<f32>>,
    pub(crate) kinds: Py<PyArray1<i8>>,
    pub(crate) entries: Vec<Entry>,
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
pub(crate) type BatchArrays<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<i8>>,
);

pub(crate) fn hits_to_arrays(
    py: Python<'_>,
    hits: Vec<Vec<Hit>>,
    k: usize,
) -> PyResult<BatchArrays<'_>> {
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
