//! A shard's augmentation config, and a row's stored views replayed on its original image.

use dfndr_augment::params::AugConfig;
use dfndr_augment::rgb::RgbImage;
use dfndr_shards::format::{FileMeta, Paug};

use crate::paug::from_stored;
use crate::DatasetError;

/// The augmentation config a shard was written with (its `dfndr.augmentation` metadata).
pub fn augmentation_of(meta: &FileMeta) -> Result<AugConfig, DatasetError> {
    if meta.augmentation.is_null() {
        return Err(DatasetError::NoAugmentations);
    }
    serde_json::from_value(meta.augmentation.clone())
        .map_err(|e| DatasetError::BadAugmentation(e.to_string()))
}

/// Checks that a row's original image `img` has the size the row records (`width` x
/// `height`), which its stored crop boxes are in.
pub fn check_original(width: u32, height: u32, img: &RgbImage) -> Result<(), DatasetError> {
    if (img.width, img.height) == (width, height) {
        return Ok(());
    }
    Err(DatasetError::ChangedOriginal {
        width,
        height,
        found_width: img.width,
        found_height: img.height,
    })
}

/// The stored views `paug` of a row replayed on its original image `img` at `size` pixels
/// (the job's `aug.size` reproduces what the teachers saw; a student replays at its own).
/// Each view's parameters are checked against the image first.
pub fn replay_views(
    aug: &AugConfig,
    paug: &[Paug],
    img: &RgbImage,
    size: u32,
) -> Result<Vec<RgbImage>, DatasetError> {
    paug.iter()
        .map(|p| {
            let params = from_stored(p)?;
            params
                .validate(img.width, img.height, aug.size)
                .map_err(|e| DatasetError::Params(e.to_string()))?;
            Ok(aug.replay(img, &params, size))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paug::to_stored;
    use dfndr_shards::format::FileMeta;

    fn image(width: u32, height: u32) -> RgbImage {
        let data = (0..width * height * 3).map(|i| (i % 251) as u8).collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    #[test]
    fn stored_views_replay_at_any_size_and_bad_ones_are_refused() {
        let aug = AugConfig::default();
        let img = image(120, 80);
        let params: Vec<Paug> = (0..3)
            .map(|k| to_stored(&aug.sample(7, "key", k, img.width, img.height)))
            .collect();
        let views = replay_views(&aug, &params, &img, 32).unwrap();
        assert_eq!(views.len(), 3);
        assert!(views.iter().all(|v| (v.width, v.height) == (32, 32)));
        check_original(120, 80, &img).unwrap();
        assert!(matches!(
            check_original(80, 120, &img),
            Err(DatasetError::ChangedOriginal { width: 80, .. })
        ));
        let mut bad = params[0].clone();
        bad.crop = [0, 0, 1 << 30, 1 << 30];
        let err = replay_views(&aug, &[bad], &img, 32).unwrap_err();
        assert!(matches!(err, DatasetError::Params(_)), "{err}");
        let mut unknown = params[0].clone();
        unknown.ops.push(dfndr_shards::format::AugOp {
            op: 200,
            magnitude: 0.0,
        });
        assert!(matches!(
            replay_views(&aug, &[unknown], &img, 32),
            Err(DatasetError::UnknownOp(200))
        ));
    }

    #[test]
    fn the_augmentation_config_comes_from_the_metadata() {
        let meta = FileMeta::default();
        assert!(matches!(
            augmentation_of(&meta),
            Err(DatasetError::NoAugmentations)
        ));
        let aug = AugConfig::default();
        let meta = FileMeta {
            augmentation: serde_json::to_value(&aug).unwrap(),
            ..FileMeta::default()
        };
        assert_eq!(augmentation_of(&meta).unwrap(), aug);
        let meta = FileMeta {
            augmentation: serde_json::json!({"size": "big"}),
            ..FileMeta::default()
        };
        assert!(matches!(
            augmentation_of(&meta),
            Err(DatasetError::BadAugmentation(_))
        ));
    }
}
