//! Adding columns to the done shards of an existing DFNDR output (`dfndr embed`, `dfndr
//! caption`), as a task of the worker loop in [`crate::executor`]: claims, heartbeats,
//! takeover, retries and any number of workers, like `dfndr reinforce`.
//!
//! Each done shard is streamed in batches of `job.batch_size` rows; each batch's original
//! images come from the rows' `image` column or, in row order, from their source shards
//! ([`OriginalsCursor`]), so memory holds one batch, never a shard. The updated shard is
//! written to a staged output, published over the old one, and its done record updated; then
//! the task's own completion record (`_progress/tasks/TASK/done`) names the update and the
//! file it produced, so a rerun skips it. A row whose original image is missing or does not
//! decode is dropped and counted in the done record's skip reasons; it never fails its shard.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use dfndr_augment::decode::decode_rgb;
use dfndr_augment::rgb::RgbImage;
use dfndr_dataset::views::check_original;
use dfndr_shards::format::{FileMeta, Layout, Row, ShardReader};
use dfndr_shards::job::{sha256_of, DoneRecord, Job};
use dfndr_shards::originals::OriginalsCursor;
use dfndr_shards::shardlist::ShardRef;
use dfndr_shards::spool::Spool;
use dfndr_shards::store::local_copy;
use dfndr_shards::wds::ReaderLimits;
use rayon::prelude::*;

use crate::config::JobConfig;
use crate::executor::{ShardContext, ShardResult, ShardTask};
use crate::output;

/// One kind of column update.
pub trait ShardUpdate: Sync {
    /// Past participle for messages ("embedded", "captioned").
    fn verb(&self) -> &'static str;
    /// Name of the task's records (`embed`, `caption`).
    fn task(&self) -> &'static str;
    /// Identity of what the update adds (its teachers or captioners), recorded with every
    /// shard it updated: a changed config updates the shards again.
    fn key(&self) -> String;
    /// Whether a shard already carries what this update adds.
    fn is_current(&self, meta: &FileMeta, layout: &Layout) -> bool;
    /// Whether the update needs the rows' original images.
    fn needs_images(&self, old: &Layout) -> bool;
    /// The layout and metadata after the update.
    fn updated(&self, meta: &FileMeta, layout: &Layout) -> Result<(FileMeta, Layout)>;
    /// Updates one batch of rows in place (`images` holds their decoded originals when
    /// [`ShardUpdate::needs_images`]); `meta` and `old` describe the shard as it was read.
    fn update_batch(
        &self,
        rows: &mut [Row],
        images: &Originals,
        meta: &FileMeta,
        old: &Layout,
    ) -> Result<()>;
}

/// The decoded original images of one batch of rows, in row order (empty when the update
/// needs none).
pub struct Originals {
    images: Vec<RgbImage>,
}

impl Originals {
    /// `f` of every row and its decoded original, in parallel.
    pub fn map<T: Send>(
        &self,
        rows: &[Row],
        f: impl Fn(&Row, &RgbImage) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        if self.images.len() != rows.len() {
            return Err(anyhow!(
                "{} rows but {} original images",
                rows.len(),
                self.images.len()
            ));
        }
        rows.par_iter()
            .zip(self.images.par_iter())
            .map(|(row, img)| f(row, img))
            .collect()
    }
}

/// A column update over the done shards of an output, as a task of the executor.
pub struct Rewrite<'a> {
    /// The update.
    pub update: &'a dyn ShardUpdate,
    /// Job control of the output (done records, manifest).
    pub output: Job,
    /// The task's own job control (claims, failures, completion records).
    pub job: Job,
    /// The job config (batch size, reader limits, row groups).
    pub config: &'a JobConfig,
    /// Local copies of the source shards.
    pub spool: Spool,
}

impl Rewrite<'_> {
    /// The done shards of the output, as the task's shard list.
    pub fn shards(&self) -> Result<Vec<ShardRef>> {
        Ok(self
            .output
            .all_done()?
            .into_iter()
            .map(|(name, record)| ShardRef {
                uri: record.input,
                name,
            })
            .collect())
    }

    /// Reads a batch's original images (counting and dropping the rows without one) and
    /// decodes them in parallel (likewise for the ones that do not decode).
    fn originals(
        &self,
        rows: Vec<Row>,
        cursor: &mut OriginalsCursor<'_>,
        skipped: &mut BTreeMap<String, u64>,
        shard: &str,
    ) -> Result<(Vec<Row>, Originals)> {
        let mut found = Vec::with_capacity(rows.len());
        for row in rows {
            match cursor.original(&row)? {
                Ok(bytes) => found.push((row, bytes)),
                Err(missing) => {
                    tracing::warn!(shard, key = %row.key, reason = missing.reason(), detail = ?missing, "row dropped: its original image cannot be read");
                    *skipped.entry(missing.reason().to_string()).or_default() += 1;
                }
            }
        }
        let max_pixels = self.config.reader.max_pixels;
        let decoded: Vec<_> = found
            .into_par_iter()
            .map(|(row, bytes)| {
                let img = decode_rgb(&bytes, max_pixels);
                (row, img)
            })
            .collect();
        let (mut kept, mut images) = (Vec::new(), Vec::new());
        for (row, img) in decoded {
            match img {
                Ok(img) if check_original(row.width, row.height, &img).is_err() => {
                    tracing::warn!(shard, key = %row.key, "row dropped: its original image is {}x{}, the row records {}x{} (its source changed)", img.width, img.height, row.width, row.height);
                    *skipped.entry("changed_original".to_string()).or_default() += 1;
                }
                Ok(img) => {
                    kept.push(row);
                    images.push(img);
                }
                Err(e) => {
                    tracing::warn!(shard, key = %row.key, error = %e, "row dropped: its original image does not decode");
                    *skipped.entry("undecodable_image".to_string()).or_default() += 1;
                }
            }
        }
        Ok((kept, Originals { images }))
    }

    /// Records that `record` (the shard as published) carries this update.
    fn mark_done(&self, name: &str, record: &DoneRecord) -> Result<()> {
        self.job.write_done(
            name,
            &DoneRecord {
                config_fingerprint: self.update.key(),
                ..record.clone()
            },
        )?;
        Ok(())
    }
}

