//! Shear, translate and rotate exactly as torchvision's PIL path runs them.
//!
//! torchvision builds the inverse affine matrix in `f64` (`_get_inverse_affine_matrix`, or
//! `Image.rotate`'s own matrix with entries rounded to 15 decimals), and Pillow's
//! `ImagingTransformAffine` samples with NEAREST through one of three paths:
//!
//! - no cross terms (translations): `ImagingScaleAffine`, which accumulates source positions in
//!   `f64` starting from the pixel centre;
//! - all four corners within ±32768: `affine_fixed`, 16.16 fixed point, per-pixel integer
//!   increments and `>> 16` (a floor);
//! - otherwise a plain `f64` walk.
//!
//! Transcendentals are evaluated once per op (with the platform `libm`, as CPython does); the
//! per-pixel loops only add precomputed increments.

use crate::resize::{c_int, coord, pixels, validated_copy};
use crate::RgbImage;

/// Output of the same size as `src`, filled with `fill`, plus the validated source view.
fn start(src: &RgbImage, fill: [u8; 3]) -> (&[u8], usize, usize, RgbImage) {
    let (data, w, h) = pixels(src);
    let out = RgbImage {
        width: w as u32,
        height: h as u32,
        data: fill.repeat(w * h),
    };
    (data, w, h, out)
}

#[inline]
fn copy_px(out: &mut [u8], o: usize, data: &[u8], i: usize) {
    out[o..o + 3].copy_from_slice(&data[i..i + 3]);
}

/// Pillow `FLOOR`: floor for negatives, truncation otherwise, through C's `(int)`.
fn pil_floor(v: f64) -> i32 {
    if v < 0.0 {
        c_int(v.floor())
    } else {
        c_int(v)
    }
}

/// `im.transform(im.size, Image.AFFINE, a, Image.NEAREST, fillcolor=fill)`: output pixel
/// (x, y) reads source `(a0*x' + a1*y' + a2, a3*x' + a4*y' + a5)` at its centre
/// (x' = x + 0.5), uncovered pixels get `fill`.
pub fn affine_nearest(src: &RgbImage, a: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (data, w, h, mut out) = start(src, fill);
    if w == 0 || h == 0 {
        return out;
    }
    if a[1] == 0.0 && a[3] == 0.0 {
        scale_affine(data, w, h, &a, &mut out.data);
        return out;
    }
    let check = |x: f64, y: f64| {
        (x * a[0] + y * a[1] + a[2]).abs() < 32768.0 && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0
    };
    let (fw, fh) = (w as f64, h as f64);
    if check(0.0, 0.0) && check(fw, fh) && check(0.0, fh) && check(fw, 0.0) {
        affine_fixed(data, w, h, &a, &mut out.data);
    } else {
        affine_float(data, w, h, &a, &mut out.data);
    }
    out
}

/// Pillow's `ImagingScaleAffine` (output and input the same size here).
fn scale_affine(data: &[u8], w: usize, h: usize, a: &[f64; 6], out: &mut [u8]) {
    let mut xintab = vec![0usize; w];
    let (mut xmin, mut xmax) = (w, 0);
    let mut xo = a[2] + a[0] * 0.5;
    for (x, slot) in xintab.iter_mut().enumerate() {
        let xin = coord(xo);
        if xin >= 0 && (xin as usize) < w {
            xmax = x + 1;
            xmin = xmin.min(x);
            *slot = xin as usize;
        }
        xo += a[0];
    }
    let mut yo = a[5] + a[4] * 0.5;
    for y in 0..h {
        let yi = coord(yo);
        yo += a[4];
        if yi < 0 || yi as usize >= h {
            continue;
        }
        let row = yi as usize * w * 3;
        for (x, &xin) in xintab.iter().enumerate().take(xmax).skip(xmin) {
            copy_px(out, (y * w + x) * 3, data, row + xin * 3);
        }
    }
}

