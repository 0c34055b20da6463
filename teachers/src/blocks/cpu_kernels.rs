//! Fused CPU kernels for inference: linear layers with their bias and activation applied to
//! the product's own output (self-attention from the packed projection is in
//! [`super::packed_attention`]), and the softmax and exponential they share.
//!
//! candle's CPU element-wise ops are single-threaded scalar loops and its batched matmul
//! splits the (batch x heads) small products poorly; on a ViT-L forward they cost more than a
//! third of the time. These kernels are used only with [`super::Kernels::Fused`] on the CPU
//! (they have no backward pass); every other case takes the plain candle path, and the parity
//! tests run both.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use super::Activation;

/// `e^x` for `x <= 0`-ish softmax inputs and activation arguments: Cephes' `expf` polynomial
/// after a power-of-two range reduction, written with plain arithmetic so it vectorises.
/// Relative error below 2e-7 on [-87, 88]; inputs below -87 (a masked score's −∞ among them)
/// give exactly 0. Not a tiny value: a softmax would turn it into a subnormal, and products
/// over subnormals (attention backward through a causal mask) run many times slower.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer without a libm call, and leaves that
    // integer in the low mantissa bits of `t`.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n built from t's bits: shifting by 23 drops t's sign and exponent and leaves
    // (n + 127) << 23, n in -126..=127 after the clamp. Unlike `n as i32` (a saturating cast,
    // which the compiler keeps scalar) this integer arithmetic vectorises.
    let y = e * f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if underflow {
        0.0
    } else {
        y
    }
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error below 1e-6 in float32) with [`fast_exp`]:
/// plain arithmetic, so the GELU loop vectorises (libm's `erff` is a scalar call per value).
#[inline(always)]
pub(crate) fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * fast_exp(-a * a);
    y.copysign(x)
}

/// Lanes of the explicit reductions below: wide enough for AVX-512, and independent
/// accumulators let the compiler vectorise a float reduction it may not reorder itself.
const LANES: usize = 16;

/// In-place softmax of one row, after adding `mask` (same length) when given.
pub(crate) fn softmax_row(row: &mut [f32], mask: Option<&[f32]>) {
    crate::simd_dispatch!(softmax_row_generic(row, mask))
}

