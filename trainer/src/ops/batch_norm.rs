//! Batch normalisation with batch statistics (training mode), forward and backward.
//!
//! candle-nn's training-mode BatchNorm composes reductions over a transposed copy of the
//! activations; this op reads each channel in place, once for the statistics and once to
//! normalise, and its backward needs two passes. Optionally the batch is normalised in
//! "ghost" slices of a fixed number of samples, each with its own statistics, which is what a
//! multi-GPU run with per-GPU BatchNorm computes.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use dfndr_teachers::blocks::contiguous_f32;
use rayon::prelude::*;

/// Per-slice statistics of one batch-norm forward: `mean[s·C + c]` and the biased
/// `var[s·C + c]` of slice `s`, over `count` values per channel.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Samples per slice (the last slice may be shorter; see `slice_counts`).
    pub slice: usize,
    /// Channels.
    pub channels: usize,
    /// Values per channel in each slice (samples × H × W).
    pub slice_counts: Vec<usize>,
    /// Means, slice-major.
    pub mean: Vec<f64>,
    /// Biased variances, slice-major.
    pub var: Vec<f64>,
}

/// `y = (x − mean) / √(var + eps) · weight + bias` over `x: [N, C, H, W]`, with the mean and
/// the biased variance of each channel taken over the batch (or over each `ghost` slice of
/// samples), differentiable in `x`, `weight` and `bias`. Returns the output and the statistics
/// used (for the running averages).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    ghost: Option<usize>,
) -> Result<(Tensor, BatchStats)> {
    let (n, c, _, _) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "batch norm over {c} channels got weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    if n == 0 {
        candle_core::bail!("batch norm of an empty batch");
    }
    let slice = ghost.unwrap_or(n).clamp(1, n);
    let stats = Arc::new(OnceLock::new());
    let y = x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        BatchNormTrain {
            eps,
            slice,
            stats: stats.clone(),
        },
    )?;
    let Some(stats) = stats.get().cloned() else {
        candle_core::bail!("batch norm statistics were not computed");
    };
    Ok((y, stats))
}

/// Independent float64 partial sums per reduction, so that the compiler vectorises the
/// float32-to-float64 accumulation (a single sum is one serial chain of additions).
const LANES: usize = 8;

/// `out += Σ a` in float64.
fn add_sum(out: &mut f64, a: &[f32]) {
    dfndr_teachers::simd_dispatch!(add_sum_generic(out, a))
}

#[inline(always)]
fn add_sum_generic(out: &mut f64, a: &[f32]) {
    let mut lanes = [0f64; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] += c[l] as f64;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        lanes[l] += v as f64;
    }
    *out += lanes.iter().sum::<f64>();
}

/// `out += Σ (a − mean)²` in float64.
fn add_centred_squares(out: &mut f64, a: &[f32], mean: f64) {
    dfndr_teachers::simd_dispatch!(add_centred_squares_generic(out, a, mean))
}

#[inline(always)]
fn add_centred_squares_generic(out: &mut f64, a: &[f32], mean: f64) {
    let mut lanes = [0f64; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] as f64 - mean;
            lanes[l] += d * d;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        let d = v as f64 - mean;
        lanes[l] += d * d;
    }
    *out += lanes.iter().sum::<f64>();
}

/// `(dot, sum) += (Σ g·(x − mean), Σ g)` in float64.
fn add_grad_sums(dot: &mut f64, sum: &mut f64, g: &[f32], x: &[f32], mean: f64) {
    dfndr_teachers::simd_dispatch!(add_grad_sums_generic(dot, sum, g, x, mean))
}

