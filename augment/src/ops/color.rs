//! Photometric ops with Pillow's arithmetic.
//!
//! The `ImageEnhance` ops are all `Image.blend(degenerate, image, factor)`, which Pillow runs
//! in `f32` (the factor is narrowed from Python's `f64`): `d + factor * (i - d)`, truncated to
//! a byte when 0 <= factor <= 1, clamped to 0..=255 and then truncated otherwise. The
//! degenerate images are: black (Brightness), the ITU-R 601-2 luma `(19595 r + 38470 g +
//! 7471 b + 0x8000) >> 16` (Color), a constant `int(mean(luma) + 0.5)` (Contrast), and
//! Pillow's 3x3 SMOOTH filter, which leaves the outermost rows and columns as they were
//! (Sharpness). Each is computed per pixel on the fly instead of as a second image.
//!
//! The `ImageOps` ops are 256-entry lookup tables per channel; Pillow's `point` clamps table
//! values to 0..=255, which matters for Equalize.

use crate::resize::{pixels, validated_copy};
use crate::RgbImage;

/// One channel of `Image.blend(degenerate, image, alpha)`; `interp` is Pillow's
/// `0 <= alpha <= 1` test, made once per image.
#[inline]
fn blend(d: u8, i: u8, alpha: f32, interp: bool) -> u8 {
    let v = d as f32 + alpha * (i as i32 - d as i32) as f32;
    if interp {
        v as u8
    } else if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    }
}

/// Pillow narrows the factor to `f32` and decides once whether it interpolates.
fn alpha_of(factor: f64) -> (f32, bool) {
    let a = factor as f32;
    (a, (0.0..=1.0).contains(&a))
}

/// Pillow's RGB to L conversion.
#[inline]
fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blend with black.
pub fn brightness(src: &RgbImage, factor: f64) -> RgbImage {
    let (alpha, interp) = alpha_of(factor);
    let lut: Vec<u8> = (0..=255u8).map(|v| blend(0, v, alpha, interp)).collect();
    apply_lut(src, [&lut, &lut, &lut])
}

