//! Augmentation parameters: sampled once at generation time, stored in DFNDR shards, and
//! replayed identically (at any output size and normalisation) by the trainer.
//!
//! The chain is MobileCLIP2's (SPEC section 6): RandomResizedCrop -> optional horizontal
//! flip -> RandAugment -> to float -> normalise. Sampling follows torchvision's algorithms
//! draw for draw (same distributions, same float32 arithmetic and rounding); only the random
//! source differs: it is [`AugRng`], seeded per (job seed, key, view).

use serde::{Deserialize, Serialize};

use crate::decode::{Rect, RgbPart};
use crate::ops::{apply_op, Op};
use crate::resize::{hflip, resized_crop, Filter};
use crate::rng::AugRng;
use crate::RgbImage;

/// A crop box in original-image pixels, as torchvision's `RandomResizedCrop.get_params`
/// returns it: `(top, left, height, width)` = Apple's `(i, j, h, w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First row.
    pub top: i32,
    /// First column.
    pub left: i32,
    /// Rows.
    pub height: i32,
    /// Columns.
    pub width: i32,
}

/// One sampled augmentation.
#[derive(Debug, Clone, PartialEq)]
pub struct AugParams {
    /// RandomResizedCrop box in original pixels.
    pub crop: CropBox,
    /// Horizontal flip after the crop.
    pub flip: bool,
    /// RandAugment ops in application order with their signed magnitudes (empty when
    /// RandAugment is off or was skipped by its probability).
    pub ops: Vec<(Op, f32)>,
}

/// Resampling filter names as torchvision's `InterpolationMode` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// PIL NEAREST.
    Nearest,
    /// PIL BILINEAR (antialiased).
    Bilinear,
    /// PIL BICUBIC (antialiased), MobileCLIP2's choice.
    Bicubic,
}

impl Interpolation {
    /// The resampling filter.
    pub fn filter(self) -> Filter {
        match self {
            Interpolation::Nearest => Filter::Nearest,
            Interpolation::Bilinear => Filter::Bilinear,
            Interpolation::Bicubic => Filter::Bicubic,
        }
    }
}

/// RandAugment settings (torchvision's constructor arguments plus Apple's `p`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandAugmentConfig {
    /// Whether RandAugment runs at all.
    pub enable: bool,
    /// Ops applied per image.
    pub num_ops: usize,
    /// Magnitude bin index.
    pub magnitude: usize,
    /// Number of magnitude bins.
    pub num_magnitude_bins: usize,
    /// Probability of applying RandAugment at all.
    pub p: f32,
    /// Fill of pixels moved in from outside by geometric ops.
    pub fill: [u8; 3],
}

impl Default for RandAugmentConfig {
    fn default() -> Self {
        RandAugmentConfig {
            enable: true,
            num_ops: 2,
            magnitude: 9,
            num_magnitude_bins: 31,
            p: 1.0,
            fill: [0, 0, 0],
        }
    }
}

/// The augmentation chain of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugConfig {
    /// Views sampled per sample (K); 0 turns the augmentation stage off.
    pub num_augmentations: u32,
    /// Output size (square) of RandomResizedCrop at generation time.
    pub size: u32,
    /// Range of the crop area as a fraction of the image area.
    pub scale: [f32; 2],
    /// Range of the crop aspect ratio (width / height).
    pub ratio: [f32; 2],
    /// Resampling filter of the crop resize.
    pub interpolation: Interpolation,
    /// Probability of a horizontal flip (0 in MobileCLIP2).
    pub hflip_p: f32,
    /// RandAugment.
    pub rand_augment: RandAugmentConfig,
    /// Normalisation mean (OpenAI CLIP).
    pub mean: [f32; 3],
    /// Normalisation standard deviation (OpenAI CLIP).
    pub std: [f32; 3],
}

/// OpenAI CLIP's normalisation mean (the digits as published; float32 rounds them exactly as
/// torch does when it builds its float32 mean tensor).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's normalisation standard deviation (digits as published).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl Default for AugConfig {
    fn default() -> Self {
        AugConfig {
            num_augmentations: 2,
            size: 224,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            interpolation: Interpolation::Bicubic,
            hflip_p: 0.0,
            rand_augment: RandAugmentConfig::default(),
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }
}

