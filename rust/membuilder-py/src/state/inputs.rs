//! What the store methods accept besides arrays: actions (Action objects and ParseResults,
//! borrowed without copying) and query rows.

use membuilder_core::kinds::Action;
use membuilder_core::vectors::prepare_vectors;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::actions::{PyAction, PyParseResult};
use crate::errors::{core_err, invalid_argument};

/// Actions from a list of Action, a ParseResult, or a list of ParseResult (or a mix). The
/// actions of several ParseResults are concatenated; `Unmatched.action_index` counts in that
/// concatenation.
pub(crate) fn extract_actions(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Action>> {
    let sources = action_sources(obj)?;
    Ok(action_segments(&sources).concat())
}

/// The Action / ParseResult objects that [`extract_actions`] reads, type-checked (same errors),
/// kept alive so that [`action_segments`] can borrow their actions without copying them.
pub(crate) fn action_sources<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
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
pub(crate) fn action_segments<'a>(sources: &'a [Bound<'_, PyAny>]) -> Vec<&'a [Action]> {
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

/// Normalised copy of `rows` query rows (errors name the bad row).
pub(crate) fn prepare_queries(
    py: Python<'_>,
    data: &[f32],
    rows: usize,
    dim: usize,
) -> PyResult<Vec<f32>> {
    prepare_vectors(data, rows, dim, "query").map_err(|e| core_err(py, e))
}
