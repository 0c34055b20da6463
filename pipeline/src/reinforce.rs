//! `dfndr reinforce`: the processing of one shard, a task of the worker loop in
//! [`crate::executor`].
//!
//! A shard runs through the staged executor of [`crate::stages`]: read (streaming tar, in
//! batches of `job.batch_size`), decode and augmentation parameters (`paug`, rendered views
//! and captioner inputs, in the rayon pool), synthetic captions (`syn_text_TAG`), teacher
//! embeddings of every view and caption (`image_emb`, `text_emb`, `syn_text_TAG_emb`), write
//! (parquet), each stage on its own thread; then publish (output, then done record).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use dfndr_augment::decode::{decode_rgb, DecodeError};
use dfndr_augment::params::AugParams;
use dfndr_augment::rgb::RgbImage;
use dfndr_shards::format::{FileMeta, Layout, Paug, Row, ShardWriter, SynCaptions};
use dfndr_shards::job::{self, Job};
use dfndr_shards::shardlist::ShardRef;
use dfndr_shards::spool::Spool;
use dfndr_shards::wds::{RawSample, ReaderLimits, SkipReason, WdsEvent, WdsReader};
use rayon::prelude::*;

use crate::caption::CaptionStage;
use crate::config::JobConfig;
use crate::crash::pace;
use crate::embed::EmbedStage;
use crate::executor::{ShardContext, ShardResult, ShardTask};
use crate::liveness::Liveness;
use crate::output;
use crate::progress::Progress;
use crate::stages::{self, StageBusy};
use dfndr_dataset::paug::to_stored;

/// The generation of shards from input shards, as a task of the [`Executor`].
pub struct Reinforce {
    /// Job control over the output.
    pub job: Job,
    /// The config.
    pub config: JobConfig,
    /// Its fingerprint.
    pub fingerprint: String,
    /// The teacher stage, when the config has teachers.
    pub embed: Option<EmbedStage>,
    /// The caption stage, when the config has captioners.
    pub caption: Option<CaptionStage>,
    /// Local copies of the input shards (object-store inputs downloaded, ahead of use).
    pub spool: Spool,
}

/// A decoded sample: its size, its views' parameters and, when teachers run, the views.
struct Decoded {
    width: u32,
    height: u32,
    params: Vec<AugParams>,
    views: Vec<RgbImage>,
    /// Each captioner's preprocessed input, when captioners run.
    caption_inputs: Vec<Vec<f32>>,
}

/// What the model stages produced for one kept sample.
#[derive(Default)]
struct Generated {
    image_emb: Vec<Vec<f32>>,
    text_emb: Vec<Vec<f32>>,
    syn: Vec<SynCaptions>,
}

/// Consecutive input samples, and the reasons of the samples the reader skipped among them.
struct ReadBatch {
    samples: Vec<RawSample>,
    skips: Vec<SkipReason>,
}

/// One input sample on its way through the stages.
struct Item {
    sample: RawSample,
    /// Its decoded image and views, or why it is skipped.
    decoded: Result<Decoded, (SkipReason, String)>,
    /// What the model stages have added so far.
    generated: Generated,
}

/// A batch after decoding: every sample of the [`ReadBatch`] in input order.
struct Batch {
    items: Vec<Item>,
    reader_skips: Vec<SkipReason>,
}

/// The reader stage: groups the shard's samples into batches of `batch_size` and sends them
/// downstream, then the end of input (or the read error). Stops without an end message when
/// `stop` says so. Returns the seconds spent reading.
fn read_stage<R: std::io::Read>(
    events: &mut WdsReader<R>,
    batch_size: usize,
    uri: &str,
    out: std::sync::mpsc::SyncSender<stages::Message<ReadBatch>>,
    stop: &dyn Fn() -> bool,
    liveness: &Liveness,
) -> f64 {
    let mut busy = 0.0;
    loop {
        if stop() {
            return busy;
        }
        let started = Instant::now();
        let mut batch = ReadBatch {
            samples: Vec::with_capacity(batch_size),
            skips: Vec::new(),
        };
        let mut end = false;
        let mut error = None;
        while batch.samples.len() < batch_size {
            match events.next() {
                None => {
                    end = true;
                    break;
                }
                Some(Ok(WdsEvent::Sample(s))) => batch.samples.push(s),
                Some(Ok(WdsEvent::Skip(skip))) => {
                    tracing::debug!(shard = uri, key = %skip.key, reason = %skip.reason, detail = %skip.detail, "sample skipped");
                    batch.skips.push(skip.reason);
                }
                Some(Err(e)) => {
                    error = Some(anyhow!(e).context(format!("cannot read input shard {uri}")));
                    break;
                }
            }
        }
        busy += started.elapsed().as_secs_f64();
        liveness.beat();
        if let Some(e) = error {
            let _ = out.send(Err(e));
            return busy;
        }
        if (!batch.samples.is_empty() || !batch.skips.is_empty())
            && out.send(Ok(Some(batch))).is_err()
        {
            return busy;
        }
        if end {
            let _ = out.send(Ok(None));
            return busy;
        }
    }
}

