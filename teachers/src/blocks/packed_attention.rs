//! Self-attention straight from a packed q|k|v projection `[B, T, 3E]` (heads contiguous
//! inside each of q, k and v) with an optional additive mask, to merged heads `[B, T, E]`, on
//! the CPU: for inference ([`PackedSelfAttention`], nothing kept) and differentiable
//! ([`packed_self_attention`], for training).
//!
//! Composed from candle's ops, attention splits q, k and v into contiguous head tensors (a
//! copy), runs each batched product as one small parallel `gemm` per (sample, head), merges
//! the heads (another copy), and backward pads each of the q, k and v gradients to the packed
//! size with zeros before summing them. Here every (sample, head) is one task on one thread
//! that reads its columns of the packed input in place and writes its columns of the output
//! (forward) or of the packed gradient (backward); the forward keeps only the attention
//! probabilities for the backward pass. The tasks are independent and each runs in a fixed
//! order, so the results do not depend on the number of threads.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu_kernels::softmax_row;
use super::grad_kernels::contiguous_f32;

/// Self-attention for inference: no backward pass, nothing kept.
pub struct PackedSelfAttention {
    /// Attention heads.
    pub heads: usize,
    /// Additive mask values `[M, T, T]` with M = 1 (shared) or B (per sample).
    pub mask: Option<(Vec<f32>, usize)>,
}

/// The additive mask `[M, 1, T, T]` (or `[M, T, T]`) as the kernels take it: its values and M.
pub fn mask_values(mask: Option<&Tensor>) -> Result<Option<(Vec<f32>, usize)>> {
    match mask {
        Some(m) => Ok(Some((
            m.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            m.dim(0)?,
        ))),
        None => Ok(None),
    }
}

/// Self-attention of the packed projection `qkv: [B, T, 3E]` for inference (no backward pass):
/// [`packed_self_attention`]'s values without keeping the probabilities. CPU float32 only.
pub fn packed_self_attention_inference(
    qkv: &Tensor,
    heads: usize,
    mask: Option<(Vec<f32>, usize)>,
) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op1_no_bwd(&PackedSelfAttention { heads, mask })
}

/// Differentiable self-attention of the packed projection `qkv: [B, T, 3E]` in `heads` heads
/// (scale 1/√d), with an optional additive mask (see [`mask_values`]); returns `[B, T, E]`.
/// The mask gets no gradient. CPU float32 only (see [`super::grad_kernels`]' `usable`).
pub fn packed_self_attention(
    qkv: &Tensor,
    heads: usize,
    mask: Option<(Vec<f32>, usize)>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(TrainAttention {
        heads,
        mask,
        probs: OnceLock::new(),
    })
}

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    t: usize,
    e: usize,
    heads: usize,
    d: usize,
    scale: f32,
}

impl Geometry {
    fn new(l: &Layout, heads: usize, mask: &Option<(Vec<f32>, usize)>) -> Result<Self> {
        let (b, t, e3) = l.shape().dims3()?;
        let e = e3 / 3;
        if !e3.is_multiple_of(3) || heads == 0 || !e.is_multiple_of(heads) || e == 0 {
            candle_core::bail!("attention: width {e3} is not 3 x heads {heads} x head width");
        }
        if let Some((values, m)) = mask {
            if values.len() != m * t * t || (*m != 1 && *m != b) {
                candle_core::bail!(
                    "attention: mask of {} values for {m} x {t} x {t} (batch {b})",
                    values.len()
                );
            }
        }
        let d = e / heads;
        Ok(Self {
            b,
            t,
            e,
            heads,
            d,
            scale: (d as f32).powf(-0.5),
        })
    }

    /// The mask rows of sample `bi`, `[T, T]`.
    fn mask_of<'a>(&self, mask: &'a Option<(Vec<f32>, usize)>, bi: usize) -> Option<&'a [f32]> {
        let t = self.t;
        mask.as_ref()
            .map(|(values, m)| &values[(if *m == 1 { 0 } else { bi }) * t * t..][..t * t])
    }
}

/// A raw pointer into a buffer that parallel tasks write in disjoint parts.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes only its own (sample, head) columns; no two tasks touch the same
// element and nothing reads the buffer until all tasks have finished.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer moved by `offset` elements (a method, so closures capture the whole `Send`
    /// wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst[m×n] = factor · lhs[m×k] · rhs[k×n]` on this thread, every operand given by a pointer
/// and its (column, row) strides.
///
/// # Safety
/// Every element addressed through the strides must lie inside its operand's allocation, and
/// `dst` must not overlap `lhs` or `rhs` nor be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    factor: f32,
) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.0,
            dst_strides.1,
            false,
            lhs,
            lhs_strides.0,
            lhs_strides.1,
            rhs,
            rhs_strides.0,
            rhs_strides.1,
            0.0,
            factor,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The forward pass of every (sample, head): the probabilities `softmax(scale · q kᵀ + mask)`
