//! Depthwise convolution with a channel multiplier, forward and backward on the CPU.
//!
//! candle differentiates a grouped convolution as one convolution per group, each writing a
//! full-size zero-padded gradient copy: unusable for FastViT, where nearly every spatial
//! convolution is depthwise. This op computes `conv2d(x, w, groups = C)` for `x: [N, C, H, W]`
//! and `w: [C·m, 1, k, k]` (output channel `o` reads input channel `o / m`) directly, and its
//! backward computes both gradients in one pass each, with no intermediate copies.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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

/// [`depthwise_conv2d`] plus a bias per output channel `b [C·m]`, in one pass: each output
/// plane starts as its bias and the taps accumulate onto it. Differentiable in all three.
pub fn depthwise_conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    geometry: DepthwiseGeometry,
) -> Result<Tensor> {
    check_shapes(x, w, geometry)?;
    if b.dims() != [w.dim(0)?] {
        candle_core::bail!(
            "depthwise conv: bias {:?} does not fit weight {:?}",
            b.dims(),
            w.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        DepthwiseConvBias { geometry },
    )
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

/// The sizes one plane kernel needs: input width `w`, output width `wo`, kernel `k × k`, and
/// the valid output range of every tap along rows and columns (computed once per op instead
/// of once per row).
struct Planes {
    w: usize,
    wo: usize,
    k: usize,
    g: DepthwiseGeometry,
    rows: Vec<(usize, usize)>,
    cols: Vec<(usize, usize)>,
}

impl Planes {
    /// For an `h × w` input plane, a `ho × wo` output plane and a `k × k` kernel.
    fn new(h: usize, w: usize, ho: usize, wo: usize, k: usize, g: DepthwiseGeometry) -> Self {
        let taps = |n, out| (0..k).map(|t| valid_range(n, out, t, g)).collect();
        Planes {
            w,
            wo,
            k,
            g,
            rows: taps(h, ho),
            cols: taps(w, wo),
        }
    }
}

/// `acc[i] += v · src[i·s]` over the row (the inner loop of the forward and input-gradient
/// passes).
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

/// Lanes of a vectorised float32 dot product: independent partial sums that the compiler
/// keeps in one SIMD register (a single float32 sum would be one serial chain).
const LANES: usize = 8;

/// `lanes[i % 8] += a[i]·b[i]` for the first `a.len()` values.
#[inline(always)]
fn dot_into_lanes(lanes: &mut [f32; LANES], a: &[f32], b: &[f32]) {
    let b = &b[..a.len()];
    let (ac, at) = a.split_at(a.len() / LANES * LANES);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in at.iter().zip(bt).enumerate() {
        lanes[l] += x * y;
    }
}

/// Copies the `h × w` plane `src` into `pad` with `p` zeros on every side, giving a
/// `(h + 2p) × (w + 2p)` plane in which every tap of a stride-1 pass is in bounds.
fn pad_plane(pad: &mut Vec<f32>, src: &[f32], w: usize, p: usize) {
    let h = src.len() / w.max(1);
    let pw = w + 2 * p;
    pad.clear();
    pad.resize((h + 2 * p) * pw, 0.0);
    for (y, row) in src.chunks_exact(w.max(1)).enumerate() {
        pad[(y + p) * pw + p..][..w].copy_from_slice(row);
    }
}

/// `dst[y, x] (+)= Σ_{ky,kx} kernel[ky, kx] · pad[y + ky, x + kx]`: a stride-1 correlation of
/// a padded plane of width `pw` into `wo`-wide output rows (added to `dst` if `accumulate`).
fn correlate_s1(
    dst: &mut [f32],
    pad: &[f32],
    pw: usize,
    kernel: &[f32],
    k: usize,
    wo: usize,
    accumulate: bool,
) {
    dfndr_teachers::simd_dispatch!(correlate_s1_generic(
        dst, pad, pw, kernel, k, wo, accumulate
    ))
}

/// Eight outputs at a time stay in one register over all taps (instead of a pass over the
/// output row per tap), taps in row-major order.
#[inline(always)]
fn correlate_s1_generic(
    dst: &mut [f32],
    pad: &[f32],
    pw: usize,
    kernel: &[f32],
    k: usize,
    wo: usize,
    accumulate: bool,
) {
    for (oy, out) in dst.chunks_exact_mut(wo.max(1)).enumerate() {
        let mut ox = 0;
        while ox + LANES <= wo {
            let mut acc = [0f32; LANES];
            for ky in 0..k {
                let row = &pad[(oy + ky) * pw + ox..];
                for kx in 0..k {
                    let v = kernel[ky * k + kx];
                    let r = &row[kx..kx + LANES];
                    for l in 0..LANES {
                        acc[l] += v * r[l];
                    }
                }
            }
            let out = &mut out[ox..ox + LANES];
            if accumulate {
                for l in 0..LANES {
                    out[l] += acc[l];
                }
            } else {
                out.copy_from_slice(&acc);
            }
            ox += LANES;
        }
        for (x, o) in out.iter_mut().enumerate().skip(ox) {
            let mut acc = 0f32;
            for ky in 0..k {
                let row = &pad[(oy + ky) * pw + x..];
                for kx in 0..k {
                    acc += kernel[ky * k + kx] * row[kx];
                }
            }
            if accumulate {
                *o += acc;
            } else {
                *o = acc;
            }
        }
    }
}

/// Adds `Σ_{y,x} grad[y, x] · pad[y + ky, x + kx]` of one plane pair to every tap's float64
/// total (stride 1, input padded): float32 lanes over the plane, then float64.
fn grad_weight_s1(total: &mut [f64], grad: &[f32], pad: &[f32], pw: usize, k: usize, wo: usize) {
    dfndr_teachers::simd_dispatch!(grad_weight_s1_generic(total, grad, pad, pw, k, wo))
}

#[inline(always)]
fn grad_weight_s1_generic(
    total: &mut [f64],
    grad: &[f32],
    pad: &[f32],
    pw: usize,
    k: usize,
    wo: usize,
) {
    for ky in 0..k {
        for kx in 0..k {
            let mut lanes = [0f32; LANES];
            for (oy, grow) in grad.chunks_exact(wo.max(1)).enumerate() {
                dot_into_lanes(&mut lanes, grow, &pad[(oy + ky) * pw + kx..]);
            }
            total[ky * k + kx] += lanes.iter().map(|&v| v as f64).sum::<f64>();
        }
    }
}

/// One output plane of the forward pass from its input plane and kernel.
fn forward_plane(dst: &mut [f32], src: &[f32], kernel: &[f32], p: &Planes) {
    dfndr_teachers::simd_dispatch!(forward_plane_generic(dst, src, kernel, p))
}

#[inline(always)]
fn forward_plane_generic(dst: &mut [f32], src: &[f32], kernel: &[f32], p: &Planes) {
    let (k, g) = (p.k, p.g);
    for ky in 0..k {
        let (oy_lo, oy_hi) = p.rows[ky];
        for oy in oy_lo..oy_hi {
            let iy = oy * g.stride + ky - g.padding;
            let row = &src[iy * p.w..][..p.w];
            let acc = &mut dst[oy * p.wo..][..p.wo];
            for kx in 0..k {
                let (lo, hi) = p.cols[kx];
                if lo < hi {
                    let ix = lo * g.stride + kx - g.padding;
                    axpy_strided(&mut acc[lo..hi], &row[ix..], kernel[ky * k + kx], g.stride);
                }
            }
        }
    }
}

/// Adds one output plane's gradient, through its kernel, to the input plane's gradient.
fn grad_input_plane(dst: &mut [f32], grad: &[f32], kernel: &[f32], p: &Planes) {
    dfndr_teachers::simd_dispatch!(grad_input_plane_generic(dst, grad, kernel, p))
}

#[inline(always)]
fn grad_input_plane_generic(dst: &mut [f32], grad: &[f32], kernel: &[f32], p: &Planes) {
    let (k, g) = (p.k, p.g);
    for ky in 0..k {
        let (oy_lo, oy_hi) = p.rows[ky];
        for oy in oy_lo..oy_hi {
            let iy = oy * g.stride + ky - g.padding;
            let grow = &grad[oy * p.wo..][..p.wo];
            let drow = &mut dst[iy * p.w..][..p.w];
            for kx in 0..k {
                let (lo, hi) = p.cols[kx];
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
                    for (d, &gv) in drow[ix0..].iter_mut().step_by(g.stride).zip(&grow[lo..hi]) {
                        *d += v * gv;
                    }
                }
            }
        }
    }
}

/// Adds `Σ grad · x` of one (output plane, input plane) pair to every tap's float64 total, for
/// any stride (stride 1 takes [`grad_weight_s1`]): each tap's row products summed in float32
/// over the plane, then added in float64.
fn grad_weight_plane(total: &mut [f64], grad: &[f32], x: &[f32], p: &Planes) {
    dfndr_teachers::simd_dispatch!(grad_weight_plane_generic(total, grad, x, p))
}

#[inline(always)]
fn grad_weight_plane_generic(total: &mut [f64], grad: &[f32], x: &[f32], p: &Planes) {
    let (k, g) = (p.k, p.g);
    for ky in 0..k {
        let (oy_lo, oy_hi) = p.rows[ky];
        for kx in 0..k {
            let (lo, hi) = p.cols[kx];
            if lo >= hi {
                continue;
            }
            let ix0 = lo * g.stride + kx - g.padding;
            let mut sum = 0f32;
            for oy in oy_lo..oy_hi {
                let iy = oy * g.stride + ky - g.padding;
                let grow = &grad[oy * p.wo + lo..oy * p.wo + hi];
                let xrow = x[iy * p.w + ix0..].iter().step_by(g.stride);
                sum += xrow.zip(grow).map(|(a, b)| a * b).sum::<f32>();
            }
            total[ky * k + kx] += sum as f64;
        }
    }
}

/// The forward pass: every output plane from its input plane and kernel, starting from its
/// bias (or zero).
fn forward(
    g: DepthwiseGeometry,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    bias: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let (n, c, h, w) = l1.shape().dims4()?;
    let (o, _, k, _) = l2.shape().dims4()?;
    let m = o / c;
    let (x, wt) = (
        contiguous_f32(s1, l1, "depthwise conv input")?,
        contiguous_f32(s2, l2, "depthwise conv weight")?,
    );
    let (ho, wo) = (out_len(h, k, g), out_len(w, k, g));
    let p = Planes::new(h, w, ho, wo, k, g);
    let plane_len = ho * wo;
    let mut out = super::channel::start_planes(n, o, plane_len, bias);
    let src_of = |plane: usize| {
        let (b, oc) = (plane / o, plane % o);
        (
            &x[(b * c + oc / m) * h * w..][..h * w],
            &wt[oc * k * k..][..k * k],
        )
    };
    if g.stride == 1 {
        let pw = w + 2 * g.padding;
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each_init(Vec::new, |pad, (plane, dst)| {
                let (src, kernel) = src_of(plane);
                pad_plane(pad, src, w, g.padding);
                correlate_s1(dst, pad, pw, kernel, k, wo, bias.is_some());
            });
    } else {
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (src, kernel) = src_of(plane);
                forward_plane(dst, src, kernel, &p);
            });
    }
    Ok((CpuStorage::F32(out), Shape::from((n, o, ho, wo))))
}

