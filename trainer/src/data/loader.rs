//! Batches prepared on a background thread while the model trains.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use dfndr_shards::format::ShardReader;
use dfndr_shards::spool::Spool;
use dfndr_shards::store::local_copy;
use dfndr_shards::wds::ReaderLimits;
use rayon::prelude::*;
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::dataset::{requirements, Dataset, Requirements};
use super::sample::{materialize, Sample, SampleSettings};
use super::stream::EpochStream;
use super::DataConfig;
use crate::error::{Result, TrainError};
use crate::step::Batch;

/// Where the data stream stands: items of `epoch` consumed so far. Saved in checkpoints; a
/// loader started from it continues with the next batch the interrupted run would have seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Stream items of that epoch consumed (samples used and rows skipped).
    pub items: u64,
}

/// One batch and its bookkeeping.
pub struct LoadedBatch {
    /// The batch, on the CPU.
    pub batch: Batch,
    /// The stream position after this batch.
    pub position: Position,
    /// Rows skipped while making it, by reason.
    pub skipped: BTreeMap<String, u64>,
}

/// The student-side settings of the loader.
#[derive(Clone, Debug)]
pub struct StudentInput {
    /// Input side.
    pub size: u32,
    /// Normalisation mean.
    pub mean: [f32; 3],
    /// Normalisation std.
    pub std: [f32; 3],
    /// Text context length.
    pub context_length: usize,
}

/// Streams batches from a dataset on a background thread.
pub struct Loader {
    rx: Receiver<Result<LoadedBatch>>,
    requirements: Requirements,
    _thread: JoinHandle<()>,
}

