//! Errors of the memory store (states, views, plans). A model's bad output is never one of
//! these: it is a `Rejection` of the action parser. These are the caller's mistakes and index
//! failures; each variant is a kind the binding maps to one Python exception class.

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum StateError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid action at index {index}: {message}")]
    InvalidAction { index: usize, message: String },
    #[error(
        "this plan was made by another state or view, or before a later change to this one; \
         plan again and commit the new plan"
    )]
    StalePlan,
    #[error("no entry with id {0}")]
    UnknownId(u64),
    #[error("graph index failed: {0}")]
    Index(String),
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;