struct DepthwiseConvBias {
    geometry: DepthwiseGeometry,
}

impl CustomOp3 for DepthwiseConvBias {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = contiguous_f32(s3, l3, "depthwise conv bias")?;
        forward(self.geometry, s1, l1, s2, l2, Some(bias))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = DepthwiseConv {
            geometry: self.geometry,
        }
        .bwd(x, w, res, grad)?;
        let gb = super::channel::channel_sums(&grad.contiguous()?)?;
        Ok((gx, gw, Some(gb)))
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
        forward(self.geometry, s1, l1, s2, l2, None)
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
        // An input that tracks no gradient (the network's input) gets none.
        let grad_x = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                w,
                &DepthwiseGradInput {
                    geometry: self.geometry,
                    channels: c,
                    height: h,
                    width: wd,
                },
            )?)
        } else {
            None
        };
        let grad_w = grad.apply_op2_no_bwd(
            x,
            &DepthwiseGradWeight {
                geometry: self.geometry,
                kernel: w.dim(2)?,
            },
        )?;
        Ok((grad_x, Some(grad_w)))
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
        let p = Planes::new(h, w, ho, wo, k, g);
        let mut out = vec![0f32; n * c * h * w];
        if g.stride == 1 && g.padding < k {
            // With stride 1 the input gradient is a correlation of the output gradient, padded
            // by k − 1 − p, with the kernel turned by 180°.
            let q = k - 1 - g.padding;
            let flipped: Vec<f32> = wt
                .chunks_exact(k * k)
                .flat_map(|kernel| kernel.iter().rev().copied())
                .collect();
            out.par_chunks_mut(h * w)
                .enumerate()
                .for_each_init(Vec::new, |pad, (plane, dst)| {
                    let (b, ch) = (plane / c, plane % c);
                    for j in 0..m {
                        let oc = ch * m + j;
                        pad_plane(pad, &gy[(b * o + oc) * ho * wo..][..ho * wo], wo, q);
                        let kernel = &flipped[oc * k * k..][..k * k];
                        correlate_s1(dst, pad, wo + 2 * q, kernel, k, w, j > 0);
                    }
                });
        } else {
            out.par_chunks_mut(h * w)
                .enumerate()
                .for_each(|(plane, dst)| {
                    let (b, ch) = (plane / c, plane % c);
                    for j in 0..m {
                        let oc = ch * m + j;
                        let src = &gy[(b * o + oc) * ho * wo..][..ho * wo];
                        grad_input_plane(dst, src, &wt[oc * k * k..][..k * k], &p);
                    }
                });
        }
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
        let p = Planes::new(h, w, ho, wo, k, g);
        let mut out = vec![0f32; o * k * k];
        out.par_chunks_mut(k * k).enumerate().for_each(|(oc, dst)| {
            // Per-sample partial sums in float32 lanes, accumulated across samples in float64
            // so large batches do not lose the small terms.
            let mut total = vec![0f64; k * k];
            let mut pad = Vec::new();
            for b in 0..n {
                let gplane = &gy[(b * o + oc) * ho * wo..][..ho * wo];
                let xplane = &x[(b * c + oc / m) * h * w..][..h * w];
                if g.stride == 1 {
                    pad_plane(&mut pad, xplane, w, g.padding);
                    grad_weight_s1(&mut total, gplane, &pad, w + 2 * g.padding, k, wo);
                } else {
                    grad_weight_plane(&mut total, gplane, xplane, &p);
                }
            }
            for (d, t) in dst.iter_mut().zip(total) {
                *d = t as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((o, 1, k, k))))
    }
}
