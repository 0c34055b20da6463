//! The 14 RandAugment operations, bit-exact with torchvision's `_apply_op` on a PIL RGB image
//! with `interpolation=NEAREST` (MobileCLIP2's setting).
//!
//! Geometric ops go through Pillow's affine `transform` with its nearest-neighbour fast paths
//! (a scale-only path in `f64`, and 16.16 fixed point otherwise); colour ops go through
//! `ImageEnhance` (`Image.blend` in `f32`) and `ImageOps` lookup tables. See [`geometry`] and
//! [`color`] for the arithmetic each one repeats.
//!
//! Indices follow SPEC section 6 (Apple's `paug.json` order), which is also the key order of
//! torchvision's `RandAugment._augmentation_space`, so `torch.randint(14)` draws map straight
//! onto [`Op::from_index`].

pub mod color;
pub mod geometry;

use crate::resize::validated_copy;
use crate::RgbImage;

/// A RandAugment operation, in SPEC section 6 index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// 0: no change.
    Identity,
    /// 1: horizontal shear by `atan(magnitude)` about the top-left corner.
    ShearX,
    /// 2: vertical shear by `atan(magnitude)` about the top-left corner.
    ShearY,
    /// 3: horizontal shift by `int(magnitude)` pixels.
    TranslateX,
    /// 4: vertical shift by `int(magnitude)` pixels.
    TranslateY,
    /// 5: rotation by `magnitude` degrees counter-clockwise about the centre.
    Rotate,
    /// 6: `ImageEnhance.Brightness` with factor `1 + magnitude`.
    Brightness,
    /// 7: `ImageEnhance.Color` with factor `1 + magnitude`.
    Color,
    /// 8: `ImageEnhance.Contrast` with factor `1 + magnitude`.
    Contrast,
    /// 9: `ImageEnhance.Sharpness` with factor `1 + magnitude`.
    Sharpness,
    /// 10: keep the top `int(magnitude)` bits of each channel.
    Posterize,
    /// 11: invert channel values at or above the threshold `magnitude`.
    Solarize,
    /// 12: `ImageOps.autocontrast`, per channel.
    AutoContrast,
    /// 13: `ImageOps.equalize`, per channel.
    Equalize,
}

impl Op {
    /// All ops, position = index.
    pub const ALL: [Op; 14] = [
        Op::Identity,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
        Op::Rotate,
        Op::Brightness,
        Op::Color,
        Op::Contrast,
        Op::Sharpness,
        Op::Posterize,
        Op::Solarize,
        Op::AutoContrast,
        Op::Equalize,
    ];

    /// The SPEC section 6 index (0..=13).
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The op at `i`, or `None` past 13.
    pub fn from_index(i: u8) -> Option<Op> {
        Op::ALL.get(i as usize).copied()
    }

    /// torchvision's op name, e.g. `"ShearX"`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Identity => "Identity",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateX => "TranslateX",
            Op::TranslateY => "TranslateY",
            Op::Rotate => "Rotate",
            Op::Brightness => "Brightness",
            Op::Color => "Color",
            Op::Contrast => "Contrast",
            Op::Sharpness => "Sharpness",
            Op::Posterize => "Posterize",
            Op::Solarize => "Solarize",
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
        }
    }

    /// The op named `name` (exact, case-sensitive torchvision name).
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| op.name() == name)
    }

    /// `RandAugment._augmentation_space(num_bins, (height, width))[name]`: the magnitude of
    /// each bin as the `f32` torch stores, and whether RandAugment flips its sign with
    /// probability 1/2.
    ///
    /// torch's CPU `linspace` computes `start + step * i` below the midpoint and
    /// `end - step * (n - 1 - i)` from it, in `f32`; the builds torchvision ships compile that
    /// with fused multiply-add, which is what this repeats (a plain multiply and add differs in
    /// the last bit for some bins). Posterize is `8 - round(arange(n) / ((n - 1) / 4))` in
    /// `f32` with round-half-even. Identity, AutoContrast and Equalize have a scalar 0 in
    /// torchvision; here every bin holds 0.0. One bin gives the start value (torch fills it),
    /// except Posterize, whose 0/0 torch turns into `8 - i32::MIN` wrapped.
    pub fn magnitude_bins(self, num_bins: usize, width: u32, height: u32) -> (Vec<f32>, bool) {
        let lin = |end: f64| linspace(0.0, end as f32, num_bins);
        match self {
            Op::Identity | Op::AutoContrast | Op::Equalize => (vec![0.0; num_bins], false),
            Op::ShearX | Op::ShearY => (lin(0.3), true),
            Op::TranslateX => (lin(150.0 / 331.0 * width as f64), true),
            Op::TranslateY => (lin(150.0 / 331.0 * height as f64), true),
            Op::Rotate => (lin(30.0), true),
            Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => (lin(0.9), true),
            Op::Posterize => (posterize_bins(num_bins), false),
            Op::Solarize => (linspace(255.0, 0.0, num_bins), false),
        }
    }
}

