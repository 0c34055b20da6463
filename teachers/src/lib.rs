//! dfndr-teachers: the CLIP tokenizer (OpenCLIP SimpleTokenizer semantics), OpenCLIP-compatible
//! vision and text towers built from reusable, trainable blocks, weight loading (safetensors,
//! PyTorch pickles, the Hugging Face cache, deterministic random weights) and teacher
//! ensembles.

pub mod arch;
pub mod blocks;
pub mod clip;
pub mod device;
pub mod ensemble;
pub mod error;
pub mod memory;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use arch::{ArchSpec, ClipConfig};
pub use clip::{l2_normalize, ClipModel};
pub use ensemble::{Ensemble, Preprocess, Resample, Teacher, TeacherConfig};
pub use error::{KeyMismatch, Result, TeacherError};
pub use weights::{LoadedWeights, WeightsRef};

/// candle's tensor and device types, re-exported so callers need no direct candle dependency.
pub use candle_core::{DType, Device, Tensor};

/// The SIMD dispatch of the hand-vectorised kernels (see [`dfndr_simd`]), re-exported for the
/// crates built on the teachers' blocks.
pub use dfndr_simd::simd_dispatch;
