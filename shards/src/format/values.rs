//! Valid ranges of stored values, checked on write and on read.
//!
//! The arrow schema only fixes types: an `int32` crop box can still reach 2^31 past a 512 px
//! image, a `uint8` op index can name the 200th RandAugment op, a `float32` magnitude can be NaN.
//! Consumers replay these values (crop, resize, ops), so a bad one must stop at the reader with
//! a message naming the row, the key and the field, not turn into a silent garbage view or an
//! allocation sized by a stored number.
//!
//! The magnitude ranges are those `dfndr_augment`'s RandAugment sampler can produce under any
//! valid augmentation config (torchvision's `_augmentation_space`, SPEC section 6):
//! `dfndr_augment::ops::Op::magnitude_range` computes the same bounds from the sampler's own
//! tables, and a test of the `dfndr` crate checks that the two agree.

use serde_json::Value;

use super::row::{Paug, Row, NUM_AUG_OPS};

/// Largest augmentation `size` a valid config has (`dfndr_augment::params::MAX_SIZE`); it
/// bounds the translation magnitudes when a shard does not record its size.
pub const MAX_AUG_SIZE: u32 = 4096;

/// Most RandAugment ops one view may hold (the augmentation config refuses more `num_ops`).
pub const MAX_OPS_PER_VIEW: usize = 16;

/// torchvision's op names, by SPEC section 6 index.
pub const OP_NAMES: [&str; NUM_AUG_OPS as usize] = [
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
];

/// The closed range `[min, max]` of stored magnitudes of op `op` for views sampled at
/// `aug_size` x `aug_size` (the RandAugment input), or `None` for an unknown op.
///
/// Signed ops (shears, translations, rotation, enhancements) range over `[-end, end]` where
/// `end` is the last magnitude bin; Posterize keeps 4 to 8 bits; Solarize thresholds lie in
/// `[0, 255]`; ops without a magnitude store 0. Bounds are the exact `f32` values the sampler
/// computes (`end as f32`), so a sampled value never falls outside by rounding.
pub fn magnitude_range(op: u8, aug_size: u32) -> Option<(f32, f32)> {
    let signed = |end: f32| Some((-end, end));
    match op {
        0 | 12 | 13 => Some((0.0, 0.0)),
        1 | 2 => signed(0.3),
        // torchvision: 150 / 331 * image side, computed in f64 and stored as f32.
        3 | 4 => signed((150.0 / 331.0 * f64::from(aug_size)) as f32),
        5 => signed(30.0),
        6..=9 => signed(0.9),
        10 => Some((4.0, 8.0)),
        11 => Some((0.0, 255.0)),
        _ => None,
    }
}

/// A problem with one stored view (`paug` entry); displays as the field path within the view
/// followed by what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PaugError {
    /// The crop box has a zero or negative side.
    #[error("crop ({}, {}, {}, {}) is empty: its height and width must be at least 1", crop[0], crop[1], crop[2], crop[3])]
    EmptyCrop {
        /// `(top, left, height, width)` as stored.
        crop: [i32; 4],
    },
    /// The crop box reaches outside the recorded image.
    #[error("crop ({}, {}, {}, {}) lies outside the {width}x{height} image", crop[0], crop[1], crop[2], crop[3])]
    CropOutside {
        /// `(top, left, height, width)` as stored.
        crop: [i32; 4],
        /// Recorded image width.
        width: u32,
        /// Recorded image height.
        height: u32,
    },
    /// More ops than any valid config applies.
    #[error("ops holds {found} ops, at most {MAX_OPS_PER_VIEW} are valid")]
    TooManyOps {
        /// Number of stored ops.
        found: usize,
    },
    /// An op index past the op list.
    #[error("ops[{index}].op {op} is not a RandAugment op index (valid: 0..{NUM_AUG_OPS})")]
    UnknownOp {
        /// Position in `ops`.
        index: usize,
        /// The stored index.
        op: u8,
    },
    /// A NaN or infinite magnitude.
    #[error("ops[{index}].magnitude of {} is {magnitude}, not a finite number", OP_NAMES[usize::from(*op)])]
    NonFiniteMagnitude {
        /// Position in `ops`.
        index: usize,
        /// The op index (valid).
        op: u8,
        /// The stored magnitude.
        magnitude: f32,
    },
    /// A magnitude outside the op's range.
    #[error("ops[{index}].magnitude of {} is {magnitude}, outside its range [{min}, {max}]", OP_NAMES[usize::from(*op)])]
    MagnitudeOutOfRange {
        /// Position in `ops`.
        index: usize,
        /// The op index (valid).
        op: u8,
        /// The stored magnitude.
        magnitude: f32,
        /// Smallest valid value.
        min: f32,
        /// Largest valid value.
        max: f32,
    },
}

