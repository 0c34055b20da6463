//! Any CLIP model dfndr can evaluate, encode or export, from the command line's words:
//!
//! - `--checkpoint PATH`: a training checkpoint folder (`…/checkpoints/ckpt-SSSSSSSS`) or a
//!   training output folder (its newest checkpoint); the student's architecture comes from the
//!   run's `config.json`;
//! - `--model NAME|FILE.toml --weights PATH|hf-hub:ORG/NAME|random:SEED`: a student (the
//!   built-in `MobileCLIP2-S0`, or a student config file) or a teacher-style OpenCLIP model (a
//!   built-in architecture name such as `ViT-L-14-quickgelu`, or an architecture TOML).
//!   Student weights are OpenCLIP's or Apple's MobileCLIP2 files (safetensors or `.pt`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::device::Compute;
use dfndr_teachers::weights::{resolve_hub, StateDict};
use dfndr_teachers::{ArchSpec, ClipConfig, ClipModel, LoadedWeights, Resample, WeightsRef};

use crate::checkpoint;
use crate::error::{Result, TrainError};
use crate::eval::{ClipTowers, ImageTransform, Towers};
use crate::student::{Student, StudentConfig};

/// The student configs of `configs/students/`, in [`STUDENT_NAMES`]' order.
const STUDENT_FILES: [&str; 6] = [
    include_str!("../../configs/students/mobileclip2-s0.toml"),
    include_str!("../../configs/students/mobileclip2-s2.toml"),
    include_str!("../../configs/students/mobileclip2-s3.toml"),
    include_str!("../../configs/students/mobileclip2-s4.toml"),
    include_str!("../../configs/students/mobileclip2-b.toml"),
    include_str!("../../configs/students/mobileclip2-l-14.toml"),
];

/// Built-in student architectures by OpenCLIP's model name (case-insensitive).
pub fn builtin_student(name: &str) -> Option<StudentConfig> {
    STUDENT_NAMES
        .iter()
        .zip(STUDENT_FILES)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        // The embedded files are part of the build and parse (tested).
        .and_then(|(_, text)| toml::from_str(text).ok())
}

/// OpenCLIP's model name of a student with a built-in architecture (for result lines).
pub fn openclip_name(config: &StudentConfig) -> Option<String> {
    STUDENT_NAMES
        .iter()
        .find(|n| builtin_student(n).is_some_and(|b| b.vision.arch == config.vision.arch))
        .map(|n| n.to_string())
}

/// Names `--model` accepts for students.
pub const STUDENT_NAMES: [&str; 6] = [
    "MobileCLIP2-S0",
    "MobileCLIP2-S2",
    "MobileCLIP2-S3",
    "MobileCLIP2-S4",
    "MobileCLIP2-B",
    "MobileCLIP2-L-14",
];

/// Where a model comes from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A training checkpoint or training output folder.
    Checkpoint(PathBuf),
    /// An architecture and its weights.
    Spec {
        /// Student name or file, or teacher architecture name or file.
        model: String,
        /// `PATH`, `hf-hub:ORG/NAME` or `random:SEED`.
        weights: String,
    },
}

/// What a loaded model is.
pub enum Loaded {
    /// A MobileCLIP2 student (on the CPU).
    Student(Box<Student>),
    /// A teacher-style OpenCLIP model.
    Clip(Box<ClipTowers>),
}

/// A loaded model and how it is named in results.
pub struct LoadedModel {
    /// The architecture (clip_benchmark's `model`).
    pub label: String,
    /// The weights (clip_benchmark's `pretrained`).
    pub weights: String,
    /// sha256 of the weights file, where loading read it whole anyway (teacher-style models).
    pub weights_sha256: Option<String>,
    /// The model.
    pub model: Loaded,
}

impl LoadedModel {
    /// The model ready for inference only: a FastViT student reparameterised (faster, same
    /// outputs); anything else as it is.
    pub fn into_inference(self) -> Result<Self> {
        Ok(match self.model {
            Loaded::Student(s) => Self {
                model: Loaded::Student(Box::new(s.into_inference()?)),
                ..self
            },
            Loaded::Clip(_) => self,
        })
    }