#[inline(always)]
fn softmax_row_generic(row: &mut [f32], mask: Option<&[f32]>) {
    if let Some(mask) = mask {
        for (v, &m) in row.iter_mut().zip(mask) {
            *v += m;
        }
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = l.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk) {
            *v = fast_exp(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `x = act(x)` in place, on the widest vector instructions the CPU has.
fn activate(x: &mut [f32], act: Activation) {
    crate::simd_dispatch!(activate_generic(x, act))
}

#[inline(always)]
fn activate_generic(x: &mut [f32], act: Activation) {
    match act {
        Activation::QuickGelu => {
            for v in x.iter_mut() {
                *v /= 1.0 + fast_exp(-1.702 * *v);
            }
        }
        Activation::Gelu => {
            for v in x.iter_mut() {
                *v *= (fast_erf(*v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5;
            }
        }
    }
}

/// [`activate`] over `x` split into parallel tasks of whole cache-friendly chunks.
fn activate_par(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(16384).for_each(|c| activate(c, act));
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: fused CPU kernels take float32");
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: fused CPU kernels take contiguous tensors"),
    }
}

/// `act(x Wᵀ + bias)` with the weight `[out, in]` as stored, or `act(x W + bias)` with it
/// transposed (`[in, out]`); either with unit column stride and any row stride (slices of a
/// packed projection work without a copy). The bias is written into the output before the
/// product accumulates onto it, and the activation then runs over that output in place, so
/// an MLP's wide hidden layer is written once.
pub struct BiasLinear {
    /// The bias values, `[out]` (`None`: no bias).
    pub bias: Option<Vec<f32>>,
    /// The weight is `[in, out]` rather than `[out, in]`.
    pub transposed: bool,
    /// Activation applied to the biased product (`None`: none).
    pub activation: Option<Activation>,
}

/// A float32 matrix `[rows, cols]` with unit column stride: the values from its first element
/// on, and its row stride.
fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: fused CPU kernels take float32");
    };
    let (rows, cols) = l.shape().dims2()?;
    let stride = l.stride();
    if stride[1] != 1 && cols > 1 {
        candle_core::bail!("{what}: fused CPU kernels need unit column stride");
    }
    let row_stride = if rows > 1 { stride[0] } else { cols };
    let start = l.start_offset();
    let needed = if rows == 0 {
        0
    } else {
        (rows - 1) * row_stride + cols
    };
    if row_stride < cols || start + needed > v.len() {
        candle_core::bail!("{what}: layout out of bounds");
    }
    Ok((&v[start..start + needed], row_stride))
}

impl CustomOp2 for BiasLinear {
    fn name(&self) -> &'static str {
        "bias-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear input")?;
        let (w, w_stride) = f32_rows(s2, l2, "linear weight")?;
        let (in_dim, out_dim) = if self.transposed {
            l2.shape().dims2()?
        } else {
            let (o, i) = l2.shape().dims2()?;
            (i, o)
        };
        let dims = l1.shape().dims();
        let bias_len = self.bias.as_ref().map_or(out_dim, Vec::len);
        if dims.last() != Some(&in_dim) || bias_len != out_dim || in_dim == 0 {
            candle_core::bail!(
                "linear: input {dims:?}, weight for {in_dim} -> {out_dim}, bias {bias_len}"
            );
        }
        let rows = x.len() / in_dim;
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out_dim;
        }
        if super::small_rows::prefer(rows, in_dim, out_dim) {
            let bias = self.bias.as_deref();
            let out = if self.transposed {
                Some(super::small_rows::linear(
                    x, w, w_stride, bias, rows, in_dim, out_dim,
                ))
            } else if w_stride == in_dim {
                Some(super::small_rows::linear_out_in(
                    x, w, bias, rows, in_dim, out_dim,
                ))
            } else {
                None
            };
            if let Some(mut out) = out {
                if let Some(act) = self.activation {
                    activate_par(&mut out, act);
                }
                return Ok((CpuStorage::F32(out), Shape::from(shape)));
            }
        }
        // gemm reads B = W (transposed) or Wᵀ (as stored) through strides.
        let (rhs_cs, rhs_rs) = if self.transposed {
            (1, w_stride as isize)
        } else {
            (w_stride as isize, 1)
        };
        let mut out = match &self.bias {
            Some(bias) => super::grad_kernels::repeated_rows(rows, bias),
            None => vec![0f32; rows * out_dim],
        };
        // SAFETY: x is rows x in (row stride in); W's extent was checked by f32_rows and B is
        // read within it through (rhs_cs, rhs_rs); out is rows x out (row stride out).
        unsafe {
            gemm::gemm(
                rows,
                out_dim,
                in_dim,
                out.as_mut_ptr(),
                1,
                out_dim as isize,
                self.bias.is_some(),
                x.as_ptr(),
                1,
                in_dim as isize,
                w.as_ptr(),
                rhs_cs,
                rhs_rs,
                if self.bias.is_some() { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        if let Some(act) = self.activation {
            activate_par(&mut out, act);
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

pub(crate) use super::grad_kernels::usable;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_where_softmax_and_activations_use_it() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-87.5), 0.0);
        assert!(fast_exp(-87.0) > 0.0);
    }

    #[test]
    fn fast_erf_is_within_1e6_of_erf() {
        let mut worst = 0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((fast_erf(x) - candle_core::cpu::erf::erf_f32(x)).abs());
            x += 0.00113;
        }
        assert!(worst < 1e-6, "worst absolute error {worst:e}");
        assert!(fast_erf(0.0).abs() < 1e-7);
    }
}
