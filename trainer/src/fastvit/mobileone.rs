//! Re-parameterisable convolution blocks in their train-time (branched) form: MobileOne and
//! the large-kernel convolution of the downsampling layers.

use candle_core::{Result, Tensor};
use dfndr_teachers::blocks::gelu_erf;

use super::reparam::{identity_kernel, pad_kernel, Fused};
use crate::layers::{BatchNorm2d, Builder, Conv2d, ConvBn, ConvKind, Mode, SqueezeExcite};

/// Options of one [`MobileOneBlock`] beyond its channels, kernel and stride.
#[derive(Clone, Copy, Debug)]
pub struct MobileOneOptions {
    /// Depthwise (`group_size = 1` in timm) or dense.
    pub kind: ConvKind,
    /// Squeeze-excite (ratio 1/16, divisor 1) before the activation.
    pub use_se: bool,
    /// GELU at the end.
    pub use_act: bool,
    /// The 1×1 scale branch (only when the kernel is larger than 1).
    pub use_scale_branch: bool,
    /// Number of k×k branches (`conv_kxk.{i}`).
    pub conv_branches: usize,
}

impl Default for MobileOneOptions {
    fn default() -> Self {
        Self {
            kind: ConvKind::Dense,
            use_se: false,
            use_act: true,
            use_scale_branch: true,
            conv_branches: 1,
        }
    }
}

/// timm's `MobileOneBlock`: `act(se(conv_scale(x) + identity(x) + Σ conv_kxk[i](x)))`, or in
/// its reparameterised form `act(se(reparam_conv(x)))`.
#[derive(Clone, Debug)]
pub struct MobileOneBlock {
    prefix: String,
    reparam: Option<Conv2d>,
    in_per_group: usize,
    kernel: usize,
    identity: Option<BatchNorm2d>,
    conv_scale: Option<ConvBn>,
    conv_kxk: Vec<ConvBn>,
    se: Option<SqueezeExcite>,
    use_act: bool,
}

impl MobileOneBlock {
    /// Loads the block at `b`'s prefix.
    pub fn new(
        b: &Builder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        opts: MobileOneOptions,
    ) -> Result<Self> {
        let se = if opts.use_se {
            let reduced = SqueezeExcite::reduced_channels(out_ch, 1.0 / 16.0, 1);
            Some(SqueezeExcite::new(&b.pp("se"), out_ch, reduced)?)
        } else {
            None
        };
        let in_per_group = match opts.kind {
            ConvKind::Depthwise => 1,
            ConvKind::Dense => in_ch,
        };
        let mut block = Self {
            prefix: b.vb().prefix(),
            reparam: None,
            in_per_group,
            kernel,
            identity: None,
            conv_scale: None,
            conv_kxk: Vec::new(),
            se,
            use_act: opts.use_act,
        };
        if b.inference_mode() {
            block.reparam = Some(Conv2d::new(
                &b.pp("reparam_conv"),
                in_ch,
                out_ch,
                kernel,
                stride,
                opts.kind,
                true,
                None,
            )?);
            return Ok(block);
        }
        block.identity = if in_ch == out_ch && stride == 1 {
            Some(BatchNorm2d::new(&b.pp("identity"), in_ch)?)
        } else {
            None
        };
        block.conv_scale = if kernel > 1 && opts.use_scale_branch {
            Some(ConvBn::new(
                &b.pp("conv_scale"),
                in_ch,
                out_ch,
                1,
                stride,
                opts.kind,
            )?)
        } else {
            None
        };
        block.conv_kxk = (0..opts.conv_branches)
            .map(|i| {
                ConvBn::new(
                    &b.pp("conv_kxk").pp(i),
                    in_ch,
                    out_ch,
                    kernel,
                    stride,
                    opts.kind,
                )
            })
            .collect::<Result<_>>()?;
        Ok(block)
    }

    /// The sum of the branches (before squeeze-excite and activation) as one biased
    /// convolution `(weight, bias)`: each conv+BN folded, the 1×1 scale kernel zero-padded to
    /// k×k, the identity BatchNorm as a one-hot centre kernel.
    pub fn fused_kernel(&self) -> Result<(Tensor, Tensor)> {
        if let Some(conv) = &self.reparam {
            let bias = match conv.bias() {
                Some(b) => b.clone(),
                None => candle_core::bail!("{}: reparam_conv without bias", self.prefix),
            };
            return Ok((conv.weight().clone(), bias));
        }
        let mut parts = Vec::new();
        for conv in &self.conv_kxk {
            parts.push(conv.fused()?);
        }
        if let Some(scale) = &self.conv_scale {
            let (w, b) = scale.fused()?;
            parts.push((pad_kernel(&w, self.kernel)?, b));
        }
        if let Some(bn) = &self.identity {
            let (scale, shift) = bn.eval_affine()?;
            let c = scale.dim(0)?;
            let id = identity_kernel(c, self.in_per_group, self.kernel, scale.device())?;
            parts.push((id.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?, shift));
        }
        let mut parts = parts.into_iter();
        let Some((mut w, mut b)) = parts.next() else {
            candle_core::bail!("{}: a MobileOne block without branches", self.prefix);
        };
        for (pw, pb) in parts {
            w = (w + pw)?;
            b = (b + pb)?;
        }
        Ok((w, b))
    }

