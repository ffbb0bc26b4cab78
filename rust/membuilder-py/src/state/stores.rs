//! `MemoryState` and `StateView`: frozen Python classes around an `RwLock` of the core type, so
//! that batch calls can borrow many of them at once with the interpreter released. Methods shared
//! by both come from one macro (`store_methods!`) over the core's `Store` trait, so the two
//! cannot drift apart.

use std::path::PathBuf;
use std::sync::RwLock;

use membuilder_core::persist;
use membuilder_core::{Entry, Hit, MemoryState, Provenance, StateConfig, StateView, Store};
use numpy::IntoPyArray;
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::inputs::{extract_actions, prepare_queries};
use super::locks::{read, write};
use super::values::{
    entry_dict, hits_to_arrays, py_str, BatchArrays, PyCommitReport, PyEntry, PyPlan, PyProvenance,
    PySearchHits,
};
use crate::convert::{check_k, extract_ids, parse_kind, F32Array};
use crate::errors::{core_err, invalid_argument};
use crate::util::detach;

/// Per query: hits, and (for single searches) the hit entries as they were at search time.
type HitsAndEntries = (Vec<Vec<Hit>>, Vec<Vec<Entry>>);

pub(crate) fn search_arrays<'py, S: Store>(
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
                    .map_err(|e| core_err(py, e))?;
                Ok(PyPlan { inner: p })
            }
            /// Apply a plan; ``vectors`` has shape ``(len(plan.texts), dim)``.
            fn commit(&self, py: Python<'_>, plan: &PyPlan, vectors: &Bound<'_, PyAny>) -> PyResult<PyCommitReport> {
                let dim = self.dim();
                let arr = F32Array::extract(vectors, "vectors")?;
                let n = plan.inner.texts.len();
                arr.check_vectors_for(dim, n, || format!("the plan has {n} texts to embed"), py)?;
                let data = arr.data();
                let r = detach(py, || write(&self.inner).commit(&plan.inner, &data)).map_err(|e| core_err(py, e))?;
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
                arr.check_vectors_for(dim, texts.len(), || format!("{} texts were given", texts.len()), py)?;
                let data = arr.data();
                let provs: Vec<Provenance> = provenances.into_iter().map(|p| p.inner).collect();
                detach(py, || write(&self.inner).add_entries(kind, &texts, &data, &provs)).map_err(|e| core_err(py, e))
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
    pub(crate) inner: RwLock<MemoryState>,
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
        let mode = crate::convert::update_mode(py, update_mode)?;
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
        let st = MemoryState::new(config).map_err(|e| core_err(py, e))?;
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
        detach(py, || read(&self.inner).save(&path)).map_err(|e| core_err(py, e))
    }

    /// Raises StateFileError naming the file and the problem.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let st = detach(py, || MemoryState::load(&path)).map_err(|e| core_err(py, e))?;
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
    pub(crate) inner: RwLock<StateView>,
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
        let st = detach(py, || read(&self.inner).materialize()).map_err(|e| core_err(py, e))?;
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