/// go to `probs` (`[B·H, T, T]`, or one `[T, T]` scratch row per task when `keep` is false),
/// the merged output to a fresh `[B, T, E]`.
fn forward(
    qkv: &[f32],
    g: Geometry,
    mask: &Option<(Vec<f32>, usize)>,
    keep: bool,
) -> (Vec<f32>, Vec<f32>) {
    let Geometry {
        b,
        t,
        e,
        heads,
        d,
        scale,
    } = g;
    let e3 = 3 * e;
    let mut out = vec![0f32; b * t * e];
    let out_ptr = SharedOut(out.as_mut_ptr());
    let head = |task: usize, p: &mut [f32]| {
        let (bi, h) = (task / heads, task % heads);
        let base = bi * t * e3 + h * d;
        let (q, k, v) = (&qkv[base..], &qkv[base + e..], &qkv[base + 2 * e..]);
        // SAFETY: q, k and v start inside the input and every element read, at row r < T and
        // column c < d with row stride 3E, lies inside it (base + 2E + (T−1)·3E + d ≤ B·T·3E);
        // p holds T×T values; this task alone writes rows bi·T.. columns h·d..h·d+d of out.
        unsafe {
            // p = scale · q kᵀ
            product(
                (t, t, d),
                p.as_mut_ptr(),
                (1, t as isize),
                q.as_ptr(),
                (1, e3 as isize),
                k.as_ptr(),
                (e3 as isize, 1),
                scale,
            );
        }
        let mask = g.mask_of(mask, bi);
        for (r, row) in p.chunks_mut(t).enumerate() {
            softmax_row(row, mask.map(|m| &m[r * t..][..t]));
        }
        // SAFETY: as above.
        unsafe {
            // out[bi, :, h·d..] = p v
            product(
                (t, d, t),
                out_ptr.at(bi * t * e + h * d),
                (1, e as isize),
                p.as_ptr(),
                (1, t as isize),
                v.as_ptr(),
                (1, e3 as isize),
                1.0,
            );
        }
    };
    let probs = if keep {
        let mut probs = vec![0f32; b * heads * t * t];
        probs
            .par_chunks_mut(t * t)
            .enumerate()
            .for_each(|(task, p)| head(task, p));
        probs
    } else {
        (0..b * heads)
            .into_par_iter()
            .for_each_init(|| vec![0f32; t * t], |p, task| head(task, p));
        Vec::new()
    };
    (out, probs)
}

impl CustomOp1 for PackedSelfAttention {
    fn name(&self) -> &'static str {
        "packed-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, "attention input")?;
        let g = Geometry::new(layout, self.heads, &self.mask)?;
        let (out, _) = forward(qkv, g, &self.mask, false);
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.e))))
    }
}

/// The differentiable op: its forward keeps the probabilities for its backward.
struct TrainAttention {
    heads: usize,
    mask: Option<(Vec<f32>, usize)>,
    probs: OnceLock<Vec<f32>>,
}

impl CustomOp1 for TrainAttention {
    fn name(&self) -> &'static str {
        "packed-self-attention-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, "attention input")?;
        let g = Geometry::new(layout, self.heads, &self.mask)?;
        let (out, probs) = forward(qkv, g, &self.mask, true);
        if self.probs.set(probs).is_err() {
            candle_core::bail!("attention: one op instance ran forward twice");
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.e))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("attention: backward before forward");
        };
        let op = AttentionGrad {
            heads: self.heads,
            probs,
        };
        qkv.apply_op2_no_bwd(&grad.contiguous()?, &op).map(Some)
    }
}

/// `∂L/∂qkv` from the packed input and the output gradient `[B, T, E]`.
struct AttentionGrad<'a> {
    heads: usize,
    /// The forward's probabilities, `[B·H, T, T]`.
    probs: &'a [f32],
}

