//! Re-parameterisable convolution blocks in their train-time (branched) form: MobileOne and
//! the large-kernel convolution of the downsampling layers.

use candle_core::{Result, Tensor};
use dfndr_teachers::blocks::gelu_erf;

use crate::layers::{BatchNorm2d, Builder, ConvBn, ConvKind, Mode, SqueezeExcite};

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

/// timm's `MobileOneBlock`: `act(se(conv_scale(x) + identity(x) + Σ conv_kxk[i](x)))`.
#[derive(Clone, Debug)]
pub struct MobileOneBlock {
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
        let identity = if in_ch == out_ch && stride == 1 {
            Some(BatchNorm2d::new(&b.pp("identity"), in_ch)?)
        } else {
            None
        };
        let conv_scale = if kernel > 1 && opts.use_scale_branch {
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
        let conv_kxk = (0..opts.conv_branches)
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
        let se = if opts.use_se {
            let reduced = SqueezeExcite::reduced_channels(out_ch, 1.0 / 16.0, 1);
            Some(SqueezeExcite::new(&b.pp("se"), out_ch, reduced)?)
        } else {
            None
        };
        Ok(Self {
            identity,
            conv_scale,
            conv_kxk,
            se,
            use_act: opts.use_act,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
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
        let mut out = sum(branches)?;
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
    large_conv: ConvBn,
    small_conv: ConvBn,
    se: Option<SqueezeExcite>,
    use_act: bool,
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
        Ok(Self {
            large_conv: ConvBn::new(&b.pp("large_conv"), in_ch, out_ch, kernel, stride, kind)?,
            small_conv: ConvBn::new(
                &b.pp("small_conv"),
                in_ch,
                out_ch,
                small_kernel,
                stride,
                kind,
            )?,
            se,
            use_act,
        })
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut out = (self.large_conv.forward(x, mode)? + self.small_conv.forward(x, mode)?)?;
        if let Some(se) = &self.se {
            out = se.forward(&out)?;
        }
        if self.use_act {
            out = gelu_erf(&out)?;
        }
        Ok(out)
    }
}
