//! Cropping, flipping and resampling, bit-exact with Pillow as torchvision drives it.
//!
//! torchvision's PIL path for `RandomResizedCrop`, `Resize` and `CenterCrop` is `Image.crop`
//! followed by `Image.resize` (no `reducing_gap`). Pillow resamples in two separable passes
//! with antialiasing (the filter support grows with the downscale factor), rounding to 8 bits
//! between them, so which pass runs first changes pixels: Pillow 13 runs the vertical one
//! first when the height shrinks by more than twice as many pixels as the width (see
//! `vertical_first`), older Pillow always ran the horizontal one first. Coefficients are
//! computed in `f64`, normalised to sum 1, then rounded to 22-bit fixed point; each output is
//! an `i32` sum that starts at half a unit and is shifted and clamped to 0..=255. Every step
//! below repeats that arithmetic in the same order, so outputs match to the bit (checked
//! against Pillow 13.0.0 by `augment/tests/ops_parity.rs`).
//!
//! Degenerate requests never panic: a zero output size gives an image with no pixels, samples
//! outside the source (crop windows hanging over the edge) read as 0 as in PIL's `crop`, and an
//! image whose `data` is shorter than `width * height * 3` is read as if it had no pixels.
//! Crop windows longer than [`MAX_WINDOW_SIDE`] on a side resample to zeros.

use crate::RgbImage;

/// Resampling filter, with Pillow's semantics for `Image.resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `Image.NEAREST`: Pillow maps output pixel centres through an affine scale, accumulating
    /// the step in `f64`, and truncates (no antialiasing).
    Nearest,
    /// `Image.BILINEAR`: triangle filter, support 1, widened by the downscale factor.
    Bilinear,
    /// `Image.BICUBIC`: cubic convolution with a = -0.5, support 2, widened by the downscale
    /// factor.
    Bicubic,
}

/// Fractional bits of Pillow's 8-bit resampling coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// The pixel bytes and dimensions of `img`, or an empty view when `data` is too short, so that
/// a malformed image is read as having no pixels instead of indexing out of bounds.
pub(crate) fn pixels(img: &RgbImage) -> (&[u8], usize, usize) {
    let (w, h) = (img.width as usize, img.height as usize);
    match w.checked_mul(h).and_then(|n| n.checked_mul(3)) {
        Some(n) if img.data.len() >= n => (&img.data[..n], w, h),
        _ => (&[], 0, 0),
    }
}

/// A copy of `img` as every function here reads it (empty when its buffer is short).
pub(crate) fn validated_copy(img: &RgbImage) -> RgbImage {
    let (data, w, h) = pixels(img);
    RgbImage {
        width: w as u32,
        height: h as u32,
        data: data.to_vec(),
    }
}

/// A zero-filled `width` x `height` image; 0x0 when the byte count overflows `usize`.
pub(crate) fn zeroed(width: u32, height: u32) -> RgbImage {
    match (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3))
    {
        Some(n) => RgbImage {
            width,
            height,
            data: vec![0; n],
        },
        None => RgbImage {
            width: 0,
            height: 0,
            data: Vec::new(),
        },
    }
}

/// The source as PIL sees it after `crop((left, top, left + width, top + height))`: a window
/// whose samples outside the source read as 0. Resampling reads through it, so a resized crop
/// never materialises the crop.
struct Window<'a> {
    data: &'a [u8],
    src_w: usize,
    src_h: usize,
    left: i64,
    top: i64,
    width: usize,
    height: usize,
}

impl<'a> Window<'a> {
    fn new(src: &'a RgbImage, top: i64, left: i64, height: usize, width: usize) -> Self {
        let (data, src_w, src_h) = pixels(src);
        Window {
            data,
            src_w,
            src_h,
            left,
            top,
            width,
            height,
        }
    }

