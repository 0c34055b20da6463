//! OpenCLIP's `CoCa`: vision tower with attentional pooler, text tower with a class token,
//! multimodal decoder, logit scale.

use candle_core::{Result as CResult, Tensor};
use dfndr_teachers::blocks::{Kernels, VarBuilder};
use dfndr_teachers::device::Compute;
use dfndr_teachers::text::TextTransformer;
use dfndr_teachers::vision::VisionTransformer;
use dfndr_teachers::weights::{bind, requested_shapes, WeightSource};

use crate::arch::CocaConfig;
use crate::decoder::MultimodalDecoder;
use crate::error::{CaptionError, Result};

/// A CoCa model with OpenCLIP's state-dict layout (`visual.*`, `text.*`, `text_decoder.*`,
/// `logit_scale`).
#[derive(Clone, Debug)]
pub struct CocaModel {
    config: CocaConfig,
    visual: VisionTransformer,
    text: TextTransformer,
    decoder: MultimodalDecoder,
    logit_scale: Tensor,
}

/// What the decoder needs of an image batch.
#[derive(Clone, Debug)]
pub struct ImageContext {
    /// The pooled, projected image embedding `[B, embed_dim]` (not normalised).
    pub latent: Tensor,
    /// The attentional pooler's remaining outputs after `ln_post` `[B, queries - 1, embed_dim]`:
    /// the keys and values of the decoder's cross-attention.
    pub tokens: Tensor,
}

impl CocaModel {
    /// Builds the model from `vb` (the root of the state dict).
    pub fn new(vb: VarBuilder, config: &CocaConfig, kernels: Kernels) -> CResult<Self> {
        let clip = config.clip();
        let visual = VisionTransformer::new(vb.pp("visual"), &clip, kernels)?;
        let text = TextTransformer::new(vb.pp("text"), &clip, kernels)?;
        let decoder = MultimodalDecoder::new(
            vb.pp("text_decoder"),
            &config.decoder_transformer(),
            config.multimodal.context_length,
            config.multimodal.vocab_size,
            kernels,
        )?;
        let logit_scale = vb.get_with_hints(
            (),
            "logit_scale",
            candle_nn::Init::Const((1.0f64 / 0.07).ln()),
        )?;
        Ok(Self {
            config: config.clone(),
            visual,
            text,
            decoder,
            logit_scale,
        })
    }

    /// Builds the model from checkpoint tensors or random weights, strictly (every missing,
    /// unexpected or mis-shaped key is listed). `label` names the architecture in errors.
    pub fn load(
        config: &CocaConfig,
        weights: &WeightSource,
        compute: &Compute,
        kernels: Kernels,
        label: &str,
    ) -> Result<Self> {
        config.validate()?;
        Ok(bind(weights, compute, label, |vb| {
            Self::new(vb, config, kernels)
        })?)
    }

    /// Every `(key, shape)` of this architecture's state dict, in construction order.
    pub fn state_dict_shapes(config: &CocaConfig) -> Result<Vec<(String, Vec<usize>)>> {
        config.validate()?;
        // Differentiable: nothing is re-laid out, so the placeholders are never materialised.
        Ok(requested_shapes(|vb| {
            Self::new(vb, config, Kernels::Differentiable)
        })?)
    }

    /// The architecture.
    pub fn config(&self) -> &CocaConfig {
        &self.config
    }

    /// The image tower.
    pub fn visual(&self) -> &VisionTransformer {
        &self.visual
    }

    /// The unimodal text tower.
    pub fn text(&self) -> &TextTransformer {
        &self.text
    }

    /// The multimodal decoder.
    pub fn decoder(&self) -> &MultimodalDecoder {
        &self.decoder
    }

    /// The stored (log) logit scale.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// Input side in pixels.
    pub fn image_size(&self) -> usize {
        self.visual.image_size()
    }

    /// Encodes normalised images `[B, 3, S, S]` once for all captions of each image.
    pub fn encode_image(&self, images: &Tensor) -> Result<ImageContext> {
        let out = self.visual.forward_with_tokens(images)?;
        Ok(ImageContext {
            latent: out.pooled,
            tokens: out.tokens,
        })
    }

    /// Teacher-forced logits `[B, L, vocab]` of token rows `ids` (`[B, L]`, starting with the
    /// start-of-text id) given the images' context: the full unimodal text tower (class token
    /// and its pad mask included) and the full decoder over every position, exactly as
    /// OpenCLIP's `CoCa.forward(image, text, output_labels=False)["logits"]`; float32 in
    /// every precision.
    pub fn forced_logits(&self, image: &ImageContext, ids: &[Vec<u32>]) -> Result<Tensor> {
        let b = image.tokens.dim(0)?;
        if ids.len() != b {
            return Err(CaptionError::Input(format!(
                "{} token rows for {b} images",
                ids.len()
            )));
        }
        let text = self.text.forward_with_tokens(ids)?;
        Ok(self
            .decoder
            .forward(&image.tokens, &text.tokens)?
            .to_dtype(candle_core::DType::F32)?)
    }
}
