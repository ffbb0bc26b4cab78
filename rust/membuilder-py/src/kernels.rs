//! Which machine and which kernels: the CPU model, its vector instruction sets and the path
//! each of our kernels takes, for benchmarks to print; and the exact-search kernel choice, for
//! tests and benchmarks that compare the paths in one process.

use membuilder_core::{cpu, retrieval};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// {"cpu": model, "features": [...], "exact_search": kernel, "exact_search_available": [...],
/// "rescore": instruction set of the canonical re-scoring kernel}.
#[pyfunction]
fn cpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("cpu", cpu::model())?;
    d.set_item("features", cpu::features())?;
    d.set_item("exact_search", retrieval::exact_kernel().name())?;
    let avail: Vec<&str> = retrieval::available_exact_kernels()
        .into_iter()
        .map(|k| k.name())
        .collect();
    d.set_item("exact_search_available", avail)?;
    d.set_item("rescore", retrieval::dot_path())?;
    Ok(d)
}

/// Choose the exact-search kernel for this process (`None` or "auto": the best this CPU has);
/// returns the one now in use.
#[pyfunction]
#[pyo3(signature = (name=None))]
fn set_exact_kernel(py: Python<'_>, name: Option<&str>) -> PyResult<&'static str> {
    let kernel = match name {
        None | Some("auto") => None,
        Some(n) => Some(retrieval::ExactKernel::from_name(n).ok_or_else(|| {
            crate::errors::invalid_argument(
                py,
                format!("unknown exact-search kernel {n:?} (auto, amx, avx512, avx2 or portable)"),
            )
        })?),
    };
    retrieval::set_exact_kernel(kernel)
        .map(|k| k.name())
        .map_err(|e| crate::errors::invalid_argument(py, e))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_info, m)?)?;
    m.add_function(wrap_pyfunction!(set_exact_kernel, m)?)?;
    Ok(())
}
