//! The model options shared by `dfndr encode`, `dfndr eval` and `dfndr export`.

use std::path::PathBuf;

use anyhow::Result;
use dfndr_teachers::Resample;
use dfndr_trainer::eval::ImageTransform;
use dfndr_trainer::models::ModelSource;

use crate::exit::usage;

/// Resize filter choices.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Interp {
    Bicubic,
    Bilinear,
}

/// Which model, where it runs and how its images are prepared.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A training checkpoint folder (OUT/checkpoints/ckpt-SSSSSSSS) or a training output folder
    /// (its newest checkpoint); the student's architecture comes from the run's config.json.
    #[arg(long, conflicts_with_all = ["model", "weights"])]
    pub checkpoint: Option<PathBuf>,
    /// A student (MobileCLIP2-S0, or a student config such as configs/students/tiny.toml) or
    /// an OpenCLIP architecture (ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, each also with
    /// -quickgelu, or a TOML file with explicit numbers).
    #[arg(long, requires = "weights")]
    pub model: Option<String>,
    /// Weights of --model: a .safetensors/.bin/.pt file (OpenCLIP's or Apple's, e.g.
    /// mobileclip2_s0.pt), hf-hub:ORG/NAME, or random:SEED.
    #[arg(long, requires = "model")]
    pub weights: Option<String>,
    /// Compute device of OpenCLIP architectures: cpu, cuda or cuda:N (students run on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: auto (bf16 on a GPU, f32 on the CPU), f32 or bf16. Embeddings are
    /// returned as float32 either way.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Resize filter of the image preprocessing (default: the model's; bicubic for OpenCLIP
    /// architectures, the student config's for students).
    #[arg(long, value_enum)]
    pub interpolation: Option<Interp>,
    /// Normalisation mean, three comma-separated values (default: the model's; OpenAI CLIP's
    /// for OpenCLIP architectures).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    pub mean: Option<Vec<f32>>,
    /// Normalisation std, three comma-separated values (default: the model's).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    pub std: Option<Vec<f32>>,
}

fn triple(what: &str, v: &[f32]) -> Result<[f32; 3]> {
    match v {
        [a, b, c] if [a, b, c].iter().all(|x| x.is_finite()) => Ok([*a, *b, *c]),
        _ => Err(usage(format!(
            "--{what} needs three finite numbers, got {v:?}"
        ))),
    }
}

impl ModelArgs {
    /// Where the model comes from.
    pub fn source(&self) -> Result<ModelSource> {
        match (&self.checkpoint, &self.model, &self.weights) {
            (Some(c), _, _) => Ok(ModelSource::Checkpoint(c.clone())),
            (None, Some(m), Some(w)) => Ok(ModelSource::Spec {
                model: m.clone(),
                weights: w.clone(),
            }),
            _ => Err(usage(
                "which model? give --checkpoint PATH, or --model NAME --weights FILE",
            )),
        }
    }

    /// `base` (the model's own transform) with the options given on the command line.
    pub fn apply(&self, base: ImageTransform) -> Result<ImageTransform> {
        Ok(ImageTransform {
            size: base.size,
            interpolation: match self.interpolation {
                Some(Interp::Bilinear) => Resample::Bilinear,
                Some(Interp::Bicubic) => Resample::Bicubic,
                None => base.interpolation,
            },
            mean: match &self.mean {
                Some(m) => triple("mean", m)?,
                None => base.mean,
            },
            std: match &self.std {
                Some(s) => triple("std", s)?,
                None => base.std,
            },
        })
    }
}