    /// The whole source row behind window row `y`, or `None` when that row is outside.
    fn src_row(&self, y: usize) -> Option<&'a [u8]> {
        let sy = self.top + y as i64;
        if sy < 0 || sy >= self.src_h as i64 {
            return None;
        }
        let start = sy as usize * self.src_w * 3;
        Some(&self.data[start..start + self.src_w * 3])
    }

    /// Window columns `[x0, x1)` clipped to those with a source pixel behind them.
    fn valid_cols(&self, x0: usize, x1: usize) -> (usize, usize) {
        let lo = (-self.left).clamp(0, self.width as i64) as usize;
        let hi = (self.src_w as i64 - self.left).clamp(0, self.width as i64) as usize;
        let a = x0.max(lo);
        let b = x1.min(hi);
        if a < b {
            (a, b)
        } else {
            (a, a)
        }
    }

    /// Copies the window out: PIL `crop`.
    fn materialise(&self) -> RgbImage {
        let mut out = zeroed(self.width as u32, self.height as u32);
        if out.data.is_empty() {
            return out;
        }
        let (c0, c1) = self.valid_cols(0, self.width);
        if c0 == c1 {
            return out;
        }
        let row_bytes = self.width * 3;
        for (y, dst) in out.data.chunks_exact_mut(row_bytes).enumerate() {
            if let Some(row) = self.src_row(y) {
                let s0 = (c0 as i64 + self.left) as usize * 3;
                let s1 = (c1 as i64 + self.left) as usize * 3;
                dst[c0 * 3..c1 * 3].copy_from_slice(&row[s0..s1]);
            }
        }
        out
    }
}

/// Pillow's `bilinear_filter`.
fn bilinear_kernel(x: f64) -> f64 {
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `bicubic_filter` with a = -0.5, written in its evaluation order.
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point taps for one axis: output `i` reads `len[i]` inputs from `start[i]`, weighted by
/// `k[i * ksize ..]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, `in_size`).
fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let (kernel, support): (fn(f64) -> f64, f64) = match filter {
        Filter::Bicubic => (bicubic_kernel, 2.0),
        // Nearest never reaches here; bilinear taps keep the function total.
        Filter::Bilinear | Filter::Nearest => (bilinear_kernel, 1.0),
    };
    // Pillow keeps the box in `f32` and subtracts there before widening.
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = 0.0 + (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero before the clamp.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = xmin as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = kernel(((x + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..xx * ksize + n];
        for (kx, &wx) in row.iter_mut().zip(&w) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            *kx = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    Taps {
        ksize,
        start,
        len,
        k,
    }
}

/// Pillow's `clip8`: drop the fraction bits, clamp to a byte.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Rows the horizontal pass handles at once. The strip is transposed so that one source
/// column of all its rows (`STRIP` pixels, `LANES` bytes) is contiguous: each tap is then one
/// multiply-add over `LANES` lanes, for `STRIP` output pixels at a time.
const STRIP: usize = 16;
const LANES: usize = 3 * STRIP;
/// AVX2 vectors of eight `i32` lanes per strip column.
#[cfg(target_arch = "x86_64")]
const VECS: usize = LANES / 8;

/// The horizontal pass for one set of taps: per output column, where its kept taps start in
/// a source row and in `taps.k`, and how many there are (taps that fell outside the source
/// were dropped because they read 0).
struct HPlan<'t> {
    taps: &'t Taps,
    clipped: Vec<(usize, usize, usize)>,
    /// Source columns `[lo, hi)` read by some output.
    lo: usize,
    hi: usize,
}

impl<'t> HPlan<'t> {
    fn new(taps: &'t Taps, clipped: Vec<(usize, usize, usize)>) -> Self {
        let lo = clipped
            .iter()
            .filter(|c| c.2 > 0)
            .map(|c| c.0)
            .min()
            .unwrap_or(0);
        let hi = clipped.iter().map(|c| c.0 + c.2).max().unwrap_or(0).max(lo);
        HPlan {
            taps,
            clipped,
            lo,
            hi,
        }
    }

    /// Horizontal pass of source rows `0..n` (`row(y)`: the whole row, or `None` when it
    /// reads as zeros), appended to `out` as `n` rows of `clipped.len()` pixels. Appending
    /// strip by strip zero-fills only a few cache-hot rows at a time.
    fn rows<'r>(&self, n: usize, row: impl Fn(usize) -> Option<&'r [u8]>, out: &mut Vec<u8>) {
        let cols = self.hi - self.lo;
        let mut strip = vec![0u8; cols * LANES];
        let out_row = self.clipped.len() * 3;
        for y0 in (0..n).step_by(STRIP) {
            let m = STRIP.min(n - y0);
            for r in 0..STRIP {
                let src = if r < m { row(y0 + r) } else { None };
                match src {
                    Some(src) => {
                        let src = &src[self.lo * 3..self.hi * 3];
                        for (d, p) in strip.chunks_exact_mut(LANES).zip(src.chunks_exact(3)) {
                            d[r * 3..r * 3 + 3].copy_from_slice(p);
                        }
                    }
                    None => {
                        for d in strip.chunks_exact_mut(LANES) {
                            d[r * 3..r * 3 + 3].fill(0);
                        }
                    }
                }
            }
            let at = out.len();
            out.resize(at + m * out_row, 0);
            self.strip(&strip, &mut out[at..], m);
        }
    }

    /// One transposed strip into `m` output rows.
    fn strip(&self, strip: &[u8], out: &mut [u8], m: usize) {
        #[cfg(target_arch = "x86_64")]
        if dfndr_simd::level() >= dfndr_simd::Level::Avx2 {
            // SAFETY: the CPU supports AVX2: `level()` never exceeds what was detected.
            unsafe { self.strip_avx2(strip, out, m) };
            return;
        }
        self.strip_generic(strip, out, m);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn strip_avx2(&self, strip: &[u8], out: &mut [u8], m: usize) {
        use std::arch::x86_64::*;
        let out_row = self.clipped.len() * 3;
        let half = _mm256_set1_epi32(HALF);
        for (xx, &(src0, k0, n)) in self.clipped.iter().enumerate() {
            let mut acc = [half; VECS];
            // An output with no kept taps reads nothing (and `src0` may lie before `lo`).
            let (k, px) = if n > 0 {
                let at = src0 - self.lo;
                (
                    &self.taps.k[k0..k0 + n],
                    &strip[at * LANES..(at + n) * LANES],
                )
            } else {
                (&[][..], &[][..])
            };
            for (p, &kx) in px.chunks_exact(LANES).zip(k) {
                let kv = _mm256_set1_epi32(kx);
                for (j, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `p` is LANES = 8 * VECS bytes long; load j reads bytes
                    // 8j..8j + 8 of it.
                    let q = unsafe { _mm_loadl_epi64(p.as_ptr().add(8 * j).cast()) };
                    *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(q), kv));
                }
            }
            // clip8 on every lane: drop the fraction bits, clamp to 0..=255.
            let (lo, hi) = (_mm256_setzero_si256(), _mm256_set1_epi32(255));
            let clip = |a| {
                _mm256_min_epi32(
                    _mm256_max_epi32(_mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(a), lo),
                    hi,
                )
            };
            let mut v = [0i32; LANES];
            for (j, a) in acc.iter().enumerate() {
                // SAFETY: `v` holds VECS 32-byte vectors; store j writes the j-th.
                unsafe { _mm256_storeu_si256(v.as_mut_ptr().add(8 * j).cast(), clip(*a)) };
            }
            for r in 0..m {
                let d = &mut out[r * out_row + xx * 3..r * out_row + xx * 3 + 3];
                d[0] = v[r * 3] as u8;
                d[1] = v[r * 3 + 1] as u8;
                d[2] = v[r * 3 + 2] as u8;
            }
        }
    }

    #[inline(always)]
    fn strip_generic(&self, strip: &[u8], out: &mut [u8], m: usize) {
        let out_row = self.clipped.len() * 3;
        for (xx, &(src0, k0, n)) in self.clipped.iter().enumerate() {
            let mut acc = [HALF; LANES];
            if n > 0 {
                let k = &self.taps.k[k0..k0 + n];
                let px = &strip[(src0 - self.lo) * LANES..(src0 - self.lo + n) * LANES];
                for (p, &kx) in px.chunks_exact(LANES).zip(k) {
                    for i in 0..LANES {
                        acc[i] += p[i] as i32 * kx;
                    }
                }
            }
            for r in 0..m {
                let d = &mut out[r * out_row + xx * 3..r * out_row + xx * 3 + 3];
                d[0] = clip8(acc[r * 3]);
                d[1] = clip8(acc[r * 3 + 1]);
                d[2] = clip8(acc[r * 3 + 2]);
            }
        }
    }
}