    /// The model's towers, for evaluation and encoding.
    pub fn towers(&self) -> &dyn Towers {
        match &self.model {
            Loaded::Student(s) => s.as_ref(),
            Loaded::Clip(c) => c.as_ref(),
        }
    }

    /// The student, when it is one.
    pub fn student(&self) -> Option<&Student> {
        match &self.model {
            Loaded::Student(s) => Some(s),
            Loaded::Clip(_) => None,
        }
    }
}

/// The checkpoint folder and student config of `path` (a checkpoint folder or a training
/// output folder).
pub fn resolve_checkpoint(path: &Path) -> Result<(PathBuf, StudentConfig)> {
    let not_found = || {
        TrainError::Weights(format!(
            "{}: not a training checkpoint (a checkpoints/ckpt-SSSSSSSS folder holding {}) nor a \
             training output folder (holding checkpoints/); for a weights file give --model and \
             --weights instead",
            path.display(),
            checkpoint::MODEL_FILE
        ))
    };
    let (ckpt, run) = if path.join(checkpoint::MODEL_FILE).is_file() {
        let run = path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .ok_or_else(not_found)?;
        (path.to_path_buf(), run)
    } else if path.join("checkpoints").is_dir() {
        let ckpt = checkpoint::latest(&path.join("checkpoints"))?.ok_or_else(|| {
            TrainError::Weights(format!("{}: the run has no checkpoint yet", path.display()))
        })?;
        (ckpt, path.to_path_buf())
    } else {
        return Err(not_found());
    };
    let config_path = run.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        TrainError::Weights(format!(
            "{}: the run's config.json, which names the student, cannot be read: {e}",
            config_path.display()
        ))
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Weights(format!("{}: {e}", config_path.display())))?;
    let student: StudentConfig = serde_json::from_value(value["student"].clone()).map_err(|e| {
        TrainError::Weights(format!(
            "{}: no student config in it: {e}",
            config_path.display()
        ))
    })?;
    Ok((ckpt, student))
}

/// A student config from `--model`: a built-in name or a student TOML file.
pub fn student_config_of(model: &str) -> Result<Option<StudentConfig>> {
    if let Some(cfg) = builtin_student(model) {
        return Ok(Some(cfg));
    }
    let path = Path::new(model);
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| TrainError::Config(format!("{model}: {e}")))?;
    // A student config has `[vision] arch|fastvit`; a teacher architecture TOML does not
    // parse as one (unknown fields are refused).
    Ok(toml::from_str::<StudentConfig>(&text).ok())
}

/// Loads a student from its config and `weights` (a file or `random:SEED`).
pub fn load_student(config: &StudentConfig, weights: &WeightsRef) -> Result<Student> {
    let file = match weights {
        WeightsRef::Random(seed) => return Student::with_seed(config, *seed, &Device::Cpu),
        WeightsRef::Path(p) => p.clone(),
        WeightsRef::Hub(h) => resolve_hub(h).map_err(|e| TrainError::Weights(e.to_string()))?,
    };
    let state = StateDict::load(&file)
        .map_err(|e| TrainError::Weights(format!("{}: {e}", file.display())))?;
    // A reparameterised export (`dfndr export --reparameterize`, or timm's
    // `reparameterize_model` saved) loads into the fused form.
    let mut config = config.clone();
    config.vision.inference_mode |= state.tensors.keys().any(|k| k.contains(".reparam_conv."));
    let student = Student::for_loading(&config, &Device::Cpu)?;
    student
        .load(&state.tensors, true)
        .map_err(|e| TrainError::Weights(format!("{}: {e}", file.display())))?;
    Ok(student)
}