impl Loader {
    /// Checks the dataset (its first shard) and starts preparing batches of `batch_size` from
    /// `start`.
    pub fn start(
        dataset: Dataset,
        config: &DataConfig,
        student: StudentInput,
        batch_size: usize,
        seed: u64,
        start: Position,
    ) -> Result<Self> {
        let regex = Regex::new(&config.syn_text_regex).map_err(|e| {
            TrainError::Config(format!(
                "data.syn_text_regex {:?}: {e}",
                config.syn_text_regex
            ))
        })?;
        if batch_size == 0 {
            return Err(TrainError::Config("batch_size must be at least 1".into()));
        }
        let first = &dataset.shards[0];
        let copy = local_copy(dataset.store.as_ref(), &first.path)
            .map_err(|e| TrainError::Data(format!("shard {}: {e}", first.name)))?;
        let reader = ShardReader::open_path(copy.path())
            .map_err(|e| TrainError::Data(format!("shard {}: {e}", first.name)))?;
        let requirements = requirements(&first.name, reader.layout(), reader.meta(), &regex)?;
        drop((reader, copy));
        let settings = SampleSettings {
            aug: requirements.aug.clone(),
            size: student.size,
            mean: student.mean,
            std: student.std,
            context_length: student.context_length,
            views: config.view_sampling,
            max_pixels: config.max_pixels,
            seed,
        };
        let (tx, rx) = sync_channel(config.prefetch_batches.max(1));
        let limits = ReaderLimits {
            max_member_bytes: config.max_member_bytes,
        };
        let expected = requirements.clone();
        let buffer = config.shuffle_buffer;
        let thread = std::thread::Builder::new()
            .name("dfndr-loader".into())
            .spawn(move || {
                let spool = Spool::new(None, 1, std::sync::Arc::new(|| {}));
                let mut epoch = start.epoch;
                let mut skip_items = start.items;
                loop {
                    let mut stream = EpochStream::new(
                        &dataset,
                        &spool,
                        limits,
                        regex.clone(),
                        expected.clone(),
                        buffer,
                        seed,
                        epoch,
                    );
                    let mut position = 0u64;
                    let mut produced = false;
                    while position < skip_items {
                        match stream.next() {
                            Some(Ok(_)) => position += 1,
                            Some(Err(e)) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                            None => break,
                        }
                    }
                    skip_items = 0;
                    stream.skipped.clear();
                    loop {
                        match next_batch(&mut stream, &settings, epoch, &mut position, batch_size) {
                            Ok(Some((samples, mut skipped))) => {
                                for (k, v) in std::mem::take(&mut stream.skipped) {
                                    *skipped.entry(k).or_default() += v;
                                }
                                let batch = to_batch(&samples, settings.size);
                                let sent = tx.send(batch.map(|batch| LoadedBatch {
                                    batch,
                                    position: Position {
                                        epoch,
                                        items: position,
                                    },
                                    skipped,
                                }));
                                if sent.is_err() {
                                    return;
                                }
                                produced = true;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    if !produced && epoch > start.epoch + 1 {
                        let _ = tx.send(Err(TrainError::Data(format!(
                            "the dataset yields fewer than {batch_size} usable samples per epoch"
                        ))));
                        return;
                    }
                    epoch += 1;
                }
            })
            .map_err(|e| TrainError::Internal(format!("cannot start the loader thread: {e}")))?;
        Ok(Self {
            rx,
            requirements,
            _thread: thread,
        })
    }

    /// What the dataset provides (teacher layout, synthetic tags, augmentation config).
    pub fn requirements(&self) -> &Requirements {
        &self.requirements
    }

    /// The next batch (waits for it).
    pub fn next_batch(&self) -> Result<LoadedBatch> {
        match self.rx.recv() {
            Ok(batch) => batch,
            Err(_) => Err(TrainError::Internal("the loader thread stopped".into())),
        }
    }
}

type Made = (Vec<Sample>, BTreeMap<String, u64>);

/// `batch_size` samples from the stream (more items when some are skipped), or `None` when the
/// epoch ends first (its last partial batch is dropped, as OpenCLIP drops it in training).
fn next_batch(
    stream: &mut EpochStream<'_>,
    settings: &SampleSettings,
    epoch: u64,
    position: &mut u64,
    batch_size: usize,
) -> Result<Option<Made>> {
    let mut samples = Vec::with_capacity(batch_size);
    let mut skipped = BTreeMap::new();
    while samples.len() < batch_size {
        let mut items = Vec::new();
        while items.len() < batch_size - samples.len() {
            match stream.next() {
                Some(item) => {
                    items.push((*position, item?));
                    *position += 1;
                }
                None => break,
            }
        }
        if items.is_empty() {
            return Ok(None);
        }
        let made: Vec<_> = items
            .par_iter()
            .map(|(pos, item)| materialize(item, settings, epoch, *pos))
            .collect();
        for (r, (_, item)) in made.into_iter().zip(&items) {
            match r {
                Ok(s) => samples.push(s),
                Err(reason) => {
                    tracing::debug!(shard = %item.shard, key = %item.key, reason, "sample skipped");
                    *skipped.entry(reason.to_string()).or_default() += 1;
                }
            }
        }
    }
    Ok(Some((samples, skipped)))
}

fn to_batch(samples: &[Sample], size: u32) -> Result<Batch> {
    let b = samples.len();
    let s = size as usize;
    let dev = Device::Cpu;
    let pixels: Vec<f32> = samples
        .iter()
        .flat_map(|x| x.pixels.iter().copied())
        .collect();
    let stack = |f: &dyn Fn(&Sample) -> &Vec<f32>| -> Result<Tensor> {
        let d = f(&samples[0]).len();
        if samples.iter().any(|x| f(x).len() != d) {
            return Err(TrainError::Data(
                "teacher embeddings of different widths in one batch".into(),
            ));
        }
        let v: Vec<f32> = samples.iter().flat_map(|x| f(x).iter().copied()).collect();
        Ok(Tensor::from_vec(v, (b, d), &dev)?)
    };
    Ok(Batch {
        images: Tensor::from_vec(pixels, (b, 3, s, s), &dev)?,
        text_gt: samples.iter().map(|x| x.gt.clone()).collect(),
        text_syn: samples.iter().map(|x| x.syn.clone()).collect(),
        teacher_image: stack(&|x| &x.image_emb)?,
        teacher_gt: stack(&|x| &x.gt_emb)?,
        teacher_syn: stack(&|x| &x.syn_emb)?,
    })
}