impl ShardTask for Reinforce {
    fn verb(&self) -> &'static str {
        "done"
    }

    fn is_done(&self, shard: &ShardRef) -> Result<bool> {
        Ok(self.job.is_done(&shard.name, &self.fingerprint)?)
    }

    fn prefetch(&self, shard: &ShardRef) {
        self.spool.prefetch(&shard.uri);
    }

    fn process(&self, shard: &ShardRef, ctx: &ShardContext<'_>) -> Result<ShardResult> {
        self.process_shard(shard, ctx)
    }
}

impl Reinforce {
    /// The output layout of this job: only the columns of stages that exist.
    fn layout(&self) -> Layout {
        let paug = self.config.augment.num_augmentations > 0;
        Layout {
            embed_images: self.config.output.embed_images,
            paug,
            emb: self.embed.as_ref().map(EmbedStage::emb_layout),
            image_emb: paug && self.embed.is_some(),
            text_emb: self.embed.is_some(),
            syn: self
                .caption
                .as_ref()
                .map(|c| c.syn_layouts(self.embed.is_some()))
                .unwrap_or_default(),
        }
    }

    /// Decodes a sample, samples its views' parameters and, when teachers run, renders them.
    fn decode_sample(&self, sample: &RawSample) -> Result<Decoded, (SkipReason, String)> {
        let img = match decode_rgb(&sample.image, self.config.reader.max_pixels) {
            Ok(img) => img,
            Err(e @ DecodeError::TooLarge { .. }) => {
                return Err((SkipReason::ImageTooLarge, e.to_string()))
            }
            Err(e @ DecodeError::Empty) => return Err((SkipReason::EmptyImage, e.to_string())),
            Err(e) => return Err((SkipReason::UndecodableImage, e.to_string())),
        };
        let aug = &self.config.augment;
        let params: Vec<AugParams> = (0..aug.num_augmentations)
            .map(|k| aug.sample(self.config.job.seed, &sample.key, k, img.width, img.height))
            .collect();
        let views = if self.embed.is_some() {
            params
                .iter()
                .map(|p| aug.replay(&img, p, aug.size))
                .collect()
        } else {
            Vec::new()
        };
        let caption_inputs = self
            .caption
            .as_ref()
            .map(|c| c.prepare(&img))
            .unwrap_or_default();
        Ok(Decoded {
            width: img.width,
            height: img.height,
            params,
            views,
            caption_inputs,
        })
    }

    /// The caption stage on a batch: every kept sample's synthetic captions, per captioner.
    fn caption_stage(&self, stage: &CaptionStage, mut batch: Batch) -> Result<Batch> {
        let kept: Vec<(&str, &[Vec<f32>])> = batch
            .items
            .iter()
            .filter_map(|it| {
                let d = it.decoded.as_ref().ok()?;
                Some((it.sample.key.as_str(), d.caption_inputs.as_slice()))
            })
            .collect();
        let keys: Vec<&str> = kept.iter().map(|(k, _)| *k).collect();
        let inputs: Vec<&[Vec<f32>]> = kept.iter().map(|(_, i)| *i).collect();
        let captions = stage.caption_batch(&keys, &inputs)?;
        for per_sample in captions {
            let kept_items = batch.items.iter_mut().filter(|it| it.decoded.is_ok());
            for (item, texts) in kept_items.zip(per_sample) {
                item.generated.syn.push(SynCaptions {
                    texts,
                    emb: Vec::new(),
                });
            }
        }
        Ok(batch)
    }

