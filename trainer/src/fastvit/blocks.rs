//! FastViT's metaformer blocks (train-time form): RepMixer and attention blocks, their
//! convolutional MLP, the conditional positional encoding and the downsampling patch embed.

use candle_core::{Result, Tensor};
use dfndr_teachers::blocks::gelu_erf;
use dfndr_teachers::blocks::{softmax_last_dim, Kernels, Linear};

use super::mobileone::{LargeKernelConv, MobileOneBlock, MobileOneOptions};
use crate::layers::{BatchNorm2d, Builder, Conv2d, ConvBn, ConvKind, LayerScale2d, Mode};

/// timm's `ConvMlp`: depthwise 7×7 conv + BN (`conv`), then `fc1` → GELU → `fc2` (1×1, biased).
#[derive(Clone, Debug)]
pub struct ConvMlp {
    conv: ConvBn,
    fc1: Conv2d,
    fc2: Conv2d,
}

impl ConvMlp {
    /// Loads `PREFIX.conv`, `PREFIX.fc1`, `PREFIX.fc2`.
    pub fn new(b: &Builder, dim: usize, hidden: usize) -> Result<Self> {
        let dense = ConvKind::Dense;
        Ok(Self {
            conv: ConvBn::new(&b.pp("conv"), dim, dim, 7, 1, ConvKind::Depthwise)?,
            fc1: Conv2d::new(&b.pp("fc1"), dim, hidden, 1, 1, dense, true, None)?,
            fc2: Conv2d::new(&b.pp("fc2"), hidden, dim, 1, 1, dense, true, None)?,
        })
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = self.conv.forward(x, mode)?;
        self.fc2.forward(&gelu_erf(&self.fc1.forward(&x)?)?)
    }
}

/// `RepMixerBlock`: `x + γ₁·(mixer(x) − norm(x))`, then `x + γ₂·mlp(x)`.
#[derive(Clone, Debug)]
pub struct RepMixerBlock {
    norm: MobileOneBlock,
    mixer: MobileOneBlock,
    mixer_scale: LayerScale2d,
    mlp: ConvMlp,
    layer_scale: LayerScale2d,
}

impl RepMixerBlock {
    /// Loads `PREFIX.token_mixer.{norm,mixer,layer_scale}`, `PREFIX.mlp`, `PREFIX.layer_scale`.
    pub fn new(
        b: &Builder,
        dim: usize,
        kernel: usize,
        mlp_ratio: f64,
        ls_init: f64,
    ) -> Result<Self> {
        let tm = b.pp("token_mixer");
        let dw = MobileOneOptions {
            kind: ConvKind::Depthwise,
            use_act: false,
            ..Default::default()
        };
        let norm_opts = MobileOneOptions {
            use_scale_branch: false,
            conv_branches: 0,
            ..dw
        };
        Ok(Self {
            norm: MobileOneBlock::new(&tm.pp("norm"), dim, dim, kernel, 1, norm_opts)?,
            mixer: MobileOneBlock::new(&tm.pp("mixer"), dim, dim, kernel, 1, dw)?,
            mixer_scale: LayerScale2d::new(&tm.pp("layer_scale"), dim, ls_init)?,
            mlp: ConvMlp::new(&b.pp("mlp"), dim, (dim as f64 * mlp_ratio) as usize)?,
            layer_scale: LayerScale2d::new(&b.pp("layer_scale"), dim, ls_init)?,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mixed = (self.mixer.forward(x, mode)? - self.norm.forward(x, mode)?)?;
        let x = (x + self.mixer_scale.forward(&mixed)?)?;
        let mlp = self.mlp.forward(&x, mode)?;
        x + self.layer_scale.forward(&mlp)?
    }
}

/// Multi-head self-attention over the pixels of `[B, C, H, W]` (head width 32, `qkv` without
/// bias, `proj` with bias).
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

/// Width of one attention head in FastViT.
pub const HEAD_DIM: usize = 32;

impl Attention {
    /// Loads `PREFIX.qkv` and `PREFIX.proj`.
    pub fn new(b: &Builder, dim: usize) -> Result<Self> {
        if !dim.is_multiple_of(HEAD_DIM) {
            candle_core::bail!(
                "attention width {dim} at {} is not a multiple of the head width {HEAD_DIM}",
                b.vb().prefix()
            );
        }
        Ok(Self {
            qkv: Linear::new(b.vb().pp("qkv"), dim, 3 * dim, false)?,
            proj: Linear::new(b.vb().pp("proj"), dim, dim, true)?,
            heads: dim / HEAD_DIM,
        })
    }

    /// Applies attention.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?;
        let qkv = self
            .qkv
            .forward(&tokens)?
            .reshape((b, n, 3, self.heads, HEAD_DIM))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let q = (q * (HEAD_DIM as f64).powf(-0.5))?;
        let scores = q.matmul(&k.t()?)?;
        // The differentiable softmax: the fused one has no backward pass.
        let weights = softmax_last_dim(&scores, Kernels::Differentiable)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))
    }
}

