//! Multi-head self-attention over tokens with timm's key names (`qkv`, `proj`), differentiable.

use candle_core::{Result, Tensor};
use dfndr_teachers::blocks::{
    cpu_kernels_usable, packed_self_attention, softmax_last_dim, Kernels, Linear,
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
