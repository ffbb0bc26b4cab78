//! The one GIL-releasing helper of the binding.
//!
//! Every call that can take long goes through [`detach`]: arguments are extracted and checked
//! while holding the interpreter, the work runs with it released (so other Python threads and
//! the rayon workers run freely), and results are converted back under it. Locks on Rust state
//! are taken and released *inside* the detached closure, never held across it, so a thread
//! waiting for the interpreter never holds a lock another thread needs.

use pyo3::prelude::*;

/// Run `f` with the interpreter released.
#[inline]
pub fn detach<T, F>(py: Python<'_>, f: F) -> T
where
    F: Send + FnOnce() -> T,
    T: Send,
{
    py.detach(f)
}
