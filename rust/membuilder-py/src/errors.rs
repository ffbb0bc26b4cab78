//! The exception hierarchy of `membuilder._core` and the mapping of core errors onto it.
//!
//! A model's bad output never arrives here (it is a `Rejection`); these are for the caller's
//! mistakes and for files.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    _core,
    MembuilderError,
    PyException,
    "Base class of every exception raised by membuilder."
);

// `create_exception!` allows one base only; the two below need two (MembuilderError and a
// builtin, so that `except ValueError` / `except OSError` also catch them), so `register` creates
// them with Python's `type()`.

/// `InvalidArgumentError(MembuilderError, ValueError)`, created in `register`.
pub fn invalid_argument(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    new_error(py, "InvalidArgumentError", (msg.into(),), &[])
}

/// `StateFileError(MembuilderError, OSError)` carrying `path` and `problem`.
pub fn state_file_error(
    py: Python<'_>,
    path: &str,
    problem: &str,
    msg: impl Into<String>,
) -> PyErr {
    new_error(
        py,
        "StateFileError",
        (msg.into(),),
        &[("path", path), ("problem", problem)],
    )
}

fn new_error(py: Python<'_>, class_name: &str, args: (String,), attrs: &[(&str, &str)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = py.import("membuilder._core")?;
        let cls = module.getattr(class_name)?;
        let inst = cls.call1(args.clone())?;
        for (k, v) in attrs {
            inst.setattr(*k, *v)?;
        }
        Ok(PyErr::from_value(inst))
    };
    // If the module is somehow not importable (it always is while its code runs), still raise
    // something meaningful rather than panicking.
    build().unwrap_or_else(|_| PyValueError::new_err(args.0))
}

pub fn register<'py>(m: &Bound<'py, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = py.get_type::<MembuilderError>();
    m.add("MembuilderError", &base)?;
    let builtins = py.import("builtins")?;
    let type_fn = builtins.getattr("type")?;
    let make = |name: &str, other: Bound<'py, PyAny>, doc: &str| -> PyResult<Bound<'py, PyAny>> {
        let ns = pyo3::types::PyDict::new(py);
        ns.set_item("__doc__", doc)?;
        ns.set_item("__module__", "membuilder._core")?;
        let bases = pyo3::types::PyTuple::new(py, [base.as_any().clone(), other])?;
        type_fn.call1((name, bases, ns))
    };
    let invalid = make(
        "InvalidArgumentError",
        py.get_type::<PyValueError>().into_any(),
        "The caller passed something unusable (unknown agent, wrong vector shape, stale plan, ...).",
    )?;
    m.add("InvalidArgumentError", invalid)?;
    let state_file = make(
        "StateFileError",
        py.get_type::<PyOSError>().into_any(),
        "A state file is missing, truncated, corrupt or of another format version; `path` names \
         the file and `problem` says what is wrong.",
    )?;
    m.add("StateFileError", state_file)?;
    Ok(())
}
