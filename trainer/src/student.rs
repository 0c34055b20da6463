//! A MobileCLIP2 student: FastViT or ViT image tower, OpenCLIP text tower (built with the
//! differentiable kernels; evaluation runs its blocks with the inference kernels), learnable
//! logit scale, with OpenCLIP's `CustomTextCLIP` key names.

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
use crate::vit::{Vit, VitConfig};

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
    /// A timm architecture name (one of [`IMAGE_ARCHS`])…
    #[serde(default)]
    pub arch: Option<String>,
    /// …or the numbers of a FastViT (`num_classes` is the student's `embed_dim`)…
    #[serde(default)]
    pub fastvit: Option<FastVitConfig>,
    /// …or of a ViT.
    #[serde(default)]
    pub vit: Option<VitConfig>,
    /// The reparameterised form (timm's `inference_mode`): each re-parameterisable FastViT
    /// layer is one convolution (`reparam_conv`). It evaluates the same as the branched form,
    /// faster, and cannot train. Set when loading a fused weights file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inference_mode: bool,
}

/// The timm image towers a student config can name in `vision.arch`.
pub const IMAGE_ARCHS: [&str; 7] = [
    "fastvit_mci0",
    "fastvit_mci1",
    "fastvit_mci2",
    "fastvit_mci3",
    "fastvit_mci4",
    "vit_base_mci_224",
    "vit_large_patch14_clip_224",
];

