//! LayerNorm, softmax over the last dimension and biased linear layers with their own backward
//! passes, for the differentiable (training) path on the CPU.
//!
//! Composed from candle's primitives, a LayerNorm is eight element-wise passes forward (each
//! keeping its output alive for the backward pass) and more backward, each on one thread; a
//! softmax is five. Here each is one parallel pass over rows forward and one backward, and the
//! graph keeps only the input (LayerNorm, plus two numbers per row) or the output (softmax).
//! Row reductions run in float64; the parameter gradients of the LayerNorm are summed over
//! fixed blocks of rows in a fixed order, so the result does not depend on thread timing (a
//! resumed training run must equal an uninterrupted one bit for bit). Other devices and dtypes
//! take the compositions.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task and per partial sum of the parameter gradients.
const ROW_BLOCK: usize = 32;

/// Whether dfndr's CPU kernels (these and the fused inference ones) apply to `x`: a float32
/// tensor on the CPU.
pub fn usable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The values of a custom op's operand, which must be contiguous float32 (`what` names it in
/// the error). Shared by the CPU kernels of the blocks and of the trainer.
pub fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("{what} must be float32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn last_dim(l: &Layout, op: &str) -> Result<(usize, usize)> {
    let d = l.dims().last().copied().unwrap_or(1);
    if d == 0 {
        candle_core::bail!("{op}: the last dimension is empty");
    }
    Ok((l.shape().elem_count() / d, d))
}

/// `(x − mean) / √(var + eps) · weight + bias` over the last dimension of `x` (biased
/// variance, as torch), differentiable in all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "layer norm over {d} features got weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp {
            eps,
            stats: Arc::new(OnceLock::new()),
        },
    )
}

/// `rows` copies of `row` in one vector, written by parallel tasks: a layer's biased output
/// filled on one thread costs a few percent of its matrix product on two cores.
pub(crate) fn repeated_rows(rows: usize, row: &[f32]) -> Vec<f32> {
    let n = rows * row.len();
    if n == 0 {
        return Vec::new();
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(row.len() * ROW_BLOCK)
        .for_each(|chunk| {
            for dst in chunk.chunks_mut(row.len()) {
                for (d, &s) in dst.iter_mut().zip(row) {
                    d.write(s);
                }
            }
        });
    // SAFETY: the chunks cover the first n elements, every one written above.
    unsafe { v.set_len(n) };
    v
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// Per row: the mean and `1 / √(var + eps)`.
type RowStats = Vec<(f32, f32)>;

/// `(∂L/∂weight, ∂L/∂bias)`, handed from the backward kernel to the op's `bwd`.
type ParamGrads = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

struct LayerNormOp {
    eps: f64,
    /// Filled by the forward pass, read by the backward pass.
    stats: Arc<OnceLock<RowStats>>,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let (rows, d) = last_dim(l1, "layer norm")?;
        let x = contiguous_f32(s1, l1, "layer norm")?;
        let (w, b) = (
            contiguous_f32(s2, l2, "layer norm")?,
            contiguous_f32(s3, l3, "layer norm")?,
        );
        let mut out = vec![0f32; rows * d];
        let mut stats = vec![(0f32, 0f32); rows];
        out.par_chunks_mut(ROW_BLOCK * d)
            .zip(stats.par_chunks_mut(ROW_BLOCK))
            .zip(x.par_chunks(ROW_BLOCK * d))
            .for_each(|((dst, st), src)| {
                for ((y, s), x) in dst.chunks_mut(d).zip(st.iter_mut()).zip(src.chunks(d)) {
                    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var = x
                        .iter()
                        .map(|&v| {
                            let c = v as f64 - mean;
                            c * c
                        })
                        .sum::<f64>()
                        / d as f64;
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    let (m, r) = (mean as f32, rstd as f32);
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - m) * r * w + b;
                    }
                    *s = (m, r);
                }
            });
        // A graph node is forwarded once; a second forward would only repeat the same numbers.
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("layer norm: backward before forward");
        };
        let params = Arc::new(Mutex::new(None));
        let op = LayerNormGrad {
            stats: stats.clone(),
            params: params.clone(),
        };
        let gx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let taken = params.lock().ok().and_then(|mut p| p.take());
        let Some((gw, gb)) = taken else {
            candle_core::bail!("layer norm: parameter gradients were not computed");
        };
        let d = gw.len();
        let gw = Tensor::from_vec(gw, d, w.device())?;
        let gb = Tensor::from_vec(gb, d, w.device())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `∂L/∂x` as the op's output; `∂L/∂weight` and `∂L/∂bias` left in `params`.