/// `ImageEnhance.Color(img).enhance(factor)`: blend with the grey (L, then back to RGB) image.
pub fn saturation(src: &RgbImage, factor: f64) -> RgbImage {
    let (alpha, interp) = alpha_of(factor);
    map_pixels(src, |p| {
        let l = luma(p);
        [
            blend(l, p[0], alpha, interp),
            blend(l, p[1], alpha, interp),
            blend(l, p[2], alpha, interp),
        ]
    })
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with the mean luma, computed as
/// `ImageStat` does (exact integer sum over a histogram, one `f64` division) and rounded by
/// `int(mean + 0.5)`.
pub fn contrast(src: &RgbImage, factor: f64) -> RgbImage {
    let (data, _, _) = pixels(src);
    let (mut sum, mut count) = (0u64, 0u64);
    for p in data.chunks_exact(3) {
        sum += luma(p) as u64;
        count += 1;
    }
    let mean = if count == 0 {
        0.0
    } else {
        sum as f64 / count as f64
    };
    let m = (mean + 0.5) as u8;
    let (alpha, interp) = alpha_of(factor);
    let lut: Vec<u8> = (0..=255u8).map(|v| blend(m, v, alpha, interp)).collect();
    apply_lut(src, [&lut, &lut, &lut])
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blend with `img.filter(ImageFilter.SMOOTH)`.
///
/// SMOOTH is the kernel `[1 1 1; 1 5 1; 1 1 1] / 13`, run by Pillow's `ImagingFilter3x3` in
/// `f32`: the kernel is divided by 13 in `f32`, the sum starts at 0.5 (its rounding offset),
/// adds the row below, this row, then the row above, each as `(left + centre) + right`, and is
/// clamped and truncated. Border pixels are copied, so they blend with themselves and stay;
/// images under 3x3 are copied whole.
pub fn sharpness(src: &RgbImage, factor: f64) -> RgbImage {
    let (alpha, interp) = alpha_of(factor);
    let (data, w, h) = pixels(src);
    let mut out = validated_copy(src);
    if w < 3 || h < 3 {
        return out;
    }
    // The kernel products (plain f32 multiplies, no fused multiply-add, so they vectorise
    // without changing a bit), and each row's `(left + centre) + right` sum with the
    // weight-1 centre computed once: it serves as the row below one output row and the row
    // above another.
    let k1 = 1.0f32 / 13.0f32;
    let k5 = 5.0f32 / 13.0f32;
    let stride = w * 3;
    let ones = |row: &[u8], sums: &mut Vec<f32>| {
        sums.clear();
        sums.extend(
            row.windows(7)
                .map(|p| p[0] as f32 * k1 + p[3] as f32 * k1 + p[6] as f32 * k1),
        );
    };
    let clip = |v: f32| -> u8 {
        if v <= 0.0 {
            0
        } else if v >= 255.0 {
            255
        } else {
            v as u8
        }
    };
    // Row sums for rows y - 1, y and y + 1, rotated as y advances.
    let mut above = Vec::with_capacity(stride);
    let mut here = Vec::with_capacity(stride);
    let mut below = Vec::with_capacity(stride);
    ones(&data[..stride], &mut above);
    ones(&data[stride..2 * stride], &mut here);
    for y in 1..h - 1 {
        let mid = &data[y * stride..(y + 1) * stride];
        ones(&data[(y + 1) * stride..(y + 2) * stride], &mut below);
        let orow = &mut out.data[y * stride + 3..(y + 1) * stride - 3];
        for (((o, p), &b), &a) in orow.iter_mut().zip(mid.windows(7)).zip(&below).zip(&above) {
            let centre = p[0] as f32 * k1 + p[3] as f32 * k5 + p[6] as f32 * k1;
            // Pillow's order: offset, row below, this row, row above.
            let ss = 0.5f32 + b + centre + a;
            *o = blend(clip(ss), p[3], alpha, interp);
        }
        std::mem::swap(&mut above, &mut here);
        std::mem::swap(&mut here, &mut below);
    }
    out
}

/// `ImageOps.posterize(img, bits)`: keep the top `bits` bits (0 keeps none, 8 or more all).
pub fn posterize(src: &RgbImage, bits: u8) -> RgbImage {
    let mask = if bits >= 8 { 0xff } else { !(0xffu8 >> bits) };
    let lut: Vec<u8> = (0..=255u8).map(|v| v & mask).collect();
    apply_lut(src, [&lut, &lut, &lut])
}

/// `ImageOps.solarize(img, threshold)`: values `>= threshold` become `255 - v` (the
/// comparison is Python's int-to-float one, so a fractional threshold works as is).
pub fn solarize(src: &RgbImage, threshold: f64) -> RgbImage {
    let lut: Vec<u8> = (0..=255u8)
        .map(|v| if (v as f64) < threshold { v } else { 255 - v })
        .collect();
    apply_lut(src, [&lut, &lut, &lut])
}

/// Per-channel 256-bin histograms.
fn histograms(data: &[u8]) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in data.chunks_exact(3) {
        h[0][p[0] as usize] += 1;
        h[1][p[1] as usize] += 1;
        h[2][p[2] as usize] += 1;
    }
    h
}

/// `ImageOps.autocontrast(img)` (no cutoff): per channel, stretch `[lo, hi]` to `[0, 255]`
/// with `int(v * scale + offset)` in `f64`; a channel with a single level is left alone.
pub fn autocontrast(src: &RgbImage) -> RgbImage {
    let (data, _, _) = pixels(src);
    let hist = histograms(data);
    let luts: Vec<Vec<u8>> = hist
        .iter()
        .map(|h| {
            let lo = (0..256).find(|&i| h[i] != 0).unwrap_or(255);
            let hi = (0..256).rev().find(|&i| h[i] != 0).unwrap_or(0);
            if hi <= lo {
                return (0..=255u8).collect();
            }
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            (0..256)
                .map(|i| (i as f64 * scale + offset).trunc().clamp(0.0, 255.0) as u8)
                .collect()
        })
        .collect();
    apply_lut(src, [&luts[0], &luts[1], &luts[2]])
}

/// `ImageOps.equalize(img)`: per channel, `step = (total - count of the last used level) //
/// 255`; if a channel uses one level or `step` is 0 it is left alone, otherwise level `i` maps
/// to `(step // 2 + pixels below i) // step`, clamped to 255 by `point`.
pub fn equalize(src: &RgbImage) -> RgbImage {
    let (data, _, _) = pixels(src);
    let hist = histograms(data);
    let luts: Vec<Vec<u8>> = hist
        .iter()
        .map(|h| {
            let used: Vec<u64> = h.iter().copied().filter(|&c| c != 0).collect();
            let identity = (0..=255u8).collect();
            let Some(&last) = used.last() else {
                return identity;
            };
            if used.len() <= 1 {
                return identity;
            }
            let step = (used.iter().sum::<u64>() - last) / 255;
            if step == 0 {
                return identity;
            }
            let mut n = step / 2;
            h.iter()
                .map(|&c| {
                    let v = (n / step).min(255) as u8;
                    n += c;
                    v
                })
                .collect()
        })
        .collect();
    apply_lut(src, [&luts[0], &luts[1], &luts[2]])
}

/// `Image.point` with one table per channel.
fn apply_lut(src: &RgbImage, luts: [&[u8]; 3]) -> RgbImage {
    if let (Ok(lut), true) = (
        <&[u8; 256]>::try_from(luts[0]),
        luts[1] == luts[0] && luts[2] == luts[0],
    ) {
        // One table for all channels: a flat byte loop.
        let (data, w, h) = pixels(src);
        return RgbImage {
            width: w as u32,
            height: h as u32,
            data: data.iter().map(|&v| lut[v as usize]).collect(),
        };
    }
    map_pixels(src, |p| {
        [
            luts[0][p[0] as usize],
            luts[1][p[1] as usize],
            luts[2][p[2] as usize],
        ]
    })
}

/// A new image with `f` applied to every pixel, written once.
fn map_pixels(src: &RgbImage, f: impl Fn(&[u8]) -> [u8; 3]) -> RgbImage {
    let (data, w, h) = pixels(src);
    let mut out = vec![0u8; data.len()];
    for (o, p) in out.chunks_exact_mut(3).zip(data.chunks_exact(3)) {
        o.copy_from_slice(&f(p));
    }
    RgbImage {
        width: w as u32,
        height: h as u32,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_truncates_and_clamps() {
        // 10 + 0.5 * (21 - 10) = 15.5 -> 15
        assert_eq!(blend(10, 21, 0.5, true), 15);
        assert_eq!(blend(10, 250, 1.9, false), 255);
        assert_eq!(blend(200, 10, 1.9, false), 0);
        // 100 + 1.5 * (103 - 100) = 104.5 -> 104
        assert_eq!(blend(100, 103, 1.5, false), 104);
    }

    #[test]
    fn luma_matches_pillow() {
        assert_eq!(luma(&[255, 255, 255]), 255);
        assert_eq!(luma(&[255, 0, 0]), 76);
        assert_eq!(luma(&[0, 255, 0]), 150);
        assert_eq!(luma(&[0, 0, 255]), 29);
    }

    #[test]
    fn equalize_clamps_and_skips_flat_channels() {
        let img = RgbImage::filled(4, 4, [5, 6, 7]);
        assert_eq!(equalize(&img), img);
        assert_eq!(autocontrast(&img), img);
        // 256 pixels at 0 and 1 pixel at 200: step = 1, level 200 maps to 256 -> 255.
        let mut data = vec![0u8; 257 * 3];
        data[256 * 3..].copy_from_slice(&[200, 200, 200]);
        let img = RgbImage::from_raw(257, 1, data).unwrap();
        let e = equalize(&img);
        assert_eq!(e.pixel(256, 0), [255, 255, 255]);
        assert_eq!(e.pixel(0, 0), [0, 0, 0]);
    }

    #[test]
    fn posterize_masks() {
        let img = RgbImage::filled(1, 1, [0xff, 0x81, 0x7f]);
        assert_eq!(posterize(&img, 4).pixel(0, 0), [0xf0, 0x80, 0x70]);
        assert_eq!(posterize(&img, 8), img);
        assert_eq!(posterize(&img, 0).pixel(0, 0), [0, 0, 0]);
    }
}
