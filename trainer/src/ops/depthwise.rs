//! Depthwise convolution with a channel multiplier, forward and backward on the CPU.
//!
//! candle differentiates a grouped convolution as one convolution per group, each writing a
//! full-size zero-padded gradient copy: unusable for FastViT, where nearly every spatial
//! convolution is depthwise. This op computes `conv2d(x, w, groups = C)` for `x: [N, C, H, W]`
//! and `w: [C·m, 1, k, k]` (output channel `o` reads input channel `o / m`) directly, and its
//! backward computes both gradients in one pass each, with no intermediate copies.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use dfndr_teachers::blocks::contiguous_f32;
use rayon::prelude::*;

/// Geometry of one depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseGeometry {
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

/// `conv2d(x, w, stride, padding, groups = C)` for `x: [N, C, H, W]` and `w: [C·m, 1, k, k]`,
/// differentiable in both arguments. Float32 on the CPU.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, geometry: DepthwiseGeometry) -> Result<Tensor> {
    check_shapes(x, w, geometry)?;
    x.contiguous()?
        .apply_op2(&w.contiguous()?, DepthwiseConv { geometry })
}

fn check_shapes(x: &Tensor, w: &Tensor, g: DepthwiseGeometry) -> Result<()> {
    let (_, c, h, wd) = x.dims4()?;
    let (o, one, k, k2) = w.dims4()?;
    if one != 1 || k != k2 || c == 0 || o % c != 0 {
        candle_core::bail!(
            "depthwise conv: weight {:?} does not fit input {:?} (want [C·m, 1, k, k])",
            w.dims(),
            x.dims()
        );
    }
    if g.stride == 0 || h + 2 * g.padding < k || wd + 2 * g.padding < k {
        candle_core::bail!(
            "depthwise conv: kernel {k} with padding {} and stride {} does not fit {h}x{wd}",
            g.padding,
            g.stride
        );
    }
    Ok(())
}

/// Output side for an input side `n`.
fn out_len(n: usize, k: usize, g: DepthwiseGeometry) -> usize {
    (n + 2 * g.padding - k) / g.stride + 1
}

