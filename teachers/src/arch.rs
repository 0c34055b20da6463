//! Architectures of OpenCLIP CLIP models: built-in names and explicit numbers.
//!
//! Field names follow OpenCLIP's model configs (`vision_cfg`, `text_cfg`) so numbers can be
//! copied from an OpenCLIP JSON into a dfndr TOML.

use serde::{Deserialize, Serialize};

use crate::blocks::{Activation, TransformerConfig};
use crate::error::{Result, TeacherError};

/// LayerNorm epsilon of every OpenCLIP tower.
pub const LN_EPS: f64 = 1e-5;

/// How the vision tower pools its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionPool {
    /// The class token (`tok`, OpenCLIP's default).
    Tok,
    /// Mean of the patch tokens (`avg`).
    Avg,
}

/// How the text tower picks its pooled token (ignored with `embed_cls`, which pools the
/// appended class token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPool {
    /// The first position of the largest id, i.e. the end-of-text token (OpenCLIP's default).
    Argmax,
    /// Position 0.
    First,
    /// The last position.
    Last,
    /// The first position holding `eos_id`.
    Eos,
}

/// The image tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Input side in pixels (square).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Residual width.
    pub width: usize,
    /// Residual blocks.
    pub layers: usize,
    /// Width of one attention head (heads = width / head_width).
    #[serde(default = "default_head_width")]
    pub head_width: usize,
    /// MLP hidden width / width.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Layer-scale initial value; absent means no layer scale.
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    /// Token pooling.
    #[serde(default = "default_vision_pool")]
    pub pool_type: VisionPool,
    /// Apply `ln_post` after pooling instead of to every token.
    #[serde(default)]
    pub final_ln_after_pool: bool,
    /// No `ln_pre`.
    #[serde(default)]
    pub no_ln_pre: bool,
    /// CoCa's attentional pooler over the tokens.
    #[serde(default)]
    pub attentional_pool: bool,
    /// Heads of the attentional pooler.
    #[serde(default = "default_pooler_heads")]
    pub attn_pooler_heads: usize,
    /// Learned queries of the attentional pooler.
    #[serde(default = "default_pooler_queries")]
    pub attn_pooler_queries: usize,
}

/// The text tower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// Token positions (77 for CLIP, 76 for CoCa).
    #[serde(default = "default_context")]
    pub context_length: usize,
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Residual width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Residual blocks.
    pub layers: usize,
    /// MLP hidden width / width.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Layer-scale initial value; absent means no layer scale.
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    /// Every position attends to every other, padding included (MobileCLIP2 students).
    #[serde(default)]
    pub no_causal_mask: bool,
    /// Append a learned class token and pool it (CoCa).
    #[serde(default)]
    pub embed_cls: bool,
    /// Padding id (masks keys when `embed_cls`).
    #[serde(default)]
    pub pad_id: u32,
    /// End-of-text id for `pool_type = "eos"`.
    #[serde(default = "default_eos")]
    pub eos_id: u32,
    /// Pooling without `embed_cls`.
    #[serde(default = "default_text_pool")]
    pub pool_type: TextPool,
    /// `text_projection` is an `nn.Linear` with bias instead of a bare matrix.
    #[serde(default)]
    pub proj_bias: bool,
}

/// A whole CLIP model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    /// Dimension of the joint embedding.
    pub embed_dim: usize,
    /// QuickGELU instead of exact GELU in both towers.
    #[serde(default)]
    pub quick_gelu: bool,
    /// Text tower keys under `text.` (OpenCLIP CustomTextCLIP, CoCa, MobileCLIP2) instead of
    /// at the top level (plain CLIP).
    #[serde(default)]
    pub custom_text: bool,
    /// The image tower.
    #[serde(alias = "vision_cfg")]
    pub vision: VisionConfig,
    /// The text tower.
    #[serde(alias = "text_cfg")]
    pub text: TextConfig,
}

fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_vision_pool() -> VisionPool {
    VisionPool::Tok
}
fn default_pooler_heads() -> usize {
    8
}
fn default_pooler_queries() -> usize {
    256
}
fn default_context() -> usize {
    77
}
fn default_vocab() -> usize {
    49408
}
fn default_eos() -> u32 {
    crate::tokenizer::EOT
}
fn default_text_pool() -> TextPool {
    TextPool::Argmax
}

/// Built-in architecture names (each also exists with a `-quickgelu` suffix).
pub const BUILTIN: &[&str] = &["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14"];

/// (name, embed, vision (patch, width, layers, head width), text (width, heads, layers)).
type Numbers = (
    &'static str,
    usize,
    (usize, usize, usize, usize),
    (usize, usize, usize),
);
const NUMBERS: &[Numbers] = &[
    ("ViT-B-32", 512, (32, 768, 12, 64), (512, 8, 12)),
    ("ViT-B-16", 512, (16, 768, 12, 64), (512, 8, 12)),
    ("ViT-L-14", 768, (14, 1024, 24, 64), (768, 12, 12)),
    ("ViT-H-14", 1024, (14, 1280, 32, 80), (1024, 16, 24)),
];