impl Op {
    /// The closed range `[min, max]` of the magnitudes [`crate::params::sample_rand_augment`]
    /// can draw for this op on a `size` x `size` RandAugment input, under any valid config
    /// (at least 2 magnitude bins, any bin, either sign): the hull of
    /// [`Op::magnitude_bins`] and, for signed ops, their negatives.
    ///
    /// Stored magnitudes outside it were not sampled by dfndr or torchvision; readers refuse
    /// them. Signed ops span `[-end, end]` with `end` the last bin (0.3, 150/331 * size, 30,
    /// 0.9); Posterize keeps 4 to 8 bits (`8 - round(i / ((n - 1) / 4))`, i < n); Solarize
    /// thresholds lie in `[0, 255]`; the ops without a magnitude store 0. `dfndr_shards`
    /// keeps the same table (`format::magnitude_range`) to check shards on read; the `dfndr`
    /// crate tests that the two agree.
    pub fn magnitude_range(self, size: u32) -> (f32, f32) {
        // The last bin is `end as f32` exactly (linspace's second half counts back from it).
        let signed = |end: f64| (-(end as f32), end as f32);
        match self {
            Op::Identity | Op::AutoContrast | Op::Equalize => (0.0, 0.0),
            Op::ShearX | Op::ShearY => signed(0.3),
            Op::TranslateX | Op::TranslateY => signed(150.0 / 331.0 * size as f64),
            Op::Rotate => signed(30.0),
            Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => signed(0.9),
            Op::Posterize => (4.0, 8.0),
            Op::Solarize => (0.0, 255.0),
        }
    }
}

/// torch's CPU `linspace` for `f32`.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `8 - (torch.arange(n) / ((n - 1) / 4)).round().int()` as torch computes it.
fn posterize_bins(n: usize) -> Vec<f32> {
    let div = ((n as f64 - 1.0) / 4.0) as f32;
    (0..n)
        .map(|i| {
            let q = (i as f32 / div).round_ties_even();
            // `.int()` of NaN or an out-of-range value is INT_MIN on x86.
            let q = if q.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&q) {
                i32::MIN
            } else {
                q as i32
            };
            8i32.wrapping_sub(q) as f32
        })
        .collect()
}