/// For each output column: (first source column, offset of its first kept coefficient, number
/// of kept taps), after dropping taps that fall outside the source.
fn clip_taps(win: &Window, taps: &Taps) -> Vec<(usize, usize, usize)> {
    (0..taps.start.len())
        .map(|xx| {
            let x0 = taps.start[xx];
            let (a, b) = win.valid_cols(x0, x0 + taps.len[xx]);
            if a < b {
                (
                    (a as i64 + win.left) as usize,
                    xx * taps.ksize + (a - x0),
                    b - a,
                )
            } else {
                (0, xx * taps.ksize, 0)
            }
        })
        .collect()
}

/// The span `[first, last)` of inputs some output reads.
fn span(taps: &Taps) -> (usize, usize) {
    let first = taps.start.first().copied().unwrap_or(0);
    let last = taps
        .start
        .iter()
        .zip(&taps.len)
        .map(|(s, n)| s + n)
        .max()
        .unwrap_or(first);
    (first, last.max(first))
}

/// Whether Pillow runs the vertical pass first. Pillow 13 does when both passes are needed,
/// the height shrinks, and it shrinks by more than twice as many pixels as the width:
/// `in_h - out_h > 2 * (in_w - out_w)`. Found by probing Pillow 13.0.0 (its C source was not
/// at hand): about 3,500 random size combinations up to 1,500 px, both filters, on which the
/// two orders give different pixels, with no exception, including both sides of the
/// boundary. Older Pillow always went horizontal first.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    out_w != in_w && out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64)
}

