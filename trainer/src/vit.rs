//! timm's `VisionTransformer` image towers of MobileCLIP2: `vit_base_mci_224` (MobileCLIP2-B: a
//! convolutional stem, the positional embedding without the class token, LayerNorm eps 1e-6)
//! and `vit_large_patch14_clip_224` (MobileCLIP2-L-14: a 14×14 patch embedding without bias,
//! a LayerNorm before the blocks, LayerNorm eps 1e-5, drop path), with timm's key names
//! (`patch_embed.*`, `cls_token`, `pos_embed`, `norm_pre.*`, `blocks.*`, `norm.*`, `head.*`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::Init;
use dfndr_teachers::blocks::{gelu_erf, Activation, Kernels, LayerNorm, Linear};
use serde::{Deserialize, Serialize};

use crate::layers::{BatchNorm2d, Builder, Conv2d, ConvKind, Mode, SelfAttention};

/// The convolutional stem of `vit_base_mci_224` (timm's `ConvStem`): conv + BatchNorm + GELU
/// for every layer but the last, which is a biased conv alone; no padding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvStemConfig {
    /// Output channels per layer (the last is the ViT width).
    pub channels: Vec<usize>,
    /// Kernel per layer (equal to its stride).
    pub kernel_sizes: Vec<usize>,
    /// Stride per layer.
    pub strides: Vec<usize>,
}

/// The numbers of a timm ViT tower (timm's `VisionTransformer` arguments), pooled by its class
/// token (`global_pool='token'`, as both MobileCLIP2 ViTs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Patch side of the patch embedding (a `[width, 3, p, p]` convolution with stride p);
    /// unused with a `conv_stem`.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// A convolutional stem instead of the patch convolution.
    #[serde(default)]
    pub conv_stem: Option<ConvStemConfig>,
    /// Token width.
    pub width: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width / token width.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Bias of the `qkv` projections.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Bias of the patch convolution (timm: `not pre_norm`).
    #[serde(default)]
    pub patch_bias: bool,
    /// A LayerNorm (`norm_pre`) before the blocks, as CLIP's ViTs.
    #[serde(default)]
    pub pre_norm: bool,
    /// The positional embedding covers the patches only; the class token is prepended after
    /// it is added (timm's `no_embed_class`).
    #[serde(default)]
    pub no_embed_class: bool,
    /// LayerNorm epsilon (timm's default 1e-6; CLIP towers 1e-5).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Stochastic depth: the largest drop rate, of the last block (rates rise linearly from
    /// 0 at the first block, as timm's); training only.
    #[serde(default)]
    pub drop_path_rate: f64,
    /// Output width of `head` (the CLIP embedding width; a student sets it to its `embed_dim`).
    #[serde(default)]
    pub num_classes: usize,
}