/// Pillow's `affine_fixed`: 16.16 fixed point with C `int` wrap-around.
fn affine_fixed(data: &[u8], w: usize, h: usize, a: &[f64; 6], out: &mut [u8]) {
    let fix = |v: f64| pil_floor(v * 65536.0 + 0.5);
    let a0 = fix(a[0]);
    let a1 = fix(a[1]);
    let a3 = fix(a[3]);
    let a4 = fix(a[4]);
    let mut a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
    let mut a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
    let (wi, hi) = (w as i32, h as i32);
    for y in 0..h {
        let (mut xx, mut yy) = (a2, a5);
        let orow = y * w * 3;
        for x in 0..w {
            let xin = xx >> 16;
            if xin >= 0 && xin < wi {
                let yin = yy >> 16;
                if yin >= 0 && yin < hi {
                    copy_px(
                        out,
                        orow + x * 3,
                        data,
                        (yin as usize * w + xin as usize) * 3,
                    );
                }
            }
            xx = xx.wrapping_add(a0);
            yy = yy.wrapping_add(a3);
        }
        a2 = a2.wrapping_add(a1);
        a5 = a5.wrapping_add(a4);
    }
}

/// Pillow's floating-point `AFFINE_TRANSFORM` walk, for matrices too large for 16.16.
fn affine_float(data: &[u8], w: usize, h: usize, a: &[f64; 6], out: &mut [u8]) {
    let mut xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
    let mut yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
    for y in 0..h {
        let (mut xx, mut yy) = (xo, yo);
        let orow = y * w * 3;
        for x in 0..w {
            let xin = coord(xx);
            if xin >= 0 && (xin as usize) < w {
                let yin = coord(yy);
                if yin >= 0 && (yin as usize) < h {
                    copy_px(
                        out,
                        orow + x * 3,
                        data,
                        (yin as usize * w + xin as usize) * 3,
                    );
                }
            }
            xx += a[0];
            yy += a[3];
        }
        xo += a[1];
        yo += a[4];
    }
}

/// CPython's `math.radians`.
fn radians(deg: f64) -> f64 {
    deg * (std::f64::consts::PI / 180.0)
}

/// CPython's `math.degrees`.
fn degrees(rad: f64) -> f64 {
    rad * (180.0 / std::f64::consts::PI)
}

/// torchvision `_get_inverse_affine_matrix(center, angle, translate, scale, shear)`, in its
/// operation order.
pub fn inverse_affine_matrix(
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    scale: f64,
    shear: [f64; 2],
) -> [f64; 6] {
    let rot = radians(angle);
    let sx = radians(shear[0]);
    let sy = radians(shear[1]);
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0].map(|v| v / scale);
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// `_apply_op` ShearX / ShearY: `F.affine` with shear `degrees(atan(magnitude))` on one axis,
/// centre (0, 0).
pub fn shear(src: &RgbImage, magnitude: f64, vertical: bool, fill: [u8; 3]) -> RgbImage {
    let s = degrees(magnitude.atan());
    let shear = if vertical { [0.0, s] } else { [s, 0.0] };
    let m = inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, shear);
    affine_nearest(src, m, fill)
}

/// `_apply_op` TranslateX / TranslateY: `F.affine` by whole pixels (`int(magnitude)`) about
/// the default centre (`width * 0.5`, `height * 0.5`).
pub fn translate(src: &RgbImage, tx: f64, ty: f64, fill: [u8; 3]) -> RgbImage {
    let (_, w, h) = pixels(src);
    let center = [w as f64 * 0.5, h as f64 * 0.5];
    let m = inverse_affine_matrix(center, 0.0, [tx, ty], 1.0, [0.0, 0.0]);
    affine_nearest(src, m, fill)
}

/// Python's `%` on floats: the result takes the divisor's sign.
fn py_mod(a: f64, b: f64) -> f64 {
    let m = a % b;
    if m != 0.0 {
        if (b < 0.0) != (m < 0.0) {
            m + b
        } else {
            m
        }
    } else {
        0.0f64.copysign(b)
    }
}

/// Python's `round(v, 15)`: the value of `v` correctly rounded to 15 decimals, read back as
/// the nearest `f64`.
fn round15(v: f64) -> f64 {
    if !v.is_finite() {
        return v;
    }
    format!("{v:.15}").parse().unwrap_or(v)
}

