//! Helpers shared by the binding modules: the one GIL-releasing helper, and array conversion.
//!
//! Every call that can take long goes through [`detach`]: arguments are extracted and checked
//! while holding the interpreter, the work runs with it released (so other Python threads and
//! the rayon workers run freely), and results are converted back under it. Locks on Rust state
//! are taken and released *inside* the detached closure, never held across it, so a thread
//! waiting for the interpreter never holds a lock another thread needs.

use std::borrow::Cow;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::invalid_argument;

/// Run `f` with the interpreter released.
#[inline]
pub fn detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    py.detach(f)
}

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
