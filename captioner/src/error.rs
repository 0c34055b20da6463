//! Typed errors of the captioner crate.

use dfndr_teachers::error::plain;
use dfndr_teachers::TeacherError;

/// Everything that can go wrong while building, loading or running a captioner.
#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    /// Loading weights or running a tower failed (the teachers crate's error, unchanged).
    #[error(transparent)]
    Model(#[from] TeacherError),
    /// A tensor operation failed (shape bug, device error, out of memory).
    #[error("tensor operation failed: {}", plain(.0))]
    Tensor(#[from] candle_core::Error),
    /// An architecture name that is not built in.
    #[error("unknown captioner architecture {name:?}; built in: {known}")]
    UnknownArchitecture { name: String, known: String },
    /// An architecture given by numbers that cannot work.
    #[error("invalid captioner architecture: {0}")]
    InvalidArchitecture(String),
    /// Decoding settings that cannot work (e.g. `seq_len` not above `min_seq_len`).
    #[error("invalid generation settings: {0}")]
    InvalidGeneration(String),
    /// Bad input (wrong image size, empty batch, token outside the vocabulary, ...).
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result type of this crate.
pub type Result<T, E = CaptionError> = std::result::Result<T, E>;
