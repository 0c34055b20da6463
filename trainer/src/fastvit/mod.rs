//! timm's FastViT image towers of MobileCLIP (`fastvit_mci*`) in their train-time form, with
//! timm's key names (`stem.*`, `stages.*`, `final_conv.*`, `head.fc.*`).

mod blocks;
mod mobileone;
pub mod reparam;

pub use blocks::{Attention, AttentionBlock, ConvMlp, PatchEmbed, RepCpe, RepMixerBlock};
pub use mobileone::{LargeKernelConv, MobileOneBlock, MobileOneOptions};

use candle_core::{Result, Tensor, D};
use dfndr_teachers::blocks::Linear;
use serde::{Deserialize, Serialize};

use crate::layers::{Builder, ConvKind, Mode};

/// The token mixer of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenMixer {
    /// Re-parameterisable depthwise mixing.
    Repmixer,
    /// Multi-head self-attention (BatchNorm pre-norm).
    Attention,
}

/// The normalisation before attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnNorm {
    /// `BatchNorm2d` (MCi0-2).
    #[default]
    BatchNorm,
    /// `LayerNorm2d` with eps 1e-5 over each pixel's channels (MCi3-4).
    LayerNorm,
}

/// The numbers of a FastViT tower (timm's `FastVit` arguments).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastVitConfig {
    /// Blocks per stage.
    pub layers: Vec<usize>,
    /// Channels per stage.
    pub embed_dims: Vec<usize>,
    /// MLP hidden width / channels, per stage.
    pub mlp_ratios: Vec<f64>,
    /// Token mixer per stage.
    pub token_mixers: Vec<TokenMixer>,
    /// Squeeze-excite in each stage's downsampling layer.
    pub se_downsamples: Vec<bool>,
    /// Conditional positional encoding (7×7) after each stage's downsampling.
    pub pos_embs: Vec<bool>,
    /// RepMixer kernel.
    #[serde(default = "default_repmixer_kernel")]
    pub repmixer_kernel_size: usize,
    /// Large kernel of the downsampling layers.
    #[serde(default = "default_down_patch")]
    pub down_patch_size: usize,
    /// Stride of the downsampling layers.
    #[serde(default = "default_down_stride")]
    pub down_stride: usize,
    /// Initial layer-scale value.
    #[serde(default = "default_ls_init")]
    pub layer_scale_init_value: f64,
    /// GELU after the large-kernel convolution (true for every MCi).
    #[serde(default = "default_true")]
    pub lkc_use_act: bool,
    /// The 1×1 scale branch in the stem's blocks.
    #[serde(default = "default_true")]
    pub stem_use_scale_branch: bool,
    /// Normalisation of the attention blocks (timm's `norm_layer`).
    #[serde(default)]
    pub attn_norm: AttnNorm,
    /// Width of the final convolution / last stage's width.
    #[serde(default = "default_cls_ratio")]
    pub cls_ratio: f64,
    /// Output width of `head.fc` (the CLIP embedding width in MobileCLIP; a student sets it
    /// to its `embed_dim`).
    #[serde(default)]
    pub num_classes: usize,
}

fn default_repmixer_kernel() -> usize {
    3
}
fn default_down_patch() -> usize {
    7
}
fn default_down_stride() -> usize {
    2
}
fn default_ls_init() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_cls_ratio() -> f64 {
    2.0
}

impl FastVitConfig {
    /// timm's `fastvit_mci0` (MobileCLIP-S0 / MobileCLIP2-S0) with `num_classes` outputs.
    pub fn mci0(num_classes: usize) -> Self {
        Self {
            layers: vec![2, 6, 10, 2],
            embed_dims: vec![64, 128, 256, 512],
            mlp_ratios: vec![3.0; 4],
            token_mixers: vec![
                TokenMixer::Repmixer,
                TokenMixer::Repmixer,
                TokenMixer::Repmixer,
                TokenMixer::Attention,
            ],
            se_downsamples: vec![false, false, true, true],
            pos_embs: vec![false, false, false, true],
            repmixer_kernel_size: 3,
            down_patch_size: 7,
            down_stride: 2,
            layer_scale_init_value: 1e-5,
            lkc_use_act: true,
            stem_use_scale_branch: true,
            attn_norm: AttnNorm::BatchNorm,
            cls_ratio: 2.0,
            num_classes,
        }
    }