/// Largest `size` a config may have; it also bounds the translation magnitudes of stored
/// parameters whose generation size is unknown (see [`crate::ops::Op::magnitude_range`]).
pub const MAX_SIZE: u32 = 4096;

/// Most RandAugment ops per view a config may ask for (`rand_augment.num_ops`).
pub const MAX_NUM_OPS: usize = 16;

/// Invalid augmentation settings.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid augmentation config: {0}")]
pub struct AugConfigError(pub String);

impl AugConfig {
    /// Checks values that would make sampling meaningless.
    pub fn validate(&self) -> Result<(), AugConfigError> {
        let err = |m: &str| Err(AugConfigError(m.to_string()));
        if self.size == 0 || self.size > MAX_SIZE {
            return err("size must be between 1 and 4096");
        }
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1.is_finite()) {
            return err("scale must be [min, max] with 0 < min <= max");
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return err("ratio must be [min, max] with 0 < min <= max");
        }
        if !(0.0..=1.0).contains(&self.hflip_p) {
            return err("hflip_p must be within [0, 1]");
        }
        if self.num_augmentations > 1000 {
            return err("num_augmentations must be at most 1000");
        }
        let ra = &self.rand_augment;
        {
            if ra.num_magnitude_bins < 2 || ra.magnitude >= ra.num_magnitude_bins {
                return err("rand_augment.magnitude must be below num_magnitude_bins (at least 2)");
            }
            if !(0.0..=1.0).contains(&ra.p) {
                return err("rand_augment.p must be within [0, 1]");
            }
            if ra.num_ops > MAX_NUM_OPS {
                return err("rand_augment.num_ops must be at most 16");
            }
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return err("std must be positive");
        }
        Ok(())
    }

    /// Samples the parameters of view `index` of sample `key` of a `width` x `height` image.
    pub fn sample(&self, seed: u64, key: &str, index: u32, width: u32, height: u32) -> AugParams {
        let mut rng = AugRng::for_view(seed, key, index);
        let crop = sample_crop(&mut rng, width, height, self.scale, self.ratio);
        let flip = self.hflip_p > 0.0 && rng.chance(self.hflip_p);
        let ops = if self.rand_augment.enable {
            sample_rand_augment(&mut rng, &self.rand_augment, self.size, self.size)
        } else {
            Vec::new()
        };
        AugParams { crop, flip, ops }
    }

    /// [`AugConfig::replay`] on part of an image (see [`replay_part`]).
    pub fn replay_part(&self, part: &RgbPart, params: &AugParams, size: u32) -> RgbImage {
        replay_part(
            part,
            params,
            size,
            self.interpolation.filter(),
            self.rand_augment.fill,
        )
    }

    /// Replays `params` on `img` at `size` x `size` (which may differ from the size they were
    /// sampled at: the crop is in original pixels, the op magnitudes are replayed as stored,
    /// as Apple's trainer does).
    pub fn replay(&self, img: &RgbImage, params: &AugParams, size: u32) -> RgbImage {
        replay(
            img,
            params,
            size,
            self.interpolation.filter(),
            self.rand_augment.fill,
        )
    }
}

/// The smallest rectangle of a `width` x `height` image that holds the part of every crop
/// of `params` inside the image: all a replay of them reads (pixels outside the image are
/// zeros). `None` when no crop touches the image.
pub fn crops_region(params: &[AugParams], width: u32, height: u32) -> Option<Rect> {
    let (w, h) = (i64::from(width), i64::from(height));
    let mut bounds: Option<[i64; 4]> = None;
    for c in params.iter().map(|p| p.crop) {
        let top = i64::from(c.top).clamp(0, h);
        let left = i64::from(c.left).clamp(0, w);
        let bottom = (i64::from(c.top) + i64::from(c.height.max(0))).clamp(0, h);
        let right = (i64::from(c.left) + i64::from(c.width.max(0))).clamp(0, w);
        if bottom <= top || right <= left {
            continue;
        }
        bounds = Some(match bounds {
            None => [top, left, bottom, right],
            Some(b) => [
                b[0].min(top),
                b[1].min(left),
                b[2].max(bottom),
                b[3].max(right),
            ],
        });
    }
    // Within the image, so every value fits u32.
    bounds.map(|[top, left, bottom, right]| Rect {
        top: top as u32,
        left: left as u32,
        height: (bottom - top) as u32,
        width: (right - left) as u32,
    })
}

