//! A MobileCLIP2 student: FastViT image tower, OpenCLIP text tower (always in its
//! differentiable form), learnable logit scale, with OpenCLIP's `CustomTextCLIP` key names.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use dfndr_teachers::arch::{TextConfig, VisionConfig as TeacherVision};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::text::TextTransformer;
use dfndr_teachers::ClipConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::fastvit::{FastVit, FastVitConfig};
use crate::init::SeededVarMap;
use crate::layers::{Builder, Mode, NormConfig};
use crate::recompute::Units;

/// Key prefix of the image tower inside an OpenCLIP MobileCLIP2 state dict.
pub const VISUAL_PREFIX: &str = "visual.trunk";
/// Key prefix of the text tower.
pub const TEXT_PREFIX: &str = "text";
/// Key of the learnable (log) logit scale.
pub const LOGIT_SCALE: &str = "logit_scale";

/// The image tower of a student.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentVision {
    /// Input side in pixels.
    pub image_size: usize,
    /// A timm architecture name (`fastvit_mci0`, `fastvit_mci1`, `fastvit_mci2`)…
    #[serde(default)]
    pub arch: Option<String>,
    /// …or explicit numbers (`num_classes` is the student's `embed_dim`).
    #[serde(default)]
    pub fastvit: Option<FastVitConfig>,
}

/// A student model's architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// Width of the joint embedding.
    pub embed_dim: usize,
    /// The image tower.
    pub vision: StudentVision,
    /// The text tower (OpenCLIP's `text_cfg` fields).
    pub text: TextConfig,
    /// BatchNorm settings of the image tower.
    #[serde(default)]
    pub norm: NormConfig,
    /// Input normalisation of the images.
    #[serde(default)]
    pub preprocess: Preprocess,
    /// Initial `logit_scale` (the log of the scale): OpenCLIP's ln(1/0.07).
    #[serde(default = "default_logit_scale")]
    pub init_logit_scale: f64,
}

/// How images are normalised for the student (`(x − mean) / std` on values in [0, 1]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Per-channel mean (default: OpenAI CLIP's; Apple's S0/S2/B release uses 0).
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation (default: OpenAI CLIP's; Apple's S0/S2/B release uses 1).
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Resize filter of the evaluation transform (default: bilinear, as OpenCLIP's
    /// MobileCLIP/MobileCLIP2 S0/S2/B configs; bicubic for L-14). Training views are replayed
    /// with the dataset's own augmentation settings.
    #[serde(default = "default_interpolation")]
    pub interpolation: dfndr_teachers::Resample,
}

fn default_interpolation() -> dfndr_teachers::Resample {
    dfndr_teachers::Resample::Bilinear
}

fn default_mean() -> [f32; 3] {
    dfndr_augment::params::CLIP_MEAN
}
fn default_std() -> [f32; 3] {
    dfndr_augment::params::CLIP_STD
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            mean: default_mean(),
            std: default_std(),
            interpolation: default_interpolation(),
        }
    }
}

fn default_logit_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}

impl StudentConfig {
    /// The image tower's numbers, with the CLIP width as its output.
    pub fn fastvit(&self) -> Result<FastVitConfig> {
        let v = &self.vision;
        let mut cfg = match (&v.arch, &v.fastvit) {
            (Some(name), None) => FastVitConfig::named(name, self.embed_dim).ok_or_else(|| {
                TrainError::Config(format!(
                    "vision.arch: unknown architecture {name:?} (known: fastvit_mci0, \
                     fastvit_mci1, fastvit_mci2)"
                ))
            })?,
            (None, Some(numbers)) => numbers.clone(),
            (Some(_), Some(_)) => {
                return Err(TrainError::Config(
                    "vision: give either arch or [vision.fastvit], not both".into(),
                ))
            }
            (None, None) => {
                return Err(TrainError::Config(
                    "vision: give arch (e.g. \"fastvit_mci0\") or [vision.fastvit]".into(),
                ))
            }
        };
        cfg.num_classes = self.embed_dim;
        cfg.validate()
            .map_err(|e| TrainError::Config(format!("vision.fastvit.{e}")))?;
        Ok(cfg)
    }

    /// The text tower as the teachers' CLIP config describes it (its vision part is unused).
    fn clip_config(&self) -> ClipConfig {
        ClipConfig {
            embed_dim: self.embed_dim,
            quick_gelu: false,
            custom_text: true,
            vision: TeacherVision {
                image_size: self.vision.image_size,
                patch_size: 1,
                width: 1,
                layers: 0,
                head_width: 1,
                mlp_ratio: 4.0,
                ls_init_value: None,
                pool_type: dfndr_teachers::arch::VisionPool::Avg,
                final_ln_after_pool: false,
                no_ln_pre: true,
                attentional_pool: false,
                attn_pooler_heads: 1,
                attn_pooler_queries: 1,
            },
            text: self.text.clone(),
        }
    }
}

/// A student with its parameters (trainable) and buffers (BatchNorm running statistics).
pub struct Student {
    config: StudentConfig,
    visual: FastVit,
    text: TextTransformer,
    logit_scale: Tensor,
    params: VarMap,
    buffers: VarMap,
    device: Device,
}

impl Student {
    /// A student with initial weights drawn from seed 0 on `device`.
    pub fn new(config: &StudentConfig, device: &Device) -> Result<Self> {
        Self::with_seed(config, 0, device)
    }