    /// The five-stage MCi3/MCi4 layout (MobileCLIP2-S3/S4): attention in the last two stages
    /// after a positional encoding, LayerNorm2d before attention, MLP ratio 4, no squeeze-excite
    /// in the downsampling layers and no scale branch in the stem.
    fn five_stage(layers: [usize; 5], embed_dims: [usize; 5], num_classes: usize) -> Self {
        let rep = TokenMixer::Repmixer;
        let attn = TokenMixer::Attention;
        Self {
            layers: layers.to_vec(),
            embed_dims: embed_dims.to_vec(),
            mlp_ratios: vec![4.0; 5],
            token_mixers: vec![rep, rep, rep, attn, attn],
            se_downsamples: vec![false; 5],
            pos_embs: vec![false, false, false, true, true],
            stem_use_scale_branch: false,
            attn_norm: AttnNorm::LayerNorm,
            ..Self::mci0(num_classes)
        }
    }

    /// The named timm architecture.
    pub fn named(name: &str, num_classes: usize) -> Option<Self> {
        let mut cfg = Self::mci0(num_classes);
        match name {
            "fastvit_mci0" => {}
            "fastvit_mci1" => cfg.layers = vec![4, 12, 20, 4],
            "fastvit_mci2" => {
                cfg.layers = vec![4, 12, 24, 4];
                cfg.embed_dims = vec![80, 160, 320, 640];
            }
            "fastvit_mci3" => {
                cfg = Self::five_stage([2, 12, 24, 4, 2], [96, 192, 384, 768, 1536], num_classes)
            }
            "fastvit_mci4" => {
                cfg = Self::five_stage([2, 12, 24, 4, 4], [128, 256, 512, 1024, 2048], num_classes)
            }
            _ => return None,
        }
        Some(cfg)
    }

    /// Checks that the per-stage lists agree and the widths fit the blocks.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.layers.len();
        if n == 0 {
            return Err("layers: at least one stage is needed".into());
        }
        for (field, len) in [
            ("embed_dims", self.embed_dims.len()),
            ("mlp_ratios", self.mlp_ratios.len()),
            ("token_mixers", self.token_mixers.len()),
            ("se_downsamples", self.se_downsamples.len()),
            ("pos_embs", self.pos_embs.len()),
        ] {
            if len != n {
                return Err(format!("{field}: {len} entries for {n} stages (layers)"));
            }
        }
        for (i, pair) in self.embed_dims.windows(2).enumerate() {
            if pair[1] % pair[0] != 0 {
                return Err(format!(
                    "embed_dims: stage {} width {} is not a multiple of stage {i}'s {} \
                     (the downsampling convolution is depthwise)",
                    i + 1,
                    pair[1],
                    pair[0]
                ));
            }
        }
        for (i, (mixer, dim)) in self.token_mixers.iter().zip(&self.embed_dims).enumerate() {
            if *mixer == TokenMixer::Attention && dim % blocks_head_dim() != 0 {
                return Err(format!(
                    "embed_dims: stage {i} uses attention, so its width {dim} must be a \
                     multiple of {}",
                    blocks_head_dim()
                ));
            }
        }
        Ok(())
    }
}

fn blocks_head_dim() -> usize {
    blocks::HEAD_DIM
}

/// One block of a stage.
#[derive(Clone, Debug)]
enum Block {
    RepMixer(Box<RepMixerBlock>),
    Attention(Box<AttentionBlock>),
}

/// One stage: optional downsampling, optional positional encoding, blocks.
#[derive(Clone, Debug)]
struct Stage {
    downsample: Option<PatchEmbed>,
    pos_emb: Option<RepCpe>,
    blocks: Vec<Block>,
}

/// The FastViT tower: stem, stages, final convolution, average pool, `head.fc`.
#[derive(Clone, Debug)]
pub struct FastVit {
    stem: Vec<MobileOneBlock>,
    stages: Vec<Stage>,
    final_conv: MobileOneBlock,
    head: Linear,
}