/// [`replay`] on part of an image: `part` must hold [`crops_region`] of `params` (as
/// [`crate::decode::decode_rgb_part`] returns it when asked for that region); the result is
/// the same as replaying on the whole image.
pub fn replay_part(
    part: &RgbPart,
    params: &AugParams,
    size: u32,
    filter: Filter,
    fill: [u8; 3],
) -> RgbImage {
    let mut shifted = params.clone();
    // Image offsets fit i32 (the pixel limit keeps sides far below 2^31).
    shifted.crop.top = params.crop.top.saturating_sub(part.rect.top as i32);
    shifted.crop.left = params.crop.left.saturating_sub(part.rect.left as i32);
    replay(&part.image, &shifted, size, filter, fill)
}

/// torchvision's `RandomResizedCrop.get_params` on a `width` x `height` image.
pub fn sample_crop(
    rng: &mut AugRng,
    width: u32,
    height: u32,
    scale: [f32; 2],
    ratio: [f32; 2],
) -> CropBox {
    let (w_img, h_img) = (i64::from(width), i64::from(height));
    let area = (w_img * h_img) as f64;
    // torch computes log(ratio) in float32.
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target_area = area * f64::from(rng.uniform_f32(scale[0], scale[1]));
        let aspect = f64::from(rng.uniform_f32(log_ratio[0], log_ratio[1]).exp());
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if 0 < w && w <= w_img && 0 < h && h <= h_img {
            let top = rng.int_range(0, h_img - h + 1);
            let left = rng.int_range(0, w_img - w + 1);
            return CropBox {
                top: top as i32,
                left: left as i32,
                height: h as i32,
                width: w as i32,
            };
        }
    }
    // Fallback: the central crop at the nearest allowed aspect ratio.
    let in_ratio = w_img as f64 / h_img.max(1) as f64;
    let (w, h) = if in_ratio < f64::from(ratio[0]) {
        (w_img, round_half_even(w_img as f64 / f64::from(ratio[0])))
    } else if in_ratio > f64::from(ratio[1]) {
        (round_half_even(h_img as f64 * f64::from(ratio[1])), h_img)
    } else {
        (w_img, h_img)
    };
    CropBox {
        top: ((h_img - h) / 2) as i32,
        left: ((w_img - w) / 2) as i32,
        height: h as i32,
        width: w as i32,
    }
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// torchvision's `RandAugment.forward` draws (as Apple's subclass makes them): skip with
/// probability `1 - p`, then per op a uniform op index, its magnitude at the configured bin,
/// and a random sign for signed ops. `width`/`height` are those of the image RandAugment
/// sees (the crop output), which sets the translate magnitudes.
pub fn sample_rand_augment(
    rng: &mut AugRng,
    cfg: &RandAugmentConfig,
    width: u32,
    height: u32,
) -> Vec<(Op, f32)> {
    if cfg.p < 1.0 && !rng.chance(cfg.p) {
        return Vec::new();
    }
    let mut ops = Vec::with_capacity(cfg.num_ops);
    for _ in 0..cfg.num_ops {
        let op = Op::ALL[rng.below(Op::ALL.len() as u64) as usize];
        let (bins, signed) = op.magnitude_bins(cfg.num_magnitude_bins, width, height);
        let mut magnitude = bins.get(cfg.magnitude).copied().unwrap_or(0.0);
        if signed && rng.below(2) == 1 {
            magnitude = -magnitude;
        }
        ops.push((op, magnitude));
    }
    ops
}

/// Applies `params` to `img`: crop + resize to `size` x `size` with `filter`, flip, ops.
pub fn replay(
    img: &RgbImage,
    params: &AugParams,
    size: u32,
    filter: Filter,
    fill: [u8; 3],
) -> RgbImage {
    let c = params.crop;
    let mut out = resized_crop(
        img,
        c.top,
        c.left,
        c.height.max(0) as u32,
        c.width.max(0) as u32,
        size,
        size,
        filter,
    );
    if params.flip {
        out = hflip(&out);
    }
    for &(op, magnitude) in &params.ops {
        out = apply_op(&out, op, magnitude, fill);
    }
    out
}