struct LayerNormGrad {
    stats: RowStats,
    params: ParamGrads,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
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
        let (rows, d) = last_dim(l1, "layer norm backward")?;
        let x = contiguous_f32(s1, l1, "layer norm backward")?;
        let w = contiguous_f32(s2, l2, "layer norm backward")?;
        let g = contiguous_f32(s3, l3, "layer norm backward")?;
        if self.stats.len() != rows || g.len() != x.len() {
            candle_core::bail!("layer norm backward: operands do not match the forward pass");
        }
        let mut out = vec![0f32; rows * d];
        // Per block of rows: (Σ g·x̂, Σ g) per feature, in float64.
        let partials: Vec<(Vec<f64>, Vec<f64>)> = out
            .par_chunks_mut(ROW_BLOCK * d)
            .zip(x.par_chunks(ROW_BLOCK * d))
            .zip(g.par_chunks(ROW_BLOCK * d))
            .zip(self.stats.par_chunks(ROW_BLOCK))
            .map(|(((dst, xs), gs), st)| {
                let mut gw = vec![0f64; d];
                let mut gb = vec![0f64; d];
                let mut xhat = vec![0f32; d];
                for (((dx, x), g), &(m, r)) in dst
                    .chunks_mut(d)
                    .zip(xs.chunks(d))
                    .zip(gs.chunks(d))
                    .zip(st)
                {
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for i in 0..d {
                        let xh = (x[i] - m) * r;
                        xhat[i] = xh;
                        let gw_i = (g[i] * w[i]) as f64;
                        sum_g += gw_i;
                        sum_gx += gw_i * xh as f64;
                        gw[i] += (g[i] * xh) as f64;
                        gb[i] += g[i] as f64;
                    }
                    let (mean_g, mean_gx) = ((sum_g / d as f64) as f32, (sum_gx / d as f64) as f32);
                    for i in 0..d {
                        dx[i] = r * (g[i] * w[i] - mean_g - xhat[i] * mean_gx);
                    }
                }
                (gw, gb)
            })
            .collect();
        let mut gw = vec![0f64; d];
        let mut gb = vec![0f64; d];
        for (pw, pb) in &partials {
            for i in 0..d {
                gw[i] += pw[i];
                gb[i] += pb[i];
            }
        }
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        if let Ok(mut p) = self.params.lock() {
            *p = Some((to_f32(gw), to_f32(gb)));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = last_dim(l, "softmax")?;
        let x = contiguous_f32(s, l, "softmax")?;
        let mut out = vec![0f32; rows * d];
        out.par_chunks_mut(ROW_BLOCK * d)
            .zip(x.par_chunks(ROW_BLOCK * d))
            .for_each(|(dst, src)| {
                for (y, x) in dst.chunks_mut(d).zip(src.chunks(d)) {
                    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - max).exp();
                        sum += *y;
                    }
                    let inv = 1.0 / sum;
                    y.iter_mut().for_each(|y| *y *= inv);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)
            .map(Some)
    }
}