    /// A student with initial weights drawn from `seed` (the same seed, the same weights).
    pub fn with_seed(config: &StudentConfig, seed: u64, device: &Device) -> Result<Self> {
        let fastvit = config.fastvit()?;
        let params = VarMap::new();
        let buffers = VarMap::new();
        let vb = VarBuilder::from_backend(
            Box::new(SeededVarMap::new(params.clone(), seed)),
            DType::F32,
            device.clone(),
        );
        let b = Builder::new(vb.clone(), buffers.clone(), config.norm);
        let visual = FastVit::new(&b.pp(VISUAL_PREFIX), &fastvit)?;
        // Training needs the differentiable kernels: the fused ones would silently cut the
        // gradient. A student has no way to ask for anything else.
        let text = TextTransformer::new(
            vb.pp(TEXT_PREFIX),
            &config.clip_config(),
            Kernels::Differentiable,
        )?;
        let logit_scale =
            vb.get_with_hints((), LOGIT_SCALE, Init::Const(config.init_logit_scale))?;
        Ok(Self {
            config: config.clone(),
            visual,
            text,
            logit_scale,
            params,
            buffers,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &StudentConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Unnormalised image embeddings `[B, embed_dim]` of `[B, 3, S, S]` images.
    pub fn encode_image(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.visual.forward(images, mode)?)
    }

    /// Unnormalised text embeddings `[B, embed_dim]` of token rows of equal length.
    pub fn encode_text(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        Ok(self.text.forward_with_tokens(ids)?.pooled)
    }

    /// The image tower as units for activation recomputation (see [`crate::recompute`]).
    pub fn image_units(&self) -> Units<'_> {
        Units::new(self.visual.units(), move |i, x, mode| {
            Ok(self.visual.forward_unit(i, x, mode)?)
        })
    }

    /// The text tower over the token rows `ids` as units: the embedding (its input is
    /// ignored), each residual block, then `ln_final`, pooling and projection.
    pub fn text_units<'a>(&'a self, ids: &'a [Vec<u32>]) -> Result<Units<'a>> {
        let mask = self.text.embed(ids)?.mask;
        let blocks = self.text.transformer().blocks();
        let n = blocks.len();
        Ok(Units::new(n + 2, move |i, x, _mode| {
            Ok(if i == 0 {
                self.text.embed(ids)?.x
            } else if i <= n {
                blocks[i - 1].forward(x, mask.as_ref())?
            } else {
                self.text.finish(x, ids)?.pooled
            })
        }))
    }

    /// The raw (log) logit scale, shape `[]`.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// Context length of the text tower.
    pub fn context_length(&self) -> usize {
        self.text.context_length()
    }

    /// Trainable parameters by state-dict key, sorted.
    pub fn parameters(&self) -> Result<Vec<(String, Var)>> {
        sorted_vars(&self.params)
    }

    /// BatchNorm running statistics by state-dict key, sorted.
    pub fn buffers(&self) -> Result<Vec<(String, Var)>> {
        sorted_vars(&self.buffers)
    }

    /// Every tensor of the state dict (parameters and buffers) by OpenCLIP's key names.
    pub fn state_dict(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, var) in self.parameters()?.into_iter().chain(self.buffers()?) {
            out.insert(name, var.as_tensor().copy()?);
        }
        Ok(out)
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> Result<usize> {
        Ok(self
            .parameters()?
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum())
    }

    /// Sets every parameter and buffer from `tensors` (OpenCLIP key names). Keys the model
    /// has but `tensors` lacks, keys with another shape, and (when `strict`) keys the model
    /// does not know are errors that list them; `num_batches_tracked` counters are ignored.
    pub fn load(&self, tensors: &HashMap<String, Tensor>, strict: bool) -> Result<LoadReport> {
        let mut report = LoadReport::default();
        let mut known = std::collections::HashSet::new();
        for (name, var) in self.parameters()?.into_iter().chain(self.buffers()?) {
            known.insert(name.clone());
            match tensors.get(&name) {
                None => report.missing.push(name),
                Some(t) if t.dims() != var.as_tensor().dims() => report.mismatched.push(format!(
                    "{name}: checkpoint {:?}, model {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                )),
                Some(t) => {
                    var.set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
                    report.loaded += 1;
                }
            }
        }
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|k| !known.contains(*k) && !k.ends_with("num_batches_tracked"))
            .cloned()
            .collect();
        unexpected.sort();
        report.unexpected = unexpected;
        if !report.missing.is_empty()
            || !report.mismatched.is_empty()
            || (strict && !report.unexpected.is_empty())
        {
            return Err(TrainError::Weights(report.describe()));
        }
        Ok(report)
    }
}

/// What [`Student::load`] matched.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Tensors set.
    pub loaded: usize,
    /// Model keys absent from the checkpoint.
    pub missing: Vec<String>,
    /// Keys whose shapes differ.
    pub mismatched: Vec<String>,
    /// Checkpoint keys the model does not have.
    pub unexpected: Vec<String>,
}

impl LoadReport {
    fn describe(&self) -> String {
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(8).map(String::as_str).collect();
            let more = v.len().saturating_sub(8);
            if more > 0 {
                format!("{} (and {more} more)", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} missing: {}",
                self.missing.len(),
                list(&self.missing)
            ));
        }
        if !self.mismatched.is_empty() {
            parts.push(format!(
                "{} with another shape: {}",
                self.mismatched.len(),
                list(&self.mismatched)
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected: {}",
                self.unexpected.len(),
                list(&self.unexpected)
            ));
        }
        format!(
            "the checkpoint does not fit the student: {}",
            parts.join("; ")
        )
    }
}

fn sorted_vars(map: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = map
        .data()
        .lock()
        .map_err(|_| TrainError::Internal("a variable map's lock was poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}
