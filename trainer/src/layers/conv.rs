//! Convolutions as FastViT uses them: depthwise (with a channel multiplier), pointwise, and
//! dense k×k on the network's input, each differentiable without candle's grouped or
//! transposed convolution backward passes.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use candle_nn::Init;
use rayon::prelude::*;

use super::{BatchNorm2d, Builder, Mode};
use crate::ops::{
    depthwise_conv2d, depthwise_conv2d_bias, pointwise_conv, pointwise_conv_bias, scale_channels,
    DepthwiseGeometry,
};

/// How a convolution's channels are connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKind {
    /// `groups = in_channels`: every output channel reads one input channel (out = in × m).
    Depthwise,
    /// `groups = 1`.
    Dense,
}

/// `nn.Conv2d` with keys `weight` (and `bias`); padding `((s − 1) + (k − 1)) / 2` as timm's
/// `create_conv2d` computes it, unless given.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    kind: ConvKind,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads `PREFIX.weight` (`[out, in/groups, k, k]`) and, with `bias`, `PREFIX.bias`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &Builder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        kind: ConvKind,
        bias: bool,
        padding: Option<usize>,
    ) -> Result<Self> {
        let in_per_group = match kind {
            ConvKind::Depthwise => {
                if !out_ch.is_multiple_of(in_ch) {
                    candle_core::bail!(
                        "depthwise conv {}: {out_ch} outputs is not a multiple of {in_ch} inputs",
                        b.vb().prefix()
                    );
                }
                1
            }
            ConvKind::Dense => in_ch,
        };
        // torch's default (kaiming-uniform with a = √5) bound: 1/√fan_in.
        let bound = 1.0 / ((in_per_group * kernel * kernel) as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = b.param((out_ch, in_per_group, kernel, kernel), "weight", uniform)?;
        let bias = if bias {
            Some(b.param(out_ch, "bias", uniform)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            kind,
            kernel,
            stride,
            padding: padding.unwrap_or(((stride - 1) + (kernel - 1)) / 2),
        })
    }

    /// The weight, `[out, in/groups, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the convolution to `[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.weight, self.bias.as_ref())
    }

    /// Applies the convolution's geometry with `weight` and `bias` in place of its own (a
    /// BatchNorm folded into them in evaluation). The bias is added inside the convolution
    /// (each output starts as it), not in a pass of its own.
    pub fn forward_with(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let o = weight.dim(0)?;
        match self.kind {
            ConvKind::Depthwise => {
                let geometry = DepthwiseGeometry {
                    stride: self.stride,
                    padding: self.padding,
                };
                match bias {
                    Some(bias) => depthwise_conv2d_bias(x, weight, bias, geometry),
                    None => depthwise_conv2d(x, weight, geometry),
                }
            }
            ConvKind::Dense if self.kernel == 1 && self.stride == 1 => {
                dense_product(x, &weight.reshape((o, ()))?, bias)
            }
            ConvKind::Dense if self.kernel == self.stride && self.padding == 0 => {
                dense_product(&self.patchify(x)?, &weight.reshape((o, ()))?, bias)
            }
            ConvKind::Dense => {
                dense_product(&self.dense_on_input(x)?, &weight.reshape((o, ()))?, bias)
            }
        }
    }

    /// The patches of a dense k×k convolution with stride k and no padding (a ViT patch
    /// embedding, a conv stem's 2×2 stride-2 layers) as the channels of a 1×1 convolution's
    /// input: the non-overlapping patches regrouped by a reshape and a permutation (both
    /// differentiable). Rows and columns past the last whole patch are dropped, as torch does.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let k = self.kernel;
        let (ho, wo) = (h / k, w / k);
        if ho == 0 || wo == 0 {
            candle_core::bail!(
                "a {k}x{k} stride-{k} convolution needs at least {k}x{k} pixels, got {h}x{w}"
            );
        }
        let x = if ho * k != h || wo * k != w {
            x.narrow(2, 0, ho * k)?.narrow(3, 0, wo * k)?
        } else {
            x.clone()
        };
        // [N, C, Ho, k, Wo, k] → [N, C, k, k, Ho, Wo]: channel index c·k·k + ky·k + kx, the
        // order of the weight's [O, C, k, k] layout.
        x.reshape((n, c, ho, k, wo, k))?
            .permute((0, 1, 3, 5, 2, 4))?
            .contiguous()?
            .reshape((n, c * k * k, ho, wo))
    }

    /// The patches of a dense k×k convolution as the channels of a 1×1 convolution's input.
    /// They are extracted without a backward pass, so this is only for inputs that need no
    /// gradient: the image at the network's stem.
    fn dense_on_input(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            candle_core::bail!(
                "a dense {0}x{0} convolution is only supported on the network input",
                self.kernel
            );
        }
        let (n, _, h, w) = x.dims4()?;
        let k = self.kernel;
        let ho = (h + 2 * self.padding - k) / self.stride + 1;
        let wo = (w + 2 * self.padding - k) / self.stride + 1;
        let cols = x.contiguous()?.apply_op1_no_bwd(&Im2Col {
            kernel: k,
            stride: self.stride,
            padding: self.padding,
        })?;
        // The patch matrix as a C·k·k-channel input of a 1×1 convolution: one product per
        // sample, and no gradient for the patches (they track none).
        cols.reshape((n, (), ho, wo))
    }
}

