//! Conversions from Python values to the core's: agent and bank-kind names, update modes,
//! strings (lossy where a model's text may carry lone surrogates) and numpy arrays. Every binding
//! module converts through here, so each value is accepted, and refused with one message, the
//! same way everywhere.

use std::borrow::Cow;

use membuilder_core::kinds::{Agent, BankKind};
use membuilder_core::UpdateMode;
use numpy::{PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyIterator, PyString};

use crate::errors::invalid_argument;

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// An agent name from Python; unknown names are the caller's mistake.
pub fn agent_from_str(py: Python<'_>, name: &str) -> PyResult<Agent> {
    Agent::parse(name).ok_or_else(|| {
        invalid_argument(
            py,
            format!("unknown agent {name:?}; expected one of \"core\", \"episodic\", \"semantic\", \"procedural\""),
        )
    })
}

/// A model's text from Python. Lone surrogates (which a JSON-decoded response can carry) are
/// replaced by U+FFFD instead of raising: bad output is data.
pub fn text_lossy(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    match obj.cast::<PyString>() {
        Ok(s) => Ok(s.to_string_lossy().into_owned()),
        Err(_) => Err(invalid_argument(
            py,
            format!(
                "{what} must be a str, got {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ),
        )),
    }
}

/// Agent names from a Python sequence.
pub fn agents_from_seq(py: Python<'_>, agents: &Bound<'_, PyAny>) -> PyResult<Vec<Agent>> {
    if agents.is_instance_of::<PyString>() {
        return Err(invalid_argument(
            py,
            "agents must be a sequence of agent names, not a single str",
        ));
    }
    let mut out = Vec::new();
    for item in agents
        .try_iter()
        .map_err(|_| invalid_argument(py, "agents must be a sequence of agent names"))?
    {
        let item = item?;
        let name = item
            .cast::<PyString>()
            .map_err(|_| invalid_argument(py, "agents must hold str agent names"))?
            .to_string_lossy()
            .into_owned();
        out.push(agent_from_str(py, &name)?);
    }
    Ok(out)
}

/// The items of a sequence meant to hold `str`; a lone `str` (itself iterable) is refused.
fn str_sequence<'py>(
    py: Python<'py>,
    raws: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyIterator>> {
    if raws.is_instance_of::<PyString>() {
        return Err(invalid_argument(
            py,
            format!("{what} must be a sequence of str, not a single str"),
        ));
    }
    raws.try_iter()
        .map_err(|_| invalid_argument(py, format!("{what} must be a sequence of str")))
}

/// Raw outputs from a Python sequence (lossy, see [`text_lossy`]).
pub fn texts_from_seq(
    py: Python<'_>,
    raws: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<Vec<String>> {
    let mut out = Vec::new();
    for item in str_sequence(py, raws, what)? {
        out.push(text_lossy(py, &item?, what)?);
    }
    Ok(out)
}

/// The `str` objects of a Python sequence, kept alive so that their text can be borrowed
/// without a copy.
pub fn str_objects<'py>(
    py: Python<'py>,
    raws: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Vec<Bound<'py, PyString>>> {
    let mut out = Vec::new();
    for item in str_sequence(py, raws, what)? {
        let item = item?;
        match item.cast_into::<PyString>() {
            Ok(s) => out.push(s),
            Err(e) => {
                let name = e
                    .into_inner()
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                return Err(invalid_argument(
                    py,
                    format!("{what} must hold str, got {name}"),
                ));
            }
        }
    }
    Ok(out)
}

/// A bank kind name, or all banks for `None`.
pub fn parse_kind(py: Python<'_>, kind: Option<&str>) -> PyResult<Option<BankKind>> {
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

/// A top-k count from Python (>= 0).
pub fn check_k(py: Python<'_>, k: i64) -> PyResult<usize> {
    if k < 0 {
        return Err(invalid_argument(py, format!("k must be >= 0, got {k}")));
    }
    Ok(k as usize)
}

/// A bank kind that may be absent (`None`: nothing dominant), as the attribution functions take.
pub fn optional_kind(py: Python<'_>, name: Option<&str>) -> PyResult<Option<BankKind>> {
    match name {
        None => Ok(None),
        Some(name) => Some(BankKind::parse(name).ok_or_else(|| {
            invalid_argument(py, format!("unknown bank kind {name:?}; expected \"episodic\", \"semantic\", \"procedural\" or None"))
        }))
        .transpose(),
    }
}

pub fn update_mode(py: Python<'_>, name: &str) -> PyResult<UpdateMode> {
    UpdateMode::parse(name).ok_or_else(|| {
        invalid_argument(
            py,
            format!("update_mode must be 'history' or 'replace', got {name:?}"),
        )
    })
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Arrays
// ---------------------------------------------------------------------------------------------

/// A float32 array borrowed from Python (or converted once, when given another dtype or a
/// non-contiguous array): its data as a slice and its shape.
pub struct F32Array<'py> {
    array: PyReadonlyArrayDyn<'py, f32>,
    owned: Option<Vec<f32>>,
}

impl<'py> F32Array<'py> {
    /// Accept any array-like; float32 C-contiguous arrays are read in place (no copy).
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let py = obj.py();
        let array: PyReadonlyArrayDyn<'py, f32> = match obj.extract() {
            Ok(a) => a,
            Err(_) => {
                let np = py.import("numpy")?;
                let converted = np
                    .call_method1("ascontiguousarray", (obj, "float32"))
                    .map_err(|e| {
                        invalid_argument(py, format!("{what} must be a float32 array: {e}"))
                    })?;
                converted.extract().map_err(|e| {
                    invalid_argument(py, format!("{what} must be a float32 array: {e}"))
                })?
            }
        };
        let owned = if array.as_slice().is_ok() {
            None
        } else {
            Some(array.as_array().iter().copied().collect())
        };
        Ok(F32Array { array, owned })
    }

    pub fn shape(&self) -> Vec<usize> {
        self.array.shape().to_vec()
    }

    pub fn data(&self) -> Cow<'_, [f32]> {
        match &self.owned {
            Some(v) => Cow::Borrowed(v.as_slice()),
            None => Cow::Borrowed(self.array.as_slice().expect("checked contiguous")),
        }
    }

    /// Check that this is the `(texts, dim)` matrix of vectors for `texts` texts (`what_texts`
    /// says whose, for the error: "the plan has 3 texts to embed"); an empty array is accepted
    /// when there are no texts, whatever its shape.
    pub fn check_vectors_for(
        &self,
        dim: usize,
        texts: usize,
        what_texts: impl FnOnce() -> String,
        py: Python<'_>,
    ) -> PyResult<()> {
        if texts == 0 && self.array.len() == 0 {
            return Ok(());
        }
        let rows = self.rows(dim, false, "vectors", py)?;
        if rows != texts {
            return Err(invalid_argument(
                py,
                format!("vectors has {rows} rows but {}", what_texts()),
            ));
        }
        Ok(())
    }

    /// Rows of a `(n, dim)` matrix (a 1-D `(dim,)` array counts as one row when `allow_1d`).
    pub fn rows(&self, dim: usize, allow_1d: bool, what: &str, py: Python<'_>) -> PyResult<usize> {
        let shape = self.shape();
        match shape.as_slice() {
            [d] if allow_1d && *d == dim => Ok(1),
            [n, d] if *d == dim => Ok(*n),
            _ => Err(invalid_argument(
                py,
                format!(
                    "{what} must have shape {}(n, {dim}) (the state's dimension), got {:?}",
                    if allow_1d {
                        format!("({dim},) or ")
                    } else {
                        String::new()
                    },
                    shape
                ),
            )),
        }
    }
}