/// `Image.rotate(angle, NEAREST, fillcolor=fill)` (what `F.rotate` calls): counter-clockwise
/// degrees about the centre, same size. Multiples of 180 (and 90 on square images) take
/// Pillow's exact transpose paths.
pub fn rotate(src: &RgbImage, angle: f64, fill: [u8; 3]) -> RgbImage {
    let angle = py_mod(angle, 360.0);
    let (data, w, h) = pixels(src);
    if angle == 0.0 {
        return validated_copy(src);
    }
    if angle == 180.0 {
        return transpose(data, w, h, |x, y| (w - 1 - x, h - 1 - y), w, h);
    }
    if (angle == 90.0 || angle == 270.0) && w == h {
        return if angle == 90.0 {
            transpose(data, w, h, |x, y| (y, w - 1 - x), h, w)
        } else {
            transpose(data, w, h, |x, y| (h - 1 - y, x), h, w)
        };
    }
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let t = -radians(angle);
    let mut m = [
        round15(t.cos()),
        round15(t.sin()),
        0.0,
        round15(-t.sin()),
        round15(t.cos()),
        0.0,
    ];
    // `transform(-cx, -cy, matrix)`: a*x + b*y + c with c = 0.
    let (x, y) = (-cx - 0.0, -cy - 0.0);
    m[2] += m[0] * x + m[1] * y;
    m[5] += m[3] * x + m[4] * y;
    m[2] += cx;
    m[5] += cy;
    affine_nearest(src, m, fill)
}

/// Copies source pixel (x, y) to `to(x, y)` in a `ow` x `oh` output.
fn transpose(
    data: &[u8],
    w: usize,
    h: usize,
    to: impl Fn(usize, usize) -> (usize, usize),
    ow: usize,
    oh: usize,
) -> RgbImage {
    let mut out = RgbImage {
        width: ow as u32,
        height: oh as u32,
        data: vec![0; ow * oh * 3],
    };
    for y in 0..h {
        for x in 0..w {
            let (ox, oy) = to(x, y);
            copy_px(&mut out.data, (oy * ow + ox) * 3, data, (y * w + x) * 3);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(w: u32, h: u32) -> RgbImage {
        let data = (0..w * h)
            .flat_map(|i| [(i % 251) as u8, (i / 251) as u8, 7])
            .collect();
        RgbImage::from_raw(w, h, data).unwrap()
    }

    #[test]
    fn translate_shifts_whole_pixels() {
        let img = numbered(6, 4);
        let t = translate(&img, 2.0, -1.0, [9, 9, 9]);
        assert_eq!(t.pixel(0, 0), [9, 9, 9]);
        assert_eq!(t.pixel(2, 0), img.pixel(0, 1));
        assert_eq!(t.pixel(5, 2), img.pixel(3, 3));
        assert_eq!(t.pixel(5, 3), [9, 9, 9]);
    }

    #[test]
    fn rotate_fast_paths() {
        let img = numbered(5, 5);
        let r = rotate(&img, 90.0, [0; 3]);
        // Counter-clockwise: the top-right pixel moves to the top-left.
        assert_eq!(r.pixel(0, 0), img.pixel(4, 0));
        let r = rotate(&img, -180.0, [0; 3]);
        assert_eq!(r.pixel(0, 0), img.pixel(4, 4));
        assert_eq!(rotate(&img, 360.0, [0; 3]), img);
        let r = rotate(&img, 270.0, [0; 3]);
        assert_eq!(r.pixel(0, 0), img.pixel(0, 4));
    }

    #[test]
    fn python_float_helpers() {
        assert_eq!(py_mod(-30.0, 360.0), 330.0);
        assert_eq!(py_mod(-1e-20, 360.0), 360.0);
        assert_eq!(py_mod(720.0, 360.0), 0.0);
        assert_eq!(round15(0.123_456_789_012_345_68), 0.123456789012346);
        assert_eq!(round15(6.123233995736766e-17), 0.0);
    }

    #[test]
    fn huge_matrices_use_the_float_walk() {
        let img = numbered(4, 4);
        let m = [1.0, 0.5, 1e6, 0.0, 1.0, 0.0];
        let out = affine_nearest(&img, m, [5, 5, 5]);
        assert!(out.data.chunks(3).all(|p| p == [5, 5, 5]));
        let out = affine_nearest(&img, [f64::NAN; 6], [5, 5, 5]);
        assert!(out.data.chunks(3).all(|p| p == [5, 5, 5]));
    }
}
