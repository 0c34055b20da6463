//! `x Wᵀ` for a handful of rows (KV-cached decoding feeds 1–32 positions per step).
//!
//! With so few rows a linear layer is a stream over its weights, and the `gemm` crate's
//! blocked kernels lose to a plain dot-product loop there: on the CoCa decoder's shapes
//! (2 cores, AVX-512) 5 rows of `[768, 768]` take 0.24 ms instead of 0.75, and 20 rows of the
//! MLP's `[768, 3072]` down-projection 2.8 ms instead of 5.3. [`prefer`] encodes where that
//! was measured to hold; everything else keeps `gemm`.

use rayon::prelude::*;

/// Output features per parallel task (their weight rows stay in L2 across row blocks).
const CHUNK: usize = 64;
/// Rows whose inputs stay in L1 while a chunk's weight rows stream past.
const ROW_BLOCK: usize = 8;

/// Whether the dot-product kernel beats `gemm` for `rows x k` times `[n, k]ᵀ`.
pub fn prefer(rows: usize, k: usize, n: usize) -> bool {
    rows <= 8 || (rows <= 32 && n <= k)
}

/// `out[r][o] = bias[o] + Σₖ x[r][k]·w[o][k]` with `x: [rows, k]`, `w: [n, k]`, `out: [rows, n]`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    // Computed transposed ([n, rows]) so each task owns a contiguous block of outputs.
    let mut out_t = vec![0f32; n * rows];
    if rows == 0 || k == 0 {
        return transpose_with_bias(&out_t, bias, rows, n);
    }
    out_t
        .par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(c, chunk)| block(x, w, k, c * CHUNK, chunk, rows));
    transpose_with_bias(&out_t, bias, rows, n)
}

fn transpose_with_bias(out_t: &[f32], bias: Option<&[f32]>, rows: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    for (r, row) in out.chunks_exact_mut(n.max(1)).enumerate().take(rows) {
        for (o, v) in row.iter_mut().enumerate() {
            *v = out_t[o * rows + r] + bias.map_or(0.0, |b| b[o]);
        }
    }
    out
}

/// One chunk of outputs, with the widest vector instructions the CPU has.
fn block(x: &[f32], w: &[f32], k: usize, o0: usize, out_t: &mut [f32], rows: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { block_avx512(x, w, k, o0, out_t, rows) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { block_avx2(x, w, k, o0, out_t, rows) };
        }
    }
    block_generic(x, w, k, o0, out_t, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_avx512(x: &[f32], w: &[f32], k: usize, o0: usize, out_t: &mut [f32], rows: usize) {
    block_generic(x, w, k, o0, out_t, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(x: &[f32], w: &[f32], k: usize, o0: usize, out_t: &mut [f32], rows: usize) {
    block_generic(x, w, k, o0, out_t, rows)
}

#[inline(always)]
fn block_generic(x: &[f32], w: &[f32], k: usize, o0: usize, out_t: &mut [f32], rows: usize) {
    let n = out_t.len() / rows;
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + ROW_BLOCK).min(rows);
        for j in 0..n {
            let wo = &w[(o0 + j) * k..][..k];
            for r in r0..r1 {
                out_t[j * rows + r] = dot(&x[r * k..][..k], wo);
            }
        }
        r0 = r1;
    }
}

/// Dot product with 16 independent lanes (one AVX-512 register, two AVX2 ones).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.mul_add(*y, tail);
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product_for_odd_shapes() {
        for &(rows, k, n) in &[(1, 5, 3), (3, 37, 70), (9, 64, 130), (20, 768, 65)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let got = linear(&x, &w, Some(&bias), rows, k, n);
            for r in 0..rows {
                for o in 0..n {
                    let want: f64 = bias[o] as f64
                        + (0..k)
                            .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                            .sum::<f64>();
                    let d = (got[r * n + o] as f64 - want).abs();
                    assert!(d < 1e-4, "{rows}x{k}x{n} at ({r}, {o}): {d}");
                }
            }
        }
        assert!(linear(&[], &[], None, 0, 4, 4).is_empty());
    }
}
