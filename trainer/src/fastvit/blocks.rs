//! FastViT's metaformer blocks (train-time form): RepMixer and attention blocks, their
//! convolutional MLP, the conditional positional encoding and the downsampling patch embed.

use candle_core::{Result, Tensor};
use dfndr_teachers::blocks::gelu_erf;

use super::mobileone::{LargeKernelConv, MobileOneBlock, MobileOneOptions};
use super::reparam::{identity_kernel, Fused};
use super::AttnNorm;
use crate::layers::{
    BatchNorm2d, Builder, Conv2d, ConvBn, ConvKind, LayerNorm2d, LayerScale2d, Mode, SelfAttention,
};

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

/// `RepMixerBlock`: `x + γ₁·(mixer(x) − norm(x))`, then `x + γ₂·mlp(x)`; reparameterised,
/// the first half is one depthwise convolution (`token_mixer.reparam_conv`).
#[derive(Clone, Debug)]
pub struct RepMixerBlock {
    mixer: TokenMixerForm,
    mlp: ConvMlp,
    layer_scale: LayerScale2d,
}

/// The RepMixer token mixer in either form.
#[derive(Clone, Debug)]
enum TokenMixerForm {
    Train {
        prefix: String,
        kernel: usize,
        norm: Box<MobileOneBlock>,
        mixer: Box<MobileOneBlock>,
        scale: LayerScale2d,
    },
    Fused(Conv2d),
}

impl RepMixerBlock {
    /// Loads `PREFIX.token_mixer.{norm,mixer,layer_scale}` (or `token_mixer.reparam_conv` in
    /// inference mode), `PREFIX.mlp`, `PREFIX.layer_scale`.
    pub fn new(
        b: &Builder,
        dim: usize,
        kernel: usize,
        mlp_ratio: f64,
        ls_init: f64,
    ) -> Result<Self> {
        let tm = b.pp("token_mixer");
        let mixer = if b.inference_mode() {
            TokenMixerForm::Fused(Conv2d::new(
                &tm.pp("reparam_conv"),
                dim,
                dim,
                kernel,
                1,
                ConvKind::Depthwise,
                true,
                Some(kernel / 2),
            )?)
        } else {
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
            TokenMixerForm::Train {
                prefix: tm.vb().prefix(),
                kernel,
                norm: Box::new(MobileOneBlock::new(
                    &tm.pp("norm"),
                    dim,
                    dim,
                    kernel,
                    1,
                    norm_opts,
                )?),
                mixer: Box::new(MobileOneBlock::new(
                    &tm.pp("mixer"),
                    dim,
                    dim,
                    kernel,
                    1,
                    dw,
                )?),
                scale: LayerScale2d::new(&tm.pp("layer_scale"), dim, ls_init)?,
            }
        };
        Ok(Self {
            mixer,
            mlp: ConvMlp::new(&b.pp("mlp"), dim, (dim as f64 * mlp_ratio) as usize)?,
            layer_scale: LayerScale2d::new(&b.pp("layer_scale"), dim, ls_init)?,
        })
    }

    /// Records the fused token mixer, `I + γ·(W_mixer − W_norm)` with bias
    /// `γ·(b_mixer − b_norm)`, in `out`.
    pub fn fuse_into(&self, out: &mut Fused) -> Result<()> {
        let TokenMixerForm::Train {
            prefix,
            kernel,
            norm,
            mixer,
            scale,
        } = &self.mixer
        else {
            return Ok(());
        };
        let (wm, bm) = mixer.fused_kernel()?;
        let (wn, bn) = norm.fused_kernel()?;
        let gamma = scale.gamma().flatten_all()?;
        let c = gamma.dim(0)?;
        let id = identity_kernel(c, 1, *kernel, gamma.device())?;
        let w = (id + (wm - wn)?.broadcast_mul(&gamma.reshape((c, 1, 1, 1))?)?)?;
        let b = ((bm - bn)? * &gamma)?;
        out.replace(
            prefix,
            &["norm", "mixer", "layer_scale"],
            "reparam_conv",
            w,
            b,
        );
        Ok(())
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = match &self.mixer {
            TokenMixerForm::Train {
                norm, mixer, scale, ..
            } => {
                let mixed = (mixer.forward(x, mode)? - norm.forward(x, mode)?)?;
                scale.residual(x, &mixed)?
            }
            TokenMixerForm::Fused(conv) => conv.forward(x)?,
        };
        let mlp = self.mlp.forward(&x, mode)?;
        self.layer_scale.residual(&x, &mlp)
    }
}

/// Multi-head self-attention over the pixels of `[B, C, H, W]` (head width 32, `qkv` without
/// bias, `proj` with bias).
#[derive(Clone, Debug)]
pub struct Attention {
    inner: SelfAttention,
}

/// Width of one attention head in FastViT.
pub const HEAD_DIM: usize = 32;

