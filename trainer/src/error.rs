//! Errors of the trainer library.

/// What can go wrong while building, loading or training a student.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed (shapes, devices, dtypes).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration value is invalid; the message names the field.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint does not fit the model.
    #[error("{0}")]
    Weights(String),
    /// Inputs to a step disagree with each other or with the configuration.
    #[error("batch: {0}")]
    Batch(String),
    /// The dataset cannot be trained on (missing columns, another teacher layout, unreadable
    /// manifest); the message says which shard and why.
    #[error("data: {0}")]
    Data(String),
    /// Reading or writing a file failed; the message names it.
    #[error("{0}")]
    Io(String),
    /// A broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of the trainer library.
pub type Result<T> = std::result::Result<T, TrainError>;
