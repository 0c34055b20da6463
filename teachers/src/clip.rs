//! OpenCLIP's `CLIP` / `CustomTextCLIP`: both towers and the logit scale.

use candle_core::{DType, Result as CResult, Tensor, D};

use crate::arch::ClipConfig;
use crate::blocks::{Kernels, VarBuilder};
use crate::device::Compute;
use crate::error::Result;
use crate::text::TextTransformer;
use crate::vision::VisionTransformer;
use crate::weights::{bind, requested_shapes, WeightSource};

/// A CLIP model with OpenCLIP's state-dict layout.
#[derive(Clone, Debug)]
pub struct ClipModel {
    config: ClipConfig,
    visual: VisionTransformer,
    text: TextTransformer,
    /// The stored (log) logit scale.
    logit_scale: Tensor,
}

impl ClipModel {
    /// Builds the model from `vb` (the root of the state dict).
    pub fn new(vb: VarBuilder, config: &ClipConfig, kernels: Kernels) -> CResult<Self> {
        let visual = VisionTransformer::new(vb.pp("visual"), config, kernels)?;
        let text_vb = if config.custom_text {
            vb.pp("text")
        } else {
            vb.clone()
        };
        let text = TextTransformer::new(text_vb, config, kernels)?;
        // A scalar read on the host: kept float32 in every precision.
        let logit_scale = vb.to_dtype(DType::F32).get_with_hints(
            (),
            "logit_scale",
            candle_nn::Init::Const((1.0f64 / 0.07).ln()),
        )?;
        Ok(Self {
            config: config.clone(),
            visual,
            text,
            logit_scale,
        })
    }

    /// Builds the model from checkpoint tensors or random weights, strictly: a missing,
    /// unexpected or mis-shaped key is an error listing all of them. `label` names the
    /// architecture in that message.
    pub fn load(
        config: &ClipConfig,
        weights: &WeightSource,
        compute: &Compute,
        kernels: Kernels,
        label: &str,
    ) -> Result<Self> {
        config.validate()?;
        bind(weights, compute, label, |vb| Self::new(vb, config, kernels))
    }

    /// Every `(key, shape)` of this architecture's state dict, in construction order.
    pub fn state_dict_shapes(config: &ClipConfig) -> Result<Vec<(String, Vec<usize>)>> {
        config.validate()?;
        // Differentiable: nothing is re-laid out, so the placeholders are never materialised.
        requested_shapes(|vb| Self::new(vb, config, Kernels::Differentiable))
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The image tower.
    pub fn visual(&self) -> &VisionTransformer {
        &self.visual
    }

    /// The text tower.
    pub fn text(&self) -> &TextTransformer {
        &self.text
    }

    /// Image embeddings `[B, embed_dim]` of normalised images `[B, 3, S, S]` (not normalised,
    /// like OpenCLIP's `encode_image(normalize=False)`), float32 in every precision.
    pub fn encode_image(&self, images: &Tensor) -> CResult<Tensor> {
        self.visual.forward(images)?.to_dtype(DType::F32)
    }

    /// Text embeddings `[B, embed_dim]` of token rows (not normalised), float32 in every
    /// precision.
    pub fn encode_text(&self, ids: &[Vec<u32>]) -> CResult<Tensor> {
        self.text.forward(ids)?.to_dtype(DType::F32)
    }

    /// The logit-scale parameter (a 0-d log value), for training.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// The stored logit scale (a log value; `exp` gives the multiplier).
    pub fn logit_scale_log(&self) -> CResult<f32> {
        self.logit_scale
            .flatten_all()?
            .to_vec1::<f32>()
            .map(|v| v.first().copied().unwrap_or(0.0))
    }
}

/// `x / max(‖x‖₂, 1e-12)` over the last dimension, as `F.normalize`.
pub fn l2_normalize(x: &Tensor) -> CResult<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}
