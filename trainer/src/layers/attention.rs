//! Multi-head self-attention over tokens with timm's key names (`qkv`, `proj`), differentiable.

use candle_core::{Result, Tensor};
use dfndr_teachers::blocks::{
    cpu_kernels_usable, packed_self_attention, packed_self_attention_inference, softmax_last_dim,
    Kernels, Linear,
};

use super::Builder;

/// timm's `Attention`: one packed `qkv` projection, scaled dot-product attention per head,
/// then `proj` (biased).
#[derive(Clone, Debug)]
pub struct SelfAttention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    /// Loads `PREFIX.qkv` (biased when `qkv_bias`) and `PREFIX.proj` for `dim` channels in
    /// heads of `head_dim`.
    pub fn new(b: &Builder, dim: usize, head_dim: usize, qkv_bias: bool) -> Result<Self> {
        if head_dim == 0 || !dim.is_multiple_of(head_dim) {
            candle_core::bail!(
                "attention width {dim} at {} is not a multiple of the head width {head_dim}",
                b.vb().prefix()
            );
        }
        Ok(Self {
            qkv: Linear::new(b.vb().pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: Linear::new(b.vb().pp("proj"), dim, dim, true)?,
            heads: dim / head_dim,
            head_dim,
        })
    }

    /// [`SelfAttention::forward`] for inference (no backward pass): on the CPU in float32 the
    /// fused kernels, nothing kept for a backward. With `first = Some(n)` only the first `n`
    /// positions' outputs are computed, each still attending over every token (what a last
    /// block needs when only the class token is pooled).
    pub fn forward_inference(&self, tokens: &Tensor, first: Option<usize>) -> Result<Tensor> {
        if !cpu_kernels_usable(tokens) {
            let out = self.forward(tokens)?;
            return match first {
                Some(n) => out.narrow(1, 0, n),
                None => Ok(out),
            };
        }
        let packed = self.qkv.forward_inference(tokens, None)?;
        let merged = match first {
            None => packed_self_attention_inference(&packed, self.heads, None)?,
            Some(n) => {
                let (b, t, _) = tokens.dims3()?;
                let c = self.heads * self.head_dim;
                let heads = |x: Tensor, len: usize| -> Result<Tensor> {
                    x.reshape((b, len, self.heads, self.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let q = heads(packed.narrow(1, 0, n)?.narrow(2, 0, c)?, n)?;
                let k = heads(packed.narrow(2, c, c)?, t)?;
                let v = heads(packed.narrow(2, 2 * c, c)?, t)?;
                let q = (q * (self.head_dim as f64).powf(-0.5))?;
                let weights = softmax_last_dim(&q.matmul(&k.t()?)?, Kernels::Fused)?;
                weights.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?
            }
        };
        self.proj.forward_inference(&merged, None)
    }

    /// Attends over the tokens of `[B, N, C]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, n, c) = tokens.dims3()?;
        let packed = self.qkv.forward(tokens)?;
        if cpu_kernels_usable(&packed) {
            // One differentiable kernel from the packed projection (no head copies).
            return self
                .proj
                .forward(&packed_self_attention(&packed, self.heads, None)?);
        }
        let qkv = packed
            .reshape((b, n, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let q = (q * (self.head_dim as f64).powf(-0.5))?;
        let scores = q.matmul(&k.t()?)?;
        // The differentiable softmax: the fused one has no backward pass.
        let weights = softmax_last_dim(&scores, Kernels::Differentiable)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::layers::NormConfig;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn inference_matches_the_differentiable_forward_for_all_or_the_first_positions() {
        for qkv_bias in [true, false] {
            let vb = VarBuilder::from_backend(
                Box::new(SeededVarMap::new(VarMap::new(), 5)),
                DType::F32,
                Device::Cpu,
            );
            let b = Builder::new(vb, VarMap::new(), NormConfig::default());
            let attn = SelfAttention::new(&b, 24, 8, qkv_bias).unwrap();
            let x = Tensor::randn(0f32, 1f32, (3, 7, 24), &Device::Cpu).unwrap();
            let full = attn.forward(&x).unwrap();
            let inference = attn.forward_inference(&x, None).unwrap();
            assert!(!inference.track_op());
            assert!(max_abs_diff(&full, &inference) < 1e-5);
            for n in [1, 3, 7] {
                let first = attn.forward_inference(&x, Some(n)).unwrap();
                assert_eq!(first.dims(), &[3, n, 24]);
                assert!(max_abs_diff(&full.narrow(1, 0, n).unwrap(), &first) < 1e-5);
            }
        }
    }
}