impl Attention {
    /// Loads `PREFIX.qkv` and `PREFIX.proj`.
    pub fn new(b: &Builder, dim: usize) -> Result<Self> {
        Ok(Self {
            inner: SelfAttention::new(b, dim, HEAD_DIM, false)?,
        })
    }

    /// Applies attention; in [`Mode::Eval`] with the inference kernels (no backward pass).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?;
        let out = if mode == Mode::Eval {
            self.inner.forward_inference(&tokens, None)?
        } else {
            self.inner.forward(&tokens)?
        };
        out.transpose(1, 2)?.reshape((b, c, h, w))
    }
}

/// The normalisation of an [`AttentionBlock`].
#[derive(Clone, Debug)]
enum Norm2d {
    Batch(BatchNorm2d),
    Layer(LayerNorm2d),
}

impl Norm2d {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            Norm2d::Batch(bn) => bn.forward(x, mode),
            Norm2d::Layer(ln) if mode == Mode::Eval => ln.forward_inference(x),
            Norm2d::Layer(ln) => ln.forward(x),
        }
    }
}

/// `AttentionBlock`: `x + γ₁·attn(norm(x))`, then `x + γ₂·mlp(x)`.
#[derive(Clone, Debug)]
pub struct AttentionBlock {
    norm: Norm2d,
    attn: Attention,
    layer_scale_1: LayerScale2d,
    mlp: ConvMlp,
    layer_scale_2: LayerScale2d,
}

impl AttentionBlock {
    /// Loads `PREFIX.norm`, `PREFIX.token_mixer`, `PREFIX.mlp` and both layer scales.
    pub fn new(
        b: &Builder,
        dim: usize,
        mlp_ratio: f64,
        ls_init: f64,
        norm: AttnNorm,
    ) -> Result<Self> {
        let norm = match norm {
            AttnNorm::BatchNorm => Norm2d::Batch(BatchNorm2d::new(&b.pp("norm"), dim)?),
            // timm's MCi3/4: LayerNorm2d(eps=1e-5).
            AttnNorm::LayerNorm => Norm2d::Layer(LayerNorm2d::new(&b.pp("norm"), dim, 1e-5)?),
        };
        Ok(Self {
            norm,
            attn: Attention::new(&b.pp("token_mixer"), dim)?,
            layer_scale_1: LayerScale2d::new(&b.pp("layer_scale_1"), dim, ls_init)?,
            mlp: ConvMlp::new(&b.pp("mlp"), dim, (dim as f64 * mlp_ratio) as usize)?,
            layer_scale_2: LayerScale2d::new(&b.pp("layer_scale_2"), dim, ls_init)?,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let attn = self.attn.forward(&self.norm.forward(x, mode)?, mode)?;
        let x = self.layer_scale_1.residual(x, &attn)?;
        let mlp = self.mlp.forward(&x, mode)?;
        self.layer_scale_2.residual(&x, &mlp)
    }
}

/// `RepConditionalPosEnc`: `x + pos_enc(x)`, a biased depthwise 7×7 convolution;
/// reparameterised, one convolution with the identity in its kernel (`reparam_conv`).
#[derive(Clone, Debug)]
pub struct RepCpe {
    prefix: String,
    conv: Conv2d,
    fused: bool,
}

impl RepCpe {
    /// Loads `PREFIX.pos_enc` (or `PREFIX.reparam_conv` in inference mode).
    pub fn new(b: &Builder, dim: usize) -> Result<Self> {
        let fused = b.inference_mode();
        let name = if fused { "reparam_conv" } else { "pos_enc" };
        Ok(Self {
            prefix: b.vb().prefix(),
            conv: Conv2d::new(
                &b.pp(name),
                dim,
                dim,
                7,
                1,
                ConvKind::Depthwise,
                true,
                Some(3),
            )?,
            fused,
        })
    }

    /// Records the fused form, `I + W_pe` with the same bias, in `out`.
    pub fn fuse_into(&self, out: &mut Fused) -> Result<()> {
        if self.fused {
            return Ok(());
        }
        let w = self.conv.weight();
        let (c, _, k, _) = w.dims4()?;
        let Some(bias) = self.conv.bias() else {
            candle_core::bail!("{}: pos_enc without bias", self.prefix);
        };
        let fused = (identity_kernel(c, 1, k, w.device())? + w)?;
        out.replace(
            &self.prefix,
            &["pos_enc"],
            "reparam_conv",
            fused,
            bias.clone(),
        );
        Ok(())
    }

    /// Applies the encoding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            return self.conv.forward(x);
        }
        self.conv.forward(x)? + x
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

    /// Records the fused forms of both layers in `out`.
    pub fn fuse_into(&self, out: &mut Fused) -> Result<()> {
        self.large.fuse_into(out)?;
        self.pointwise.fuse_into(out)
    }

    /// Applies the embedding.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.pointwise.forward(&self.large.forward(x, mode)?, mode)
    }
}
