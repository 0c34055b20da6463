//! Where tower weights come from: checkpoint files, the Hugging Face cache, or deterministic
//! random numbers; the strict binding of a state dict to an architecture; and writing a state
//! dict back as a `torch.save` file.

mod binder;
mod checkpoint;
mod hub;
mod random;
mod torch_save;

pub use binder::{bind, requested_shapes, WeightSource};
pub use checkpoint::StateDict;
pub use hub::{hub_cache_dir, resolve_hub, HubRef};
pub use torch_save::save_torch;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Result, TeacherError};

/// A weights reference as written in a config or on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsRef {
    /// A checkpoint file (`.safetensors`, `.bin`, `.pt`, `.pth`).
    Path(PathBuf),
    /// `hf-hub:ORG/NAME`: OpenCLIP's file in that Hugging Face repository.
    Hub(HubRef),
    /// `random:SEED`: deterministic random weights, for demos and tests only.
    Random(u64),
}

impl WeightsRef {
    /// Parses `PATH`, `file://PATH`, `hf-hub:ORG/NAME[@REVISION]` or `random:SEED`.
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid = |reason: &str| TeacherError::InvalidWeights {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if let Some(seed) = spec.strip_prefix("random:") {
            return seed
                .trim()
                .parse()
                .map(WeightsRef::Random)
                .map_err(|_| invalid("the seed after `random:` must be an unsigned integer"));
        }
        if let Some(repo) = spec.strip_prefix("hf-hub:") {
            return HubRef::parse(repo)
                .map(WeightsRef::Hub)
                .map_err(|e| invalid(&e));
        }
        let path = spec.strip_prefix("file://").unwrap_or(spec);
        if path.is_empty() {
            return Err(invalid("empty path"));
        }
        if path.contains("://") {
            return Err(invalid(
                "only local paths, hf-hub:ORG/NAME and random:SEED are supported for weights",
            ));
        }
        Ok(WeightsRef::Path(PathBuf::from(path)))
    }
}

impl std::fmt::Display for WeightsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightsRef::Path(p) => write!(f, "{}", p.display()),
            WeightsRef::Hub(h) => write!(f, "hf-hub:{h}"),
            WeightsRef::Random(seed) => write!(f, "random:{seed}"),
        }
    }
}

/// Weights ready to bind: the tensors (or the random seed) and where they came from.
#[derive(Debug)]
pub struct LoadedWeights {
    /// What to bind.
    pub source: WeightSource,
    /// The reference the user gave.
    pub reference: WeightsRef,
    /// The file actually read, if any.
    pub file: Option<PathBuf>,
    /// sha256 of that file (hex); `None` for random weights.
    pub sha256: Option<String>,
}

impl LoadedWeights {
    /// Resolves and reads `reference` (hashing the file for provenance).
    pub fn load(reference: &WeightsRef) -> Result<Self> {
        let file = match reference {
            WeightsRef::Random(seed) => {
                return Ok(Self {
                    source: WeightSource::Random(*seed),
                    reference: reference.clone(),
                    file: None,
                    sha256: None,
                })
            }
            WeightsRef::Path(p) => p.clone(),
            WeightsRef::Hub(h) => resolve_hub(h)?,
        };
        let state = StateDict::load(&file)?;
        let sha256 = sha256_file(&file)?;
        Ok(Self {
            source: WeightSource::Tensors(state),
            reference: reference.clone(),
            file: Some(file),
            sha256: Some(sha256),
        })
    }
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| TeacherError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