    /// Records the block's fused form (`PREFIX.reparam_conv`; `se` stays) in `out`.
    pub fn fuse_into(&self, out: &mut Fused) -> Result<()> {
        let (w, b) = self.fused_kernel()?;
        out.replace(
            &self.prefix,
            &["identity", "conv_scale", "conv_kxk"],
            "reparam_conv",
            w,
            b,
        );
        Ok(())
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if let Some(conv) = &self.reparam {
            return self.finish(conv.forward(x)?);
        }
        let mut branches = Vec::with_capacity(2 + self.conv_kxk.len());
        if let Some(scale) = &self.conv_scale {
            branches.push(scale.forward(x, mode)?);
        }
        if let Some(identity) = &self.identity {
            branches.push(identity.forward(x, mode)?);
        }
        for conv in &self.conv_kxk {
            branches.push(conv.forward(x, mode)?);
        }
        self.finish(sum(branches)?)
    }

    fn finish(&self, mut out: Tensor) -> Result<Tensor> {
        if let Some(se) = &self.se {
            out = se.forward(&out)?;
        }
        if self.use_act {
            out = gelu_erf(&out)?;
        }
        Ok(out)
    }
}

/// The sum of at least one tensor, left to right (timm's order).
fn sum(parts: Vec<Tensor>) -> Result<Tensor> {
    let mut parts = parts.into_iter();
    let Some(mut acc) = parts.next() else {
        candle_core::bail!("a MobileOne block without branches");
    };
    for p in parts {
        acc = (acc + p)?;
    }
    Ok(acc)
}

/// timm's `ReparamLargeKernelConv` (train-time form): `act(se(large_conv(x) + small_conv(x)))`,
/// both depthwise with a channel multiplier.
#[derive(Clone, Debug)]
pub struct LargeKernelConv {
    prefix: String,
    branches: LargeKernelBranches,
    se: Option<SqueezeExcite>,
    use_act: bool,
}

/// The two branches of a [`LargeKernelConv`], or their fused convolution.
#[derive(Clone, Debug)]
enum LargeKernelBranches {
    Train {
        large_conv: ConvBn,
        small_conv: ConvBn,
        kernel: usize,
    },
    Fused(Conv2d),
}

impl LargeKernelConv {
    /// Loads `PREFIX.large_conv`, `PREFIX.small_conv` and, with `use_se`, `PREFIX.se` (ratio
    /// 1/4, divisor 8).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &Builder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        small_kernel: usize,
        stride: usize,
        use_se: bool,
        use_act: bool,
    ) -> Result<Self> {
        let kind = ConvKind::Depthwise;
        let se = if use_se {
            let reduced = SqueezeExcite::reduced_channels(out_ch, 0.25, 8);
            Some(SqueezeExcite::new(&b.pp("se"), out_ch, reduced)?)
        } else {
            None
        };
        let branches = if b.inference_mode() {
            LargeKernelBranches::Fused(Conv2d::new(
                &b.pp("reparam_conv"),
                in_ch,
                out_ch,
                kernel,
                stride,
                kind,
                true,
                None,
            )?)
        } else {
            LargeKernelBranches::Train {
                large_conv: ConvBn::new(&b.pp("large_conv"), in_ch, out_ch, kernel, stride, kind)?,
                small_conv: ConvBn::new(
                    &b.pp("small_conv"),
                    in_ch,
                    out_ch,
                    small_kernel,
                    stride,
                    kind,
                )?,
                kernel,
            }
        };
        Ok(Self {
            prefix: b.vb().prefix(),
            branches,
            se,
            use_act,
        })
    }

    /// Records the fused form (`PREFIX.reparam_conv`: the large kernel plus the small one
    /// zero-padded to its size; `se` stays) in `out`.
    pub fn fuse_into(&self, out: &mut Fused) -> Result<()> {
        let (w, b) = match &self.branches {
            LargeKernelBranches::Train {
                large_conv,
                small_conv,
                kernel,
            } => {
                let (wl, bl) = large_conv.fused()?;
                let (ws, bs) = small_conv.fused()?;
                ((wl + pad_kernel(&ws, *kernel)?)?, (bl + bs)?)
            }
            LargeKernelBranches::Fused(_) => return Ok(()),
        };
        out.replace(
            &self.prefix,
            &["large_conv", "small_conv"],
            "reparam_conv",
            w,
            b,
        );
        Ok(())
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut out = match &self.branches {
            LargeKernelBranches::Train {
                large_conv,
                small_conv,
                ..
            } => (large_conv.forward(x, mode)? + small_conv.forward(x, mode)?)?,
            LargeKernelBranches::Fused(conv) => conv.forward(x)?,
        };
        if let Some(se) = &self.se {
            out = se.forward(&out)?;
        }
        if self.use_act {
            out = gelu_erf(&out)?;
        }
        Ok(out)
    }
}
