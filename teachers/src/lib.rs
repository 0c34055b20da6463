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

/// Returns `$f(args)` (an `#[inline(always)]` loop) compiled for AVX-512 or AVX2+FMA when the
/// CPU has them (detected at run time), else for the build's baseline: the default build
/// targets plain x86-64, and these loops are several times faster with wide vectors and FMA.
/// Used as the tail of a function (it returns from it).
#[macro_export]
macro_rules! simd_dispatch {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512(f: impl FnOnce()) {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(f: impl FnOnce()) {
                f()
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { avx512(|| $f($($arg),*)) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                return unsafe { avx2(|| $f($($arg),*)) };
            }
        }
        $f($($arg),*)
    }};
}