/// torchvision `_apply_op(img, op.name(), magnitude, InterpolationMode.NEAREST, fill)` on a
/// PIL RGB image. `magnitude` is the signed bin value (`float(magnitudes[bin])`, negated when
/// RandAugment drew the sign); `fill` colours pixels that geometric ops uncover (RandAugment's
/// `fill=None` is `[0, 0, 0]`).
///
/// Where torchvision would raise, the result is defined instead: a non-finite magnitude leaves
/// the image unchanged, and Posterize clamps its bit count to 0..=8 (0 keeps no bits).
pub fn apply_op(img: &RgbImage, op: Op, magnitude: f32, fill: [u8; 3]) -> RgbImage {
    if !magnitude.is_finite() {
        return validated_copy(img);
    }
    let m = magnitude as f64;
    match op {
        Op::Identity => validated_copy(img),
        Op::ShearX => geometry::shear(img, m, false, fill),
        Op::ShearY => geometry::shear(img, m, true, fill),
        Op::TranslateX => geometry::translate(img, m.trunc(), 0.0, fill),
        Op::TranslateY => geometry::translate(img, 0.0, m.trunc(), fill),
        Op::Rotate => geometry::rotate(img, m, fill),
        Op::Brightness => color::brightness(img, 1.0 + m),
        Op::Color => color::saturation(img, 1.0 + m),
        Op::Contrast => color::contrast(img, 1.0 + m),
        Op::Sharpness => color::sharpness(img, 1.0 + m),
        Op::Posterize => color::posterize(img, m.trunc().clamp(0.0, 8.0) as u8),
        Op::Solarize => color::solarize(img, m),
        Op::AutoContrast => color::autocontrast(img),
        Op::Equalize => color::equalize(img),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_name_round_trip() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index() as usize, i);
            assert_eq!(Op::from_index(i as u8), Some(*op));
            assert_eq!(Op::from_name(op.name()), Some(*op));
        }
        assert_eq!(Op::from_index(14), None);
        assert_eq!(Op::from_name("shearx"), None);
        assert_eq!(Op::from_name("Invert"), None);
        assert_eq!(Op::Rotate.name(), "Rotate");
        assert_eq!(Op::AutoContrast.index(), 12);
    }

    /// Values printed by torch 2.15 on x86-64:
    /// `float(RandAugment()._augmentation_space(31, (64, 80))[name][0][i])`.
    #[test]
    fn magnitude_bins_match_torch() {
        let at = |op: Op, w: u32, h: u32, i: usize| op.magnitude_bins(31, w, h).0[i] as f64;
        let cases: &[(Op, usize, f64)] = &[
            (Op::ShearX, 0, 0.0),
            (Op::ShearX, 9, 0.09000000357627869),
            (Op::ShearY, 17, 0.17000000178813934),
            (Op::ShearY, 30, 0.30000001192092896),
            (Op::TranslateX, 9, 10.87613296508789),
            (Op::TranslateX, 20, 24.1691837310791),
            (Op::TranslateX, 30, 36.25377655029297),
            (Op::TranslateY, 9, 8.700906753540039),
            (Op::TranslateY, 25, 24.1691837310791),
            (Op::TranslateY, 30, 29.003021240234375),
            (Op::Rotate, 9, 9.0),
            (Op::Rotate, 17, 17.0),
            (Op::Rotate, 30, 30.0),
            (Op::Brightness, 9, 0.26999998092651367),
            (Op::Color, 17, 0.5099999904632568),
            // A plain multiply-add would give f32(0.6) = 0.6000000238418579 here.
            (Op::Contrast, 20, 0.5999999642372131),
            (Op::Sharpness, 30, 0.8999999761581421),
            (Op::Posterize, 0, 8.0),
            (Op::Posterize, 9, 7.0),
            (Op::Posterize, 17, 6.0),
            (Op::Posterize, 30, 4.0),
            (Op::Solarize, 0, 255.0),
            (Op::Solarize, 9, 178.5),
            (Op::Solarize, 17, 110.5),
            (Op::Solarize, 30, 0.0),
        ];
        for &(op, i, want) in cases {
            assert_eq!(at(op, 80, 64, i), want, "{op:?} bin {i}");
        }
        // 224x224: float(...["TranslateX"][0][i]) for i = 9, 20, 30.
        assert_eq!(at(Op::TranslateX, 224, 224, 9), 30.45317268371582);
        assert_eq!(at(Op::TranslateY, 224, 224, 20), 67.67371368408203);
        assert_eq!(at(Op::TranslateX, 224, 224, 30), 101.51057434082031);
        let signed: Vec<bool> = Op::ALL
            .iter()
            .map(|op| op.magnitude_bins(31, 8, 8).1)
            .collect();
        assert_eq!(
            signed,
            [
                false, true, true, true, true, true, true, true, true, true, false, false, false,
                false
            ]
        );
        let (b, _) = Op::Posterize.magnitude_bins(31, 224, 224);
        let expect = [
            8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 5, 5, 5, 5, 5, 5, 5, 5, 4, 4,
            4, 4,
        ];
        assert_eq!(b, expect.iter().map(|&v| v as f32).collect::<Vec<_>>());
        for op in [Op::Identity, Op::AutoContrast, Op::Equalize] {
            let (b, s) = op.magnitude_bins(31, 224, 224);
            assert!(!s && b.len() == 31 && b.iter().all(|&v| v == 0.0));
        }
        assert!(Op::ShearX.magnitude_bins(0, 1, 1).0.is_empty());
        assert_eq!(Op::Rotate.magnitude_bins(1, 1, 1).0, vec![0.0]);
        assert_eq!(Op::Solarize.magnitude_bins(1, 1, 1).0, vec![255.0]);
        // torch: (8 - (torch.arange(1) / 0.0).round().int()) == -2147483640
        assert_eq!(Op::Posterize.magnitude_bins(1, 1, 1).0, vec![-2147483640.0]);
    }

    /// Every magnitude the sampler can draw lies in [`Op::magnitude_range`], and the range's
    /// ends are drawn by some config, so the range is exactly the hull of the sampled values.
    #[test]
    fn magnitude_range_is_the_hull_of_the_bins() {
        for size in [1u32, 2, 64, 96, 224, 256, 4096] {
            for op in Op::ALL {
                let (min, max) = op.magnitude_range(size);
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for bins in (2..=64).chain([100, 101, 255, 1000, 4097]) {
                    let (values, signed) = op.magnitude_bins(bins, size, size);
                    for v in values {
                        for v in if signed { vec![v, -v] } else { vec![v] } {
                            assert!(
                                (min..=max).contains(&v),
                                "{op:?} size {size} bins {bins}: {v} outside [{min}, {max}]"
                            );
                            lo = lo.min(v);
                            hi = hi.max(v);
                        }
                    }
                }
                assert_eq!((lo, hi), (min, max), "{op:?} size {size}");
            }
        }
    }

    #[test]
    fn apply_op_tiny_images_do_not_panic() {
        let magnitudes = [
            0.0,
            0.5,
            -0.5,
            9.0,
            -30.0,
            90.0,
            255.0,
            1e9,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for (w, h) in [
            (0, 0),
            (0, 4),
            (3, 0),
            (1, 1),
            (2, 1),
            (1, 3),
            (3, 3),
            (5, 4),
        ] {
            let img = RgbImage::filled(w, h, [100, 150, 200]);
            for op in Op::ALL {
                for m in magnitudes {
                    let out = apply_op(&img, op, m, [1, 2, 3]);
                    assert_eq!((out.width, out.height), (w, h), "{op:?} {m}");
                    assert_eq!(out.data.len(), (w * h * 3) as usize);
                }
            }
        }
        // A buffer shorter than its dimensions claim reads as an empty image.
        let bad = RgbImage {
            width: 4,
            height: 4,
            data: vec![7; 10],
        };
        for op in Op::ALL {
            let out = apply_op(&bad, op, 9.0, [0; 3]);
            assert_eq!(out.data.len(), out.width as usize * out.height as usize * 3);
        }
    }

    #[test]
    fn non_finite_magnitude_is_identity() {
        let img = RgbImage::from_raw(3, 2, (0..18).map(|v| v * 13).collect()).unwrap();
        for op in Op::ALL {
            assert_eq!(apply_op(&img, op, f32::NAN, [9; 3]), img, "{op:?}");
        }
    }
}