/// Antialiased resampling of `win` to `out_w` x `out_h`: Pillow's `ImagingResampleInner`.
/// The two passes round to 8 bits in between, so their order changes pixels; it follows
/// [`vertical_first`].
fn resample(win: &Window, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    let mut out = zeroed(out_w as u32, out_h as u32);
    if out.data.is_empty() {
        return out;
    }
    let need_h = out_w != win.width;
    let need_v = out_h != win.height;
    if !need_h && !need_v {
        return win.materialise();
    }
    let row_bytes = out_w * 3;
    if !need_v {
        let htaps = precompute(win.width, out_w, filter);
        let plan = HPlan::new(&htaps, clip_taps(win, &htaps));
        out.data.clear();
        plan.rows(out_h, |y| win.src_row(y), &mut out.data);
        return out;
    }
    let vtaps = precompute(win.height, out_h, filter);
    if !need_h {
        // Same width: only the vertical pass, straight over the crop's columns; columns with
        // no source pixel behind them stay 0.
        vertical_from_window(win, &vtaps, 0, win.width, &mut out.data);
        return out;
    }
    let htaps = precompute(win.width, out_w, filter);
    if vertical_first(win.width, win.height, out_w, out_h) {
        // Vertical pass over the columns the horizontal taps reach, then horizontal.
        let (c_first, c_last) = span(&htaps);
        let temp_w = c_last - c_first;
        if temp_w == 0 {
            return out;
        }
        let mut temp = vec![0u8; temp_w * out_h * 3];
        vertical_from_window(win, &vtaps, c_first, temp_w, &mut temp);
        let shifted: Vec<(usize, usize, usize)> = (0..out_w)
            .map(|xx| (htaps.start[xx] - c_first, xx * htaps.ksize, htaps.len[xx]))
            .collect();
        let plan = HPlan::new(&htaps, shifted);
        let temp_row = temp_w * 3;
        out.data.clear();
        plan.rows(
            out_h,
            |y| Some(&temp[y * temp_row..(y + 1) * temp_row]),
            &mut out.data,
        );
        return out;
    }
    // Horizontal first, over only the rows the vertical taps reach, as Pillow does.
    let plan = HPlan::new(&htaps, clip_taps(win, &htaps));
    let (first, last) = span(&vtaps);
    let mut temp = Vec::with_capacity((last - first) * row_bytes);
    plan.rows(last - first, |r| win.src_row(first + r), &mut temp);
    vertical(
        &vtaps,
        out_w,
        |y| {
            let r = y.checked_sub(first)?;
            temp.get(r * row_bytes..(r + 1) * row_bytes)
                .map(|row| (row, 0usize, out_w))
        },
        &mut out.data,
    );
    out
}

/// Vertical pass read straight from the window, for window columns `[c_first, c_first + w)`,
/// into `out` (`w` wide).
fn vertical_from_window(win: &Window, vtaps: &Taps, c_first: usize, w: usize, out: &mut [u8]) {
    let (c0, c1) = win.valid_cols(c_first, c_first + w);
    if c0 == c1 {
        return;
    }
    let src_c0 = (c0 as i64 + win.left) as usize;
    let n = c1 - c0;
    vertical(
        vtaps,
        w,
        |y| {
            win.src_row(y)
                .map(|row| (&row[src_c0 * 3..(src_c0 + n) * 3], c0 - c_first, n))
        },
        out,
    );
}

