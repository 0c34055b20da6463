//! Training batches streamed from a DFNDR dataset (a dfndr output folder, local or on an
//! object store).
//!
//! - [`dataset`]: the shards of a dataset from its `manifest.json`, and the checks that its
//!   columns and teacher layout are what training needs.
//! - [`stream`]: one epoch as a deterministic sequence of rows: shard order shuffled per epoch,
//!   each shard read in order together with its originals, through a bounded shuffle buffer.
//! - [`sample`]: one row made a training sample: a stored view replayed at the student's size,
//!   its teacher embedding, the ground-truth and one synthetic caption, tokenised.
//! - [`loader`]: batches built on a background thread, with counted skips, resumable at any
//!   batch boundary.
//!
//! Every random choice is a function of (seed, epoch, position), so a run restarted from a
//! checkpoint sees exactly the batches the uninterrupted run saw.

pub mod dataset;
pub mod loader;
pub mod sample;
pub mod stream;

pub use dataset::{Dataset, DatasetShard};
pub use loader::{LoadedBatch, Loader, Position};
pub use sample::{Sample, SampleSettings};

use serde::{Deserialize, Serialize};

/// Which stored view a sample uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewSampling {
    /// Uniformly random each time the sample is read (Apple's default).
    Random,
    /// View `epoch mod K` (Apple's `--dataset-reinforcement-sample-sequential`).
    Sequential,
}

/// The `[data]` section of a training config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The dataset: a dfndr output folder (holding `manifest.json`), local or `s3://`,
    /// `gs://`, `az://`.
    pub path: String,
    /// Samples held in the shuffle buffer (rows enter in shard order and leave at random).
    #[serde(default = "default_buffer")]
    pub shuffle_buffer: usize,
    /// Which stored view each sample uses.
    #[serde(default = "default_views")]
    pub view_sampling: ViewSampling,
    /// Synthetic-caption columns to draw from: a regex over the column names
    /// (`syn_text_TAG`), as Apple's `--dataset-reinforcement-syn-text-key-regex`.
    #[serde(default = "default_syn_regex")]
    pub syn_text_regex: String,
    /// Batches prepared ahead of the model.
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: usize,
    /// Images with more pixels are skipped (decompression-bomb guard).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Largest source-shard member read into memory.
    #[serde(default = "default_max_member")]
    pub max_member_bytes: u64,
}

fn default_buffer() -> usize {
    1000
}
fn default_views() -> ViewSampling {
    ViewSampling::Random
}
fn default_syn_regex() -> String {
    "^syn_text.*$".to_string()
}
fn default_prefetch() -> usize {
    2
}
fn default_max_pixels() -> u64 {
    89_478_485
}
fn default_max_member() -> u64 {
    64 << 20
}

/// A SplitMix64 step: the seedable, stateless mixing every random choice of the loader uses.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random number below `n` from the words `parts` (0 when `n` is 0).
pub(crate) fn below(n: usize, parts: &[u64]) -> usize {
    if n == 0 {
        return 0;
    }
    let h = parts.iter().fold(0u64, |acc, &p| mix(acc ^ mix(p)));
    // Multiply-shift: unbiased enough for indices far below 2^32.
    (((h >> 32) as u128 * n as u128) >> 32) as usize
}
