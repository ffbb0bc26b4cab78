//! Checks of the vectors callers hand to a store (shape, finite, non-zero), with errors that
//! name the offending row.

use crate::error::{Result, StateError};
use crate::retrieval;

/// Check and normalise `rows x dim` vectors (copy); errors name the row.
pub fn prepare_vectors(vectors: &[f32], rows: usize, dim: usize, what: &str) -> Result<Vec<f32>> {
    if vectors.len() != rows * dim {
        return Err(StateError::InvalidArgument(format!(
            "{what}: expected {rows} vectors of dimension {dim} ({} floats), got {} floats",
            rows * dim,
            vectors.len()
        )));
    }
    let mut v = vectors.to_vec();
    for (r, chunk) in v.chunks_exact_mut(dim.max(1)).enumerate() {
        retrieval::normalize(chunk).map_err(|p| {
            StateError::InvalidArgument(format!("{what}: vector {r} {}", p.describe()))
        })?;
    }
    Ok(v)
}

/// The checks of [`prepare_vectors`] (same errors), without copying or normalising: for callers
/// that validate a whole batch up front and normalise each part later.
pub fn check_vectors(vectors: &[f32], rows: usize, dim: usize, what: &str) -> Result<()> {
    if vectors.len() != rows * dim {
        return Err(StateError::InvalidArgument(format!(
            "{what}: expected {rows} vectors of dimension {dim} ({} floats), got {} floats",
            rows * dim,
            vectors.len()
        )));
    }
    for (r, chunk) in vectors.chunks_exact(dim.max(1)).enumerate() {
        retrieval::check_normalizable(chunk).map_err(|p| {
            StateError::InvalidArgument(format!("{what}: vector {r} {}", p.describe()))
        })?;
    }
    Ok(())
}