impl CustomOp2 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "packed-self-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s1, l1, "attention input")?;
        let go = contiguous_f32(s2, l2, "attention gradient")?;
        let Geometry {
            b,
            t,
            e,
            heads,
            d,
            scale,
        } = Geometry::new(l1, self.heads, &None)?;
        let e3 = 3 * e;
        let probs = self.probs;
        if qkv.len() != b * t * e3 || go.len() != b * t * e || probs.len() != b * heads * t * t {
            candle_core::bail!("attention backward: operands do not fit {b} x {t} x 3·{e}");
        }
        let mut dqkv = vec![0f32; b * t * e3];
        let dst = SharedOut(dqkv.as_mut_ptr());
        probs.par_chunks(t * t).enumerate().for_each_init(
            || vec![0f32; t * t],
            |ds, (task, p)| {
                let (bi, h) = (task / heads, task % heads);
                let base = bi * t * e3 + h * d;
                let (q, k, v) = (&qkv[base..], &qkv[base + e..], &qkv[base + 2 * e..]);
                let dout = &go[bi * t * e + h * d..];
                // SAFETY: reads stay inside qkv (as in the forward) and the output gradient
                // (row stride E, columns h·d..h·d+d of rows bi·T..); p and ds hold T×T values;
                // this task alone writes its columns of the q, k and v parts of rows bi·T..
                // of dqkv.
                unsafe {
                    // ds = ∂L/∂p = dout vᵀ
                    product(
                        (t, t, d),
                        ds.as_mut_ptr(),
                        (1, t as isize),
                        dout.as_ptr(),
                        (1, e as isize),
                        v.as_ptr(),
                        (e3 as isize, 1),
                        1.0,
                    );
                }
                // Through the softmax: ds = p ⊙ (ds − Σ_c p ds), per row.
                for (dsr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot = dsr
                        .iter()
                        .zip(pr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32;
                    for (x, &pv) in dsr.iter_mut().zip(pr) {
                        *x = pv * (*x - dot);
                    }
                }
                // SAFETY: as above.
                unsafe {
                    // ∂q = scale · ds k
                    product(
                        (t, d, t),
                        dst.at(base),
                        (1, e3 as isize),
                        ds.as_ptr(),
                        (1, t as isize),
                        k.as_ptr(),
                        (1, e3 as isize),
                        scale,
                    );
                    // ∂k = scale · dsᵀ q
                    product(
                        (t, d, t),
                        dst.at(base + e),
                        (1, e3 as isize),
                        ds.as_ptr(),
                        (t as isize, 1),
                        q.as_ptr(),
                        (1, e3 as isize),
                        scale,
                    );
                    // ∂v = pᵀ dout
                    product(
                        (t, d, t),
                        dst.at(base + 2 * e),
                        (1, e3 as isize),
                        p.as_ptr(),
                        (t as isize, 1),
                        dout.as_ptr(),
                        (1, e as isize),
                        1.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// Attention composed from candle's differentiable ops, the reference.
    fn composed(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
        let (b, t, e3) = qkv.dims3().unwrap();
        let d = e3 / 3 / heads;
        let packed = qkv
            .reshape((b, t, 3, heads, d))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap()
            .contiguous()
            .unwrap();
        let (q, k, v) = (
            packed.get(0).unwrap(),
            packed.get(1).unwrap(),
            packed.get(2).unwrap(),
        );
        let q = (q * (d as f64).powf(-0.5)).unwrap();
        let mut scores = q.matmul(&k.t().unwrap()).unwrap();
        if let Some(m) = mask {
            scores = scores.broadcast_add(m).unwrap();
        }
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, e3 / 3))
            .unwrap()
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
            .to_scalar()
            .unwrap()
    }

    fn causal(m: usize, t: usize, pad_from: Option<usize>) -> Tensor {
        let v: Vec<f32> = (0..m * t * t)
            .map(|i| {
                let (s, r, c) = (i / (t * t), (i / t) % t, i % t);
                let padded = pad_from.is_some_and(|p| s == 1 && c >= p && r != c);
                if c > r || padded {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (m, 1, t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let (b, t, heads, d) = (2, 19, 3, 8);
        let e3 = 3 * heads * d;
        let masks = [None, Some(causal(1, t, None)), Some(causal(2, t, Some(5)))];
        for mask in &masks {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, e3), &dev).unwrap()).unwrap();
            let w = Tensor::randn(0f32, 1.0, (b, t, e3 / 3), &dev).unwrap();
            let ours =
                packed_self_attention(x.as_tensor(), heads, mask_values(mask.as_ref()).unwrap())
                    .unwrap();
            let want = composed(x.as_tensor(), heads, mask.as_ref());
            assert!(
                max_diff(&ours, &want) < 2e-6,
                "values {}",
                max_diff(&ours, &want)
            );
            let inference = x
                .as_tensor()
                .apply_op1_no_bwd(&PackedSelfAttention {
                    heads,
                    mask: mask_values(mask.as_ref()).unwrap(),
                })
                .unwrap();
            assert_eq!(
                max_diff(&ours, &inference),
                0.0,
                "inference and training forward agree"
            );
            let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g_want = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g_ours.get(&x).unwrap(), g_want.get(&x).unwrap());
            let scale: f32 = b
                .abs()
                .unwrap()
                .max_keepdim(2)
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                max_diff(a, b) < 1e-5 * scale.max(1.0),
                "gradients {} (scale {scale})",
                max_diff(a, b)
            );
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 11, 48), &dev).unwrap()).unwrap();
        let run = || {
            let y = packed_self_attention(x.as_tensor(), 2, None).unwrap();
            let g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
            (
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g.get(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(one, three);
    }

    #[test]
    fn bad_shapes_and_masks_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5, 30), DType::F32, &dev).unwrap();
        assert!(
            packed_self_attention(&x, 4, None).is_err(),
            "10 is not 4 heads"
        );
        assert!(packed_self_attention(&x, 0, None).is_err());
        let bad_mask = Some((vec![0f32; 3 * 25], 3));
        assert!(
            packed_self_attention(&x, 2, bad_mask).is_err(),
            "3 masks for 2 samples"
        );
        let short = Some((vec![0f32; 24], 1));
        assert!(packed_self_attention(&x, 2, short).is_err());
    }
}
