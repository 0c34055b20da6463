//! One epoch of a dataset as a deterministic sequence of rows.
//!
//! Shards are visited in an order shuffled per epoch; each is read in row order together with
//! its source shard (or `image` column), so nothing is random-accessed and memory holds one
//! row group plus the shuffle buffer. Rows leave the buffer at random positions drawn from
//! (seed, epoch, draw number). The sequence depends only on the dataset, the seed and the
//! epoch, which is what makes a resumed run see the same batches.

use std::collections::BTreeMap;

use dfndr_shards::format::{Paug, Row, Rows, ShardReader};
use dfndr_shards::originals::OriginalsCursor;
use dfndr_shards::spool::Spool;
use dfndr_shards::store::{local_copy, LocalCopy};
use dfndr_shards::wds::ReaderLimits;
use regex::Regex;

use super::dataset::{requirements, Dataset, Requirements};
use super::{below, mix};
use crate::error::{Result, TrainError};

/// Salt of the shard order.
const ORDER: u64 = 0x5348_4152_4453;
/// Salt of the shuffle buffer's draws.
const DRAW: u64 = 0x4452_4157;

/// One row with what training reads of it.
#[derive(Clone, Debug)]
pub struct Item {
    /// Shard name.
    pub shard: String,
    /// Row key.
    pub key: String,
    /// Recorded size of the original.
    pub width: u32,
    /// Recorded height of the original.
    pub height: u32,
    /// Ground-truth caption.
    pub caption: String,
    /// Stored views.
    pub paug: Vec<Paug>,
    /// Teacher image embedding per view.
    pub image_emb: Vec<Vec<f32>>,
    /// Teacher embedding of the ground-truth caption.
    pub text_emb: Vec<f32>,
    /// Synthetic captions and their teacher embeddings, per selected tag.
    pub syn: Vec<Vec<(String, Vec<f32>)>>,
    /// The original encoded image, or why it could not be read (a counted skip).
    pub original: std::result::Result<Vec<u8>, &'static str>,
}

/// The shard being read.
struct Open<'a> {
    name: String,
    rows: Rows,
    cursor: OriginalsCursor<'a>,
    _copy: LocalCopy,
}

/// The rows of one epoch, in the order training sees them.
pub struct EpochStream<'a> {
    dataset: &'a Dataset,
    spool: &'a Spool,
    limits: ReaderLimits,
    regex: Regex,
    expected: Requirements,
    order: Vec<usize>,
    next_shard: usize,
    open: Option<Open<'a>>,
    buffer: Vec<Item>,
    capacity: usize,
    seed: u64,
    epoch: u64,
    draws: u64,
    /// Rows that could not be read, by reason.
    pub skipped: BTreeMap<String, u64>,
}