impl FastVit {
    /// Loads the tower at `b`'s prefix (`visual.trunk` inside an OpenCLIP model).
    pub fn new(b: &Builder, cfg: &FastVitConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let c0 = cfg.embed_dims[0];
        let stem_b = b.pp("stem");
        let scale = cfg.stem_use_scale_branch;
        let stem = vec![
            MobileOneBlock::new(
                &stem_b.pp(0),
                3,
                c0,
                3,
                2,
                MobileOneOptions {
                    use_scale_branch: scale,
                    ..Default::default()
                },
            )?,
            MobileOneBlock::new(
                &stem_b.pp(1),
                c0,
                c0,
                3,
                2,
                MobileOneOptions {
                    kind: ConvKind::Depthwise,
                    use_scale_branch: scale,
                    ..Default::default()
                },
            )?,
            MobileOneBlock::new(
                &stem_b.pp(2),
                c0,
                c0,
                1,
                1,
                MobileOneOptions {
                    use_scale_branch: scale,
                    ..Default::default()
                },
            )?,
        ];
        let mut stages = Vec::with_capacity(cfg.layers.len());
        let mut prev = c0;
        for (i, &depth) in cfg.layers.iter().enumerate() {
            let sb = b.pp("stages").pp(i);
            let dim = cfg.embed_dims[i];
            // timm downsamples every stage after the first (`downsamples` default) and any
            // stage whose width changes.
            let downsample = if i > 0 || prev != dim {
                Some(PatchEmbed::new(
                    &sb.pp("downsample"),
                    prev,
                    dim,
                    cfg.down_patch_size,
                    cfg.down_stride,
                    cfg.se_downsamples[i],
                    cfg.lkc_use_act,
                )?)
            } else {
                None
            };
            let pos_emb = if cfg.pos_embs[i] {
                Some(RepCpe::new(&sb.pp("pos_emb"), dim)?)
            } else {
                None
            };
            let blocks =
                (0..depth)
                    .map(|j| {
                        let bb = sb.pp("blocks").pp(j);
                        let ratio = cfg.mlp_ratios[i];
                        let ls = cfg.layer_scale_init_value;
                        Ok(match cfg.token_mixers[i] {
                            TokenMixer::Repmixer => Block::RepMixer(Box::new(RepMixerBlock::new(
                                &bb,
                                dim,
                                cfg.repmixer_kernel_size,
                                ratio,
                                ls,
                            )?)),
                            TokenMixer::Attention => Block::Attention(Box::new(
                                AttentionBlock::new(&bb, dim, ratio, ls, cfg.attn_norm)?,
                            )),
                        })
                    })
                    .collect::<Result<_>>()?;
            stages.push(Stage {
                downsample,
                pos_emb,
                blocks,
            });
            prev = dim;
        }
        let final_width = (prev as f64 * cfg.cls_ratio) as usize;
        let final_conv = MobileOneBlock::new(
            &b.pp("final_conv"),
            prev,
            final_width,
            3,
            1,
            MobileOneOptions {
                kind: ConvKind::Depthwise,
                use_se: true,
                ..Default::default()
            },
        )?;
        let head = Linear::new(
            b.vb().pp("head").pp("fc"),
            final_width,
            cfg.num_classes,
            true,
        )?;
        Ok(Self {
            stem,
            stages,
            final_conv,
            head,
        })
    }

    /// The tower as a sequence of units (stem blocks, downsampling layers, position
    /// embeddings, blocks, then the final convolution with pooling and head), each mapping
    /// one activation to the next: [`FastVit::forward`] runs them in order, and a trainer that
    /// recomputes activations keeps only the units' inputs.
    pub fn units(&self) -> usize {
        self.stem.len()
            + self
                .stages
                .iter()
                .map(|s| {
                    usize::from(s.downsample.is_some())
                        + usize::from(s.pos_emb.is_some())
                        + s.blocks.len()
                })
                .sum::<usize>()
            + 1
    }

    /// Applies unit `index` (see [`FastVit::units`]) to its input.
    pub fn forward_unit(&self, index: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut i = index;
        if let Some(block) = self.stem.get(i) {
            return block.forward(x, mode);
        }
        i -= self.stem.len();
        for stage in &self.stages {
            if let Some(down) = &stage.downsample {
                if i == 0 {
                    return down.forward(x, mode);
                }
                i -= 1;
            }
            if let Some(pe) = &stage.pos_emb {
                if i == 0 {
                    return pe.forward(x);
                }
                i -= 1;
            }
            if let Some(block) = stage.blocks.get(i) {
                return match block {
                    Block::RepMixer(b) => b.forward(x, mode),
                    Block::Attention(b) => b.forward(x, mode),
                };
            }
            i -= stage.blocks.len();
        }
        if i != 0 {
            candle_core::bail!("FastViT has {} units, not {}", self.units(), index + 1);
        }
        let x = self.final_conv.forward(x, mode)?;
        let pooled = x.flatten_from(2)?.mean(D::Minus1)?;
        self.head.forward(&pooled)
    }

    /// The changes that reparameterise the tower (see [`reparam`]): applied to its state
    /// dict, they give the state dict of the same tower built in inference mode.
    pub fn fused(&self) -> Result<reparam::Fused> {
        let mut out = reparam::Fused::default();
        for block in &self.stem {
            block.fuse_into(&mut out)?;
        }
        for stage in &self.stages {
            if let Some(down) = &stage.downsample {
                down.fuse_into(&mut out)?;
            }
            if let Some(pe) = &stage.pos_emb {
                pe.fuse_into(&mut out)?;
            }
            for block in &stage.blocks {
                if let Block::RepMixer(b) = block {
                    b.fuse_into(&mut out)?;
                }
            }
        }
        self.final_conv.fuse_into(&mut out)?;
        Ok(out)
    }

    /// Image embeddings `[B, num_classes]` of `[B, 3, S, S]` images.
    pub fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut x = images.clone();
        for i in 0..self.units() {
            x = self.forward_unit(i, &x, mode)?;
        }
        Ok(x)
    }
}