/// Loads the model `source` names; teacher-style models go to `compute` and get OpenCLIP's
/// default transform (bicubic, OpenAI's mean and std, the model's size).
pub fn load(source: &ModelSource, compute: &Compute) -> Result<LoadedModel> {
    match source {
        ModelSource::Checkpoint(path) => {
            let (ckpt, config) = resolve_checkpoint(path)?;
            let weights = WeightsRef::Path(ckpt.join(checkpoint::MODEL_FILE));
            let student = load_student(&config, &weights)?;
            Ok(LoadedModel {
                label: openclip_name(&config).unwrap_or_else(|| "student".into()),
                weights: ckpt.display().to_string(),
                weights_sha256: None,
                model: Loaded::Student(Box::new(student)),
            })
        }
        ModelSource::Spec { model, weights } => {
            let reference =
                WeightsRef::parse(weights).map_err(|e| TrainError::Weights(e.to_string()))?;
            if let Some(config) = student_config_of(model)? {
                let student = load_student(&config, &reference)?;
                return Ok(LoadedModel {
                    label: model.clone(),
                    weights: reference.to_string(),
                    weights_sha256: None,
                    model: Loaded::Student(Box::new(student)),
                });
            }
            let (cfg, label) = teacher_arch(model)?;
            let loaded =
                LoadedWeights::load(&reference).map_err(|e| TrainError::Weights(e.to_string()))?;
            let clip = ClipModel::load(&cfg, &loaded.source, compute, Kernels::Fused, &label)
                .map_err(|e| TrainError::Weights(e.to_string()))?;
            let transform = ImageTransform {
                size: cfg.vision.image_size,
                interpolation: Resample::Bicubic,
                mean: dfndr_augment::params::CLIP_MEAN,
                std: dfndr_augment::params::CLIP_STD,
            };
            Ok(LoadedModel {
                label,
                weights: reference.to_string(),
                weights_sha256: loaded.sha256.clone(),
                model: Loaded::Clip(Box::new(ClipTowers {
                    model: clip,
                    transform,
                    device: compute.device.clone(),
                })),
            })
        }
    }
}

/// A teacher architecture from a built-in name or a TOML file with its numbers.
pub fn teacher_arch(model: &str) -> Result<(ClipConfig, String)> {
    let path = Path::new(model);
    let spec = if model.ends_with(".toml") || path.is_file() {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::Config(format!("{model}: {e}")))?;
        let cfg: ClipConfig = toml::from_str(&text).map_err(|e| {
            TrainError::Config(format!(
                "{model} is neither a student config nor an architecture TOML: {e}"
            ))
        })?;
        ArchSpec::Explicit(Box::new(cfg))
    } else {
        ArchSpec::Named(model.to_string())
    };
    let cfg = spec.resolve().map_err(|e| {
        TrainError::Config(format!(
            "{e} (students: {}, or a student config file)",
            STUDENT_NAMES.join(", ")
        ))
    })?;
    let label = match &spec {
        ArchSpec::Named(n) => n.clone(),
        ArchSpec::Explicit(_) => spec.label(),
    };
    Ok((cfg, label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_student_parses_and_names_itself() {
        let cfg = builtin_student("MobileCLIP2-S0").unwrap();
        assert_eq!(cfg.vision.arch.as_deref(), Some("fastvit_mci0"));
        assert_eq!(cfg.embed_dim, 512);
        assert_eq!(cfg.preprocess.interpolation, Resample::Bilinear);
        assert!(builtin_student("MobileCLIP2-S9").is_none());
        for name in STUDENT_NAMES {
            let cfg = builtin_student(name).unwrap_or_else(|| panic!("{name} does not parse"));
            cfg.vision_tower().unwrap();
            assert_eq!(openclip_name(&cfg).as_deref(), Some(name));
        }
        assert_eq!(
            builtin_student("mobileclip2-l-14")
                .unwrap()
                .vision
                .arch
                .as_deref(),
            Some("vit_large_patch14_clip_224")
        );
    }

    #[test]
    fn a_folder_that_is_no_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a training checkpoint"), "{e}");
    }
}
