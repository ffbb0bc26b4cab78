//! Every error type of the core, and [`Error`], their sum. A model's bad output is never one of
//! these (it is a `Rejection` of the action parser): they are the caller's mistakes, index
//! failures and unreadable files. Bindings map [`Error`]'s variants to their own exception
//! classes in one place, by type, never by message.

use std::path::PathBuf;

/// A store (state, view or plan) refused a call.
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

/// What is wrong with a state file (stable names, used by the Python error's `problem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    NotFound,
    Truncated,
    ChecksumMismatch,
    BadMagic,
    VersionMismatch,
    Malformed,
    Io,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::NotFound => "not_found",
            Problem::Truncated => "truncated",
            Problem::ChecksumMismatch => "checksum_mismatch",
            Problem::BadMagic => "bad_magic",
            Problem::VersionMismatch => "version_mismatch",
            Problem::Malformed => "malformed",
            Problem::Io => "io",
        }
    }
}

/// A state file could not be written or read; `problem` says why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PersistError {
    pub path: PathBuf,
    pub problem: Problem,
    pub message: String,
}

/// A configuration value out of its range; the message names the field and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A kind code that is neither -1 (padding) nor 0..=2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("kind code {0} is not one of -1 (padding), 0 episodic, 1 semantic, 2 procedural")]
pub struct BadKindCode(pub i8);

/// A caller's mistake in a batch (lengths that differ, NaN, negative lengths, bad kind codes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BatchError(pub String);

/// Any error of the core.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    KindCode(#[from] BadKindCode),
}
