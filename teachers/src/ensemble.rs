//! Teacher ensembles: several CLIP models whose normalised embeddings are concatenated.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::arch::{ArchSpec, ClipConfig};
use crate::blocks::Kernels;
use crate::clip::{l2_normalize, ClipModel};
use crate::device::Compute;
use crate::error::{Result, TeacherError};
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadedWeights, WeightsRef};

/// OpenAI CLIP normalisation, the default of every teacher here.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP normalisation standard deviation (digits as published).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Resampling filter of a teacher's resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    /// PIL bicubic (OpenCLIP's default).
    Bicubic,
    /// PIL bilinear (MobileCLIP S0/S2/B).
    Bilinear,
}

/// A teacher's image preprocessing: resize the shorter side, centre crop, normalise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Output side; defaults to the architecture's image size.
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Resampling filter.
    #[serde(default = "default_resample")]
    pub interpolation: Resample,
    /// Per-channel mean subtracted after scaling to [0, 1].
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    #[serde(default = "default_std")]
    pub std: [f32; 3],
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            image_size: None,
            interpolation: default_resample(),
            mean: default_mean(),
            std: default_std(),
        }
    }
}

fn default_resample() -> Resample {
    Resample::Bicubic
}
fn default_mean() -> [f32; 3] {
    CLIP_MEAN
}
fn default_std() -> [f32; 3] {
    CLIP_STD
}

/// One teacher as configured (`[[teachers]]` in a job TOML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// Short name recorded in the shard metadata (e.g. `dfn2b`).
    pub name: String,
    /// Built-in OpenCLIP name (`ViT-L-14-quickgelu`) or explicit numbers.
    pub arch: ArchSpec,
    /// `PATH`, `hf-hub:ORG/NAME` or `random:SEED`.
    pub weights: String,
    /// Logit scale recorded for the distillation loss (MobileCLIP2: 70 and 60). Defaults to
    /// `exp` of the checkpoint's learned logit scale.
    #[serde(default)]
    pub logit_scale: Option<f32>,
    /// Image preprocessing.
    #[serde(default)]
    pub preprocess: Preprocess,
}

/// A loaded teacher.
#[derive(Debug)]
pub struct Teacher {
    /// Its configuration.
    pub config: TeacherConfig,
    /// The resolved architecture.
    pub arch: ClipConfig,
    /// The model.
    pub model: ClipModel,
    /// sha256 of the weights file, or `random:SEED`.
    pub weights_id: String,
    /// Logit scale recorded in the metadata.
    pub logit_scale: f32,
    /// True for `random:SEED` weights (demos and tests only).
    pub random_weights: bool,
}

impl Teacher {
    /// Resolves the architecture, reads the weights and builds the model on `compute`.
    pub fn load(config: &TeacherConfig, compute: &Compute) -> Result<Self> {
        let arch = config.arch.resolve()?;
        let reference = WeightsRef::parse(&config.weights)?;
        let weights = LoadedWeights::load(&reference)?;
        let label = config.arch.label();
        let model = ClipModel::load(&arch, &weights.source, compute, Kernels::Fused, &label)?;
        let logit_scale = match config.logit_scale {
            Some(s) => s,
            None => model.logit_scale_log()?.exp(),
        };
        if !(logit_scale.is_finite() && logit_scale > 0.0) {
            return Err(TeacherError::Input(format!(
                "teacher {}: logit scale {logit_scale} is not a positive number",
                config.name
            )));
        }
        let random_weights = matches!(reference, WeightsRef::Random(_));
        Ok(Self {
            config: config.clone(),
            arch,
            model,
            weights_id: weights.sha256.unwrap_or_else(|| reference.to_string()),
            logit_scale,
            random_weights,
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.arch.embed_dim
    }

    /// Side of the images this teacher takes.
    pub fn image_size(&self) -> usize {
        self.config
            .preprocess
            .image_size
            .unwrap_or(self.arch.vision.image_size)
    }

    /// Normalised image embeddings of preprocessed images `[B, 3, S, S]`, one row per image.
    pub fn embed_images(&self, images: &Tensor) -> Result<Vec<Vec<f32>>> {
        let emb = l2_normalize(&self.model.encode_image(images)?)?;
        Ok(emb.to_vec2::<f32>()?)
    }

    /// Normalised text embeddings, one row per text (tokenised with this teacher's context).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids = Tokenizer::global().tokenize_batch(texts, self.arch.text.context_length);
        let emb = l2_normalize(&self.model.encode_text(&ids)?)?;
        Ok(emb.to_vec2::<f32>()?)
    }
}

/// Teachers whose normalised embeddings are concatenated in order.
#[derive(Debug)]
pub struct Ensemble {
    /// The teachers, in concatenation order.
    pub teachers: Vec<Teacher>,
}

impl Ensemble {
    /// Loads every teacher.
    pub fn load(configs: &[TeacherConfig], compute: &Compute) -> Result<Self> {
        if configs.is_empty() {
            return Err(TeacherError::Input(
                "an ensemble needs at least one teacher".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in configs {
            if !seen.insert(c.name.as_str()) {
                return Err(TeacherError::Input(format!(
                    "teacher name {:?} is used twice",
                    c.name
                )));
            }
        }
        let teachers = configs
            .iter()
            .map(|c| Teacher::load(c, compute))
            .collect::<Result<_>>()?;
        Ok(Self { teachers })
    }

    /// Sum of the teachers' dimensions.
    pub fn dim(&self) -> usize {
        self.teachers.iter().map(Teacher::dim).sum()
    }

    /// Concatenated text embeddings, one row of [`Ensemble::dim`] values per text.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let per_teacher = self
            .teachers
            .iter()
            .map(|t| t.embed_texts(texts))
            .collect::<Result<Vec<_>>>()?;
        Ok(concat_rows(per_teacher, texts.len()))
    }

    /// Concatenated image embeddings of `n` images; `images` gives each teacher its
    /// preprocessed batch `[n, 3, S, S]`.
    pub fn embed_images(
        &self,
        n: usize,
        mut images: impl FnMut(&Teacher) -> Result<Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let mut per_teacher = Vec::with_capacity(self.teachers.len());
        for t in &self.teachers {
            let batch = images(t)?;
            if batch.dim(0)? != n {
                return Err(TeacherError::Input(format!(
                    "teacher {} got {} images, expected {n}",
                    t.config.name,
                    batch.dim(0)?
                )));
            }
            per_teacher.push(t.embed_images(&batch)?);
        }
        Ok(concat_rows(per_teacher, n))
    }
}

/// Row-wise concatenation of per-teacher embedding rows.
fn concat_rows(per_teacher: Vec<Vec<Vec<f32>>>, n: usize) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); n];
    for teacher_rows in per_teacher {
        for (row, part) in rows.iter_mut().zip(teacher_rows) {
            row.extend(part);
        }
    }
    rows
}