/// `∂L/∂x = y ⊙ (g − Σ g ⊙ y)` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = last_dim(l1, "softmax backward")?;
        let y = contiguous_f32(s1, l1, "softmax backward")?;
        let g = contiguous_f32(s2, l2, "softmax backward")?;
        if g.len() != y.len() {
            candle_core::bail!("softmax backward: the gradient does not match the output");
        }
        let mut out = vec![0f32; rows * d];
        out.par_chunks_mut(ROW_BLOCK * d)
            .zip(y.par_chunks(ROW_BLOCK * d))
            .zip(g.par_chunks(ROW_BLOCK * d))
            .for_each(|((dst, ys), gs)| {
                for ((dx, y), g) in dst.chunks_mut(d).zip(ys.chunks(d)).zip(gs.chunks(d)) {
                    let dot = y.iter().zip(g).map(|(&y, &g)| (y * g) as f64).sum::<f64>() as f32;
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// How many threads one matrix product of [`matmul_strided`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmThreads {
    /// Every thread of the rayon pool: for one large product.
    All,
    /// The calling thread: for many small products that the caller runs in parallel itself
    /// (one per sample), where splitting each over the threads costs more in synchronisation
    /// and packing than it gains.
    One,
}

impl GemmThreads {
    fn parallelism(self) -> gemm::Parallelism {
        match (self, rayon::current_num_threads()) {
            (GemmThreads::One, _) | (GemmThreads::All, 0 | 1) => gemm::Parallelism::None,
            (GemmThreads::All, n) => gemm::Parallelism::Rayon(n),
        }
    }
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]` on the `gemm` crate, with explicit (column, row)
/// strides of each operand; `dst` is row-major. Shared by the training kernels that multiply
/// matrices (linear layers here, 1×1 convolutions in the trainer).
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (isize, isize),
    rhs: &[f32],
    rhs_strides: (isize, isize),
    threads: GemmThreads,
) -> Result<()> {
    let extent = |rows: usize, cols: usize, (cs, rs): (isize, isize)| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs.unsigned_abs() + (cols - 1) * cs.unsigned_abs() + 1
        }
    };
    if dst.len() < m * n
        || lhs.len() < extent(m, k, lhs_strides)
        || rhs.len() < extent(k, n, rhs_strides)
        || lhs_strides.0 < 0
        || lhs_strides.1 < 0
        || rhs_strides.0 < 0
        || rhs_strides.1 < 0
    {
        candle_core::bail!("matmul: operands smaller than {m}x{k} · {k}x{n}");
    }
    // SAFETY: the checks above keep every operand's extent under its strides inside its
    // slice, and dst (a unique borrow) does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.0,
            lhs_strides.1,
            rhs.as_ptr(),
            rhs_strides.0,
            rhs_strides.1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            threads.parallelism(),
        );
    }
    Ok(())
}

/// `x Wᵀ + b` over the last dimension of `x: [..., in]` with `w: [out, in]` and `b: [out]`,
/// differentiable in all three: one matrix product forward (the bias is its initial value),
/// two backward, and the bias gradient as column sums over fixed blocks of rows. Composed from
/// candle's ops, the bias is a broadcast addition whose output (as large as the layer's) the
/// graph keeps and whose backward sums on one thread.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&inp) || b.dims() != [out] {
        candle_core::bail!(
            "linear: weight {:?} and bias {:?} do not fit input {:?}",
            w.dims(),
            b.dims(),
            dims
        );
    }
    let rows = x.elem_count() / inp.max(1);
    let y = x.reshape((rows, inp))?.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LinearOp,
    )?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    y.reshape(out_dims)
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        let (rows, inp) = l1.shape().dims2()?;
        let (out, _) = l2.shape().dims2()?;
        let x = contiguous_f32(s1, l1, "linear")?;
        let w = contiguous_f32(s2, l2, "linear")?;
        let b = contiguous_f32(s3, l3, "linear")?;
        let mut y = repeated_rows(rows, b);
        // y[rows×out] += x[rows×in] · Wᵀ[in×out]; Wᵀ(k, j) = W[j·in + k].
        matmul_strided(
            rows,
            out,
            inp,
            &mut y,
            true,
            x,
            (1, inp as isize),
            w,
            (inp as isize, 1),
            GemmThreads::All,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(w, &LinearGrad::Input)?;
        let gw = grad.apply_op2_no_bwd(x, &LinearGrad::Weight)?;
        let gb = grad.apply_op1_no_bwd(&ColumnSums)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// The gradients of [`LinearOp`]'s matrix operands from the output gradient `G [rows, out]`.
enum LinearGrad {
    /// `∂L/∂x = G · W` (second operand: `W [out, in]`).
    Input,
    /// `∂L/∂W = Gᵀ · x` (second operand: `x [rows, in]`).
    Weight,
}

impl CustomOp2 for LinearGrad {
    fn name(&self) -> &'static str {
        match self {
            LinearGrad::Input => "linear-grad-input",
            LinearGrad::Weight => "linear-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = l1.shape().dims2()?;
        let g = contiguous_f32(s1, l1, "linear backward")?;
        let other = contiguous_f32(s2, l2, "linear backward")?;
        let (_, inp) = l2.shape().dims2()?;
        match self {
            LinearGrad::Input => {
                let mut gx = vec![0f32; rows * inp];
                matmul_strided(
                    rows,
                    inp,
                    out,
                    &mut gx,
                    false,
                    g,
                    (1, out as isize),
                    other,
                    (1, inp as isize),
                    GemmThreads::All,
                )?;
                Ok((CpuStorage::F32(gx), Shape::from((rows, inp))))
            }
            LinearGrad::Weight => {
                let mut gw = vec![0f32; out * inp];
                // Gᵀ(o, r) = G[r·out + o].
                matmul_strided(
                    out,
                    inp,
                    rows,
                    &mut gw,
                    false,
                    g,
                    (out as isize, 1),
                    other,
                    (1, inp as isize),
                    GemmThreads::All,
                )?;
                Ok((CpuStorage::F32(gw), Shape::from((out, inp))))
            }
        }
    }
}

/// Column sums of a `[rows, cols]` matrix, in float64 over fixed blocks of rows summed in
/// order (the same result whatever the thread timing).
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        let g = contiguous_f32(s, l, "column sums")?;
        if cols == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(0)));
        }
        let block = 4 * ROW_BLOCK * cols.max(1);
        let partials: Vec<Vec<f64>> = g
            .par_chunks(block)
            .map(|rows| {
                let mut acc = vec![0f64; cols];
                for row in rows.chunks(cols) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v as f64;
                    }
                }
                acc
            })
            .collect();
        let mut sums = vec![0f64; cols];
        for p in &partials {
            for (s, v) in sums.iter_mut().zip(p) {
                *s += v;
            }
        }
        let sums: Vec<f32> = sums.into_iter().map(|v| v as f32).collect();
        Ok((CpuStorage::F32(sums), Shape::from(cols)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn repeated_rows_repeats_the_row() {
        let row = [1.0f32, -2.0, 3.5];
        for rows in [0, 1, 5, 3 * ROW_BLOCK + 7] {
            let v = repeated_rows(rows, &row);
            assert_eq!(v.len(), rows * 3);
            assert!(v.chunks(3).all(|r| r == row));
        }
        assert!(repeated_rows(4, &[]).is_empty());
    }

    fn composed_ln(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn layer_norm_matches_the_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        // 70 rows: two full blocks of rows and a short one.
        let x = Var::randn(0.5f32, 2.0, (2, 35, 48), &dev)?;
        let w = Var::randn(1f32, 0.3, 48, &dev)?;
        let b = Var::randn(0f32, 0.3, 48, &dev)?;
        let r = Tensor::randn(0f32, 1.0, (2, 35, 48), &dev)?;
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
        let theirs = composed_ln(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
        assert!(max_diff(&ours, &theirs) < 2e-6);
        let g1 = (ours * &r)?.sum_all()?.backward()?;
        let g2 = (theirs * &r)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(max_diff(a, c) < 1e-5 * scale.max(1.0), "{}", max_diff(a, c));
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_the_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (3, 4, 33, 77), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (3, 4, 33, 77), &dev)?;
        let ours = softmax_last_dim(x.as_tensor())?;
        let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let g1 = (ours * &r)?.sum_all()?.backward()?;
        let g2 = (theirs * &r)?.sum_all()?.backward()?;
        // Relative to the gradient's size, as the other kernels' checks: the inputs are
        // unseeded, and an absolute 1e-6 sits at float32 rounding for the largest gradients.
        let (a, c) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(
            max_diff(a, c) < 1e-6 * scale.max(1.0) * 4.0,
            "{}",
            max_diff(a, c)
        );
        Ok(())
    }

    #[test]
    fn linear_matches_the_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        // 150 rows: several blocks of rows for the bias sums and a short one.
        let x = Var::randn(0f32, 1.0, (3, 50, 24), &dev)?;
        let w = Var::randn(0f32, 0.2, (40, 24), &dev)?;
        let b = Var::randn(0f32, 0.5, 40, &dev)?;
        let r = Tensor::randn(0f32, 1.0, (3, 50, 40), &dev)?;
        let ours = linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let theirs = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        assert_eq!(ours.dims(), [3, 50, 40]);
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = (ours * &r)?.sum_all()?.backward()?;
        let g2 = (theirs * &r)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(max_diff(a, c) < 1e-5 * scale.max(1.0), "{}", max_diff(a, c));
        }
        Ok(())
    }
}