/// `AttentionBlock`: `x + γ₁·attn(norm(x))`, then `x + γ₂·mlp(x)`.
#[derive(Clone, Debug)]
pub struct AttentionBlock {
    norm: BatchNorm2d,
    attn: Attention,
    layer_scale_1: LayerScale2d,
    mlp: ConvMlp,
    layer_scale_2: LayerScale2d,
}

impl AttentionBlock {
    /// Loads `PREFIX.norm`, `PREFIX.token_mixer`, `PREFIX.mlp` and both layer scales.
    pub fn new(b: &Builder, dim: usize, mlp_ratio: f64, ls_init: f64) -> Result<Self> {
        Ok(Self {
            norm: BatchNorm2d::new(&b.pp("norm"), dim)?,
            attn: Attention::new(&b.pp("token_mixer"), dim)?,
            layer_scale_1: LayerScale2d::new(&b.pp("layer_scale_1"), dim, ls_init)?,
            mlp: ConvMlp::new(&b.pp("mlp"), dim, (dim as f64 * mlp_ratio) as usize)?,
            layer_scale_2: LayerScale2d::new(&b.pp("layer_scale_2"), dim, ls_init)?,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let attn = self.attn.forward(&self.norm.forward(x, mode)?)?;
        let x = (x + self.layer_scale_1.forward(&attn)?)?;
        let mlp = self.mlp.forward(&x, mode)?;
        x + self.layer_scale_2.forward(&mlp)?
    }
}

/// `RepConditionalPosEnc`: `x + pos_enc(x)`, a biased depthwise 7×7 convolution.
#[derive(Clone, Debug)]
pub struct RepCpe {
    pos_enc: Conv2d,
}

impl RepCpe {
    /// Loads `PREFIX.pos_enc`.
    pub fn new(b: &Builder, dim: usize) -> Result<Self> {
        Ok(Self {
            pos_enc: Conv2d::new(
                &b.pp("pos_enc"),
                dim,
                dim,
                7,
                1,
                ConvKind::Depthwise,
                true,
                Some(3),
            )?,
        })
    }

    /// Applies the encoding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.pos_enc.forward(x)? + x
    }
}

/// `PatchEmbed`: a large-kernel depthwise convolution (channel multiplier out/in, stride 2),
/// then a 1×1 MobileOne block (`proj.0`, `proj.1`).
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    large: LargeKernelConv,
    pointwise: MobileOneBlock,
}

impl PatchEmbed {
    /// Loads `PREFIX.proj.0` and `PREFIX.proj.1`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &Builder,
        in_ch: usize,
        out_ch: usize,
        patch: usize,
        stride: usize,
        use_se: bool,
        lkc_use_act: bool,
    ) -> Result<Self> {
        let proj = b.pp("proj");
        Ok(Self {
            large: LargeKernelConv::new(
                &proj.pp(0),
                in_ch,
                out_ch,
                patch,
                3,
                stride,
                use_se,
                lkc_use_act,
            )?,
            pointwise: MobileOneBlock::new(
                &proj.pp(1),
                out_ch,
                out_ch,
                1,
                1,
                MobileOneOptions::default(),
            )?,
        })
    }

    /// Applies the embedding.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.pointwise.forward(&self.large.forward(x, mode)?, mode)
    }
}
