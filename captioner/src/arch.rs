//! Architectures of OpenCLIP CoCa models: built-in names and explicit numbers.
//!
//! A CoCa model is a CLIP model (vision tower with an attentional pooler, text tower with an
//! appended class token, keys under `text.`) plus a multimodal decoder (`multimodal_cfg`).
//! Field names follow OpenCLIP's JSON configs.

use dfndr_teachers::arch::{TextConfig, TextPool, VisionConfig, VisionPool, LN_EPS};
use dfndr_teachers::blocks::{Activation, TransformerConfig};
use dfndr_teachers::tokenizer::{COCA_CONTEXT, EOT};
use dfndr_teachers::ClipConfig;
use serde::{Deserialize, Serialize};

use crate::error::{CaptionError, Result};

/// The multimodal decoder (`multimodal_cfg`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultimodalConfig {
    /// Positions of the causal mask (76 for `coca_ViT-L-14`).
    #[serde(default = "default_context")]
    pub context_length: usize,
    /// Vocabulary size (columns of the output projection).
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Residual width; must equal `embed_dim` (the cross-attention keys are the image tokens).
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Blocks (each one self-attention and one cross-attention block).
    pub layers: usize,
    /// MLP hidden width / width.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Layer-scale initial value; absent means no layer scale.
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    /// Unused by the decoder; accepted so OpenCLIP JSON configs parse unchanged.
    #[serde(default, skip_serializing)]
    pub attn_pooler_heads: Option<usize>,
    /// Unused by the decoder; accepted so OpenCLIP JSON configs parse unchanged.
    #[serde(default, skip_serializing)]
    pub latent_dim: Option<usize>,
    /// Unused by the decoder; accepted so OpenCLIP JSON configs parse unchanged.
    #[serde(default, skip_serializing)]
    pub n_queries: Option<usize>,
    /// Unused by the decoder; accepted so OpenCLIP JSON configs parse unchanged.
    #[serde(default, skip_serializing)]
    pub dim_head: Option<usize>,
}

fn default_context() -> usize {
    COCA_CONTEXT
}
fn default_vocab() -> usize {
    49408
}
fn default_mlp_ratio() -> f64 {
    4.0
}

/// A whole CoCa model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocaConfig {
    /// Dimension of the joint embedding (and of the pooler and decoder).
    pub embed_dim: usize,
    /// QuickGELU instead of exact GELU everywhere.
    #[serde(default)]
    pub quick_gelu: bool,
    /// The image tower (`attentional_pool` must be set).
    #[serde(alias = "vision_cfg")]
    pub vision: VisionConfig,
    /// The text tower (`embed_cls` must be set).
    #[serde(alias = "text_cfg")]
    pub text: TextConfig,
    /// The decoder.
    #[serde(alias = "multimodal_cfg")]
    pub multimodal: MultimodalConfig,
    /// Accepted for OpenCLIP JSON configs (CoCa's text keys are always under `text.`).
    #[serde(default, skip_serializing)]
    pub custom_text: Option<bool>,
}

/// Built-in names. `coca_ViT-L-14-contextN` sets both context lengths to N (Apple's
/// MobileCLIP2 captioners with 128/256 contexts).
pub const BUILTIN: &[&str] = &["coca_ViT-L-14", "coca_ViT-B-32"];

impl CocaConfig {
    /// The OpenCLIP config of that name.
    pub fn named(name: &str) -> Result<Self> {
        let (base, context) = match name.rsplit_once("-context") {
            Some((base, n)) => match n.parse::<usize>() {
                Ok(n) if n > 1 => (base, n),
                _ => return Err(unknown(name)),
            },
            None => (name, COCA_CONTEXT),
        };
        // (embed, vision (patch, width, layers), text/decoder (width, heads, layers))
        let (embed_dim, (patch, vw, vl), (tw, th, tl)) = match base {
            "coca_ViT-L-14" => (768, (14, 1024, 24), (768, 12, 12)),
            "coca_ViT-B-32" => (512, (32, 768, 12), (512, 8, 12)),
            _ => return Err(unknown(name)),
        };
        Ok(Self {
            embed_dim,
            quick_gelu: false,
            vision: VisionConfig {
                image_size: 224,
                patch_size: patch,
                width: vw,
                layers: vl,
                head_width: 64,
                mlp_ratio: 4.0,
                ls_init_value: None,
                pool_type: VisionPool::Tok,
                final_ln_after_pool: false,
                no_ln_pre: false,
                attentional_pool: true,
                attn_pooler_heads: 8,
                attn_pooler_queries: 256,
            },
            text: TextConfig {
                context_length: context,
                vocab_size: 49408,
                width: tw,
                heads: th,
                layers: tl,
                mlp_ratio: 4.0,
                ls_init_value: None,
                no_causal_mask: false,
                embed_cls: true,
                pad_id: 0,
                eos_id: EOT,
                pool_type: TextPool::Argmax,
                proj_bias: false,
            },
            multimodal: MultimodalConfig {
                context_length: context,
                vocab_size: 49408,
                width: tw,
                heads: th,
                layers: tl,
                mlp_ratio: 4.0,
                ls_init_value: None,
                attn_pooler_heads: None,
                latent_dim: None,
                n_queries: None,
                dim_head: None,
            },
            custom_text: None,
        })
    }