impl<'a> EpochStream<'a> {
    /// The stream of `epoch`. `expected` is what every shard must provide (from the first).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dataset: &'a Dataset,
        spool: &'a Spool,
        limits: ReaderLimits,
        regex: Regex,
        expected: Requirements,
        shuffle_buffer: usize,
        seed: u64,
        epoch: u64,
    ) -> Self {
        // Fisher-Yates with draws from (seed, epoch, i).
        let mut order: Vec<usize> = (0..dataset.shards.len()).collect();
        for i in (1..order.len()).rev() {
            let j = below(i + 1, &[seed, epoch, ORDER, i as u64]);
            order.swap(i, j);
        }
        Self {
            dataset,
            spool,
            limits,
            regex,
            expected,
            order,
            next_shard: 0,
            open: None,
            buffer: Vec::new(),
            capacity: shuffle_buffer.max(1),
            seed,
            epoch,
            draws: 0,
            skipped: BTreeMap::new(),
        }
    }

    fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }

    /// Opens the next shard in the epoch's order; `false` when there is none left.
    fn open_next(&mut self) -> Result<bool> {
        while self.next_shard < self.order.len() {
            let shard = &self.dataset.shards[self.order[self.next_shard]];
            self.next_shard += 1;
            match self.open_shard(&shard.name, &shard.path) {
                Ok(open) => {
                    self.open = Some(open);
                    return Ok(true);
                }
                Err(TrainError::Data(msg)) if msg.starts_with("unreadable") => {
                    tracing::warn!(shard = %shard.name, error = %msg, "shard skipped: it cannot be read");
                    self.skip("unreadable_shard");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    fn open_shard(&self, name: &str, path: &str) -> Result<Open<'a>> {
        let store = self.dataset.store.as_ref();
        let unreadable = |e: String| TrainError::Data(format!("unreadable shard {name}: {e}"));
        let copy = local_copy(store, path).map_err(|e| unreadable(e.to_string()))?;
        let reader = ShardReader::open_path(copy.path()).map_err(|e| unreadable(e.to_string()))?;
        let found = requirements(name, reader.layout(), reader.meta(), &self.regex)?;
        if found.aug != self.expected.aug {
            return Err(TrainError::Data(format!(
                "shard {name} was augmented with another config than the dataset's first shard: \
                 one run trains on one augmentation config"
            )));
        }
        if found.teachers != self.expected.teachers {
            return Err(TrainError::Data(format!(
                "shard {name} has teachers {:?} (logit scales {:?}), the dataset's first shard {:?} \
                 ({:?}): one run trains on one teacher layout",
                found.teachers.dims,
                found.teachers.scales,
                self.expected.teachers.dims,
                self.expected.teachers.scales
            )));
        }
        let mut columns = vec!["paug".to_string(), "image_emb".into(), "text_emb".into()];
        if reader.layout().embed_images {
            columns.push("image".into());
        }
        for tag in &found.syn_tags {
            columns.push(format!("syn_text_{tag}_emb"));
        }
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        let rows = reader
            .select(&names)
            .and_then(|r| r.rows())
            .map_err(|e| unreadable(e.to_string()))?;
        Ok(Open {
            name: name.to_string(),
            rows,
            cursor: OriginalsCursor::new(self.spool, self.limits),
            _copy: copy,
        })
    }

    /// The next row of the open shards, in shard order (before the shuffle buffer).
    fn next_in_order(&mut self) -> Result<Option<Item>> {
        loop {
            if self.open.is_none() && !self.open_next()? {
                return Ok(None);
            }
            let Some(open) = self.open.as_mut() else {
                return Ok(None);
            };
            match open.rows.next() {
                None => self.open = None,
                Some(Err(e)) => {
                    tracing::warn!(shard = %open.name, error = %e, "rest of the shard skipped: a row group cannot be read");
                    self.open = None;
                    self.skip("unreadable_rows");
                }
                Some(Ok(row)) => {
                    let original = match open.cursor.original(&row) {
                        Ok(Ok(bytes)) => Ok(bytes),
                        Ok(Err(missing)) => Err(missing.reason()),
                        Err(e) => {
                            tracing::warn!(shard = %open.name, key = %row.key, error = %e, "source shard cannot be opened");
                            Err("unreadable_original")
                        }
                    };
                    let shard = open.name.clone();
                    return Ok(Some(item_of(shard, row, original)));
                }
            }
        }
    }
}

fn item_of(shard: String, row: Row, original: std::result::Result<Vec<u8>, &'static str>) -> Item {
    // Unselected tags come back empty.
    let syn = row
        .syn
        .into_iter()
        .map(|s| s.texts.into_iter().zip(s.emb).collect::<Vec<_>>())
        .filter(|captions| !captions.is_empty())
        .collect();
    Item {
        shard,
        key: row.key,
        width: row.width,
        height: row.height,
        caption: row.caption,
        paug: row.paug,
        image_emb: row.image_emb,
        text_emb: row.text_emb.into_iter().next().unwrap_or_default(),
        syn,
        original,
    }
}

impl Iterator for EpochStream<'_> {
    type Item = Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.buffer.len() < self.capacity {
            match self.next_in_order() {
                Ok(Some(item)) => self.buffer.push(item),
                Ok(None) => break,
                Err(e) => return Some(Err(e)),
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let at = below(
            self.buffer.len(),
            &[self.seed, self.epoch, DRAW, mix(self.draws)],
        );
        self.draws += 1;
        Some(Ok(self.buffer.swap_remove(at)))
    }
}