impl ClipConfig {
    /// The OpenCLIP config of that name, e.g. `ViT-L-14-quickgelu`.
    pub fn named(name: &str) -> Result<Self> {
        let (base, quick_gelu) = match name.strip_suffix("-quickgelu") {
            Some(base) => (base, true),
            None => (name, false),
        };
        let Some(&(_, embed_dim, (patch, vw, vl, hw), (tw, th, tl))) =
            NUMBERS.iter().find(|n| n.0 == base)
        else {
            let known: Vec<String> = BUILTIN
                .iter()
                .flat_map(|b| [b.to_string(), format!("{b}-quickgelu")])
                .collect();
            return Err(TeacherError::UnknownArchitecture {
                name: name.to_string(),
                known: format!("{} (or explicit numbers)", known.join(", ")),
            });
        };
        Ok(Self {
            embed_dim,
            quick_gelu,
            custom_text: false,
            vision: VisionConfig {
                image_size: 224,
                patch_size: patch,
                width: vw,
                layers: vl,
                head_width: hw,
                mlp_ratio: 4.0,
                ls_init_value: None,
                pool_type: VisionPool::Tok,
                final_ln_after_pool: false,
                no_ln_pre: false,
                attentional_pool: false,
                attn_pooler_heads: 8,
                attn_pooler_queries: 256,
            },
            text: TextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: tw,
                heads: th,
                layers: tl,
                mlp_ratio: 4.0,
                ls_init_value: None,
                no_causal_mask: false,
                embed_cls: false,
                pad_id: 0,
                eos_id: crate::tokenizer::EOT,
                pool_type: TextPool::Argmax,
                proj_bias: false,
            },
        })
    }

    /// The MLP activation of both towers.
    pub fn activation(&self) -> Activation {
        if self.quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        }
    }

    /// Checks the numbers fit together, so a bad TOML fails before any weight is read.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let t = &self.text;
        let bad = |msg: String| Err(TeacherError::InvalidArchitecture(msg));
        if self.embed_dim == 0 {
            return bad("embed_dim must be positive".into());
        }
        if v.patch_size == 0 || v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return bad(format!(
                "vision image_size {} must be a positive multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.head_width == 0 || v.width == 0 || !v.width.is_multiple_of(v.head_width) {
            return bad(format!(
                "vision width {} must be a positive multiple of head_width {}",
                v.width, v.head_width
            ));
        }
        if v.attentional_pool
            && (v.attn_pooler_heads == 0
                || !self.embed_dim.is_multiple_of(v.attn_pooler_heads)
                || v.attn_pooler_queries == 0)
        {
            return bad(format!(
                "attentional pooler: embed_dim {} must be divisible by attn_pooler_heads {} and queries must be positive",
                self.embed_dim, v.attn_pooler_heads
            ));
        }
        if t.heads == 0 || t.width == 0 || !t.width.is_multiple_of(t.heads) {
            return bad(format!(
                "text width {} must be a positive multiple of heads {}",
                t.width, t.heads
            ));
        }
        if t.context_length == 0 || t.vocab_size == 0 {
            return bad("text context_length and vocab_size must be positive".into());
        }
        if !(v.mlp_ratio > 0.0 && t.mlp_ratio > 0.0) {
            return bad("mlp_ratio must be positive".into());
        }
        Ok(())
    }

    /// The vision transformer stack.
    pub fn vision_transformer(&self) -> TransformerConfig {
        TransformerConfig {
            width: self.vision.width,
            layers: self.vision.layers,
            heads: self.vision.width / self.vision.head_width.max(1),
            mlp_ratio: self.vision.mlp_ratio,
            act: self.activation(),
            ls_init_value: self.vision.ls_init_value,
            ln_eps: LN_EPS,
        }
    }

    /// The text transformer stack.
    pub fn text_transformer(&self) -> TransformerConfig {
        TransformerConfig {
            width: self.text.width,
            layers: self.text.layers,
            heads: self.text.heads,
            mlp_ratio: self.text.mlp_ratio,
            act: self.activation(),
            ls_init_value: self.text.ls_init_value,
            ln_eps: LN_EPS,
        }
    }
}

/// An architecture in a config file: a built-in name or explicit numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ArchSpec {
    /// `arch = "ViT-L-14-quickgelu"`.
    Named(String),
    /// `[teachers.arch]` with every number.
    Explicit(Box<ClipConfig>),
}

impl ArchSpec {
    /// The resolved, validated config.
    pub fn resolve(&self) -> Result<ClipConfig> {
        let cfg = match self {
            ArchSpec::Named(name) => ClipConfig::named(name)?,
            ArchSpec::Explicit(cfg) => (**cfg).clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A short name for logs and metadata.
    pub fn label(&self) -> String {
        match self {
            ArchSpec::Named(name) => name.clone(),
            ArchSpec::Explicit(cfg) => format!(
                "custom ViT (image {} patch {} width {} layers {}; text width {} layers {}; embed {})",
                cfg.vision.image_size,
                cfg.vision.patch_size,
                cfg.vision.width,
                cfg.vision.layers,
                cfg.text.width,
                cfg.text.layers,
                cfg.embed_dim
            ),
        }
    }
}