    /// The two towers as a CLIP config (text keys under `text.`).
    pub fn clip(&self) -> ClipConfig {
        ClipConfig {
            embed_dim: self.embed_dim,
            quick_gelu: self.quick_gelu,
            custom_text: true,
            vision: self.vision.clone(),
            text: self.text.clone(),
        }
    }

    /// The decoder's transformer stacks (self- and cross-attention blocks share the numbers).
    pub fn decoder_transformer(&self) -> TransformerConfig {
        let m = &self.multimodal;
        TransformerConfig {
            width: m.width,
            layers: m.layers,
            heads: m.heads,
            mlp_ratio: m.mlp_ratio,
            act: if self.quick_gelu {
                Activation::QuickGelu
            } else {
                Activation::Gelu
            },
            ls_init_value: m.ls_init_value,
            ln_eps: LN_EPS,
        }
    }

    /// Checks the numbers fit together, so a bad config fails before any weight is read.
    pub fn validate(&self) -> Result<()> {
        self.clip().validate()?;
        let m = &self.multimodal;
        let bad = |msg: String| Err(CaptionError::InvalidArchitecture(msg));
        if !self.vision.attentional_pool {
            return bad("a CoCa vision tower needs attentional_pool = true".into());
        }
        if self.vision.attn_pooler_queries < 2 {
            return bad(
                "the attentional pooler needs at least 2 queries (1 pooled + tokens)".into(),
            );
        }
        if !self.text.embed_cls {
            return bad("a CoCa text tower needs embed_cls = true".into());
        }
        if self.text.no_causal_mask {
            return bad("a CoCa text tower must be causal (no_causal_mask = false)".into());
        }
        if m.width != self.embed_dim {
            return bad(format!(
                "multimodal width {} must equal embed_dim {} (the decoder attends to the pooled image tokens)",
                m.width, self.embed_dim
            ));
        }
        if m.width != self.text.width {
            return bad(format!(
                "multimodal width {} must equal the text width {}",
                m.width, self.text.width
            ));
        }
        if m.heads == 0 || !m.width.is_multiple_of(m.heads) {
            return bad(format!(
                "multimodal width {} must be a positive multiple of heads {}",
                m.width, m.heads
            ));
        }
        if m.context_length == 0 || m.vocab_size == 0 || m.layers == 0 || m.mlp_ratio <= 0.0 {
            return bad(
                "multimodal context_length, vocab_size, layers and mlp_ratio must be positive"
                    .into(),
            );
        }
        if m.vocab_size != self.text.vocab_size {
            return bad(format!(
                "multimodal vocab_size {} differs from the text vocab_size {}",
                m.vocab_size, self.text.vocab_size
            ));
        }
        Ok(())
    }
}

fn unknown(name: &str) -> CaptionError {
    CaptionError::UnknownArchitecture {
        name: name.to_string(),
        known: format!(
            "{} (also -context128/-context256 variants of coca_ViT-L-14, or explicit numbers)",
            BUILTIN.join(", ")
        ),
    }
}

/// An architecture in a config file: a built-in name or explicit numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CocaArch {
    /// `arch = "coca_ViT-L-14"`.
    Named(String),
    /// `[captioners.arch]` with every number.
    Explicit(Box<CocaConfig>),
}

impl CocaArch {
    /// The resolved, validated config.
    pub fn resolve(&self) -> Result<CocaConfig> {
        let cfg = match self {
            CocaArch::Named(name) => CocaConfig::named(name)?,
            CocaArch::Explicit(cfg) => (**cfg).clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A short name for logs and metadata.
    pub fn label(&self) -> String {
        match self {
            CocaArch::Named(name) => name.clone(),
            CocaArch::Explicit(c) => format!(
                "custom CoCa (image {} patch {} width {} layers {}; text width {} layers {}; decoder layers {}; embed {})",
                c.vision.image_size,
                c.vision.patch_size,
                c.vision.width,
                c.vision.layers,
                c.text.width,
                c.text.layers,
                c.multimodal.layers,
                c.embed_dim
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_validate_and_context_variants_change_both_contexts() {
        for name in ["coca_ViT-L-14", "coca_ViT-B-32", "coca_ViT-L-14-context128"] {
            CocaConfig::named(name).unwrap().validate().unwrap();
        }
        let c = CocaConfig::named("coca_ViT-L-14-context256").unwrap();
        assert_eq!(
            (c.text.context_length, c.multimodal.context_length),
            (256, 256)
        );
        assert!(CocaConfig::named("coca_ViT-X").is_err());
        assert!(CocaConfig::named("coca_ViT-L-14-contextabc").is_err());
    }

    #[test]
    fn openclip_json_field_names_parse() {
        let json = r#"{"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32,
                           "attentional_pool": true, "attn_pooler_heads": 8},
            "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8,
                         "layers": 12, "embed_cls": true},
            "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512,
                               "heads": 8, "layers": 12, "attn_pooler_heads": 8},
            "custom_text": true}"#;
        let parsed: CocaConfig = serde_json_like(json);
        let named = CocaConfig::named("coca_ViT-B-32").unwrap();
        assert_eq!(parsed.clip(), named.clip());
        assert_eq!(parsed.decoder_transformer(), named.decoder_transformer());
    }

    fn serde_json_like(json: &str) -> CocaConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn mismatched_decoder_width_is_refused() {
        let mut c = CocaConfig::named("coca_ViT-B-32").unwrap();
        c.multimodal.width = 768;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("embed_dim"), "{err}");
    }
}
