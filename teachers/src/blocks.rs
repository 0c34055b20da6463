//! Transformer building blocks with OpenCLIP's structure and state-dict key names, shared by
//! the teacher towers, the CoCa captioner and the students.
//!
//! Every block is built from a [`VarBuilder`] whose prefix is the block's key path, so the
//! same constructor loads a checkpoint, builds random weights or registers trainable
//! variables. [`Kernels`] picks between candle's fused kernels (fast, but without a backward
//! pass) and differentiable compositions for training.

mod act;
mod attention;
mod cpu_kernels;
mod gelu;
mod grad_kernels;
mod linear;
mod norm;
mod packed_attention;
mod small_rows;
mod transformer;

pub use act::Activation;
pub use attention::{AttentionWeights, MultiheadAttention};
pub use gelu::gelu_erf;
pub use grad_kernels::{contiguous_f32, matmul_strided, usable as cpu_kernels_usable, GemmThreads};
pub use linear::{Linear, Projection};
pub use norm::LayerNorm;
pub use packed_attention::{mask_values, packed_self_attention, packed_self_attention_inference};
pub use transformer::{LayerScale, Mlp, ResidualAttentionBlock, Transformer, TransformerConfig};

/// candle's `VarBuilder`, re-exported so users of the blocks need not depend on candle-nn.
pub type VarBuilder<'a> = candle_nn::VarBuilder<'a>;

/// Which implementation the normalisations and softmax use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// candle's fused layer-norm and softmax: fastest, but they have no backward pass and
    /// would silently cut the gradient in training.
    #[default]
    Fused,
    /// Compositions of differentiable primitives (mean, variance, exp, sum): for training.
    Differentiable,
}

/// Softmax over the last dimension with the chosen kernels, computed in float32 (the result
/// has `x`'s dtype).
pub fn softmax_last_dim(
    x: &candle_core::Tensor,
    kernels: Kernels,
) -> candle_core::Result<candle_core::Tensor> {
    let dtype = x.dtype();
    if dtype != candle_core::DType::F32 {
        return softmax_last_dim(&x.to_dtype(candle_core::DType::F32)?, kernels)?.to_dtype(dtype);
    }
    match kernels {
        Kernels::Fused => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Kernels::Differentiable if grad_kernels::usable(x) => grad_kernels::softmax_last_dim(x),
        Kernels::Differentiable => candle_nn::ops::softmax(x, candle_core::D::Minus1),
    }
}