    /// The teacher stage on a batch: every kept sample's view embeddings, then the text
    /// embeddings of its caption and its synthetic captions (in one text batch).
    fn teacher_stage(&self, stage: &EmbedStage, mut batch: Batch) -> Result<Batch> {
        let kept: Vec<&Item> = batch.items.iter().filter(|it| it.decoded.is_ok()).collect();
        let views: Vec<&[RgbImage]> = kept
            .iter()
            .filter_map(|it| it.decoded.as_ref().ok().map(|d| d.views.as_slice()))
            .collect();
        let texts: Vec<Vec<&str>> = kept
            .iter()
            .map(|it| {
                std::iter::once(it.sample.caption.as_str())
                    .chain(
                        it.generated
                            .syn
                            .iter()
                            .flat_map(|c| c.texts.iter().map(String::as_str)),
                    )
                    .collect()
            })
            .collect();
        let image_embs = stage.embed_view_groups(&views)?;
        let text_embs = stage.embed_text_groups(&texts)?;
        let kept_items = batch.items.iter_mut().filter(|it| it.decoded.is_ok());
        for ((item, image_emb), text_emb) in kept_items.zip(image_embs).zip(text_embs) {
            let g = &mut item.generated;
            let mut rest = text_emb.into_iter();
            g.text_emb = rest.by_ref().take(1).collect();
            for syn in &mut g.syn {
                syn.emb = rest.by_ref().take(syn.texts.len()).collect();
            }
            g.image_emb = image_emb;
            // The views are no longer needed: free them before the batch waits for the writer.
            if let Ok(d) = &mut item.decoded {
                d.views = Vec::new();
            }
        }
        Ok(batch)
    }

    /// The writer stage on a batch: a row per kept sample, in input order; skips counted.
    fn write_batch<W: std::io::Write + Send>(
        &self,
        batch: Batch,
        uri: &str,
        writer: &mut ShardWriter<W>,
        skipped: &mut BTreeMap<String, u64>,
        progress: &Progress,
    ) -> Result<()> {
        for reason in batch.reader_skips {
            *skipped.entry(reason.as_str().to_string()).or_default() += 1;
        }
        for item in batch.items {
            let sample = item.sample;
            match item.decoded {
                Ok(d) => {
                    let g = item.generated;
                    let row = Row {
                        paug: d.params.iter().map(to_stored).collect::<Vec<Paug>>(),
                        key: sample.key,
                        source: uri.to_string(),
                        url: sample.url,
                        caption: sample.caption,
                        width: d.width,
                        height: d.height,
                        image: self.config.output.embed_images.then_some(sample.image),
                        image_emb: g.image_emb,
                        text_emb: g.text_emb,
                        syn: g.syn,
                    };
                    writer.write_row(&row)?;
                    progress.samples(1);
                }
                Err((reason, detail)) => {
                    tracing::debug!(shard = uri, key = %sample.key, %reason, %detail, "sample skipped");
                    *skipped.entry(reason.as_str().to_string()).or_default() += 1;
                }
            }
        }
        Ok(())
    }

