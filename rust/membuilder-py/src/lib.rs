//! PyO3 binding of membuilder-core as `membuilder._core`.
//!
//! Only conversion (`convert`), error mapping (`errors`) and GIL handling (`util::detach`) live
//! here; every algorithm is in the core crate.
//! Each submodule adds its classes and functions through a `register` function.

use pyo3::prelude::*;

mod actions;
mod convert;
mod encoder;
mod errors;
mod kernels;
mod reward;
mod state;
mod util;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    actions::register(m)?;
    state::register(m)?;
    reward::register(m)?;
    kernels::register(m)?;
    encoder::register(m)?;
    Ok(())
}
