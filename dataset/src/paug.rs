//! The `paug` column's stored form of augmentation parameters, both ways, and its one-line
//! description shared by `inspect` and `show-aug`.

use dfndr_augment::ops::Op;
use dfndr_augment::params::{AugParams, CropBox};
use dfndr_shards::format::{AugOp, Paug};

use crate::DatasetError;

/// The stored form of sampled parameters.
pub fn to_stored(p: &AugParams) -> Paug {
    Paug {
        crop: [p.crop.top, p.crop.left, p.crop.height, p.crop.width],
        flip: p.flip,
        ops: p
            .ops
            .iter()
            .map(|(op, magnitude)| AugOp {
                op: op.index(),
                magnitude: *magnitude,
            })
            .collect(),
    }
}

/// The stored parameters as typed values; an unknown op index is an error.
pub fn from_stored(p: &Paug) -> Result<AugParams, DatasetError> {
    let ops = p
        .ops
        .iter()
        .map(|o| {
            Op::from_index(o.op)
                .map(|op| (op, o.magnitude))
                .ok_or(DatasetError::UnknownOp(o.op))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AugParams {
        crop: CropBox {
            top: p.crop[0],
            left: p.crop[1],
            height: p.crop[2],
            width: p.crop[3],
        },
        flip: p.flip,
        ops,
    })
}

/// `crop WxH at top=T left=L [flip]  Op(+m) Op(+m)`; unknown op indices are shown as `opN`.
pub fn describe(p: &Paug) -> String {
    let ops: Vec<String> = p
        .ops
        .iter()
        .map(|o| match Op::from_index(o.op) {
            Some(op) => format!("{}({:+.3})", op.name(), o.magnitude),
            None => format!("op{}({:+.3})", o.op, o.magnitude),
        })
        .collect();
    let [top, left, h, w] = p.crop;
    let flip = if p.flip { " flip" } else { "" };
    format!(
        "crop {w}x{h} at top={top} left={left}{flip}  {}",
        ops.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips_and_describes() {
        let p = AugParams {
            crop: CropBox {
                top: 1,
                left: 2,
                height: 30,
                width: 40,
            },
            flip: true,
            ops: vec![(Op::Rotate, -9.0), (Op::Equalize, 0.0)],
        };
        let stored = to_stored(&p);
        assert_eq!(from_stored(&stored).unwrap(), p);
        assert_eq!(
            describe(&stored),
            "crop 40x30 at top=1 left=2 flip  Rotate(-9.000) Equalize(+0.000)"
        );
        let mut bad = stored;
        bad.ops[0].op = 99;
        assert!(from_stored(&bad).is_err());
        assert!(describe(&bad).starts_with("crop 40x30") && describe(&bad).contains("op99"));
    }

    /// The shards crate checks stored magnitudes with its own copy of the ranges (it does not
    /// depend on the augment crate); both must be the sampler's.
    #[test]
    fn shard_value_ranges_are_the_samplers() {
        use dfndr_shards::format::{magnitude_range, MAX_AUG_SIZE, NUM_AUG_OPS, OP_NAMES};
        assert_eq!(usize::from(NUM_AUG_OPS), Op::ALL.len());
        assert_eq!(MAX_AUG_SIZE, dfndr_augment::params::MAX_SIZE);
        assert_eq!(
            dfndr_shards::format::MAX_OPS_PER_VIEW,
            dfndr_augment::params::MAX_NUM_OPS
        );
        for op in Op::ALL {
            assert_eq!(OP_NAMES[usize::from(op.index())], op.name());
            for size in [1, 2, 64, 96, 224, 256, 1000, 4096] {
                assert_eq!(
                    magnitude_range(op.index(), size),
                    Some(op.magnitude_range(size)),
                    "{op:?} at {size}"
                );
            }
        }
        assert_eq!(magnitude_range(NUM_AUG_OPS, 224), None);
    }
}
