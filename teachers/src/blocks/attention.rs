//! `nn.MultiheadAttention` (batch first) with OpenCLIP's key names.

use candle_core::{Result, Tensor};

use super::packed_attention::{
    mask_values, packed_self_attention, packed_self_attention_inference,
};
use super::{cpu_kernels, grad_kernels};
use super::{softmax_last_dim, Kernels, Linear, VarBuilder};

/// How the input projections are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionWeights {
    /// One `in_proj_weight [3E, E]` with rows q, k, v (query, key and value all of width E).
    Packed,
    /// `q_proj_weight [E, E]`, `k_proj_weight [E, kdim]`, `v_proj_weight [E, vdim]`: what torch
    /// stores when the key/value width differs from the embedding width (attentional pooler).
    Separate,
}

/// Multi-head attention: `softmax(q kᵀ / √d) v` per head, then `out_proj`.
#[derive(Clone, Debug)]
pub struct MultiheadAttention {
    /// Packed q|k|v projection for self-attention in one matrix product.
    qkv: Option<Linear>,
    q: Linear,
    k: Linear,
    v: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    kernels: Kernels,
}

impl MultiheadAttention {
    /// Loads the attention at `vb`'s prefix. `kdim`/`vdim` equal to `embed_dim` give the packed
    /// layout, anything else the separate one, exactly as torch decides.
    pub fn new(
        vb: VarBuilder,
        embed_dim: usize,
        heads: usize,
        kdim: usize,
        vdim: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        if heads == 0 || !embed_dim.is_multiple_of(heads) {
            candle_core::bail!("attention width {embed_dim} is not divisible by {heads} heads");
        }
        let layout = if kdim == embed_dim && vdim == embed_dim {
            AttentionWeights::Packed
        } else {
            AttentionWeights::Separate
        };
        let xavier = |fan_in: usize, fan_out: usize| {
            let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        let bias = vb.get_with_hints(3 * embed_dim, "in_proj_bias", candle_nn::Init::Const(0.0))?;
        let (qkv, q, k, v) = match layout {
            AttentionWeights::Packed => {
                let w = vb.get_with_hints(
                    (3 * embed_dim, embed_dim),
                    "in_proj_weight",
                    xavier(embed_dim, 3 * embed_dim),
                )?;
                // q, k and v are slices of the packed layer, so prepared (transposed) weights
                // are shared, not copied.
                let qkv = Linear::from_parts(w, Some(bias)).prepared(kernels)?;
                let part = |i: usize| qkv.narrow_out(i * embed_dim, embed_dim);
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                (Some(qkv), q, k, v)
            }
            AttentionWeights::Separate => {
                let part = |i: usize| bias.narrow(0, i * embed_dim, embed_dim);
                let get = |name: &str, in_dim: usize| {
                    vb.get_with_hints((embed_dim, in_dim), name, xavier(in_dim, embed_dim))
                };
                (
                    None,
                    Linear::from_parts(get("q_proj_weight", embed_dim)?, Some(part(0)?))
                        .prepared(kernels)?,
                    Linear::from_parts(get("k_proj_weight", kdim)?, Some(part(1)?))
                        .prepared(kernels)?,
                    Linear::from_parts(get("v_proj_weight", vdim)?, Some(part(2)?))
                        .prepared(kernels)?,
                )
            }
        };
        let out_proj =
            Linear::new(vb.pp("out_proj"), embed_dim, embed_dim, true)?.prepared(kernels)?;
        Ok(Self {
            qkv,
            q,
            k,
            v,
            out_proj,
            heads,
            head_dim: embed_dim / heads,
            kernels,
        })
    }

    /// Self-attention of `x: [B, T, E]`; `mask` is additive and broadcastable to `[B, H, T, T]`.
    pub fn forward_self(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let Some(qkv) = &self.qkv else {
            return self.forward(x, x, mask);
        };
        if self.kernels == Kernels::Fused && cpu_kernels::usable(x) {
            let merged =
                packed_self_attention_inference(&qkv.forward(x)?, self.heads, mask_values(mask)?)?;
            return self.out_proj.forward(&merged);
        }
        if self.kernels == Kernels::Differentiable && grad_kernels::usable(x) {
            let merged = packed_self_attention(&qkv.forward(x)?, self.heads, mask_values(mask)?)?;
            return self.out_proj.forward(&merged);
        }
        let (b, t, _) = x.dims3()?;
        // One product for q, k and v, then one copy into [3, B, H, T, d].
        let packed = qkv
            .forward(x)?
            .reshape((b, t, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        self.attend(&packed.get(0)?, &packed.get(1)?, &packed.get(2)?, mask)
    }

    /// [`MultiheadAttention::forward_self`] for inference, whatever the layer's kernels: on
    /// the CPU in float32 the fused kernels, nothing recorded for a backward pass.
    pub fn forward_self_inference(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match &self.qkv {
            Some(qkv) if cpu_kernels::usable(x) => {
                let packed = qkv.forward_inference(x, None)?;
                let merged =
                    packed_self_attention_inference(&packed, self.heads, mask_values(mask)?)?;
                self.out_proj.forward_inference(&merged, None)
            }
            _ => self.forward_self(x, mask),
        }
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The packed query|key|value projection of `x: [..., E]` to `[..., 3E]` (self-attention
    /// layers only), for callers that run attention themselves (cached decoding).
    pub fn project_qkv(&self, x: &Tensor) -> Result<Tensor> {
        match &self.qkv {
            Some(qkv) => qkv.forward(x),
            None => Tensor::cat(
                &[self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?],
                candle_core::D::Minus1,
            ),
        }
    }

    /// The query projection of `x: [..., E]`.
    pub fn project_q(&self, x: &Tensor) -> Result<Tensor> {
        self.q.forward(x)
    }

    /// The key and value projections of `kv: [..., kdim]`.
    pub fn project_kv(&self, kv: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.k.forward(kv)?, self.v.forward(kv)?))
    }

    /// The output projection of merged heads `[..., E]`.
    pub fn project_out(&self, merged: &Tensor) -> Result<Tensor> {
        self.out_proj.forward(merged)
    }

    /// Attention of queries `q_in: [B, Tq, E]` over `kv_in: [B, Tk, kdim]`.
    pub fn forward(&self, q_in: &Tensor, kv_in: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = self.split_heads(&self.q.forward(q_in)?)?;
        let k = self.split_heads(&self.k.forward(kv_in)?)?;
        let v = self.split_heads(&self.v.forward(kv_in)?)?;
        self.attend(&q, &k, &v, mask)
    }

    /// `[B, T, E]` to `[B, H, T, d]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Scaled dot-product attention of `[B, H, T, d]` heads, merged and projected.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, tq, _) = q.dims4()?;
        let q = (q * (self.head_dim as f64).powf(-0.5))?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            // Masks are float32; in a lower precision the scores join them there, and the
            // softmax runs in float32 anyway.
            scores = scores.to_dtype(mask.dtype())?.broadcast_add(mask)?;
        }
        let weights = softmax_last_dim(&scores, self.kernels)?.to_dtype(v.dtype())?;
        let out =
            weights
                .matmul(v)?
                .transpose(1, 2)?
                .reshape((b, tq, self.heads * self.head_dim))?;
        self.out_proj.forward(&out)
    }
}