#[inline(always)]
fn add_grad_sums_generic(dot: &mut f64, sum: &mut f64, g: &[f32], x: &[f32], mean: f64) {
    let (mut d, mut t) = ([0f64; LANES], [0f64; LANES]);
    let x = &x[..g.len()];
    let (gc, xc) = (g.chunks_exact(LANES), x.chunks_exact(LANES));
    let (gt, xt) = (gc.remainder(), xc.remainder());
    for (gv, xv) in gc.zip(xc) {
        for l in 0..LANES {
            d[l] += gv[l] as f64 * (xv[l] as f64 - mean);
            t[l] += gv[l] as f64;
        }
    }
    for (l, (&gv, &xv)) in gt.iter().zip(xt).enumerate() {
        d[l] += gv as f64 * (xv as f64 - mean);
        t[l] += gv as f64;
    }
    *dot += d.iter().sum::<f64>();
    *sum += t.iter().sum::<f64>();
}

/// `dst = a·src + b` (the forward's normalisation of one plane).
fn affine_plane(dst: &mut [f32], src: &[f32], a: f32, b: f32) {
    dfndr_teachers::simd_dispatch!(affine_plane_generic(dst, src, a, b))
}

#[inline(always)]
fn affine_plane_generic(dst: &mut [f32], src: &[f32], a: f32, b: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = v * a + b;
    }
}

/// `dst = a·g − bx·x + c0` (the input gradient of one plane).
fn grad_input_plane(dst: &mut [f32], g: &[f32], x: &[f32], a: f32, bx: f32, c0: f32) {
    dfndr_teachers::simd_dispatch!(grad_input_plane_generic(dst, g, x, a, bx, c0))
}

#[inline(always)]
fn grad_input_plane_generic(dst: &mut [f32], g: &[f32], x: &[f32], a: f32, bx: f32, c0: f32) {
    for ((d, &g), &v) in dst.iter_mut().zip(g).zip(x) {
        *d = a * g - bx * v + c0;
    }
}

/// The samples of slice `s`.
fn slice_samples(n: usize, slice: usize, s: usize) -> std::ops::Range<usize> {
    s * slice..((s + 1) * slice).min(n)
}

fn compute_stats(x: &[f32], n: usize, c: usize, hw: usize, slice: usize) -> BatchStats {
    let slices = n.div_ceil(slice);
    let per: Vec<(usize, usize, f64, f64)> = (0..slices * c)
        .into_par_iter()
        .map(|i| {
            let (s, ch) = (i / c, i % c);
            let samples = slice_samples(n, slice, s);
            let count = samples.len() * hw;
            let mut sum = 0f64;
            for b in samples.clone() {
                add_sum(&mut sum, &x[(b * c + ch) * hw..][..hw]);
            }
            let mean = sum / count as f64;
            // Two passes: the centred sum of squares does not cancel catastrophically.
            let mut sq = 0f64;
            for b in samples {
                add_centred_squares(&mut sq, &x[(b * c + ch) * hw..][..hw], mean);
            }
            (s, count, mean, sq / count as f64)
        })
        .collect();
    let mut stats = BatchStats {
        slice,
        channels: c,
        slice_counts: vec![0; slices],
        mean: vec![0.0; slices * c],
        var: vec![0.0; slices * c],
    };
    for (i, (s, count, mean, var)) in per.into_iter().enumerate() {
        stats.slice_counts[s] = count;
        stats.mean[i] = mean;
        stats.var[i] = var;
    }
    stats
}