/// The numbers of a student's image tower.
#[derive(Clone, Debug, PartialEq)]
pub enum VisionTower {
    /// A FastViT (MobileCLIP2-S0 to S4).
    FastVit(FastVitConfig),
    /// A ViT (MobileCLIP2-B, L-14).
    Vit(VitConfig),
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
    pub fn vision_tower(&self) -> Result<VisionTower> {
        let v = &self.vision;
        let given = usize::from(v.arch.is_some())
            + usize::from(v.fastvit.is_some())
            + usize::from(v.vit.is_some());
        if given != 1 {
            return Err(TrainError::Config(format!(
                "vision: give exactly one of arch (e.g. \"fastvit_mci0\"), [vision.fastvit] or \
                 [vision.vit]; found {given}"
            )));
        }
        let embed = self.embed_dim;
        let tower = if let Some(name) = &v.arch {
            if let Some(cfg) = FastVitConfig::named(name, embed) {
                VisionTower::FastVit(cfg)
            } else if let Some(cfg) = VitConfig::named(name, embed) {
                VisionTower::Vit(cfg)
            } else {
                return Err(TrainError::Config(format!(
                    "vision.arch: unknown architecture {name:?} (known: {})",
                    IMAGE_ARCHS.join(", ")
                )));
            }
        } else if let Some(cfg) = &v.fastvit {
            VisionTower::FastVit(FastVitConfig {
                num_classes: embed,
                ..cfg.clone()
            })
        } else if let Some(cfg) = &v.vit {
            VisionTower::Vit(VitConfig {
                num_classes: embed,
                ..cfg.clone()
            })
        } else {
            unreachable!("exactly one of the three is set")
        };
        match &tower {
            VisionTower::FastVit(cfg) => cfg
                .validate()
                .map_err(|e| TrainError::Config(format!("vision.fastvit.{e}")))?,
            VisionTower::Vit(cfg) => cfg
                .validate(v.image_size)
                .map_err(|e| TrainError::Config(format!("vision.vit: {e}")))?,
        }
        Ok(tower)
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

/// A student's image tower.
#[derive(Clone, Debug)]
enum ImageTower {
    FastVit(Box<FastVit>),
    Vit(Box<Vit>),
}

impl ImageTower {
    fn units(&self) -> usize {
        match self {
            ImageTower::FastVit(t) => t.units(),
            ImageTower::Vit(t) => t.units(),
        }
    }

    fn forward_unit(&self, i: usize, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        match self {
            ImageTower::FastVit(t) => t.forward_unit(i, x, mode),
            ImageTower::Vit(t) => t.forward_unit(i, x, mode),
        }
    }

    fn forward(&self, images: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        match self {
            ImageTower::FastVit(t) => t.forward(images, mode),
            ImageTower::Vit(t) => t.forward(images, mode),
        }
    }
}

/// A student with its parameters (trainable) and buffers (BatchNorm running statistics).
pub struct Student {
    config: StudentConfig,
    visual: ImageTower,
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
        Self::build(config, Some(seed), device)
    }

    /// A student whose weights are zeros, to be set by [`Student::load`] (no time spent
    /// drawing initial values that are overwritten at once).
    pub fn for_loading(config: &StudentConfig, device: &Device) -> Result<Self> {
        Self::build(config, None, device)
    }

    fn build(config: &StudentConfig, seed: Option<u64>, device: &Device) -> Result<Self> {
        let tower = config.vision_tower()?;
        let params = VarMap::new();
        let buffers = VarMap::new();
        let backend = match seed {
            Some(seed) => SeededVarMap::new(params.clone(), seed),
            None => SeededVarMap::zeros(params.clone()),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        let b = Builder::new(vb.clone(), buffers.clone(), config.norm)
            .with_inference_mode(config.vision.inference_mode);
        let vb_visual = b.pp(VISUAL_PREFIX);
        let visual = match &tower {
            VisionTower::FastVit(cfg) => {
                ImageTower::FastVit(Box::new(FastVit::new(&vb_visual, cfg)?))
            }
            VisionTower::Vit(cfg) => ImageTower::Vit(Box::new(Vit::new(
                &vb_visual,
                cfg,
                config.vision.image_size,
            )?)),
        };
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

    /// The student in its reparameterised form (see [`crate::fastvit::reparam`]): the same
    /// evaluation outputs from fewer, larger convolutions. Students without re-parameterisable
    /// layers (ViT towers) and students already fused come back as they are.
    pub fn into_inference(self) -> Result<Student> {
        let ImageTower::FastVit(fastvit) = &self.visual else {
            return Ok(self);
        };
        if self.config.vision.inference_mode {
            return Ok(self);
        }
        // The weights as they are (no copies): `load` copies them into the fused student.
        let mut state = BTreeMap::new();
        for (name, var) in self.parameters()?.into_iter().chain(self.buffers()?) {
            state.insert(name, var.as_tensor().clone());
        }
        let state = fastvit.fused()?.apply(state);
        let mut config = self.config.clone();
        config.vision.inference_mode = true;
        let fused = Student::for_loading(&config, &self.device)?;
        fused.load(&state.into_iter().collect(), true)?;
        Ok(fused)
    }

    /// Whether [`Student::into_inference`] has anything to fuse (a FastViT tower in its
    /// branched form).
    pub fn reparameterizable(&self) -> bool {
        matches!(self.visual, ImageTower::FastVit(_)) && !self.config.vision.inference_mode
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

    /// Seeds the random choices of the next training forwards (the ViT towers' stochastic
    /// depth); the trainer sets it per step and micro-batch so a recomputed or resumed forward
    /// draws the same masks.
    pub fn set_forward_seed(&self, seed: u64) {
        if let ImageTower::Vit(vit) = &self.visual {
            vit.drop_seed().set(seed);
        }
    }

    /// The seed [`Student::set_forward_seed`] set last (0 for towers without random choices).
    pub fn forward_seed(&self) -> u64 {
        match &self.visual {
            ImageTower::Vit(vit) => vit.drop_seed().get(),
            ImageTower::FastVit(_) => 0,
        }
    }

    /// The image tower as units for activation recomputation (see [`crate::recompute`]).
    pub fn image_units(&self) -> Units<'_> {
        Units::new(self.visual.units(), move |i, x, mode| {
            Ok(self.visual.forward_unit(i, x, mode)?)
        })
    }

    /// The text tower over the token rows `ids` as units: the embedding (its input is
    /// ignored), each residual block, then `ln_final`, pooling and projection. In
    /// [`Mode::Eval`] the blocks take the inference kernels (no backward pass).
    pub fn text_units<'a>(&'a self, ids: &'a [Vec<u32>]) -> Result<Units<'a>> {
        let mask = self.text.embed(ids)?.mask;
        let blocks = self.text.transformer().blocks();
        let n = blocks.len();
        Ok(Units::new(n + 2, move |i, x, mode| {
            Ok(if i == 0 {
                self.text.embed(ids)?.x
            } else if i <= n && mode == Mode::Eval {
                blocks[i - 1].forward_inference(x, mask.as_ref())?
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