/// Vertical pass. `row(y)` yields, for input row `y`, its bytes for columns `[col0, col0 + n)`
/// of the output width, or `None` when the row reads as zeros.
fn vertical<'r>(
    taps: &Taps,
    out_w: usize,
    row: impl Fn(usize) -> Option<(&'r [u8], usize, usize)>,
    out: &mut [u8],
) {
    let row_bytes = out_w * 3;
    let mut acc = vec![0i32; row_bytes];
    let mut full: Vec<(&[u8], i32)> = Vec::with_capacity(taps.ksize);
    for (yy, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
        let y0 = taps.start[yy];
        let k = &taps.k[yy * taps.ksize..yy * taps.ksize + taps.len[yy]];
        // Common case: every tap's row covers the whole output width (or reads as zeros
        // and can be skipped): one pass over the columns with all taps at once.
        full.clear();
        let mut partial = false;
        for (dy, &ky) in k.iter().enumerate() {
            match row(y0 + dy) {
                Some((bytes, 0, n)) if n == out_w && bytes.len() == row_bytes => {
                    full.push((bytes, ky))
                }
                Some(_) => partial = true,
                None => {}
            }
        }
        if !partial {
            vertical_row(&full, dst);
            continue;
        }
        acc.fill(HALF);
        for (dy, &ky) in k.iter().enumerate() {
            if let Some((bytes, col0, n)) = row(y0 + dy) {
                let a = &mut acc[col0 * 3..(col0 + n) * 3];
                for (s, &p) in a.iter_mut().zip(bytes) {
                    *s += p as i32 * ky;
                }
            }
        }
        for (d, &s) in dst.iter_mut().zip(&acc) {
            *d = clip8(s);
        }
    }
}