/// `w [O, C]` (and the bias) applied to `x [N, C, H, W]`.
fn dense_product(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => pointwise_conv_bias(x, w, b),
        None => pointwise_conv(x, w),
    }
}

/// `[N, C, H, W]` to the patch matrix `[N, C·k·k, Ho·Wo]` (zero padded), torch's unfold.
struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("im2col needs a contiguous float32 input"),
        };
        let (k, st, p) = (self.kernel, self.stride, self.padding);
        let ho = (h + 2 * p - k) / st + 1;
        let wo = (w + 2 * p - k) / st + 1;
        let rows = c * k * k;
        let mut out = vec![0f32; n * rows * ho * wo];
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(i, dst)| {
                let (b, r) = (i / rows, i % rows);
                let (ch, ky, kx) = (r / (k * k), (r / k) % k, r % k);
                let plane = &x[(b * c + ch) * h * w..][..h * w];
                for oy in 0..ho {
                    let iy = (oy * st + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let row = &plane[iy as usize * w..][..w];
                    for ox in 0..wo {
                        let ix = (ox * st + kx) as isize - p as isize;
                        if ix >= 0 && ix < w as isize {
                            dst[oy * wo + ox] = row[ix as usize];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, rows, ho * wo))))
    }
}

/// timm's `ConvNormAct` without activation: a bias-free convolution (`conv`) then BatchNorm
/// (`bn`).
#[derive(Clone, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    /// Loads `PREFIX.conv` and `PREFIX.bn`.
    pub fn new(
        b: &Builder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        kind: ConvKind,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                &b.pp("conv"),
                in_ch,
                out_ch,
                kernel,
                stride,
                kind,
                false,
                None,
            )?,
            bn: BatchNorm2d::new(&b.pp("bn"), out_ch)?,
        })
    }

    /// `bn(conv(x))`; in evaluation one biased convolution with the BatchNorm folded in (the
    /// same numbers to rounding, one pass fewer).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Eval {
            let (w, b) = self.fused()?;
            return self.conv.forward_with(x, &w, Some(&b));
        }
        self.bn.forward(&self.conv.forward(x)?, mode)
    }

    /// The evaluation form as one biased convolution, `(weight, bias)`: the BatchNorm folded
    /// into the kernel (`W·γ/√(var+eps)`, `β − mean·γ/√(var+eps)`).
    pub fn fused(&self) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.bn.eval_affine()?;
        let o = scale.dim(0)?;
        let w = self
            .conv
            .weight()
            .broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?;
        Ok((w, shift))
    }
}

/// timm's `SqueezeExcite`: `x · sigmoid(fc2(relu(fc1(mean_hw(x)))))` with biased 1×1 convs.
#[derive(Clone, Debug)]
pub struct SqueezeExcite {
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
}

impl SqueezeExcite {
    /// Loads `PREFIX.fc1` and `PREFIX.fc2` with `reduced` hidden channels.
    pub fn new(b: &Builder, channels: usize, reduced: usize) -> Result<Self> {
        let fc1 = Conv2d::new(
            &b.pp("fc1"),
            channels,
            reduced,
            1,
            1,
            ConvKind::Dense,
            true,
            None,
        )?;
        let fc2 = Conv2d::new(
            &b.pp("fc2"),
            reduced,
            channels,
            1,
            1,
            ConvKind::Dense,
            true,
            None,
        )?;
        let parts = |c: Conv2d| -> Result<(Tensor, Tensor)> {
            let o = c.weight.dim(0)?;
            let bias = match c.bias {
                Some(b) => b,
                None => candle_core::bail!("squeeze-excite conv without bias"),
            };
            Ok((c.weight.reshape((o, ()))?, bias))
        };
        let (fc1_w, fc1_b) = parts(fc1)?;
        let (fc2_w, fc2_b) = parts(fc2)?;
        Ok(Self {
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        })
    }

    /// timm's `make_divisible(channels · ratio, divisor, round_limit = 0)`: the hidden width
    /// of a squeeze-excite layer.
    pub fn reduced_channels(channels: usize, ratio: f64, divisor: usize) -> usize {
        let v = channels as f64 * ratio;
        let d = divisor as f64;
        (((v + d / 2.0) / d).floor() * d).max(d) as usize
    }

    /// Gates the channels of `[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let pooled = x.flatten_from(2)?.mean(D::Minus1)?;
        let hidden = pooled
            .matmul(&self.fc1_w.t()?)?
            .broadcast_add(&self.fc1_b)?
            .relu()?;
        let gate = candle_nn::ops::sigmoid(
            &hidden
                .matmul(&self.fc2_w.t()?)?
                .broadcast_add(&self.fc2_b)?,
        )?;
        scale_channels(x, &gate.reshape((n, c))?)
    }
}