/// `ToTensor` + `Normalize`: CHW float32, `(v / 255 - mean) / std` per channel, computed in
/// the same order as torchvision so values agree to the last bit.
pub fn normalize_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = img.width as usize * img.height as usize;
    // One lookup table per channel: 256 values instead of a division per pixel.
    let luts: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            let mut lut = [0f32; 256];
            for (v, slot) in lut.iter_mut().enumerate() {
                *slot = (v as f32 / 255.0 - mean[c]) / std[c];
            }
            lut
        })
        .collect();
    let mut out = vec![0f32; plane * 3];
    let (lr, lg, lb) = (&luts[0], &luts[1], &luts[2]);
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (((px, r), g), b) in img.data.chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = lr[px[0] as usize];
        *g = lg[px[1] as usize];
        *b = lb[px[2] as usize];
    }
    out
}

/// Errors reading Apple's compressed `paug.json` parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid Apple paug parameters: {0}")]
pub struct ApplePaugError(pub String);

/// Which transforms with parameters Apple's `Compose.compress` wrote, in its fixed order
/// (`random_resized_crop`, `random_horizontal_flip`, `rand_augment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppleLayout {
    /// Whether `random_horizontal_flip` is in the config (MobileCLIP2: no).
    pub flip: bool,
    /// Whether `rand_augment` is in the config (MobileCLIP2: yes).
    pub rand_augment: bool,
}

impl AppleLayout {
    /// The layout of `config`.
    pub fn of(config: &AugConfig) -> AppleLayout {
        AppleLayout {
            flip: config.hflip_p > 0.0,
            rand_augment: config.rand_augment.enable,
        }
    }
}

/// Apple's compressed form of one view: `[[i, j, h, w], (flip,) [[op, magnitude], ...]]`,
/// with `null` for a RandAugment skipped by its probability.
pub fn to_apple(params: &AugParams, layout: AppleLayout) -> serde_json::Value {
    let c = params.crop;
    let mut parts = vec![serde_json::json!([c.top, c.left, c.height, c.width])];
    if layout.flip {
        parts.push(serde_json::json!(params.flip));
    }
    if layout.rand_augment {
        if params.ops.is_empty() {
            parts.push(serde_json::Value::Null);
        } else {
            let ops: Vec<serde_json::Value> = params
                .ops
                .iter()
                .map(|(op, m)| serde_json::json!([op.index(), f64::from(*m)]))
                .collect();
            parts.push(serde_json::Value::Array(ops));
        }
    }
    serde_json::Value::Array(parts)
}

