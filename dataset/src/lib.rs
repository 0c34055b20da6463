//! dfndr-dataset: reading DFNDR datasets back, for every command and crate that goes from a
//! stored row to pixels (`dfndr embed`, `show-aug`, `export-wds`, the trainer).
//!
//! - [`paug`]: the `paug` column's stored form of augmentation parameters, both ways.
//! - [`views`]: a shard's augmentation config from its metadata, and a row's stored views
//!   replayed on its original image at any size.
//!
//! The original image of a row (its `image` column, or its source shard streamed in row
//! order) is [`dfndr_shards::originals`]; this crate adds what needs the augment crate too.

pub mod paug;
pub mod views;

/// Errors of reading stored values back.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A stored RandAugment op index that names no op.
    #[error("unknown RandAugment op index {0}")]
    UnknownOp(u8),
    /// A shard without augmentation views (`num_augmentations = 0`).
    #[error("the shard has no augmentations (num_augmentations = 0)")]
    NoAugmentations,
    /// Augmentation metadata that is not a dfndr augmentation config.
    #[error("the shard's augmentation metadata is not a dfndr augmentation config: {0}")]
    BadAugmentation(String),
    /// Stored parameters that do not fit the row's image.
    #[error("{0}")]
    Params(String),
    /// An original image of another size than the row records: its source shard changed
    /// since the row was written, and the stored crop boxes would cut it in the wrong places.
    #[error("the original image is {found_width}x{found_height}, but the row records {width}x{height} (its source shard changed since the row was written)")]
    ChangedOriginal {
        /// Recorded width.
        width: u32,
        /// Recorded height.
        height: u32,
        /// Width of the image found.
        found_width: u32,
        /// Height of the image found.
        found_height: u32,
    },
}
