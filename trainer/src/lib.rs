//! dfndr-trainer: distillation of MobileCLIP2 students on DFNDR datasets.
//!
//! - [`ops`]: differentiable CPU kernels candle lacks (depthwise convolution, batch-statistics
//!   BatchNorm).
//! - [`layers`], [`fastvit`]: the image towers in their train-time (branched) form with timm's
//!   key names; [`student`]: image tower + OpenCLIP text tower + logit scale.
//! - [`loss`]: Apple's `DRClipLoss`; [`optim`]: AdamW with OpenCLIP's parameter groups,
//!   gradient clipping and the cosine schedule, with state that can be checkpointed;
//!   [`checkpoint`]: atomic checkpoints from which a run continues bit for bit;
//!   [`recompute`]: activation recomputation (less memory for one more forward pass);
//!   [`step`]: one optimisation step.
//! - [`plot`]: PNGs of the step metrics; [`tensorboard`]: TensorBoard event files of scalars.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod fastvit;
pub mod init;
pub mod layers;
pub mod loss;
pub mod models;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod recompute;
pub mod run;
pub mod step;
pub mod student;
pub mod tensorboard;
pub mod vit;

pub use error::{Result, TrainError};
pub use layers::Mode;
pub use student::{Student, StudentConfig};

#[cfg(test)]
mod test_util {
    use candle_core::Tensor;

    /// The largest absolute difference between two tensors of one shape.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }
}