/// The output positions `lo..hi` whose input position `o·s + kx − p` lies in `0..n`.
fn valid_range(n: usize, out: usize, kx: usize, g: DepthwiseGeometry) -> (usize, usize) {
    let (s, p) = (g.stride, g.padding);
    // o·s + kx >= p  <=>  o >= ceil((p − kx) / s)
    let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) };
    // o·s + kx − p <= n − 1  <=>  o <= (n − 1 + p − kx) / s
    let hi = if n + p > kx {
        ((n - 1 + p - kx) / s + 1).min(out)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// `acc[i] += v · src[i·s]` over the row (the inner loop of every pass).
#[inline(always)]
fn axpy_strided(acc: &mut [f32], src: &[f32], v: f32, s: usize) {
    if s == 1 {
        for (a, &x) in acc.iter_mut().zip(src) {
            *a += v * x;
        }
    } else {
        for (a, &x) in acc.iter_mut().zip(src.iter().step_by(s)) {
            *a += v * x;
        }
    }
}

struct DepthwiseConv {
    geometry: DepthwiseGeometry,
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (o, _, k, _) = l2.shape().dims4()?;
        let m = o / c;
        let (x, wt) = (
            contiguous_f32(s1, l1, "depthwise conv input")?,
            contiguous_f32(s2, l2, "depthwise conv weight")?,
        );
        let (ho, wo) = (out_len(h, k, g), out_len(w, k, g));
        let mut out = vec![0f32; n * o * ho * wo];
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (b, oc) = (plane / o, plane % o);
                let src = &x[(b * c + oc / m) * h * w..][..h * w];
                let kernel = &wt[oc * k * k..][..k * k];
                for ky in 0..k {
                    let (oy_lo, oy_hi) = valid_range(h, ho, ky, g);
                    for oy in oy_lo..oy_hi {
                        let iy = oy * g.stride + ky - g.padding;
                        let row = &src[iy * w..][..w];
                        let acc = &mut dst[oy * wo..][..wo];
                        for kx in 0..k {
                            let (lo, hi) = valid_range(w, wo, kx, g);
                            if lo < hi {
                                let ix = lo * g.stride + kx - g.padding;
                                axpy_strided(
                                    &mut acc[lo..hi],
                                    &row[ix..],
                                    kernel[ky * k + kx],
                                    g.stride,
                                );
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, o, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, c, h, wd) = x.dims4()?;
        let grad_x = grad.apply_op2_no_bwd(
            w,
            &DepthwiseGradInput {
                geometry: self.geometry,
                channels: c,
                height: h,
                width: wd,
            },
        )?;
        let grad_w = grad.apply_op2_no_bwd(
            x,
            &DepthwiseGradWeight {
                geometry: self.geometry,
                kernel: w.dim(2)?,
            },
        )?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// `∂L/∂x` from the output gradient `[N, C·m, Ho, Wo]` and the weight.
struct DepthwiseGradInput {
    geometry: DepthwiseGeometry,
    channels: usize,
    height: usize,
    width: usize,
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let (h, w) = (self.height, self.width);
        let (n, o, ho, wo) = l1.shape().dims4()?;
        let (_, _, k, _) = l2.shape().dims4()?;
        let (gy, wt) = (
            contiguous_f32(s1, l1, "depthwise conv gradient")?,
            contiguous_f32(s2, l2, "depthwise conv weight")?,
        );
        // Every plane of the input gradient gathers the `m` output planes that read it.
        let c = self.channels;
        let m = o / c;
        let mut out = vec![0f32; n * c * h * w];
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (b, ch) = (plane / c, plane % c);
                for j in 0..m {
                    let oc = ch * m + j;
                    let src = &gy[(b * o + oc) * ho * wo..][..ho * wo];
                    let kernel = &wt[oc * k * k..][..k * k];
                    for ky in 0..k {
                        let (oy_lo, oy_hi) = valid_range(h, ho, ky, g);
                        for oy in oy_lo..oy_hi {
                            let iy = oy * g.stride + ky - g.padding;
                            let grow = &src[oy * wo..][..wo];
                            let drow = &mut dst[iy * w..][..w];
                            for kx in 0..k {
                                let (lo, hi) = valid_range(w, wo, kx, g);
                                if lo >= hi {
                                    continue;
                                }
                                let v = kernel[ky * k + kx];
                                let ix0 = lo * g.stride + kx - g.padding;
                                if g.stride == 1 {
                                    for (d, &gv) in drow[ix0..].iter_mut().zip(&grow[lo..hi]) {
                                        *d += v * gv;
                                    }
                                } else {
                                    for (d, &gv) in
                                        drow[ix0..].iter_mut().step_by(g.stride).zip(&grow[lo..hi])
                                    {
                                        *d += v * gv;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

/// `∂L/∂w` from the output gradient `[N, C·m, Ho, Wo]` and the input `[N, C, H, W]`.
struct DepthwiseGradWeight {
    geometry: DepthwiseGeometry,
    kernel: usize,
}

impl CustomOp2 for DepthwiseGradWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let k = self.kernel;
        let (n, o, ho, wo) = l1.shape().dims4()?;
        let (_, c, h, w) = l2.shape().dims4()?;
        let m = o / c;
        let (gy, x) = (
            contiguous_f32(s1, l1, "depthwise conv gradient")?,
            contiguous_f32(s2, l2, "depthwise conv input")?,
        );
        let mut out = vec![0f32; o * k * k];
        out.par_chunks_mut(k * k).enumerate().for_each(|(oc, dst)| {
            // Per-row partial sums in float32, accumulated across rows and samples in float64
            // so large batches do not lose the small terms.
            let mut total = vec![0f64; k * k];
            for b in 0..n {
                let gplane = &gy[(b * o + oc) * ho * wo..][..ho * wo];
                let xplane = &x[(b * c + oc / m) * h * w..][..h * w];
                for ky in 0..k {
                    let (oy_lo, oy_hi) = valid_range(h, ho, ky, g);
                    for kx in 0..k {
                        let (lo, hi) = valid_range(w, wo, kx, g);
                        if lo >= hi {
                            continue;
                        }
                        let ix0 = lo * g.stride + kx - g.padding;
                        let mut sum = 0f64;
                        for oy in oy_lo..oy_hi {
                            let iy = oy * g.stride + ky - g.padding;
                            let grow = &gplane[oy * wo + lo..oy * wo + hi];
                            let xrow = &xplane[iy * w + ix0..];
                            let s: f32 = if g.stride == 1 {
                                grow.iter().zip(xrow).map(|(a, b)| a * b).sum()
                            } else {
                                grow.iter()
                                    .zip(xrow.iter().step_by(g.stride))
                                    .map(|(a, b)| a * b)
                                    .sum()
                            };
                            sum += s as f64;
                        }
                        total[ky * k + kx] += sum;
                    }
                }
            }
            for (d, t) in dst.iter_mut().zip(total) {
                *d = t as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((o, 1, k, k))))
    }
}
