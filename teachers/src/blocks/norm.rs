//! LayerNorm with a fused and a differentiable path.

use candle_core::{DType, Result, Tensor, D};

use super::{Kernels, VarBuilder};

/// `nn.LayerNorm(dim, eps)` with keys `weight` and `bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    kernels: Kernels,
}

impl LayerNorm {
    /// Loads `PREFIX.weight` and `PREFIX.bias` of shape `[dim]`, float32 whatever the
    /// model's precision (the normalisation itself runs in float32).
    pub fn new(vb: VarBuilder, dim: usize, eps: f64, kernels: Kernels) -> Result<Self> {
        let vb = vb.to_dtype(DType::F32);
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps,
            kernels,
        })
    }

    /// [`LayerNorm::forward`] for inference whatever the layer's kernels: candle's fused
    /// kernel (no backward pass) on float32 input.
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::F32 {
            return self.forward(x);
        }
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
    }

    /// Normalises over the last dimension, in float32; the result has `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if dtype != DType::F32 {
            return self.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
        }
        match self.kernels {
            Kernels::Fused => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            Kernels::Differentiable if super::grad_kernels::usable(x) => {
                super::grad_kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
            }
            Kernels::Differentiable => {
                // Biased variance, as torch's layer_norm.
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                normed
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
        }
    }
}
