//! A configured captioner: architecture, weights, decoding settings and caption count, as a
//! `[[captioners]]` entry of a job config describes it.

use candle_core::Tensor;
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::device::Compute;
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::{LoadedWeights, Preprocess, WeightsRef};
use serde::{Deserialize, Serialize};

use crate::arch::{CocaArch, CocaConfig};
use crate::clean::caption_text;
use crate::error::{CaptionError, Result};
use crate::generate::{generate, RowRequest, SpecialTokens};
use crate::model::CocaModel;
use crate::rng::CaptionRng;
use crate::sampling::GenerationConfig;

/// One captioner as configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionerConfig {
    /// Column suffix: captions go to `syn_text_TAG` (`[a-z0-9_]`, not ending in `_emb`).
    pub tag: String,
    /// Built-in OpenCLIP name (`coca_ViT-L-14`) or explicit numbers.
    pub arch: CocaArch,
    /// `PATH`, `hf-hub:ORG/NAME` or `random:SEED`.
    pub weights: String,
    /// Captions per image (MobileCLIP2: 5).
    #[serde(default = "default_num_captions")]
    pub num_captions: usize,
    /// Keep `open_clip.decode`'s raw text instead of RayGen's cleaned caption.
    #[serde(default)]
    pub raw: bool,
    /// Decoding settings.
    #[serde(default)]
    pub generation: GenerationConfig,
    /// Image preprocessing (OpenCLIP's eval transform: shorter side to 224 bicubic, centre
    /// crop, OpenAI mean/std).
    #[serde(default)]
    pub preprocess: Preprocess,
}

fn default_num_captions() -> usize {
    5
}

impl CaptionerConfig {
    /// Checks the tag and the numbers without reading any weights.
    pub fn validate(&self) -> Result<CocaConfig> {
        let tag_ok = !self.tag.is_empty()
            && !self.tag.ends_with("_emb")
            && self
                .tag
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !tag_ok {
            return Err(CaptionError::InvalidGeneration(format!(
                "captioner tag {:?} must be non-empty lowercase letters, digits or '_' and not end in \"_emb\" (it names the column syn_text_TAG)",
                self.tag
            )));
        }
        if self.num_captions == 0 {
            return Err(CaptionError::InvalidGeneration(format!(
                "captioner {}: num_captions must be at least 1",
                self.tag
            )));
        }
        let arch = self.arch.resolve()?;
        let context = arch.text.context_length.min(arch.multimodal.context_length);
        self.generation.validate(context)?;
        Ok(arch)
    }
}

/// A loaded captioner.
#[derive(Debug)]
pub struct Captioner {
    /// Its configuration.
    pub config: CaptionerConfig,
    /// The model.
    pub model: CocaModel,
    /// sha256 of the weights file, or `random:SEED`.
    pub weights_id: String,
    /// True for `random:SEED` weights (demos and tests only).
    pub random_weights: bool,
}

impl Captioner {
    /// Resolves the architecture, reads the weights and builds the model on `compute`.
    pub fn load(config: &CaptionerConfig, compute: &Compute) -> Result<Self> {
        let arch = config.validate()?;
        let reference = WeightsRef::parse(&config.weights)?;
        let weights = LoadedWeights::load(&reference)?;
        let model = CocaModel::load(
            &arch,
            &weights.source,
            compute,
            Kernels::Fused,
            &config.arch.label(),
        )?;
        Ok(Self {
            config: config.clone(),
            model,
            weights_id: weights.sha256.unwrap_or_else(|| reference.to_string()),
            random_weights: matches!(reference, WeightsRef::Random(_)),
        })
    }

    /// Side of the images this captioner takes.
    pub fn image_size(&self) -> usize {
        self.config
            .preprocess
            .image_size
            .unwrap_or(self.model.image_size())
    }

    /// Token rows of `num_captions` captions per image of preprocessed `images [B, 3, S, S]`;
    /// caption `c` of image `i` is seeded by (`seed`, tag, `keys[i]`, `c`).
    pub fn caption_ids(
        &self,
        images: &Tensor,
        keys: &[&str],
        seed: u64,
    ) -> Result<Vec<Vec<Vec<u32>>>> {
        let b = images.dim(0)?;
        if keys.len() != b {
            return Err(CaptionError::Input(format!(
                "{} keys for {b} images",
                keys.len()
            )));
        }
        if b == 0 {
            return Ok(Vec::new());
        }
        let n = self.config.num_captions;
        let context = self.model.encode_image(images)?;
        let mut rows: Vec<RowRequest> = keys
            .iter()
            .enumerate()
            .flat_map(|(i, key)| {
                (0..n).map(move |c| RowRequest {
                    image: i,
                    rng: CaptionRng::for_caption(seed, &self.config.tag, key, c as u32),
                })
            })
            .collect();
        let ids = generate(
            &self.model,
            &context,
            &mut rows,
            &self.config.generation,
            SpecialTokens::default(),
        )?;
        Ok(ids.chunks(n).map(<[Vec<u32>]>::to_vec).collect())
    }

    /// `num_captions` cleaned (or raw) captions per image.
    pub fn caption(&self, images: &Tensor, keys: &[&str], seed: u64) -> Result<Vec<Vec<String>>> {
        let tokenizer = Tokenizer::global();
        Ok(self
            .caption_ids(images, keys, seed)?
            .into_iter()
            .map(|rows| {
                rows.iter()
                    .map(|ids| caption_text(tokenizer, ids, self.config.raw))
                    .collect()
            })
            .collect())
    }
}