struct BatchNormTrain {
    eps: f64,
    slice: usize,
    stats: Arc<OnceLock<BatchStats>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
        let (n, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        let x = contiguous_f32(s1, l1, "batch norm input")?;
        let (gamma, beta) = (
            contiguous_f32(s2, l2, "batch norm weight")?,
            contiguous_f32(s3, l3, "batch norm bias")?,
        );
        let stats = compute_stats(x, n, c, hw, self.slice);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw.max(1))
            .zip(x.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(plane, (dst, src))| {
                let (b, ch) = (plane / c, plane % c);
                let i = (b / self.slice) * c + ch;
                let invstd = 1.0 / (stats.var[i] + self.eps).sqrt();
                let scale = (gamma[ch] as f64 * invstd) as f32;
                let shift = (beta[ch] as f64 - stats.mean[i] * gamma[ch] as f64 * invstd) as f32;
                affine_plane(dst, src, scale, shift);
            });
        // A forward runs once per op instance, so the cell is empty here.
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch norm backward before its forward");
        };
        let grad = grad.contiguous()?;
        // Per slice and channel: Σ dy·x̂ and Σ dy.
        let sums = grad.apply_op2_no_bwd(
            x,
            &GradSums {
                eps: self.eps,
                stats: stats.clone(),
            },
        )?;
        let slices = stats.slice_counts.len();
        let c = stats.channels;
        let sums_v: Vec<f32> = sums.flatten_all()?.to_vec1()?;
        let grad_x = grad.apply_op2_no_bwd(
            x,
            &GradInput {
                eps: self.eps,
                stats: stats.clone(),
                gamma: weight.to_vec1()?,
                sums: sums_v,
            },
        )?;
        let sums = sums.reshape((slices, 2, c))?.sum(0)?;
        let grad_weight = sums.get(0)?;
        let grad_bias = sums.get(1)?;
        Ok((Some(grad_x), Some(grad_weight), Some(grad_bias)))
    }
}

/// `[S, 2, C]`: per slice, Σ dy·x̂ then Σ dy of each channel.
struct GradSums {
    eps: f64,
    stats: BatchStats,
}

impl CustomOp2 for GradSums {
    fn name(&self) -> &'static str {
        "batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        let (dy, x) = (
            contiguous_f32(s1, l1, "batch norm gradient")?,
            contiguous_f32(s2, l2, "batch norm input")?,
        );
        let st = &self.stats;
        let slices = st.slice_counts.len();
        let per: Vec<(f64, f64)> = (0..slices * c)
            .into_par_iter()
            .map(|i| {
                let (s, ch) = (i / c, i % c);
                let mean = st.mean[i];
                let invstd = 1.0 / (st.var[i] + self.eps).sqrt();
                let (mut dot, mut sum) = (0f64, 0f64);
                for b in slice_samples(n, st.slice, s) {
                    let off = (b * c + ch) * hw;
                    let (mut d, mut t) = (0f64, 0f64);
                    add_grad_sums(&mut d, &mut t, &dy[off..off + hw], &x[off..off + hw], mean);
                    dot += d * invstd;
                    sum += t;
                }
                (dot, sum)
            })
            .collect();
        let mut out = vec![0f32; slices * 2 * c];
        for (i, (dot, sum)) in per.into_iter().enumerate() {
            let (s, ch) = (i / c, i % c);
            out[s * 2 * c + ch] = dot as f32;
            out[s * 2 * c + c + ch] = sum as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from((slices, 2, c))))
    }
}

/// `dx = γ/σ · (dy − Σdy/M − x̂ · Σ(dy·x̂)/M)` per slice and channel.
struct GradInput {
    eps: f64,
    stats: BatchStats,
    gamma: Vec<f32>,
    sums: Vec<f32>,
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "batch-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let hw = h * w;
        let (dy, x) = (
            contiguous_f32(s1, l1, "batch norm gradient")?,
            contiguous_f32(s2, l2, "batch norm input")?,
        );
        let st = &self.stats;
        let mut out = vec![0f32; dy.len()];
        out.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let (b, ch) = (plane / c, plane % c);
                let s = b / st.slice;
                let i = s * c + ch;
                let m = st.slice_counts[s] as f64;
                let mean = st.mean[i];
                let invstd = 1.0 / (st.var[i] + self.eps).sqrt();
                let dot = self.sums[s * 2 * c + ch] as f64 / m;
                let sum = self.sums[s * 2 * c + c + ch] as f64 / m;
                let k = self.gamma[ch] as f64 * invstd;
                // dx = k·dy − k·sum − k·invstd·dot·(x − mean), as one affine map per value.
                let a = k as f32;
                let bx = (k * invstd * dot) as f32;
                let c0 = (-k * sum + k * invstd * dot * mean) as f32;
                let off = plane * hw;
                grad_input_plane(dst, &dy[off..off + hw], &x[off..off + hw], a, bx, c0);
            });
        let _ = n;
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}
