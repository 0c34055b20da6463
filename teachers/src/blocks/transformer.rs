//! OpenCLIP's `ResidualAttentionBlock` and `Transformer`.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::cpu_kernels;
use super::{Activation, Kernels, LayerNorm, Linear, MultiheadAttention, VarBuilder};

/// Numbers of one transformer stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformerConfig {
    /// Residual width.
    pub width: usize,
    /// Number of residual blocks.
    pub layers: usize,
    /// Attention heads (width / head width).
    pub heads: usize,
    /// MLP hidden width = `int(width * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// MLP activation.
    pub act: Activation,
    /// Layer-scale initial value; `None` means no layer scale (no `ls_*.gamma` keys).
    pub ls_init_value: Option<f64>,
    /// LayerNorm epsilon (OpenCLIP: 1e-5).
    pub ln_eps: f64,
}

impl TransformerConfig {
    /// MLP hidden width.
    pub fn mlp_width(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }
}

/// `LayerScale`: `x * gamma` with key `gamma [W]`.
#[derive(Clone, Debug)]
pub struct LayerScale {
    gamma: Tensor,
}

impl LayerScale {
    /// Loads `PREFIX.gamma`.
    pub fn new(vb: VarBuilder, dim: usize, init: f64) -> Result<Self> {
        let gamma = vb.get_with_hints(dim, "gamma", candle_nn::Init::Const(init))?;
        Ok(Self { gamma })
    }

    /// Scales the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.gamma)
    }

    /// [`LayerScale::forward`] with nothing recorded for a backward pass (a trainable scale
    /// would otherwise keep `x` alive in the graph).
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.gamma.detach())
    }
}

/// `c_fc -> act -> c_proj`.
#[derive(Clone, Debug)]
pub struct Mlp {
    c_fc: Linear,
    act: Activation,
    c_proj: Linear,
    kernels: Kernels,
}

impl Mlp {
    /// Loads `PREFIX.c_fc` and `PREFIX.c_proj`.
    pub fn new(
        vb: VarBuilder,
        width: usize,
        hidden: usize,
        act: Activation,
        kernels: Kernels,
    ) -> Result<Self> {
        Ok(Self {
            c_fc: Linear::new(vb.pp("c_fc"), width, hidden, true)?.prepared(kernels)?,
            act,
            c_proj: Linear::new(vb.pp("c_proj"), hidden, width, true)?.prepared(kernels)?,
            kernels,
        })
    }

    /// [`Mlp::forward`] for inference, whatever the layer's kernels: on the CPU in float32 the
    /// fused kernels (no backward pass, the activation inside `c_fc`'s output).
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self.c_fc.forward_inference(x, Some(self.act))?;
        self.c_proj.forward_inference(&hidden, None)
    }

    /// Applies the MLP (with the fused kernels, the activation runs inside `c_fc`'s output).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels == Kernels::Fused && cpu_kernels::usable(x) {
            let hidden = self.c_fc.forward_act_fused(x, self.act)?;
            return self.c_proj.forward(&hidden);
        }
        self.c_proj
            .forward(&self.act.forward_train(&self.c_fc.forward(x)?)?)
    }
}

/// Pre-norm residual block: `x + ls_1(attn(ln_1(x)))`, then `x + ls_2(mlp(ln_2(x)))`. A
/// cross-attention block (CoCa decoder) also normalises the key/value input with `ln_1_kv`.
#[derive(Clone, Debug)]
pub struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    ln_1_kv: Option<LayerNorm>,
    attn: MultiheadAttention,
    ls_1: Option<LayerScale>,
    ln_2: LayerNorm,
    mlp: Mlp,
    ls_2: Option<LayerScale>,
}

impl ResidualAttentionBlock {
    /// Loads one block; `cross_attention` adds `ln_1_kv`.
    pub fn new(
        vb: VarBuilder,
        cfg: &TransformerConfig,
        cross_attention: bool,
        kernels: Kernels,
    ) -> Result<Self> {
        let w = cfg.width;
        let ln = |name: &str| LayerNorm::new(vb.pp(name), w, cfg.ln_eps, kernels);
        let ls = |name: &str| match cfg.ls_init_value {
            Some(init) => LayerScale::new(vb.pp(name), w, init).map(Some),
            None => Ok(None),
        };
        Ok(Self {
            ln_1: ln("ln_1")?,
            ln_1_kv: if cross_attention {
                Some(ln("ln_1_kv")?)
            } else {
                None
            },
            attn: MultiheadAttention::new(vb.pp("attn"), w, cfg.heads, w, w, kernels)?,
            ls_1: ls("ls_1")?,
            ln_2: ln("ln_2")?,
            mlp: Mlp::new(vb.pp("mlp"), w, cfg.mlp_width(), cfg.act, kernels)?,
            ls_2: ls("ls_2")?,
        })
    }

    fn residual(x: &Tensor, branch: Tensor, ls: &Option<LayerScale>) -> Result<Tensor> {
        match ls {
            Some(ls) => x + ls.forward(&branch)?,
            None => x + branch,
        }
    }