/// Read ids from an int64 array or any sequence of ints.
pub fn extract_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    if let Ok(a) = obj.extract::<numpy::PyReadonlyArrayDyn<'_, i64>>() {
        return Ok(a.as_array().iter().copied().collect());
    }
    obj.extract::<Vec<i64>>()
}

pub fn asarray<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    dtype: Option<&str>,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let kwargs = PyDict::new(py);
    if let Some(d) = dtype {
        kwargs.set_item("dtype", d)?;
    }
    np.call_method("asarray", (obj,), Some(&kwargs))
        .map_err(|e| {
            invalid_argument(
                py,
                format!("{name} must be array-like ({}): {e}", type_name(obj)),
            )
        })
}

/// A 1-D float64 array as a Vec.
pub fn f64_vec(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<f64>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, f64>>() {
        return Ok(a.as_array().iter().copied().collect());
    }
    let arr = asarray(py, obj, Some("float64"), name)?;
    match arr.extract::<PyReadonlyArray1<'_, f64>>() {
        Ok(a) => Ok(a.as_array().iter().copied().collect()),
        Err(_) => Err(invalid_argument(
            py,
            format!("{name} must be one-dimensional, one number per sample"),
        )),
    }
}

/// A 1-D bool array as a Vec (only bool dtypes or Python bools are accepted).
pub fn bool_vec(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<bool>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, bool>>() {
        return Ok(a.as_array().iter().copied().collect());
    }
    let arr = asarray(py, obj, None, name)?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    let size: usize = arr.getattr("size")?.extract()?;
    if kind != "b" && size > 0 {
        return Err(invalid_argument(
            py,
            format!("{name} must hold booleans (numpy bool dtype), got dtype kind {kind:?}"),
        ));
    }
    let arr = asarray(py, &arr, Some("bool"), name)?;
    match arr.extract::<PyReadonlyArray1<'_, bool>>() {
        Ok(a) => Ok(a.as_array().iter().copied().collect()),
        Err(_) => Err(invalid_argument(
            py,
            format!("{name} must be one-dimensional, one bool per sample"),
        )),
    }
}

pub fn check_code(py: Python<'_>, name: &str, v: i64) -> PyResult<i8> {
    if (-1..=2).contains(&v) {
        Ok(v as i8)
    } else {
        Err(invalid_argument(
            py,
            format!("{name} holds kind code {v}; expected -1 (padding), 0 episodic, 1 semantic or 2 procedural"),
        ))
    }
}

/// Kind codes of any shape, flattened, checked to be in -1..=2; returns (codes, shape).
pub fn kind_codes(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    name: &str,
) -> PyResult<(Vec<i8>, Vec<usize>)> {
    let arr = asarray(py, obj, None, name)?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    let size: usize = arr.getattr("size")?.extract()?;
    if !(kind == "i" || kind == "u") && size > 0 {
        return Err(invalid_argument(
            py,
            format!("{name} must hold integer kind codes (int8), got dtype kind {kind:?}"),
        ));
    }
    let shape: Vec<usize> = arr.getattr("shape")?.extract()?;
    let flat = arr
        .call_method1("astype", ("int64",))?
        .call_method0("ravel")?;
    let flat = flat
        .extract::<PyReadonlyArray1<'_, i64>>()
        .map_err(|_| invalid_argument(py, format!("{name} could not be read as integers")))?;
    let codes = flat
        .as_array()
        .iter()
        .map(|&v| check_code(py, name, v))
        .collect::<PyResult<Vec<i8>>>()?;
    Ok((codes, shape))
}
