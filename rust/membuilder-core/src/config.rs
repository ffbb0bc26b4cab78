//! Settings fixed for the life of a state and its views: dimension, update mode, limits.

use serde::{Deserialize, Serialize};

use crate::error::StateError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    /// UPDATE/MERGE keep the old entries and add the new text (the paper's semantics).
    History,
    /// UPDATE/MERGE retire the entries they name, then add the new text.
    Replace,
}

impl UpdateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateMode::History => "history",
            UpdateMode::Replace => "replace",
        }
    }

    pub fn parse(s: &str) -> Option<UpdateMode> {
        match s {
            "history" => Some(UpdateMode::History),
            "replace" => Some(UpdateMode::Replace),
            _ => None,
        }
    }
}

/// Settings fixed for the life of a state (and of its views).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateConfig {
    /// Embedding dimension (> 0).
    pub dim: usize,
    pub update_mode: UpdateMode,
    /// Characters (Unicode code points) above which the core block is due for compression.
    pub core_limit: usize,
    /// A bank with at most this many live entries is searched exactly; above, with a graph.
    pub exact_search_limit: usize,
    /// Cosine at or above which an unmatched old text is matched to its nearest entry.
    pub match_threshold: f32,
}

impl StateConfig {
    pub fn new(dim: usize) -> Self {
        StateConfig {
            dim,
            update_mode: UpdateMode::History,
            core_limit: 5000,
            exact_search_limit: 20_000,
            match_threshold: 0.92,
        }
    }

    pub fn validate(&self) -> Result<(), StateError> {
        if self.dim == 0 || self.dim > 65_536 {
            return Err(StateError::InvalidArgument(format!(
                "dim must be between 1 and 65536, got {}",
                self.dim
            )));
        }
        if !(self.match_threshold.is_finite() && (-1.0..=1.0).contains(&self.match_threshold)) {
            return Err(StateError::InvalidArgument(format!(
                "match_threshold must be a cosine in [-1, 1], got {}",
                self.match_threshold
            )));
        }
        Ok(())
    }
}
