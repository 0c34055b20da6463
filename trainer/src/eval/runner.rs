//! One evaluation: a model's towers over a dataset, in batches (images decoded and transformed
//! in parallel), into clip_benchmark's metrics.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use dfndr_augment::decode::decode_rgb;
use dfndr_teachers::l2_normalize;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::classifier::zero_shot_classifier;
use super::data::{DataOptions, EvalData, EvalSample, Task};
use super::metrics;
use super::prompts::openai_imagenet_templates;
use super::towers::{text_embeddings, ImageTransform, Towers};
use crate::error::{Result, TrainError};

/// How to evaluate.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    /// Images (and prompts) encoded at a time.
    pub batch_size: usize,
    /// Class names overriding the dataset's.
    pub classnames: Option<Vec<String>>,
    /// Templates overriding the dataset's (default: OpenAI's 80 ImageNet templates).
    pub templates: Option<Vec<String>>,
    /// Retrieval's k values (clip_benchmark: 1, 5, 10).
    pub recall_ks: Vec<usize>,
    /// Images with more pixels are left out (decompression-bomb guard).
    pub max_pixels: u64,
    /// Stop after this many samples (quick looks; the metrics are then of a subset).
    pub limit: Option<u64>,
    /// How to read the dataset.
    pub data: DataOptions,
    /// The image transform, overriding the model's own.
    pub transform: Option<ImageTransform>,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            batch_size: 64,
            classnames: None,
            templates: None,
            recall_ks: vec![1, 5, 10],
            max_pixels: 89_478_485,
            limit: None,
            data: DataOptions::default(),
            transform: None,
        }
    }
}

/// The result of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Dataset name.
    pub dataset: String,
    /// clip_benchmark's task name.
    pub task: String,
    /// clip_benchmark's metric names and values (`acc5` is null with fewer than 5 classes).
    pub metrics: BTreeMap<String, Option<f64>>,
    /// Images evaluated.
    pub samples: u64,
    /// Captions evaluated (retrieval).
    pub captions: u64,
    /// Samples left out, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl EvalReport {
    /// The result as one JSON object: clip_benchmark's dump (`dataset`, `model`,
    /// `pretrained`, `task`, `metrics`, `language`) plus `samples`, `captions`, `skipped` and
    /// `seconds`, so clip_benchmark's aggregation reads it.
    pub fn result_line(&self, model: &str, pretrained: &str) -> serde_json::Value {
        serde_json::json!({
            "dataset": self.dataset,
            "model": model,
            "pretrained": pretrained,
            "task": self.task,
            "metrics": self.metrics,
            "language": "en",
            "samples": self.samples,
            "captions": self.captions,
            "skipped": self.skipped,
            "seconds": self.seconds,
        })
    }
}

/// What an evaluation reports while it runs.
pub trait EvalProgress {
    /// A phase begins (`prompts`, `images`), with its size when known.
    fn phase(&mut self, _name: &str, _total: Option<u64>) {}
    /// `n` more items of the phase are done.
    fn advance(&mut self, _n: u64) {}
}

/// Progress nobody looks at.
pub struct Quiet;
impl EvalProgress for Quiet {}

/// The transformed images of `batch` as one tensor, leaving out (and counting) those that do
/// not decode or are too large.
fn pixels(
    towers: &dyn Towers,
    transform: &ImageTransform,
    batch: &[EvalSample],
    max_pixels: u64,
    skipped: &mut BTreeMap<String, u64>,
) -> Result<(Tensor, Vec<usize>)> {
    let decoded: Vec<Option<Vec<f32>>> = batch
        .par_iter()
        .map(|s| match decode_rgb(&s.image, max_pixels) {
            Ok(img) => Some(transform.apply(&img)),
            Err(e) => {
                tracing::warn!(sample = %s.key, error = %e, "image left out: it does not decode");
                None
            }
        })
        .collect();
    let mut kept = Vec::with_capacity(batch.len());
    let mut values = Vec::with_capacity(batch.len() * 3 * transform.size * transform.size);
    for (i, d) in decoded.into_iter().enumerate() {
        match d {
            Some(v) => {
                kept.push(i);
                values.extend(v);
            }
            None => *skipped.entry("undecodable_image".into()).or_default() += 1,
        }
    }
    let n = kept.len();
    let t = Tensor::from_vec(
        values,
        (n, 3, transform.size, transform.size),
        &towers.device(),
    )?;
    Ok((t, kept))
}

