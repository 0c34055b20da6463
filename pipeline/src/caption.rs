//! The caption stage: synthetic captions of every kept sample from each configured CoCa
//! captioner (`[[captioners]]`), batched across samples.

use anyhow::{bail, Context, Result};
use dfndr_augment::rgb::RgbImage;
use dfndr_captioner::{Captioner, CaptionerConfig};
use dfndr_shards::format::{CaptionerInfo, SynLayout};
use dfndr_teachers::device::Compute;
use dfndr_teachers::Tensor;
use serde::{Deserialize, Serialize};

use crate::embed::preprocess_image;

/// `[caption]`: how the caption stage runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionSection {
    /// Images decoded together; each brings `num_captions` rows to the decoder, and the
    /// key/value caches take about `2 · layers · width · seq_len · 4` bytes per row
    /// (coca_ViT-L-14, seq_len 30: 4.4 MB per caption; half that in bf16 on a GPU, where
    /// they live in GPU memory).
    pub batch_size: usize,
    /// Compute device: "cpu", "cuda" or "cuda:N" (CUDA needs a `--features cuda` build).
    pub device: String,
    /// Compute precision of the captioners: "auto" (bf16 on a GPU, f32 on the CPU), "f32" or
    /// "bf16" (see `embed.precision`).
    pub precision: String,
}

impl Default for CaptionSection {
    fn default() -> Self {
        Self {
            batch_size: 16,
            device: "cpu".into(),
            precision: "auto".into(),
        }
    }
}

/// The loaded captioners and their settings.
pub struct CaptionStage {
    /// The captioners, in column order.
    pub captioners: Vec<Captioner>,
    compute: Compute,
    batch_size: usize,
    seed: u64,
}

impl CaptionStage {
    /// Loads every captioner (says loudly when weights are random).
    pub fn load(
        configs: &[CaptionerConfig],
        section: &CaptionSection,
        device_override: Option<&str>,
        seed: u64,
    ) -> Result<Self> {
        let spec = device_override.unwrap_or(&section.device);
        let compute = Compute::parse(spec, &section.precision)?;
        let started = std::time::Instant::now();
        let mut captioners = Vec::with_capacity(configs.len());
        for c in configs {
            let captioner = Captioner::load(c, &compute)
                .with_context(|| format!("cannot load captioner {}", c.tag))?;
            if captioner.random_weights {
                tracing::warn!(
                    captioner = %c.tag,
                    weights = %c.weights,
                    "RANDOM captioner weights: captions are gibberish (for demos and tests only)"
                );
            }
            if c.generation.strategy == dfndr_captioner::Strategy::BeamSearch && c.num_captions > 1
            {
                tracing::warn!(
                    captioner = %c.tag,
                    "beam search is deterministic: the {} captions of an image will be identical",
                    c.num_captions
                );
            }
            tracing::info!(
                captioner = %c.tag,
                arch = %c.arch.label(),
                captions = c.num_captions,
                weights = %captioner.weights_id,
                "captioner loaded"
            );
            captioners.push(captioner);
        }
        tracing::info!(
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            compute = %compute.describe(),
            "captioners ready"
        );
        Ok(Self {
            captioners,
            compute,
            batch_size: section.batch_size.max(1),
            seed,
        })
    }

    /// The synthetic-caption columns, in order; `with_emb` when teachers embed them.
    pub fn syn_layouts(&self, with_emb: bool) -> Vec<SynLayout> {
        self.captioners
            .iter()
            .map(|c| SynLayout {
                tag: c.config.tag.clone(),
                with_emb,
            })
            .collect()
    }

    /// The captioners as recorded in the shard metadata.
    pub fn infos(&self) -> Vec<CaptionerInfo> {
        infos(&self.captioners)
    }

    /// Each captioner's input for one decoded image (its eval preprocessing, CHW floats); run
    /// in the decoding pool so the model stage gets ready tensors.
    pub fn prepare(&self, img: &RgbImage) -> Vec<Vec<f32>> {
        self.captioners
            .iter()
            .map(|c| preprocess_image(img, &c.config.preprocess, c.image_size()))
            .collect()
    }

    /// Captions of a batch: per captioner, per sample, its `num_captions` texts. `inputs[s]`
    /// is [`CaptionStage::prepare`] of sample `s`.
    pub fn caption_batch(
        &self,
        keys: &[&str],
        inputs: &[&[Vec<f32>]],
    ) -> Result<Vec<Vec<Vec<String>>>> {
        if keys.len() != inputs.len() {
            bail!("{} keys for {} prepared images", keys.len(), inputs.len());
        }
        let mut out = Vec::with_capacity(self.captioners.len());
        for (ci, c) in self.captioners.iter().enumerate() {
            let size = c.image_size();
            let mut per_sample = Vec::with_capacity(keys.len());
            for (chunk_keys, chunk) in keys
                .chunks(self.batch_size)
                .zip(inputs.chunks(self.batch_size))
            {
                let data: Vec<f32> = chunk.iter().flat_map(|p| p[ci].iter().copied()).collect();
                let images =
                    Tensor::from_vec(data, (chunk.len(), 3, size, size), &self.compute.device)?;
                per_sample.extend(
                    c.caption(&images, chunk_keys, self.seed)
                        .with_context(|| format!("captioner {}", c.config.tag))?,
                );
            }
            out.push(per_sample);
        }
        Ok(out)
    }
}

/// Metadata records of loaded captioners.
pub fn infos(captioners: &[Captioner]) -> Vec<CaptionerInfo> {
    captioners
        .iter()
        .map(|c| config_info(&c.config, &c.weights_id))
        .collect()
}

/// The metadata record of a configured captioner whose weights are identified by `weights_id`.
pub fn config_info(config: &CaptionerConfig, weights_id: &str) -> CaptionerInfo {
    CaptionerInfo {
        tag: config.tag.clone(),
        model: config.arch.label(),
        weights_sha256: weights_id.to_string(),
        decoding: as_read_back(serde_json::json!({
            "num_captions": config.num_captions,
            "raw": config.raw,
            "generation": config.generation,
            "preprocess": config.preprocess,
        })),
    }
}

/// `value` as a reader of the shard metadata will see it: through its JSON text, whose float
/// parsing may differ from the in-memory value in the last bit, so that records compare
/// equal to what earlier runs wrote.
fn as_read_back(value: serde_json::Value) -> serde_json::Value {
    serde_json::to_string(&value)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(value)
}

/// Checks a `[[captioners]]` list before any shard is touched.
pub fn validate_captioners(captioners: &[CaptionerConfig]) -> Result<()> {
    let mut tags = std::collections::BTreeSet::new();
    for c in captioners {
        if !tags.insert(c.tag.as_str()) {
            bail!("captioner tag {:?} is used twice", c.tag);
        }
        c.validate()
            .with_context(|| format!("captioner {}", c.tag))?;
        dfndr_teachers::WeightsRef::parse(&c.weights)
            .with_context(|| format!("captioner {}", c.tag))?;
    }
    Ok(())
}