/// Reads one view from Apple's compressed form (see [`to_apple`]).
///
/// Checks what needs no image: the structure, crop values that fit `i32`, known op indices,
/// and magnitudes per [`crate::validate::check_ops`] at the largest size ([`MAX_SIZE`]).
/// Whether the crop lies inside the image, and translations at the actual generation size,
/// are [`AugParams::validate`]'s to check once the image size is known.
pub fn from_apple(
    value: &serde_json::Value,
    layout: AppleLayout,
) -> Result<AugParams, ApplePaugError> {
    let bad = |m: String| ApplePaugError(m);
    let parts = value
        .as_array()
        .ok_or_else(|| bad(format!("expected a list, found {value}")))?;
    let expected = 1 + usize::from(layout.flip) + usize::from(layout.rand_augment);
    if parts.len() != expected {
        return Err(bad(format!(
            "expected {expected} entries (crop{}{}), found {}",
            if layout.flip { ", flip" } else { "" },
            if layout.rand_augment {
                ", rand_augment"
            } else {
                ""
            },
            parts.len()
        )));
    }
    let crop_vals: [i64; 4] = parts[0]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(serde_json::Value::as_i64)
                .collect::<Option<Vec<_>>>()
        })
        .and_then(|v| <[i64; 4]>::try_from(v).ok())
        .ok_or_else(|| bad(format!("crop must be 4 integers, found {}", parts[0])))?;
    let [top, left, height, width] = crop_vals.map(i32::try_from);
    let crop = match (top, left, height, width) {
        (Ok(top), Ok(left), Ok(height), Ok(width)) => CropBox {
            top,
            left,
            height,
            width,
        },
        _ => {
            let [t, l, h, w] = crop_vals;
            return Err(bad(format!(
                "crop ({t}, {l}, {h}, {w}) does not fit 32-bit pixel coordinates"
            )));
        }
    };
    let mut next = 1;
    let flip = if layout.flip {
        next += 1;
        parts[1]
            .as_bool()
            .ok_or_else(|| bad(format!("flip must be a boolean, found {}", parts[1])))?
    } else {
        false
    };
    let mut ops = Vec::new();
    if layout.rand_augment && !parts[next].is_null() {
        let list = parts[next].as_array().ok_or_else(|| {
            bad(format!(
                "rand_augment must be a list, found {}",
                parts[next]
            ))
        })?;
        for (i, entry) in list.iter().enumerate() {
            let pair = entry.as_array().filter(|p| p.len() == 2);
            let (op, magnitude) = pair
                .and_then(|p| Some((p[0].as_u64()?, p[1].as_f64()?)))
                .ok_or_else(|| {
                    bad(format!(
                        "ops[{i}] must be [index, magnitude], found {entry}"
                    ))
                })?;
            let op = u8::try_from(op)
                .ok()
                .and_then(Op::from_index)
                .ok_or_else(|| {
                    bad(format!(
                        "ops[{i}].op {op} is not a RandAugment op index (valid: 0..{})",
                        Op::ALL.len()
                    ))
                })?;
            ops.push((op, magnitude as f32));
        }
    }
    // f64 magnitudes past f32's range became infinite above; check_ops refuses those too.
    crate::validate::check_ops(&ops, MAX_SIZE).map_err(|e| bad(e.to_string()))?;
    Ok(AugParams { crop, flip, ops })
}

