//! The exception hierarchy of `membuilder._core`, and the one place where core errors become
//! Python exceptions ([`core_err`], by error type and variant, never by message).
//!
//! A model's bad output never arrives here (it is a `Rejection`); these are for the caller's
//! mistakes and for files.

use membuilder_core::error::Error as CoreError;
use membuilder_core::StateError;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

create_exception!(
    _core,
    MembuilderError,
    PyException,
    "Base class of every exception raised by membuilder."
);

// `create_exception!` allows one base only; the two below need two (MembuilderError and a
// builtin, so that `except ValueError` / `except OSError` also catch them), so `register` creates
// them with Python's `type()` once and keeps them here: raising one is a lookup, not an import.
static INVALID_ARGUMENT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static STATE_FILE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `InvalidArgumentError(MembuilderError, ValueError)`.
pub fn invalid_argument(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    match INVALID_ARGUMENT.get(py) {
        Some(cls) => PyErr::from_type(cls.bind(py).clone(), (msg,)),
        // Only before `register` ran (never while the module's code runs): still raise
        // something meaningful rather than panicking.
        None => PyValueError::new_err(msg),
    }
}

/// `StateFileError(MembuilderError, OSError)` carrying `path` and `problem`.
pub fn state_file_error(
    py: Python<'_>,
    path: &str,
    problem: &str,
    msg: impl Into<String>,
) -> PyErr {
    let msg = msg.into();
    let build = || -> PyResult<PyErr> {
        let cls = STATE_FILE
            .get(py)
            .ok_or_else(|| PyValueError::new_err(msg.clone()))?;
        let inst = cls.bind(py).call1((msg.clone(),))?;
        inst.setattr("path", path)?;
        inst.setattr("problem", problem)?;
        Ok(PyErr::from_value(inst))
    };
    build().unwrap_or_else(|e| e)
}

/// The Python exception for a core error: unknown ids are `KeyError`, graph index failures
/// `RuntimeError`, unreadable state files `StateFileError`, everything else (the caller's
/// mistakes) `InvalidArgumentError`; the message is the error's own.
pub fn core_err(py: Python<'_>, e: impl Into<CoreError>) -> PyErr {
    match e.into() {
        CoreError::State(StateError::UnknownId(id)) => PyKeyError::new_err(id),
        CoreError::State(e @ StateError::Index(_)) => PyRuntimeError::new_err(e.to_string()),
        CoreError::Persist(e) => state_file_error(
            py,
            &e.path.to_string_lossy(),
            e.problem.as_str(),
            e.to_string(),
        ),
        e @ (CoreError::State(_)
        | CoreError::Config(_)
        | CoreError::Batch(_)
        | CoreError::KindCode(_)) => invalid_argument(py, e.to_string()),
    }
}

pub fn register<'py>(m: &Bound<'py, PyModule>) -> PyResult<()> {
    let py = m.py();
    let base = py.get_type::<MembuilderError>();
    m.add("MembuilderError", &base)?;
    let type_fn = py.get_type::<PyType>();
    let make = |name: &str, other: Bound<'py, PyType>, doc: &str| -> PyResult<Py<PyType>> {
        let ns = PyDict::new(py);
        ns.set_item("__doc__", doc)?;
        ns.set_item("__module__", "membuilder._core")?;
        let bases = PyTuple::new(py, [base.clone(), other])?;
        Ok(type_fn
            .call1((name, bases, ns))?
            .cast_into::<PyType>()?
            .unbind())
    };
    // Created once per process, like the class of `create_exception!`.
    let invalid = INVALID_ARGUMENT.get_or_try_init(py, || {
        make(
            "InvalidArgumentError",
            py.get_type::<PyValueError>(),
            "The caller passed something unusable (unknown agent, wrong vector shape, stale plan, ...).",
        )
    })?;
    m.add("InvalidArgumentError", invalid.bind(py))?;
    let state_file = STATE_FILE.get_or_try_init(py, || {
        make(
            "StateFileError",
            py.get_type::<PyOSError>(),
            "A state file is missing, truncated, corrupt or of another format version; `path` names \
             the file and `problem` says what is wrong.",
        )
    })?;
    m.add("StateFileError", state_file.bind(py))?;
    Ok(())
}
