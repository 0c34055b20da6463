//! Typed errors of the teachers crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running a tower.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// A tensor operation failed (shape bug, device error, out of memory).
    #[error("tensor operation failed: {}", plain(.0))]
    Tensor(#[from] candle_core::Error),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a checkpoint we can read, or it is damaged.
    #[error("{path} is not a readable checkpoint: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    /// The checkpoint does not fit the architecture.
    #[error("{0}")]
    Mismatch(#[from] KeyMismatch),
    /// An architecture name that is not built in.
    #[error("unknown architecture {name:?}; built in: {known}")]
    UnknownArchitecture { name: String, known: String },
    /// An architecture given by numbers that cannot work (e.g. width not divisible by heads).
    #[error("invalid architecture: {0}")]
    InvalidArchitecture(String),
    /// A weights reference that is neither a path, `hf-hub:ORG/NAME` nor `random:SEED`.
    #[error("invalid weights reference {spec:?}: {reason}")]
    InvalidWeights { spec: String, reason: String },
    /// A Hugging Face Hub reference that could not be resolved to a file.
    #[error("{0}")]
    Hub(String),
    /// Bad input to a tower (wrong image size, empty batch, ...).
    #[error("invalid input: {0}")]
    Input(String),
}

/// A candle error's message without the backtrace candle attaches when RUST_BACKTRACE is set.
pub fn plain(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", plain(inner)),
        other => other.to_string(),
    }
}

/// Result type of this crate.
pub type Result<T, E = TeacherError> = std::result::Result<T, E>;

/// Keys that are missing, unexpected or of the wrong shape, all listed at once so a user sees
/// the whole picture (e.g. "every text key is missing: this is a CustomTextCLIP checkpoint").
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeyMismatch {
    /// What the checkpoint was checked against (architecture and source).
    pub context: String,
    /// Keys the architecture needs that the checkpoint lacks, with the expected shape.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Keys in the checkpoint the architecture does not use, with their shape.
    pub unexpected: Vec<(String, Vec<usize>)>,
    /// Keys present in both with different shapes: (key, expected, found).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl KeyMismatch {
    /// True when the checkpoint fits exactly.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.wrong_shape.is_empty()
    }
}

impl std::error::Error for KeyMismatch {}

/// At most this many keys of each kind are printed; the counts are always complete.
const LISTED: usize = 12;

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint does not match {}: {} missing, {} unexpected, {} with the wrong shape",
            self.context,
            self.missing.len(),
            self.unexpected.len(),
            self.wrong_shape.len()
        )?;
        let list = |f: &mut std::fmt::Formatter<'_>, title: &str, items: Vec<String>| {
            if items.is_empty() {
                return Ok(());
            }
            write!(f, "\n  {title}:")?;
            for item in items.iter().take(LISTED) {
                write!(f, "\n    {item}")?;
            }
            if items.len() > LISTED {
                write!(f, "\n    ... and {} more", items.len() - LISTED)?;
            }
            Ok(())
        };
        list(
            f,
            "missing",
            self.missing
                .iter()
                .map(|(k, s)| format!("{k} {s:?}"))
                .collect(),
        )?;
        list(
            f,
            "unexpected",
            self.unexpected
                .iter()
                .map(|(k, s)| format!("{k} {s:?}"))
                .collect(),
        )?;
        list(
            f,
            "wrong shape",
            self.wrong_shape
                .iter()
                .map(|(k, e, g)| format!("{k}: expected {e:?}, checkpoint has {g:?}"))
                .collect(),
        )?;
        if let Some(hint) = self.hint() {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl KeyMismatch {
    /// A guess at the usual cause, from the shape of the mismatch.
    fn hint(&self) -> Option<&'static str> {
        let text_prefix_moved = |a: &[(String, Vec<usize>)], b: &[(String, Vec<usize>)]| {
            a.iter().any(|(k, _)| k == "token_embedding.weight")
                && b.iter().any(|(k, _)| k == "text.token_embedding.weight")
        };
        if text_prefix_moved(&self.missing, &self.unexpected) {
            return Some("the checkpoint keeps its text tower under `text.` (CustomTextCLIP); set `custom_text = true`");
        }
        if text_prefix_moved(&self.unexpected, &self.missing) {
            return Some("the checkpoint keeps its text tower at the top level (plain CLIP); set `custom_text = false`");
        }
        if !self.wrong_shape.is_empty() && self.missing.is_empty() && self.unexpected.is_empty() {
            return Some("same structure, different sizes: check the architecture name (e.g. ViT-B-16 vs ViT-L-14)");
        }
        None
    }
}
