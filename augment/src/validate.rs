//! Checks of augmentation parameters that come from outside the program (a DFNDR shard, an
//! Apple `paug.json`) before they are replayed.
//!
//! Replaying never panics on odd values (crops outside the image read zeros, non-finite
//! magnitudes leave the image unchanged), but it silently renders garbage: a crop box of
//! 2^31 x 2^31 px on a 512 px image resamples to a black view. Parameters sampled by
//! [`crate::params::AugConfig::sample`] always pass; anything else is refused with the field
//! that is wrong.

use crate::ops::Op;
use crate::params::{AugParams, CropBox, MAX_NUM_OPS};

/// A field of [`AugParams`] outside its valid range; displays as the field path (`crop`,
/// `ops[1].magnitude`) followed by what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    /// The image the parameters are checked against has no pixels.
    #[error("the image is {width}x{height}, which has no pixels to crop")]
    EmptyImage {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
    },
    /// The crop box has a zero or negative side.
    #[error("crop ({}, {}, {}, {}) is empty: its height and width must be at least 1", crop.top, crop.left, crop.height, crop.width)]
    EmptyCrop {
        /// The crop box.
        crop: CropBox,
    },
    /// The crop box reaches outside the image.
    #[error("crop ({}, {}, {}, {}) lies outside the {width}x{height} image", crop.top, crop.left, crop.height, crop.width)]
    CropOutside {
        /// The crop box.
        crop: CropBox,
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
    },
    /// More ops than any valid config applies.
    #[error("ops holds {found} ops, at most {MAX_NUM_OPS} are valid")]
    TooManyOps {
        /// Number of ops.
        found: usize,
    },
    /// A NaN or infinite magnitude.
    #[error("ops[{index}].magnitude of {} is {magnitude}, not a finite number", op.name())]
    NonFiniteMagnitude {
        /// Position in `ops`.
        index: usize,
        /// The op.
        op: Op,
        /// The magnitude.
        magnitude: f32,
    },
    /// A magnitude outside [`Op::magnitude_range`].
    #[error("ops[{index}].magnitude of {} is {magnitude}, outside its range [{min}, {max}]", op.name())]
    MagnitudeOutOfRange {
        /// Position in `ops`.
        index: usize,
        /// The op.
        op: Op,
        /// The magnitude.
        magnitude: f32,
        /// Smallest valid value.
        min: f32,
        /// Largest valid value.
        max: f32,
    },
}

impl AugParams {
    /// Checks the parameters against a `width` x `height` original whose views were sampled at
    /// `size` (the config's `size`, which scales the translations; pass
    /// [`crate::params::MAX_SIZE`] when unknown): the crop box is non-empty and inside the
    /// image, and the ops pass [`check_ops`].
    pub fn validate(&self, width: u32, height: u32, size: u32) -> Result<(), ParamsError> {
        if width == 0 || height == 0 {
            return Err(ParamsError::EmptyImage { width, height });
        }
        let c = self.crop;
        if c.height <= 0 || c.width <= 0 {
            return Err(ParamsError::EmptyCrop { crop: c });
        }
        // i64: the sums of two i32 cannot overflow there.
        let inside = c.top >= 0
            && c.left >= 0
            && i64::from(c.top) + i64::from(c.height) <= i64::from(height)
            && i64::from(c.left) + i64::from(c.width) <= i64::from(width);
        if !inside {
            return Err(ParamsError::CropOutside {
                crop: c,
                width,
                height,
            });
        }
        check_ops(&self.ops, size)
    }
}

/// Checks RandAugment ops drawn for a `size` x `size` input: at most
/// [`MAX_NUM_OPS`] of them, each magnitude finite and within [`Op::magnitude_range`].
pub fn check_ops(ops: &[(Op, f32)], size: u32) -> Result<(), ParamsError> {
    if ops.len() > MAX_NUM_OPS {
        return Err(ParamsError::TooManyOps { found: ops.len() });
    }
    for (index, &(op, magnitude)) in ops.iter().enumerate() {
        if !magnitude.is_finite() {
            return Err(ParamsError::NonFiniteMagnitude {
                index,
                op,
                magnitude,
            });
        }
        let (min, max) = op.magnitude_range(size);
        if !(min..=max).contains(&magnitude) {
            return Err(ParamsError::MagnitudeOutOfRange {
                index,
                op,
                magnitude,
                min,
                max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{AugConfig, MAX_SIZE};

    fn params(crop: [i32; 4], ops: Vec<(Op, f32)>) -> AugParams {
        AugParams {
            crop: CropBox {
                top: crop[0],
                left: crop[1],
                height: crop[2],
                width: crop[3],
            },
            flip: false,
            ops,
        }
    }

    #[test]
    fn sampled_parameters_are_valid() {
        let cfg = AugConfig::default();
        for (w, h) in [(1u32, 1u32), (512, 384), (3, 1000), (5000, 7)] {
            for v in 0..300 {
                let p = cfg.sample(1, "k", v, w, h);
                assert_eq!(p.validate(w, h, cfg.size), Ok(()), "{p:?} in {w}x{h}");
            }
        }
    }

    #[test]
    fn out_of_range_values_are_named() {
        let big = params([0, 0, i32::MAX, i32::MAX], vec![]);
        assert_eq!(
            big.validate(512, 384, 224).unwrap_err().to_string(),
            "crop (0, 0, 2147483647, 2147483647) lies outside the 512x384 image"
        );
        for crop in [[-1, 0, 5, 5], [0, 0, 385, 1], [i32::MAX, i32::MAX, 1, 1]] {
            assert!(matches!(
                params(crop, vec![]).validate(512, 384, 224),
                Err(ParamsError::CropOutside { .. })
            ));
        }
        assert!(matches!(
            params([0, 0, 0, 1], vec![]).validate(512, 384, 224),
            Err(ParamsError::EmptyCrop { .. })
        ));
        assert!(matches!(
            params([0, 0, 1, 1], vec![]).validate(0, 384, 224),
            Err(ParamsError::EmptyImage { .. })
        ));
        let nan = params(
            [0, 0, 1, 1],
            vec![(Op::Rotate, 9.0), (Op::ShearX, f32::NAN)],
        );
        assert_eq!(
            nan.validate(1, 1, 224).unwrap_err().to_string(),
            "ops[1].magnitude of ShearX is NaN, not a finite number"
        );
        let far = params([0, 0, 1, 1], vec![(Op::TranslateX, 500.0)]);
        assert!(matches!(
            far.validate(1, 1, 224),
            Err(ParamsError::MagnitudeOutOfRange { index: 0, .. })
        ));
        // The same translation is valid for views sampled at 4096 px.
        assert_eq!(far.validate(1, 1, MAX_SIZE), Ok(()));
        let many = params([0, 0, 1, 1], vec![(Op::Identity, 0.0); MAX_NUM_OPS + 1]);
        assert!(matches!(
            many.validate(1, 1, 224),
            Err(ParamsError::TooManyOps { found: 17 })
        ));
    }
}