/// One output row of the vertical pass from full-width input rows and their coefficients.
fn vertical_row(rows: &[(&[u8], i32)], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if dfndr_simd::level() >= dfndr_simd::Level::Avx2 {
        // SAFETY: the CPU supports AVX2: `level()` never exceeds what was detected.
        unsafe { vertical_row_avx2(rows, dst) };
        return;
    }
    vertical_row_generic(rows, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_row_avx2(rows: &[(&[u8], i32)], dst: &mut [u8]) {
    vertical_row_generic(rows, dst);
}

#[inline(always)]
fn vertical_row_generic(rows: &[(&[u8], i32)], dst: &mut [u8]) {
    const CHUNK: usize = 32;
    let n = dst.len();
    let whole = n - n % CHUNK;
    for c in (0..whole).step_by(CHUNK) {
        let mut acc = [HALF; CHUNK];
        for &(bytes, ky) in rows {
            let p = &bytes[c..c + CHUNK];
            for i in 0..CHUNK {
                acc[i] += p[i] as i32 * ky;
            }
        }
        for (d, &s) in dst[c..c + CHUNK].iter_mut().zip(&acc) {
            *d = clip8(s);
        }
    }
    for c in whole..n {
        let mut s = HALF;
        for &(bytes, ky) in rows {
            s += bytes[c] as i32 * ky;
        }
        dst[c] = clip8(s);
    }
}

/// Mirrors C's `(int)` on x86-64: NaN and out-of-range values become `i32::MIN`.
pub(crate) fn c_int(v: f64) -> i32 {
    if !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

/// Pillow's `COORD`: negative coordinates are outside, others truncate.
#[inline]
pub(crate) fn coord(v: f64) -> i32 {
    if v < 0.0 {
        -1
    } else {
        c_int(v)
    }
}

/// Nearest-neighbour resize of `win`: Pillow's `ImagingScaleAffine` with the matrix `_resize`
/// builds, including its accumulated `f64` source positions.
fn nearest(win: &Window, out_w: usize, out_h: usize) -> RgbImage {
    let mut out = zeroed(out_w as u32, out_h as u32);
    if out.data.is_empty() {
        return out;
    }
    if out_w == win.width && out_h == win.height {
        return win.materialise();
    }
    let a0 = (win.width as f32 - 0.0f32) as f64 / out_w as f64;
    let a4 = (win.height as f32 - 0.0f32) as f64 / out_h as f64;
    // Source column per output column; `None` stays 0 as Pillow's `fill` leaves it.
    let mut xo = 0.0 + a0 * 0.5;
    let xs: Vec<Option<usize>> = (0..out_w)
        .map(|_| {
            let xin = coord(xo);
            xo += a0;
            let ok = xin >= 0 && (xin as usize) < win.width;
            let sx = xin as i64 + win.left;
            (ok && sx >= 0 && (sx as usize) < win.src_w).then_some(sx as usize)
        })
        .collect();
    let mut yo = 0.0 + a4 * 0.5;
    for dst in out.data.chunks_exact_mut(out_w * 3) {
        let yi = coord(yo);
        yo += a4;
        if yi < 0 || yi as usize >= win.height {
            continue;
        }
        if let Some(row) = win.src_row(yi as usize) {
            for (d, sx) in dst.chunks_exact_mut(3).zip(&xs) {
                if let Some(sx) = sx {
                    d.copy_from_slice(&row[sx * 3..sx * 3 + 3]);
                }
            }
        }
    }
    out
}

/// Longest window side resampled; Pillow's coefficient tables grow with the window, and beyond
/// this (far past any decodable image) the result is an all-zero image instead.
pub const MAX_WINDOW_SIDE: u32 = 1 << 24;

fn resize_window(win: &Window, width: u32, height: u32, filter: Filter) -> RgbImage {
    if win.width > MAX_WINDOW_SIDE as usize || win.height > MAX_WINDOW_SIDE as usize {
        return zeroed(width, height);
    }
    match filter {
        Filter::Nearest => nearest(win, width as usize, height as usize),
        Filter::Bilinear | Filter::Bicubic => {
            resample(win, width as usize, height as usize, filter)
        }
    }
}

/// `src.resize((width, height), filter)` in Pillow. A zero `width` or `height` gives an image
/// with no pixels (Pillow raises there).
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (_, w, h) = pixels(src);
    let win = Window::new(src, 0, 0, h, w);
    resize_window(&win, width, height, filter)
}

/// PIL `crop((left, top, left + width, top + height))`: a `width` x `height` image whose
/// pixels outside `src` are 0.
pub fn crop(src: &RgbImage, top: i32, left: i32, height: u32, width: u32) -> RgbImage {
    Window::new(
        src,
        top as i64,
        left as i64,
        height as usize,
        width as usize,
    )
    .materialise()
}

/// torchvision `F.resized_crop(img, top, left, height, width, [out_height, out_width],
/// filter)` on a PIL image: crop (zeros outside the image), then resize. The crop is never
/// copied out; resampling reads through it.
#[allow(clippy::too_many_arguments)]
pub fn resized_crop(
    src: &RgbImage,
    top: i32,
    left: i32,
    height: u32,
    width: u32,
    out_width: u32,
    out_height: u32,
    filter: Filter,
) -> RgbImage {
    let win = Window::new(
        src,
        top as i64,
        left as i64,
        height as usize,
        width as usize,
    );
    resize_window(&win, out_width, out_height, filter)
}

/// torchvision `Resize(size)` (an `int`) on a PIL image: the shorter side becomes `size`, the
/// longer `int(size * long / short)`; an image already at that size is returned as is. A
/// source with a zero side is returned unchanged (torchvision divides by zero there).
pub fn resize_shorter(src: &RgbImage, size: u32, filter: Filter) -> RgbImage {
    let (_, w, h) = pixels(src);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == 0 {
        return validated_copy(src);
    }
    // Python: int * int is exact, `/` rounds once to f64, `int()` truncates.
    let new_long = ((size as u64 * long as u64) as f64 / short as f64) as u32;
    let (new_w, new_h) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    if new_w as usize == w && new_h as usize == h {
        return validated_copy(src);
    }
    resize(src, new_w, new_h, filter)
}

/// Python's `round()` on a float: halves go to the even neighbour.
fn py_round(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// torchvision `CenterCrop((out_height, out_width))` on a PIL image: zero padding when the
/// image is smaller (left/top padding `(crop - size) // 2`), then a crop at
/// `round((size - crop) / 2)` with Python's round-half-to-even.
pub fn center_crop(src: &RgbImage, out_height: u32, out_width: u32) -> RgbImage {
    let (_, w, h) = pixels(src);
    let (cw, ch) = (out_width as i64, out_height as i64);
    let (mut w, mut h) = (w as i64, h as i64);
    // Padding shifts the origin; the padded image is then cropped like any other.
    let pad_left = if cw > w { (cw - w) / 2 } else { 0 };
    let pad_top = if ch > h { (ch - h) / 2 } else { 0 };
    if cw > w || ch > h {
        if cw > w {
            w = cw;
        }
        if ch > h {
            h = ch;
        }
    }
    let top = py_round((h - ch) as f64 / 2.0) - pad_top;
    let left = py_round((w - cw) as f64 / 2.0) - pad_left;
    Window::new(src, top, left, out_height as usize, out_width as usize).materialise()
}

/// Mirror left to right (`Image.transpose(FLIP_LEFT_RIGHT)`).
pub fn hflip(src: &RgbImage) -> RgbImage {
    let (data, w, h) = pixels(src);
    let mut out = zeroed(w as u32, h as u32);
    if out.data.is_empty() {
        return out;
    }
    for (dst, row) in out
        .data
        .chunks_exact_mut(w * 3)
        .zip(data.chunks_exact(w * 3))
    {
        for (d, s) in dst.chunks_exact_mut(3).zip(row.chunks_exact(3).rev()) {
            d.copy_from_slice(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[(x * 7 + y) as u8, (y * 5) as u8, (x * y) as u8]);
            }
        }
        RgbImage::from_raw(w, h, data).unwrap()
    }

    #[test]
    fn identity_resize_is_a_copy() {
        let img = gradient(9, 7);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(resize(&img, 9, 7, f), img);
        }
    }

    #[test]
    fn zero_sizes_do_not_panic() {
        let img = gradient(5, 4);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(resize(&img, 0, 3, f).data.len(), 0);
            assert_eq!(resize(&img, 3, 0, f).data.len(), 0);
            let empty = RgbImage::filled(0, 0, [0; 3]);
            let r = resize(&empty, 4, 4, f);
            assert_eq!((r.width, r.height), (4, 4));
            assert!(r.data.iter().all(|&v| v == 0));
            let r = resized_crop(&img, 2, 2, 0, 0, 8, 8, f);
            assert!(r.data.iter().all(|&v| v == 0));
        }
        assert_eq!(
            resize_shorter(&RgbImage::filled(0, 5, [0; 3]), 10, Filter::Bicubic).width,
            0
        );
        assert_eq!(
            center_crop(&RgbImage::filled(0, 0, [0; 3]), 3, 2).data,
            vec![0; 18]
        );
    }

    #[test]
    fn crop_outside_is_zero() {
        let img = gradient(4, 3);
        let c = crop(&img, -1, -2, 5, 8);
        assert_eq!((c.width, c.height), (8, 5));
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
        assert_eq!(c.pixel(2, 1), img.pixel(0, 0));
        assert_eq!(c.pixel(5, 3), img.pixel(3, 2));
        assert_eq!(c.pixel(6, 3), [0, 0, 0]);
        let far = crop(&img, 100, -100, 2, 2);
        assert!(far.data.iter().all(|&v| v == 0));
        // Extreme offsets must not overflow.
        let c = crop(&img, i32::MIN, i32::MAX, 2, 2);
        assert!(c.data.iter().all(|&v| v == 0));
        let r = resized_crop(&img, i32::MAX, i32::MIN, 3, 3, 5, 5, Filter::Bicubic);
        assert!(r.data.iter().all(|&v| v == 0));
    }

    #[test]
    fn one_pixel_images() {
        let img = RgbImage::filled(1, 1, [10, 200, 30]);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            let r = resize(&img, 3, 2, f);
            assert!(r.data.chunks(3).all(|p| p == [10, 200, 30]), "{f:?}");
        }
        assert_eq!(hflip(&img), img);
        assert_eq!(center_crop(&img, 1, 1), img);
        let c = center_crop(&img, 3, 3);
        assert_eq!(c.pixel(1, 1), [10, 200, 30]);
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
    }

    #[test]
    fn resized_crop_matches_crop_then_resize() {
        let img = gradient(23, 17);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            for &(t, l, h, w) in &[
                (0, 0, 17, 23),
                (-3, 5, 12, 30),
                (4, -2, 20, 9),
                (2, 3, 1, 1),
            ] {
                for &(ow, oh) in &[(7, 5), (23, 17), (40, 31), (9, 12)] {
                    let a = resized_crop(&img, t, l, h, w, ow, oh, f);
                    let b = resize(&crop(&img, t, l, h, w), ow, oh, f);
                    assert_eq!(a, b, "{f:?} {t} {l} {h} {w} -> {ow}x{oh}");
                }
            }
        }
    }

    #[test]
    fn center_crop_offsets_round_half_even() {
        let img = gradient(7, 6);
        // (7 - 2) / 2 = 2.5 rounds to 2; (6 - 3) / 2 = 1.5 rounds to 2.
        let c = center_crop(&img, 3, 2);
        assert_eq!(c.pixel(0, 0), img.pixel(2, 2));
        // Height padded by (9 - 6) // 2 = 1 on top; width cropped at round(1.5) = 2.
        let c = center_crop(&img, 9, 4);
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
        assert_eq!(c.pixel(0, 1), img.pixel(2, 0));
    }

    #[test]
    fn resize_shorter_sizes() {
        let img = gradient(30, 20);
        let r = resize_shorter(&img, 10, Filter::Bilinear);
        assert_eq!((r.width, r.height), (15, 10));
        let img = gradient(7, 10);
        let r = resize_shorter(&img, 3, Filter::Bilinear);
        // int(3 * 10 / 7) = 4
        assert_eq!((r.width, r.height), (3, 4));
    }

    /// Deterministic sweep over tiny images and hostile parameters: sizes must come out as
    /// requested and nothing may panic.
    #[test]
    fn sweep_degenerate_parameters() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let offsets = [i32::MIN, -1000, -3, -1, 0, 1, 2, 7, 1000, i32::MAX];
        for _ in 0..400 {
            let img = gradient(next(6) as u32, next(6) as u32);
            let top = offsets[next(offsets.len() as u64) as usize];
            let left = offsets[next(offsets.len() as u64) as usize];
            let (h, w) = (next(9) as u32, next(9) as u32);
            let (ow, oh) = (next(12) as u32, next(12) as u32);
            for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
                let r = resized_crop(&img, top, left, h, w, ow, oh, f);
                assert_eq!(r.data.len(), (ow * oh * 3) as usize);
                let r = resize(&img, ow, oh, f);
                assert_eq!(r.data.len(), (ow * oh * 3) as usize);
                let r = resize_shorter(&img, ow, f);
                assert_eq!(r.data.len(), r.width as usize * r.height as usize * 3);
            }
            let c = crop(&img, top, left, h, w);
            assert_eq!(c.data.len(), (w * h * 3) as usize);
            let c = center_crop(&img, oh, ow);
            assert_eq!((c.width, c.height), (ow, oh));
            assert_eq!(hflip(&hflip(&img)), img);
        }
        // Windows past MAX_WINDOW_SIDE resample to zeros instead of allocating tables.
        let img = gradient(3, 3);
        let r = resized_crop(&img, 0, 0, 3, u32::MAX, 4, 4, Filter::Bicubic);
        assert!(r.data.iter().all(|&v| v == 0));
    }

    /// Pillow 13 chooses the pass order by `in_h - out_h > 2 * (in_w - out_w)`.
    #[test]
    fn pass_order_rule() {
        assert!(!vertical_first(100, 150, 80, 110));
        assert!(vertical_first(100, 150, 80, 109));
        assert!(vertical_first(100, 150, 81, 110));
        assert!(vertical_first(30, 120, 80, 64));
        assert!(!vertical_first(200, 200, 100, 300));
        assert!(!vertical_first(200, 200, 200, 10));
    }

    #[test]
    fn malformed_image_reads_as_empty() {
        let bad = RgbImage {
            width: 10,
            height: 10,
            data: vec![1; 5],
        };
        let r = resize(&bad, 4, 4, Filter::Bicubic);
        assert!(r.data.iter().all(|&v| v == 0));
        assert_eq!(hflip(&bad).data.len(), 0);
    }

    /// The AVX2 kernels (taken on CPUs that have it) and the portable ones they stand in for
    /// agree to the bit, on every tap count, strip height and window offset.
    #[test]
    fn vector_kernels_match_portable_ones() {
        let mut seed = 12345u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        };
        for (in_size, out_size) in [(57, 13), (300, 224), (20, 31), (1000, 224), (9, 9)] {
            for filter in [Filter::Bicubic, Filter::Bilinear] {
                let taps = precompute(in_size, out_size, filter);
                let win_w = in_size + 7;
                let img = RgbImage {
                    width: win_w as u32,
                    height: 1,
                    data: (0..win_w * 3).map(|_| next()).collect(),
                };
                for left in [0i64, 3, -4] {
                    let win = Window::new(&img, 0, left, 1, in_size);
                    let plan = HPlan::new(&taps, clip_taps(&win, &taps));
                    let cols = plan.hi - plan.lo;
                    let strip: Vec<u8> = (0..cols * LANES).map(|_| next()).collect();
                    for m in [1, 5, STRIP] {
                        let mut a = vec![0u8; m * out_size * 3];
                        let mut b = a.clone();
                        plan.strip(&strip, &mut a, m);
                        plan.strip_generic(&strip, &mut b, m);
                        assert_eq!(a, b, "{in_size}->{out_size} {filter:?} left {left} m {m}");
                    }
                }
                for width in [1usize, 10, 11, 64, 75] {
                    let rows: Vec<Vec<u8>> = (0..taps.ksize)
                        .map(|_| (0..width * 3).map(|_| next()).collect())
                        .collect();
                    for yy in 0..out_size {
                        let k = &taps.k[yy * taps.ksize..yy * taps.ksize + taps.len[yy]];
                        let pairs: Vec<(&[u8], i32)> =
                            rows.iter().zip(k).map(|(r, &k)| (&r[..], k)).collect();
                        let mut a = vec![0u8; width * 3];
                        let mut b = a.clone();
                        vertical_row(&pairs, &mut a);
                        vertical_row_generic(&pairs, &mut b);
                        assert_eq!(a, b);
                    }
                }
            }
        }
    }
}