    /// Self-attention block on `x: [B, T, W]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attn = self.attn.forward_self(&self.ln_1.forward(x)?, mask)?;
        let x = Self::residual(x, attn, &self.ls_1)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Self::residual(&x, mlp, &self.ls_2)
    }

    /// [`ResidualAttentionBlock::forward`] for inference, whatever the block's kernels: on
    /// the CPU in float32 the fused kernels, nothing recorded for a backward pass (evaluation
    /// of a model built for training).
    pub fn forward_inference(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let residual = |x: &Tensor, branch: Tensor, ls: &Option<LayerScale>| match ls {
            Some(ls) => x + ls.forward_inference(&branch)?,
            None => x + branch,
        };
        let h = self.ln_1.forward_inference(x)?;
        let x = residual(x, self.attn.forward_self_inference(&h, mask)?, &self.ls_1)?;
        let h = self.ln_2.forward_inference(&x)?;
        residual(&x, self.mlp.forward_inference(&h)?, &self.ls_2)
    }

    /// [`ResidualAttentionBlock::forward`] (unmasked) computed for the first `n` positions
    /// only: they still attend to every position of `x`, but the other positions' outputs,
    /// which nothing after a last block reads when the first tokens are pooled, are skipped.
    pub fn forward_first(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let h = self.ln_1.forward(x)?;
        let attn = self.attn.forward(&h.narrow(1, 0, n)?, &h, None)?;
        let x = Self::residual(&x.narrow(1, 0, n)?, attn, &self.ls_1)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Self::residual(&x, mlp, &self.ls_2)
    }

    /// The block with its attention branch supplied by the caller: `x + ls_1(attend(attn,
    /// ln_1(x)))`, then the MLP branch. `attend` gets the attention layer and the normalised
    /// input and returns the projected attention output; cached decoding uses this to run
    /// attention over its key/value caches while the block keeps its own residual structure.
    pub fn forward_with<F>(&self, x: &Tensor, attend: F) -> Result<Tensor>
    where
        F: FnOnce(&MultiheadAttention, &Tensor) -> Result<Tensor>,
    {
        let attn = attend(&self.attn, &self.ln_1.forward(x)?)?;
        let x = Self::residual(x, attn, &self.ls_1)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Self::residual(&x, mlp, &self.ls_2)
    }

    /// `ln_1_kv(kv)` of a cross-attention block (the keys/values' own normalisation).
    pub fn norm_kv(&self, kv: &Tensor) -> Result<Tensor> {
        match &self.ln_1_kv {
            Some(ln) => ln.forward(kv),
            None => candle_core::bail!("norm_kv on a block built without ln_1_kv"),
        }
    }

    /// The attention layer.
    pub fn attention(&self) -> &MultiheadAttention {
        &self.attn
    }

    /// Cross-attention block: queries from `x`, keys and values from `ln_1_kv(kv)`.
    pub fn forward_cross(&self, x: &Tensor, kv: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let Some(ln_kv) = &self.ln_1_kv else {
            candle_core::bail!("forward_cross on a block built without ln_1_kv");
        };
        let kv = ln_kv.forward(kv)?;
        let attn = self.attn.forward(&self.ln_1.forward(x)?, &kv, mask)?;
        let x = Self::residual(x, attn, &self.ls_1)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&x)?)?;
        Self::residual(&x, mlp, &self.ls_2)
    }
}

/// A stack of residual blocks with keys `resblocks.{i}.*`.
#[derive(Clone, Debug)]
pub struct Transformer {
    resblocks: Vec<ResidualAttentionBlock>,
}

impl Transformer {
    /// Loads `PREFIX.resblocks.0..layers`.
    pub fn new(vb: VarBuilder, cfg: &TransformerConfig, kernels: Kernels) -> Result<Self> {
        let vb = vb.pp("resblocks");
        let resblocks = (0..cfg.layers)
            .map(|i| ResidualAttentionBlock::new(vb.pp(i), cfg, false, kernels))
            .collect::<Result<_>>()?;
        Ok(Self { resblocks })
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[ResidualAttentionBlock] {
        &self.resblocks
    }

    /// Runs every block in order.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.resblocks {
            x = block.forward(&x, mask)?;
        }
        Ok(x)
    }

    /// [`Transformer::forward`] (unmasked) when only the first `n` positions of the output
    /// are read: the last block computes just those (see
    /// [`ResidualAttentionBlock::forward_first`]).
    pub fn forward_first(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let Some((last, rest)) = self.resblocks.split_last() else {
            return x.narrow(1, 0, n);
        };
        let mut x = x.clone();
        for block in rest {
            x = block.forward(&x, None)?;
        }
        last.forward_first(&x, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn inference_matches_the_trainable_block_with_and_without_a_mask() {
        let cfg = TransformerConfig {
            width: 16,
            layers: 1,
            heads: 2,
            mlp_ratio: 4.0,
            act: Activation::Gelu,
            ls_init_value: Some(0.5),
            ln_eps: 1e-5,
        };
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let block = ResidualAttentionBlock::new(vb, &cfg, false, Kernels::Differentiable).unwrap();
        let x = Tensor::randn(0f32, 1f32, (2, 5, 16), &Device::Cpu).unwrap();
        let causal: Vec<f32> = (0..25)
            .map(|i| {
                if i % 5 > i / 5 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, 5, 5), &Device::Cpu).unwrap();
        for mask in [None, Some(&causal)] {
            let trained = block.forward(&x, mask).unwrap();
            assert!(trained.track_op(), "the trainable block records its graph");
            let inferred = block.forward_inference(&x, mask).unwrap();
            assert!(!inferred.track_op(), "inference records nothing");
            let diff = (&trained - &inferred)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
    }
}