impl ShardTask for Rewrite<'_> {
    fn verb(&self) -> &'static str {
        self.update.verb()
    }

    fn is_done(&self, shard: &ShardRef) -> Result<bool> {
        let (Some(mark), Some(record)) = (
            self.job.done_record(&shard.name)?,
            self.output.done_record(&shard.name)?,
        ) else {
            return Ok(false);
        };
        Ok(mark.config_fingerprint == self.update.key() && mark.sha256 == record.sha256)
    }

    fn process(&self, shard: &ShardRef, ctx: &ShardContext<'_>) -> Result<ShardResult> {
        let started = Instant::now();
        let name = shard.name.as_str();
        let record = self
            .output
            .done_record(name)?
            .ok_or_else(|| anyhow!("shard {name} has no done record"))?;
        let store = self.output.store();
        let copy = local_copy(store.as_ref(), &record.output)?;
        let reader = ShardReader::open_path(copy.path())
            .with_context(|| format!("cannot read {}", store.uri_of(&record.output)))?;
        let meta = reader.meta().clone();
        let old = reader.layout().clone();
        if self.update.is_current(&meta, &old) {
            let record = repair_done_record(&self.output, name, &record, copy.path())?;
            self.mark_done(name, &record)?;
            return Ok(ShardResult::Done(record));
        }
        let (new_meta, layout) = self.update.updated(&meta, &old)?;
        store.discard_abandoned_staged(&record.output)?;
        let output_uri = store.uri_of(&record.output);
        let mut writer = output::open(
            store.as_ref(),
            &record.output,
            layout,
            &new_meta,
            self.config.output.row_group_rows,
        )?;
        ctx.progress.shard_started(name);
        let limits = ReaderLimits {
            max_member_bytes: self.config.reader.max_member_bytes,
        };
        let mut cursor = OriginalsCursor::new(&self.spool, limits);
        let mut skipped = record.skipped.clone();
        let needs_images = self.update.needs_images(&old);
        let batch_size = self.config.job.batch_size.max(1);
        let mut rows = reader.rows()?;
        loop {
            let batch: Vec<Row> = rows.by_ref().take(batch_size).collect::<Result<_, _>>()?;
            if batch.is_empty() {
                break;
            }
            let (mut batch, images) = if needs_images {
                self.originals(batch, &mut cursor, &mut skipped, name)?
            } else {
                (batch, Originals { images: Vec::new() })
            };
            if !batch.is_empty() {
                self.update.update_batch(&mut batch, &images, &meta, &old)?;
            }
            for row in &batch {
                writer
                    .write_row(row)
                    .with_context(|| format!("cannot write {output_uri}"))?;
            }
            ctx.progress.samples(batch.len() as u64);
            ctx.liveness.beat();
            if let Some(stop) = ctx.stopped() {
                return Ok(stop);
            }
        }
        let finished = output::finish(writer, &output_uri)?;
        if !ctx.may_publish(name)? {
            return Ok(ShardResult::Lost);
        }
        let (rows, bytes, sha256) = (finished.rows, finished.bytes, finished.sha256.clone());
        finished.staged.commit()?;
        let updated = DoneRecord {
            bytes,
            sha256,
            rows,
            skipped,
            seconds: record.seconds + started.elapsed().as_secs_f64(),
            ..record
        };
        self.output.write_done(name, &updated)?;
        self.mark_done(name, &updated)?;
        Ok(ShardResult::Done(updated))
    }
}

/// Makes the done record describe the file again after a crash between publish and record;
/// returns the record that holds.
fn repair_done_record(
    job: &Job,
    name: &str,
    record: &DoneRecord,
    path: &std::path::Path,
) -> Result<DoneRecord> {
    let (sha256, bytes) = sha256_of(std::fs::File::open(path)?)?;
    if sha256 == record.sha256 && bytes == record.bytes {
        return Ok(record.clone());
    }
    tracing::warn!(
        shard = name,
        "done record was stale (interrupted update); repaired"
    );
    let repaired = DoneRecord {
        bytes,
        sha256,
        ..record.clone()
    };
    job.write_done(name, &repaired)?;
    Ok(repaired)
}