impl Paug {
    /// Checks the view against a `width` x `height` original sampled at `aug_size` (see
    /// [`magnitude_range`]; pass [`MAX_AUG_SIZE`] when unknown): the crop box is non-empty and
    /// inside the image, there are at most [`MAX_OPS_PER_VIEW`] ops, every op index is known
    /// and every magnitude finite and within its op's range.
    pub fn validate(&self, width: u32, height: u32, aug_size: u32) -> Result<(), PaugError> {
        let [top, left, h, w] = self.crop;
        if h <= 0 || w <= 0 {
            return Err(PaugError::EmptyCrop { crop: self.crop });
        }
        // i64: top + height of two i32 cannot overflow there.
        let inside = top >= 0
            && left >= 0
            && i64::from(top) + i64::from(h) <= i64::from(height)
            && i64::from(left) + i64::from(w) <= i64::from(width);
        if !inside {
            return Err(PaugError::CropOutside {
                crop: self.crop,
                width,
                height,
            });
        }
        if self.ops.len() > MAX_OPS_PER_VIEW {
            return Err(PaugError::TooManyOps {
                found: self.ops.len(),
            });
        }
        for (index, o) in self.ops.iter().enumerate() {
            let Some((min, max)) = magnitude_range(o.op, aug_size) else {
                return Err(PaugError::UnknownOp { index, op: o.op });
            };
            let m = o.magnitude;
            if !m.is_finite() {
                return Err(PaugError::NonFiniteMagnitude {
                    index,
                    op: o.op,
                    magnitude: m,
                });
            }
            if !(min..=max).contains(&m) {
                return Err(PaugError::MagnitudeOutOfRange {
                    index,
                    op: o.op,
                    magnitude: m,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }
}

/// A stored value outside its valid range; displays as the field path (`paug[1].crop`, ...)
/// followed by what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// `width` or `height` is zero: every kept sample decoded to at least one pixel.
    #[error("width x height is {width}x{height}, but a decoded image has at least one pixel")]
    EmptyImage {
        /// Stored width.
        width: u32,
        /// Stored height.
        height: u32,
    },
    /// A different number of views than the shard's augmentation config says.
    #[error("paug holds {found} views, but the shard's dfndr.augmentation has num_augmentations = {expected}")]
    ViewCount {
        /// Views in the row.
        found: usize,
        /// `num_augmentations` of the metadata.
        expected: usize,
    },
    /// A bad view.
    #[error("paug[{view}].{problem}")]
    Paug {
        /// Position of the view in `paug`.
        view: usize,
        /// What is wrong with it.
        problem: PaugError,
    },
}

/// What the values of a file's rows are checked against, from its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueLimits {
    /// Views per row when the metadata records `num_augmentations` (and rows have `paug`).
    pub views: Option<usize>,
    /// The augmentation size the views were sampled at ([`MAX_AUG_SIZE`] when unrecorded).
    pub aug_size: u32,
}

impl Default for ValueLimits {
    /// Nothing recorded: any number of views, translations up to [`MAX_AUG_SIZE`].
    fn default() -> Self {
        ValueLimits {
            views: None,
            aug_size: MAX_AUG_SIZE,
        }
    }
}

impl ValueLimits {
    /// Limits from a `dfndr.augmentation` value: its `num_augmentations` and `size` when they
    /// are integers in range (the entry is free-form JSON; anything else counts as unrecorded).
    pub fn from_augmentation(augmentation: &Value) -> ValueLimits {
        let int = |key: &str| augmentation.get(key).and_then(Value::as_u64);
        ValueLimits {
            views: int("num_augmentations")
                .filter(|k| *k > 0)
                .and_then(|k| usize::try_from(k).ok()),
            aug_size: int("size")
                .and_then(|s| u32::try_from(s).ok())
                .filter(|s| (1..=MAX_AUG_SIZE).contains(s))
                .unwrap_or(MAX_AUG_SIZE),
        }
    }
}

impl Row {
    /// Checks the row's values (not its shape, see [`Row::check`]): a non-empty image size and
    /// every view per [`Paug::validate`], plus the view count when `limits` records one.
    pub fn validate_values(&self, limits: &ValueLimits) -> Result<(), ValueError> {
        if self.width == 0 || self.height == 0 {
            return Err(ValueError::EmptyImage {
                width: self.width,
                height: self.height,
            });
        }
        if let Some(expected) = limits.views {
            if self.paug.len() != expected {
                return Err(ValueError::ViewCount {
                    found: self.paug.len(),
                    expected,
                });
            }
        }
        for (view, p) in self.paug.iter().enumerate() {
            p.validate(self.width, self.height, limits.aug_size)
                .map_err(|problem| ValueError::Paug { view, problem })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::AugOp;

    fn view(crop: [i32; 4], ops: &[(u8, f32)]) -> Paug {
        Paug {
            crop,
            flip: false,
            ops: ops
                .iter()
                .map(|&(op, magnitude)| AugOp { op, magnitude })
                .collect(),
        }
    }

    #[test]
    fn crops_must_be_non_empty_and_inside_the_image() {
        let ok = |crop| view(crop, &[]).validate(512, 384, 224);
        assert_eq!(ok([0, 0, 384, 512]), Ok(()));
        assert_eq!(ok([383, 511, 1, 1]), Ok(()));
        for crop in [[0, 0, 0, 5], [0, 0, 5, -1], [0, 0, i32::MIN, 1]] {
            assert_eq!(ok(crop), Err(PaugError::EmptyCrop { crop }), "{crop:?}");
        }
        for crop in [
            [-1, 0, 10, 10],
            [0, -1, 10, 10],
            [0, 0, 385, 512],
            [0, 1, 384, 512],
            [i32::MAX, 0, i32::MAX, 1],
            [0, 0, i32::MAX, i32::MAX],
        ] {
            assert!(
                matches!(ok(crop), Err(PaugError::CropOutside { .. })),
                "{crop:?}"
            );
        }
    }

    #[test]
    fn ops_need_a_known_index_and_a_magnitude_in_range() {
        let check = |op, m| view([0, 0, 1, 1], &[(op, m)]).validate(1, 1, 224);
        for (op, m) in [
            (0, 0.0),
            (0, -0.0),
            (1, -0.3),
            (3, -101.5),
            (4, 101.5),
            (5, 30.0),
            (9, -0.9),
            (10, 4.0),
            (10, 8.0),
            (11, 0.0),
            (11, 255.0),
            (13, 0.0),
        ] {
            assert_eq!(check(op, m), Ok(()), "op {op} magnitude {m}");
        }
        for (op, m) in [
            (0, 1.0),
            (1, 0.31),
            (3, 101.52),
            (5, -30.001),
            (6, 0.91),
            (10, 3.0),
            (10, 9.0),
            (11, -1.0),
            (12, 0.5),
        ] {
            assert!(
                matches!(check(op, m), Err(PaugError::MagnitudeOutOfRange { .. })),
                "op {op} magnitude {m}"
            );
        }
        for m in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(matches!(
                check(5, m),
                Err(PaugError::NonFiniteMagnitude { .. })
            ));
        }
        assert_eq!(
            check(NUM_AUG_OPS, 0.0),
            Err(PaugError::UnknownOp { index: 0, op: 14 })
        );
        // Translations scale with the generation size.
        assert!(view([0, 0, 1, 1], &[(3, 1000.0)])
            .validate(1, 1, 4096)
            .is_ok());
        let many = view([0, 0, 1, 1], &[(0, 0.0); MAX_OPS_PER_VIEW + 1]);
        assert_eq!(
            many.validate(1, 1, 224),
            Err(PaugError::TooManyOps { found: 17 })
        );
    }

    #[test]
    fn messages_name_the_field() {
        let row = Row {
            key: "000012".into(),
            width: 512,
            height: 384,
            paug: vec![
                view([0, 0, 1, 1], &[]),
                view([0, 0, i32::MAX, i32::MAX], &[]),
            ],
            ..Row::default()
        };
        let err = row.validate_values(&ValueLimits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "paug[1].crop (0, 0, 2147483647, 2147483647) lies outside the 512x384 image"
        );
        let row = Row {
            paug: vec![view([0, 0, 1, 1], &[(5, 9.0), (2, f32::NAN)])],
            ..row
        };
        assert_eq!(
            row.validate_values(&ValueLimits::default())
                .unwrap_err()
                .to_string(),
            "paug[0].ops[1].magnitude of ShearY is NaN, not a finite number"
        );
        let limits = ValueLimits {
            views: Some(2),
            ..ValueLimits::default()
        };
        assert!(matches!(
            row.validate_values(&limits),
            Err(ValueError::ViewCount {
                found: 1,
                expected: 2
            })
        ));
        let empty = Row {
            width: 0,
            ..Row::default()
        };
        assert!(matches!(
            empty.validate_values(&ValueLimits::default()),
            Err(ValueError::EmptyImage { .. })
        ));
    }

    #[test]
    fn limits_come_from_the_augmentation_metadata() {
        let l = ValueLimits::from_augmentation(
            &serde_json::json!({"num_augmentations": 2, "size": 96}),
        );
        assert_eq!(
            l,
            ValueLimits {
                views: Some(2),
                aug_size: 96
            }
        );
        for odd in [
            serde_json::Value::Null,
            serde_json::json!({"k": 2}),
            serde_json::json!({"num_augmentations": -1, "size": 1e9}),
            serde_json::json!({"num_augmentations": "2", "size": 0}),
        ] {
            assert_eq!(ValueLimits::from_augmentation(&odd), ValueLimits::default());
        }
    }
}