/// Reads a whole `KEY.paug.json` (`{"param_aug": [view, ...]}`) with [`from_apple`]; errors
/// name the view (`param_aug[1]: ...`).
pub fn from_apple_json(
    bytes: &[u8],
    layout: AppleLayout,
) -> Result<Vec<AugParams>, ApplePaugError> {
    let doc: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApplePaugError(format!("paug.json is not JSON: {e}")))?;
    let views = doc
        .get("param_aug")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| ApplePaugError("paug.json has no param_aug list".into()))?;
    views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            from_apple(v, layout).map_err(|e| ApplePaugError(format!("param_aug[{i}]: {}", e.0)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even_matches_python() {
        for (x, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (2.4, 2),
            (2.6, 3),
            (7.0, 7),
        ] {
            assert_eq!(round_half_even(x), want, "{x}");
        }
    }

    #[test]
    fn sampling_is_a_function_of_seed_key_and_index() {
        let cfg = AugConfig::default();
        let a = cfg.sample(3, "k1", 0, 640, 480);
        assert_eq!(a, cfg.sample(3, "k1", 0, 640, 480));
        // Any thread or batch order gives the same parameters.
        let parallel: Vec<AugParams> = {
            use rayon::prelude::*;
            (0..64u32)
                .into_par_iter()
                .rev()
                .map(|i| cfg.sample(3, "k1", i, 640, 480))
                .collect()
        };
        let serial: Vec<AugParams> = (0..64u32)
            .rev()
            .map(|i| cfg.sample(3, "k1", i, 640, 480))
            .collect();
        assert_eq!(parallel, serial);
        assert_ne!(a, cfg.sample(3, "k1", 1, 640, 480));
        assert_ne!(a, cfg.sample(4, "k1", 0, 640, 480));
    }

    #[test]
    fn crops_stay_inside_the_image() {
        let cfg = AugConfig::default();
        for (i, (w, h)) in [(640u32, 480u32), (1, 1), (3, 1000), (1000, 3), (224, 224)]
            .into_iter()
            .enumerate()
        {
            for v in 0..200 {
                let p = cfg.sample(0, &format!("s{i}"), v, w, h);
                let c = p.crop;
                assert!(
                    c.top >= 0 && c.left >= 0 && c.height > 0 && c.width > 0,
                    "{c:?}"
                );
                assert!(
                    c.top + c.height <= h as i32 && c.left + c.width <= w as i32,
                    "{c:?} in {w}x{h}"
                );
                assert_eq!(p.ops.len(), 2);
                assert!(!p.flip);
            }
        }
    }

    #[test]
    fn crops_region_is_the_clipped_union_of_the_crops() {
        let view = |top, left, height, width| AugParams {
            crop: CropBox {
                top,
                left,
                height,
                width,
            },
            flip: false,
            ops: Vec::new(),
        };
        let r = |top, left, height, width| Rect {
            top,
            left,
            height,
            width,
        };
        assert_eq!(crops_region(&[], 50, 40), None);
        assert_eq!(
            crops_region(&[view(5, 6, 7, 8)], 50, 40),
            Some(r(5, 6, 7, 8))
        );
        assert_eq!(
            crops_region(&[view(5, 6, 7, 8), view(20, 1, 3, 2)], 50, 40),
            Some(r(5, 1, 18, 13))
        );
        // Crops reaching past the image (stored parameters of another source) are clipped;
        // crops entirely outside it or empty add nothing.
        assert_eq!(
            crops_region(
                &[view(-5, 45, 10, 20), view(100, 100, 5, 5), view(3, 3, 0, 9)],
                50,
                40
            ),
            Some(r(0, 45, 5, 5))
        );
    }

    #[test]
    fn extreme_aspect_falls_back_to_a_centre_crop() {
        let mut rng = AugRng::for_view(0, "x", 0);
        // A 1000x3 strip: no sampled crop of area >= 8% fits with a ratio in [3/4, 4/3].
        let c = sample_crop(&mut rng, 1000, 3, [0.5, 1.0], [0.75, 4.0 / 3.0]);
        assert_eq!(
            c,
            CropBox {
                top: 0,
                left: 498,
                height: 3,
                width: 4
            }
        );
    }

    #[test]
    fn apple_form_round_trips() {
        let p = AugParams {
            crop: CropBox {
                top: 10,
                left: 20,
                height: 100,
                width: 120,
            },
            flip: true,
            ops: vec![(Op::Rotate, -9.0), (Op::Posterize, 7.0)],
        };
        for layout in [
            AppleLayout {
                flip: true,
                rand_augment: true,
            },
            AppleLayout {
                flip: false,
                rand_augment: true,
            },
        ] {
            let v = to_apple(&p, layout);
            let back = from_apple(&v, layout).unwrap();
            assert_eq!(back.crop, p.crop);
            assert_eq!(back.ops, p.ops);
            assert_eq!(back.flip, layout.flip);
        }
        let layout = AppleLayout {
            flip: false,
            rand_augment: true,
        };
        let v: serde_json::Value = serde_json::from_str("[[1, 2, 3, 4], null]").unwrap();
        assert!(from_apple(&v, layout).unwrap().ops.is_empty());
        for bad in [
            "[[1,2,3],null]",
            "[[1,2,3,4]]",
            "[[1,2,3,4],[[99,1.0]]]",
            "{}",
            "[[1,2,3,4],[[1]]]",
        ] {
            let v: serde_json::Value = serde_json::from_str(bad).unwrap();
            assert!(from_apple(&v, layout).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalize_matches_the_formula() {
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let t = normalize_chw(&img, CLIP_MEAN, CLIP_STD);
        assert_eq!(t.len(), 6);
        assert_eq!(t[0], (0.0 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(t[1], (10.0 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(t[2], (128.0 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
        assert_eq!(t[5], (30.0 / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2]);
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(AugConfig::default().validate().is_ok());
        let zero_scale = AugConfig {
            scale: [0.0, 1.0],
            ..AugConfig::default()
        };
        assert!(zero_scale.validate().is_err());
        let bin_out_of_range = AugConfig {
            rand_augment: RandAugmentConfig {
                magnitude: 31,
                ..RandAugmentConfig::default()
            },
            ..AugConfig::default()
        };
        assert!(bin_out_of_range.validate().is_err());
    }
}
