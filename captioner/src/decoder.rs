//! OpenCLIP's `MultimodalTransformer`: the CoCa text decoder.
//!
//! Each layer is a causal self-attention block (`resblocks.{i}`) followed by a cross-attention
//! block (`cross_attn.{i}`, its own `ln_1_kv` and MLP) whose keys and values are the image
//! tokens. After the last layer come `ln_final` and the vocabulary projection
//! `text_projection [width, vocab]`. There is no positional embedding and no pad mask.

use candle_core::{Device, Result, Tensor};
use dfndr_teachers::arch::LN_EPS;
use dfndr_teachers::blocks::{
    Kernels, LayerNorm, Projection, ResidualAttentionBlock, TransformerConfig, VarBuilder,
};

/// The decoder stack.
#[derive(Clone, Debug)]
pub struct MultimodalDecoder {
    resblocks: Vec<ResidualAttentionBlock>,
    cross_attn: Vec<ResidualAttentionBlock>,
    ln_final: LayerNorm,
    text_projection: Projection,
    context_length: usize,
}

impl MultimodalDecoder {
    /// Loads `PREFIX.{resblocks, cross_attn, ln_final, text_projection}`.
    pub fn new(
        vb: VarBuilder,
        cfg: &TransformerConfig,
        context_length: usize,
        vocab_size: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        let blocks = |name: &str, cross: bool| {
            let vb = vb.pp(name);
            (0..cfg.layers)
                .map(|i| ResidualAttentionBlock::new(vb.pp(i), cfg, cross, kernels))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            resblocks: blocks("resblocks", false)?,
            cross_attn: blocks("cross_attn", true)?,
            ln_final: LayerNorm::new(vb.pp("ln_final"), cfg.width, LN_EPS, kernels)?,
            // OpenCLIP leaves this Parameter uninitialised; random weights use width^-0.5.
            text_projection: Projection::matrix(
                &vb,
                "text_projection",
                cfg.width,
                vocab_size,
                (cfg.width as f64).powf(-0.5),
            )?,
            context_length,
        })
    }

    /// Positions of the causal mask.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.resblocks.len()
    }

    /// Self-attention block of layer `i`.
    pub fn self_block(&self, i: usize) -> &ResidualAttentionBlock {
        &self.resblocks[i]
    }

    /// Cross-attention block of layer `i`.
    pub fn cross_block(&self, i: usize) -> &ResidualAttentionBlock {
        &self.cross_attn[i]
    }

    /// `ln_final` then the vocabulary projection: `[..., W]` to `[..., vocab]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(&self.ln_final.forward(x)?)
    }

    /// Teacher-forced logits `[B, L, vocab]` of text tokens `[B, L, W]` (the text tower's
    /// outputs before its `ln_final`) attending to image tokens `[B, N, W]`: every position
    /// recomputed, as OpenCLIP's forward does.
    pub fn forward(&self, image_tokens: &Tensor, text_tokens: &Tensor) -> Result<Tensor> {
        let l = text_tokens.dim(1)?;
        if l > self.context_length {
            candle_core::bail!(
                "decoder input of {l} positions exceeds its context of {}",
                self.context_length
            );
        }
        let mask = causal_mask(l, text_tokens.device())?;
        let mut x = text_tokens.clone();
        for (block, cross) in self.resblocks.iter().zip(&self.cross_attn) {
            x = block.forward(&x, Some(&mask))?;
            x = cross.forward_cross(&x, image_tokens, None)?;
        }
        self.logits(&x)
    }
}

/// Additive causal mask `[1, 1, L, L]`.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..l * l)
        .map(|i| {
            if i % l > i / l {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (1, 1, l, l), device)
}