    /// Reads, decodes and writes one shard, then publishes it (output, then done record).
    fn process_shard(&self, shard: &ShardRef, ctx: &ShardContext<'_>) -> Result<ShardResult> {
        let progress = ctx.progress;
        let started = Instant::now();
        let store = self.job.store();
        let output = job::output_path(&shard.name);
        let output_uri = store.uri_of(&output);
        store.discard_abandoned_staged(&output)?;

        let spooled = self
            .spool
            .take(&shard.uri)
            .with_context(|| format!("cannot open input shard {}", shard.uri))?;
        let input = spooled
            .open()
            .with_context(|| format!("cannot open input shard {}", shard.uri))?;
        let limits = ReaderLimits {
            max_member_bytes: self.config.reader.max_member_bytes,
        };
        let mut events = WdsReader::new(input, limits);

        let layout = self.layout();
        let meta = FileMeta {
            source: shard.uri.clone(),
            config_fingerprint: self.fingerprint.clone(),
            augmentation: augmentation_meta(&self.config),
            teachers: self
                .embed
                .as_ref()
                .map(EmbedStage::teacher_infos)
                .unwrap_or_default(),
            captioners: self
                .caption
                .as_ref()
                .map(CaptionStage::infos)
                .unwrap_or_default(),
            ..FileMeta::default()
        };
        let mut writer = output::open(
            store.as_ref(),
            &output,
            layout,
            &meta,
            self.config.output.row_group_rows,
        )?;

        let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
        let mut busy = StageBusy::default();
        progress.shard_started(&shard.name);
        let stopped = |busy_stage: &str| {
            let stop = ctx.stopped();
            if matches!(stop, Some(ShardResult::Interrupted)) {
                tracing::debug!(shard = %shard.name, stage = busy_stage, "stopping on a signal");
            }
            stop
        };
        let flow = std::thread::scope(|scope| -> Result<Option<ShardResult>> {
            let (read_tx, read_rx) = stages::channel::<ReadBatch>();
            let (decode_tx, decode_rx) = stages::channel::<Batch>();
            let (caption_tx, caption_rx) = stages::channel::<Batch>();
            let (teacher_tx, teacher_rx) = stages::channel::<Batch>();
            let batch_size = self.config.job.batch_size;
            let uri = shard.uri.as_str();
            let liveness = ctx.liveness;
            let reader = scope.spawn(move || {
                read_stage(
                    &mut events,
                    batch_size,
                    uri,
                    read_tx,
                    &|| stopped("read").is_some(),
                    liveness,
                )
            });
            let decode = scope.spawn(move || {
                stages::run_stage(read_rx, decode_tx, liveness, |read: ReadBatch| {
                    pace("decode");
                    let decoded: Vec<_> = read
                        .samples
                        .par_iter()
                        .map(|s| self.decode_sample(s))
                        .collect();
                    let items = read
                        .samples
                        .into_iter()
                        .zip(decoded)
                        .map(|(sample, decoded)| Item {
                            sample,
                            decoded,
                            generated: Generated::default(),
                        })
                        .collect();
                    Ok(Batch {
                        items,
                        reader_skips: read.skips,
                    })
                })
            });
            let caption = scope.spawn(move || match &self.caption {
                Some(stage) => stages::run_stage(decode_rx, caption_tx, liveness, |b| {
                    self.caption_stage(stage, b)
                }),
                None => stages::run_stage(decode_rx, caption_tx, liveness, Ok),
            });
            let teachers = scope.spawn(move || match &self.embed {
                Some(stage) => stages::run_stage(caption_rx, teacher_tx, liveness, |b| {
                    self.teacher_stage(stage, b)
                }),
                None => stages::run_stage(caption_rx, teacher_tx, liveness, Ok),
            });
            let mut write_s = 0.0;
            let result = loop {
                if let Some(stop) = stopped("write") {
                    break Ok(Some(stop));
                }
                let batch = match teacher_rx.recv() {
                    Ok(Ok(Some(batch))) => batch,
                    Ok(Ok(None)) => break Ok(None),
                    Ok(Err(e)) => {
                        break Err(e.context(format!("shard {} failed", shard.name)));
                    }
                    // Every stage exits without a message only when it was told to stop.
                    Err(_) => break Ok(Some(stopped("write").unwrap_or(ShardResult::Interrupted))),
                };
                let started = Instant::now();
                if let Err(e) =
                    self.write_batch(batch, &shard.uri, &mut writer, &mut skipped, progress)
                {
                    break Err(e);
                }
                write_s += started.elapsed().as_secs_f64();
                liveness.beat();
            };
            // Unblocks the stages if the writer stopped early; then collects their timings.
            drop(teacher_rx);
            let stage_names = ["read", "decode", "caption", "teachers"];
            let handles = [reader, decode, caption, teachers];
            for (name, handle) in stage_names.into_iter().zip(handles) {
                match handle.join() {
                    Ok(seconds) => busy.add(name, seconds),
                    Err(_) => {
                        return Err(anyhow!("the {name} stage of shard {} panicked", shard.name))
                    }
                }
            }
            busy.add("write", write_s);
            result
        })?;
        if let Some(stop) = flow {
            return Ok(stop);
        }

        let finished = output::finish(writer, &output_uri)?;
        ctx.publish(
            &shard.name,
            finished,
            output::Producer {
                input: &shard.uri,
                output: &output,
                skipped,
                started,
                worker: &self.job.identity().worker,
                fingerprint: &self.fingerprint,
                stage_seconds: busy.0,
            },
        )
    }
}

/// The augmentation config as recorded in shard metadata and the dataset card (null when
/// the stage is off, so that no reader mistakes defaults for a stage that ran).
pub fn augmentation_meta(config: &JobConfig) -> serde_json::Value {
    if config.augment.num_augmentations == 0 {
        serde_json::Value::Null
    } else {
        // Through text, so float32 fields keep their shortest decimal form (0.08, not
        // 0.07999999821186066) for readers of the metadata.
        serde_json::to_string(&config.augment)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}