/// Evaluates `towers` on `data`.
pub fn evaluate(
    towers: &dyn Towers,
    data: &EvalData,
    settings: &EvalSettings,
    progress: &mut dyn EvalProgress,
) -> Result<EvalReport> {
    let started = Instant::now();
    let batch_size = settings.batch_size.max(1);
    let transform = settings
        .transform
        .clone()
        .unwrap_or_else(|| towers.transform());
    let classifier = match &data.task {
        Task::Classification {
            classnames,
            templates,
        } => {
            let classnames = settings.classnames.as_ref().unwrap_or(classnames);
            let templates = settings
                .templates
                .clone()
                .or_else(|| templates.clone())
                .unwrap_or_else(openai_imagenet_templates);
            progress.phase("prompts", Some((classnames.len() * templates.len()) as u64));
            let mut last = 0;
            let w = zero_shot_classifier(towers, classnames, &templates, batch_size, &mut |n| {
                progress.advance((n - last) as u64);
                last = n;
            })?;
            Some((w.to_device(&towers.device())?, classnames.len()))
        }
        Task::Retrieval => None,
    };
    progress.phase(
        "images",
        data.total.map(|t| settings.limit.map_or(t, |l| l.min(t))),
    );

    let mut skipped_decode = BTreeMap::new();
    let mut logits: Vec<f32> = Vec::new();
    let mut labels: Vec<usize> = Vec::new();
    let mut image_emb: Vec<Tensor> = Vec::new();
    let mut captions: Vec<String> = Vec::new();
    let mut text_image: Vec<usize> = Vec::new();
    let mut images = 0usize;
    let mut seen = 0u64;
    let mut batch: Vec<EvalSample> = Vec::with_capacity(batch_size);
    let mut flush = |batch: &mut Vec<EvalSample>, progress: &mut dyn EvalProgress| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (px, kept) = pixels(
            towers,
            &transform,
            batch,
            settings.max_pixels,
            &mut skipped_decode,
        )?;
        if !kept.is_empty() {
            let emb = l2_normalize(&towers.encode_images(&px)?)?;
            match &classifier {
                Some((w, _)) => {
                    let l = (emb.matmul(w)? * 100.0)?.to_device(&Device::Cpu)?;
                    logits.extend(l.flatten_all()?.to_vec1::<f32>()?);
                    labels.extend(kept.iter().map(|&i| batch[i].label));
                }
                None => {
                    image_emb.push(emb.to_device(&Device::Cpu)?);
                    for &i in &kept {
                        for c in &batch[i].captions {
                            captions.push(c.clone());
                            text_image.push(images);
                        }
                        images += 1;
                    }
                }
            }
        }
        progress.advance(batch.len() as u64);
        batch.clear();
        Ok(())
    };
    let skipped_read = {
        let mut take = |s: EvalSample| -> Result<()> {
            if settings.limit.is_some_and(|l| seen >= l) {
                return Ok(());
            }
            seen += 1;
            batch.push(s);
            if batch.len() == batch_size {
                flush(&mut batch, progress)?;
            }
            Ok(())
        };
        data.for_each(&settings.data, &mut take)?
    };
    flush(&mut batch, progress)?;

    let mut skipped = skipped_read;
    for (k, v) in skipped_decode {
        *skipped.entry(k).or_default() += v;
    }
    let mut out = BTreeMap::new();
    let (samples, caption_count) = match &classifier {
        Some((_, classes)) => {
            if labels.is_empty() {
                return Err(TrainError::Data(format!(
                    "{}: no image could be evaluated (left out: {skipped:?})",
                    data.name
                )));
            }
            let m = metrics::classification(&logits, *classes, &labels)?;
            out.insert("acc1".to_string(), Some(m.acc1));
            out.insert("acc5".to_string(), m.acc5);
            out.insert(
                "mean_per_class_recall".to_string(),
                Some(m.mean_per_class_recall),
            );
            (labels.len() as u64, 0)
        }
        None => {
            if images == 0 || captions.is_empty() {
                return Err(TrainError::Data(format!(
                    "{}: no image with captions could be evaluated (left out: {skipped:?})",
                    data.name
                )));
            }
            progress.phase("captions", Some(captions.len() as u64));
            let mut last = 0;
            let texts = text_embeddings(towers, &captions, batch_size, &mut |n| {
                progress.advance((n - last) as u64);
                last = n;
            })?;
            let images_t = Tensor::cat(&image_emb, 0)?;
            let scores = texts.matmul(&images_t.t()?)?;
            let scores = scores.flatten_all()?.to_vec1::<f32>()?;
            let m = metrics::retrieval(&scores, images, &text_image, &settings.recall_ks)?;
            out.extend(m.into_iter().map(|(k, v)| (k, Some(v))));
            (images as u64, captions.len() as u64)
        }
    };
    Ok(EvalReport {
        dataset: data.name.clone(),
        task: data.task.name().to_string(),
        metrics: out,
        samples,
        captions: caption_count,
        skipped,
        seconds: started.elapsed().as_secs_f64(),
    })
}