fn default_patch() -> usize {
    16
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_true() -> bool {
    true
}
fn default_norm_eps() -> f64 {
    1e-6
}

impl VitConfig {
    /// The named timm architecture with `num_classes` outputs: `vit_base_mci_224` or
    /// `vit_large_patch14_clip_224`.
    pub fn named(name: &str, num_classes: usize) -> Option<Self> {
        let base = Self {
            patch_size: 16,
            conv_stem: None,
            width: 768,
            depth: 12,
            heads: 12,
            mlp_ratio: 4.0,
            qkv_bias: true,
            patch_bias: true,
            pre_norm: false,
            no_embed_class: false,
            norm_eps: 1e-6,
            drop_path_rate: 0.0,
            num_classes,
        };
        match name {
            "vit_base_mci_224" => Some(Self {
                conv_stem: Some(ConvStemConfig {
                    channels: vec![192, 192, 768],
                    kernel_sizes: vec![4, 2, 2],
                    strides: vec![4, 2, 2],
                }),
                no_embed_class: true,
                ..base
            }),
            // OpenCLIP's MobileCLIP2-L-14 sets timm_drop_path 0.1.
            "vit_large_patch14_clip_224" => Some(Self {
                patch_size: 14,
                width: 1024,
                depth: 24,
                heads: 16,
                patch_bias: false,
                pre_norm: true,
                norm_eps: 1e-5,
                drop_path_rate: 0.1,
                ..base
            }),
            _ => None,
        }
    }

    /// Side of the token grid for `image_size` pixels.
    pub fn grid(&self, image_size: usize) -> usize {
        match &self.conv_stem {
            Some(stem) => stem.strides.iter().fold(image_size, |s, &k| s / k),
            None => image_size / self.patch_size.max(1),
        }
    }

    /// Checks the numbers against each other and the image size.
    pub fn validate(&self, image_size: usize) -> std::result::Result<(), String> {
        if self.width == 0 || self.depth == 0 || self.heads == 0 {
            return Err("width, depth and heads must be positive".into());
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(format!(
                "width {} is not a multiple of heads {}",
                self.width, self.heads
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return Err(format!(
                "drop_path_rate {} is outside [0, 1)",
                self.drop_path_rate
            ));
        }
        if let Some(stem) = &self.conv_stem {
            let n = stem.channels.len();
            if n == 0 || stem.kernel_sizes.len() != n || stem.strides.len() != n {
                return Err(
                    "conv_stem: channels, kernel_sizes and strides need one entry per layer".into(),
                );
            }
            if stem.kernel_sizes != stem.strides {
                return Err("conv_stem: every kernel must equal its stride".into());
            }
            if stem.channels.last() != Some(&self.width) {
                return Err(format!(
                    "conv_stem: the last layer's channels {:?} must equal width {}",
                    stem.channels.last(),
                    self.width
                ));
            }
        } else if self.patch_size == 0 {
            return Err("patch_size must be positive".into());
        }
        if self.grid(image_size) == 0 {
            return Err(format!("image_size {image_size} is smaller than one patch"));
        }
        Ok(())
    }
}

/// Seed of the stochastic-depth masks of the next training forward, shared by a tower's
/// blocks; a recomputed forward ([`Mode::Replay`]) with the same seed drops the same samples.
#[derive(Clone, Debug, Default)]
pub struct DropSeed(Arc<AtomicU64>);

impl DropSeed {
    /// Sets the seed of the following forwards.
    pub fn set(&self, seed: u64) {
        self.0.store(seed, Ordering::Relaxed);
    }

    /// The seed of the following forwards.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// SplitMix64: a well-mixed 64-bit value of `x`.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// timm's `DropPath` on a residual branch `[B, …]`: in training each sample's branch is kept
/// with probability 1 − rate and then scaled by 1/(1 − rate); the masks come from the seed,
/// the block and the sample index.
fn drop_path(branch: &Tensor, rate: f64, block: usize, seed: u64, mode: Mode) -> Result<Tensor> {
    if rate <= 0.0 || mode == Mode::Eval {
        return Ok(branch.clone());
    }
    let b = branch.dim(0)?;
    let keep = 1.0 - rate;
    let scales: Vec<f32> = (0..b)
        .map(|i| {
            let r = splitmix(seed ^ splitmix(((block as u64) << 32) | i as u64));
            let u = (r >> 11) as f64 / (1u64 << 53) as f64;
            if u < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut shape = vec![b];
    shape.resize(branch.rank(), 1);
    let mask = Tensor::from_vec(scales, shape, branch.device())?;
    branch.broadcast_mul(&mask)
}

/// timm's `Mlp`: `fc2(gelu(fc1(x)))`.
#[derive(Clone, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

/// timm's pre-norm transformer `Block` (no layer scale).
#[derive(Clone, Debug)]
struct Block {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: f64,
}

impl Block {
    fn new(b: &Builder, cfg: &VitConfig, drop_path: f64) -> Result<Self> {
        let w = cfg.width;
        let hidden = (w as f64 * cfg.mlp_ratio) as usize;
        let ln =
            |name: &str| LayerNorm::new(b.vb().pp(name), w, cfg.norm_eps, Kernels::Differentiable);
        Ok(Self {
            norm1: ln("norm1")?,
            attn: SelfAttention::new(&b.pp("attn"), w, w / cfg.heads, cfg.qkv_bias)?,
            norm2: ln("norm2")?,
            mlp: Mlp {
                fc1: Linear::new(b.vb().pp("mlp").pp("fc1"), w, hidden, true)?,
                fc2: Linear::new(b.vb().pp("mlp").pp("fc2"), hidden, w, true)?,
            },
            drop_path,
        })
    }

    /// The block for evaluation with the inference kernels (no backward pass, no stochastic
    /// depth); with `first = Some(n)` only the first `n` positions' outputs.
    fn forward_inference(&self, x: &Tensor, first: Option<usize>) -> Result<Tensor> {
        let attn = self
            .attn
            .forward_inference(&self.norm1.forward_inference(x)?, first)?;
        let x = match first {
            Some(n) => x.narrow(1, 0, n)?,
            None => x.clone(),
        };
        let x = (x + attn)?;
        let h = self
            .mlp
            .fc1
            .forward_inference(&self.norm2.forward_inference(&x)?, Some(Activation::Gelu))?;
        x + self.mlp.fc2.forward_inference(&h, None)?
    }

    fn forward(&self, x: &Tensor, index: usize, seed: u64, mode: Mode) -> Result<Tensor> {
        let attn = self.attn.forward(&self.norm1.forward(x)?)?;
        let x = (x + drop_path(&attn, self.drop_path, 2 * index, seed, mode)?)?;
        let h = self.mlp.fc1.forward(&self.norm2.forward(&x)?)?;
        let mlp = self.mlp.fc2.forward(&gelu_erf(&h)?)?;
        x + drop_path(&mlp, self.drop_path, 2 * index + 1, seed, mode)?
    }
}

/// One layer of the convolutional stem.
#[derive(Clone, Debug)]
struct StemLayer {
    conv: Conv2d,
    bn: Option<BatchNorm2d>,
}

/// The patch embedding: a convolutional stem or one patch convolution.
#[derive(Clone, Debug)]
enum PatchEmbed {
    Stem(Vec<StemLayer>),
    Conv(Conv2d),
}

impl PatchEmbed {
    fn new(b: &Builder, cfg: &VitConfig) -> Result<Self> {
        let pe = b.pp("patch_embed");
        Ok(match &cfg.conv_stem {
            Some(stem) => {
                let bb = pe.pp("backbone");
                let mut layers = Vec::with_capacity(stem.channels.len());
                let mut in_ch = 3;
                for (i, &out) in stem.channels.iter().enumerate() {
                    let last = i + 1 == stem.channels.len();
                    let lb = bb.pp(i);
                    let k = stem.kernel_sizes[i];
                    layers.push(StemLayer {
                        conv: Conv2d::new(
                            &lb.pp("conv"),
                            in_ch,
                            out,
                            k,
                            stem.strides[i],
                            ConvKind::Dense,
                            last,
                            Some(0),
                        )?,
                        bn: if last {
                            None
                        } else {
                            Some(BatchNorm2d::new(&lb.pp("bn"), out)?)
                        },
                    });
                    in_ch = out;
                }
                PatchEmbed::Stem(layers)
            }
            None => PatchEmbed::Conv(Conv2d::new(
                &pe.pp("proj"),
                3,
                cfg.width,
                cfg.patch_size,
                cfg.patch_size,
                ConvKind::Dense,
                cfg.patch_bias,
                Some(0),
            )?),
        })
    }

    /// `[B, 3, S, S]` to patch tokens `[B, N, width]`.
    fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = match self {
            PatchEmbed::Conv(conv) => conv.forward(images)?,
            PatchEmbed::Stem(layers) => {
                let mut x = images.clone();
                for layer in layers {
                    x = layer.conv.forward(&x)?;
                    if let Some(bn) = &layer.bn {
                        x = gelu_erf(&bn.forward(&x, mode)?)?;
                    }
                }
                x
            }
        };
        x.flatten_from(2)?.transpose(1, 2)?.contiguous()
    }
}

/// The ViT tower: patch embedding, class token and positional embedding, blocks, final
/// LayerNorm, pooling, `head`.
#[derive(Clone, Debug)]
pub struct Vit {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    norm_pre: Option<LayerNorm>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    config: VitConfig,
    seed: DropSeed,
}

impl Vit {
    /// Loads the tower at `b`'s prefix (`visual.trunk` inside an OpenCLIP model) for images of
    /// `image_size` pixels.
    pub fn new(b: &Builder, cfg: &VitConfig, image_size: usize) -> Result<Self> {
        cfg.validate(image_size).map_err(candle_core::Error::Msg)?;
        let w = cfg.width;
        let grid = cfg.grid(image_size);
        let tokens = grid * grid + usize::from(!cfg.no_embed_class);
        let ln =
            |b: &Builder| LayerNorm::new(b.vb().clone(), w, cfg.norm_eps, Kernels::Differentiable);
        let depth = cfg.depth;
        let blocks = (0..depth)
            .map(|i| {
                // timm: torch.linspace(0, drop_path_rate, depth).
                let rate = if depth > 1 {
                    cfg.drop_path_rate * i as f64 / (depth - 1) as f64
                } else {
                    0.0
                };
                Block::new(&b.pp("blocks").pp(i), cfg, rate)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(b, cfg)?,
            cls_token: b.param(
                (1, 1, w),
                "cls_token",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1e-6,
                },
            )?,
            pos_embed: b.param(
                (1, tokens, w),
                "pos_embed",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            norm_pre: if cfg.pre_norm {
                Some(ln(&b.pp("norm_pre"))?)
            } else {
                None
            },
            blocks,
            norm: ln(&b.pp("norm"))?,
            head: Linear::new(b.vb().pp("head"), w, cfg.num_classes, true)?,
            config: cfg.clone(),
            seed: DropSeed::default(),
        })
    }

    /// The seed of the stochastic-depth masks.
    pub fn drop_seed(&self) -> &DropSeed {
        &self.seed
    }

    /// Units (see [`crate::fastvit::FastVit::units`]): the embedding, each block, then the
    /// final norm with pooling and head.
    pub fn units(&self) -> usize {
        self.blocks.len() + 2
    }

    /// Applies unit `index` to its input.
    pub fn forward_unit(&self, index: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if index == 0 {
            return self.embed(x, mode);
        }
        if let Some(block) = self.blocks.get(index - 1) {
            if mode == Mode::Eval {
                // Only the class token is pooled: the last block computes just its output.
                let first = (index == self.blocks.len()).then_some(1);
                return block.forward_inference(x, first);
            }
            return block.forward(x, index - 1, self.seed.get(), mode);
        }
        if index != self.blocks.len() + 1 {
            candle_core::bail!("the ViT has {} units, not {}", self.units(), index + 1);
        }
        let class_token = x.narrow(1, 0, 1)?;
        if mode == Mode::Eval {
            let pooled = self.norm.forward_inference(&class_token)?.squeeze(1)?;
            return self.head.forward_inference(&pooled, None);
        }
        let pooled = self.norm.forward(&class_token)?.squeeze(1)?;
        self.head.forward(&pooled)
    }

    fn embed(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = self.patch_embed.forward(images, mode)?;
        let b = x.dim(0)?;
        let w = self.config.width;
        if x.dim(1)? + usize::from(!self.config.no_embed_class) != self.pos_embed.dim(1)? {
            candle_core::bail!(
                "the image gives {} patches, the positional embedding has {} positions",
                x.dim(1)?,
                self.pos_embed.dim(1)?
            );
        }
        let cls = self.cls_token.broadcast_as((b, 1, w))?;
        let x = if self.config.no_embed_class {
            let x = x.broadcast_add(&self.pos_embed)?;
            Tensor::cat(&[&cls, &x], 1)?
        } else {
            Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?
        };
        match &self.norm_pre {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    /// Image embeddings `[B, num_classes]`.
    pub fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut x = images.clone();
        for i in 0..self.units() {
            x = self.forward_unit(i, &x, mode)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::SeededVarMap;
    use crate::layers::NormConfig;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn tiny(drop_path_rate: f64) -> Vit {
        let vb = VarBuilder::from_backend(
            Box::new(SeededVarMap::new(VarMap::new(), 3)),
            DType::F32,
            Device::Cpu,
        );
        let b = Builder::new(vb, VarMap::new(), NormConfig::default());
        let cfg = VitConfig {
            patch_size: 8,
            width: 16,
            depth: 3,
            heads: 2,
            drop_path_rate,
            num_classes: 4,
            ..VitConfig::named("vit_large_patch14_clip_224", 4).unwrap()
        };
        Vit::new(&b, &cfg, 16).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn drop_path_keeps_samples_at_the_rate_and_rescales_them() {
        let x = Tensor::ones((4000, 2), DType::F32, &Device::Cpu).unwrap();
        let y = rows(&drop_path(&x, 0.25, 7, 11, Mode::Train).unwrap());
        let kept = y.iter().filter(|r| r[0] != 0.0).count();
        assert!(
            (2850..3150).contains(&kept),
            "kept {kept} of 4000 at rate 0.25"
        );
        for r in &y {
            assert!(r[0] == 0.0 || (r[0] - 1.0 / 0.75).abs() < 1e-6);
            assert_eq!(r[0], r[1], "a whole sample is kept or dropped");
        }
        let again = rows(&drop_path(&x, 0.25, 7, 11, Mode::Replay).unwrap());
        assert_eq!(y, again, "a replayed forward drops the same samples");
        let other_block = rows(&drop_path(&x, 0.25, 8, 11, Mode::Train).unwrap());
        assert_ne!(y, other_block);
        assert_eq!(
            rows(&drop_path(&x, 0.25, 7, 11, Mode::Eval).unwrap()),
            rows(&x)
        );
    }

    #[test]
    fn stochastic_depth_follows_the_seed_and_only_in_training() {
        let vit = tiny(0.5);
        let images = Tensor::rand(0f32, 1f32, (8, 3, 16, 16), &Device::Cpu).unwrap();
        vit.drop_seed().set(1);
        let a = rows(&vit.forward(&images, Mode::Train).unwrap());
        let replay = rows(&vit.forward(&images, Mode::Replay).unwrap());
        assert_eq!(a, replay);
        vit.drop_seed().set(2);
        let b = rows(&vit.forward(&images, Mode::Train).unwrap());
        assert_ne!(a, b, "another seed drops other blocks");
        let eval1 = rows(&vit.forward(&images, Mode::Eval).unwrap());
        vit.drop_seed().set(1);
        let eval2 = rows(&vit.forward(&images, Mode::Eval).unwrap());
        assert_eq!(eval1, eval2);
        assert_ne!(a, eval1);
        // Without stochastic depth (and no BatchNorm) training and evaluation agree, though
        // evaluation takes the inference kernels and runs the last block on the class token
        // only.
        let plain = tiny(0.0);
        let t = plain.forward(&images, Mode::Train).unwrap();
        let e = plain.forward(&images, Mode::Eval).unwrap();
        let scale = crate::test_util::max_abs_diff(&t, &t.zeros_like().unwrap());
        let diff = crate::test_util::max_abs_diff(&t, &e);
        assert!(scale > 0.1, "{scale}");
        assert!(diff <= 1e-5 * scale, "{diff} (scale {scale})");
        assert!(!e.track_op(), "evaluation records no graph");
    }

    #[test]
    fn bad_numbers_are_refused() {
        let base = VitConfig::named("vit_base_mci_224", 8).unwrap();
        assert!(base.validate(224).is_ok());
        assert_eq!(base.grid(224), 14);
        let odd = VitConfig {
            heads: 5,
            ..base.clone()
        };
        assert!(odd.validate(224).unwrap_err().contains("heads"));
        let dp = VitConfig {
            drop_path_rate: 1.0,
            ..base.clone()
        };
        assert!(dp.validate(224).unwrap_err().contains("drop_path_rate"));
        assert!(base
            .validate(8)
            .unwrap_err()
            .contains("smaller than one patch"));
        assert!(VitConfig::named("vit_huge", 8).is_none());
    }
}
