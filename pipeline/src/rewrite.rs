//! Adding columns to the shards of an existing DFNDR output (`dfndr embed`, `dfndr caption`).
//!
//! Each done shard is read, updated in memory, rewritten to a staged file, published
//! atomically and its done record updated. A rerun skips shards that already carry what the
//! update adds (and repairs a done record left stale by a crash between publish and record),
//! so the commands can simply be run again after an interruption.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dfndr_augment::decode::decode_rgb;
use dfndr_augment::rgb::RgbImage;
use dfndr_shards::format::{FileMeta, Layout, Row, ShardReader, SCHEMA_VERSION};
use dfndr_shards::job::{sha256_of, DoneRecord, Job, WorkerIdentity};
use dfndr_shards::store::{local_path_of, open_input, open_store};
use dfndr_shards::wds::{ReaderLimits, WdsEvent, WdsReader};
use rayon::prelude::*;

use crate::config::JobConfig;
use crate::output;
use crate::progress::Progress;

/// One kind of column update.
pub trait ShardUpdate {
    /// Past participle for messages ("embedded", "captioned").
    fn verb(&self) -> &'static str;
    /// Whether a shard already carries what this update adds.
    fn is_current(&self, meta: &FileMeta, layout: &Layout) -> bool;
    /// The layout and metadata after the update.
    fn updated(&self, meta: &FileMeta, layout: &Layout) -> Result<(FileMeta, Layout)>;
    /// Updates one batch of rows in place (`images` decodes their originals on demand);
    /// `meta` and `old` describe the shard as it was read.
    fn update_batch(
        &self,
        rows: &mut [Row],
        images: &Originals,
        meta: &FileMeta,
        old: &Layout,
    ) -> Result<()>;
}

/// Applies `update` to every done shard of `output`.
pub fn run(
    config: &JobConfig,
    output: &str,
    update: &dyn ShardUpdate,
    progress: &Progress,
) -> Result<ExitCode> {
    let store = open_store(output)?;
    let job = Job::new(
        store,
        WorkerIdentity::current(0),
        Duration::from_secs_f64(config.job.lease_seconds),
    );
    if job.read_card()?.is_none() {
        bail!("{output} is not a dfndr output: it has no dfndr.json");
    }
    let root = local_path_of(output)?;
    let done = job.all_done()?;
    if done.is_empty() {
        bail!("{output} has no done shards yet; run `dfndr reinforce` first");
    }
    progress.set_total(done.len());
    let (mut changed, mut skipped) = (0usize, 0usize);
    for (name, record) in &done {
        let path = root.join(&record.output);
        progress.shard_started(name);
        let started = Instant::now();
        let outcome = update_shard(&job, update, config, name, record, &path, progress)
            .with_context(|| {
                format!(
                    "cannot update shard {name} ({}) ({})",
                    path.display(),
                    update.verb()
                )
            })?;
        match outcome {
            Some(rows) => {
                changed += 1;
                tracing::info!(shard = %name, rows, seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "shard {}", update.verb());
                progress.shard_finished(rows);
            }
            None => {
                skipped += 1;
                progress.shard_finished(0);
            }
        }
    }
    progress.finish();
    job.rebuild_manifest(SCHEMA_VERSION)?;
    eprintln!(
        "{changed} shards {}, {skipped} were already up to date ({} done shards)",
        update.verb(),
        done.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Updates one shard; `None` when it was already up to date.
fn update_shard(
    job: &Job,
    update: &dyn ShardUpdate,
    config: &JobConfig,
    name: &str,
    record: &DoneRecord,
    path: &Path,
    progress: &Progress,
) -> Result<Option<u64>> {
    let reader = ShardReader::open_path(path)?;
    let meta: FileMeta = reader.meta().clone();
    let old: Layout = reader.layout().clone();
    if update.is_current(&meta, &old) {
        repair_done_record(job, name, record, path)?;
        return Ok(None);
    }
    let (new_meta, layout) = update.updated(&meta, &old)?;
    let mut rows: Vec<Row> = reader.rows()?.collect::<Result<_, _>>()?;
    let originals = Originals::read(&rows, config.reader.max_pixels)?;
    for batch in rows.chunks_mut(config.job.batch_size.max(1)) {
        update.update_batch(batch, &originals, &meta, &old)?;
        progress.samples(batch.len() as u64);
    }

    let store = job.store();
    store.discard_abandoned_staged(&record.output)?;
    let mut writer = output::open(
        store.as_ref(),
        &record.output,
        layout,
        &new_meta,
        config.output.row_group_rows,
    )?;
    for row in &rows {
        writer.write_row(row)?;
    }
    let finished = output::finish(writer, &store.uri_of(&record.output))?;
    finished.staged.commit()?;
    job.write_done(
        name,
        &DoneRecord {
            bytes: finished.bytes,
            sha256: finished.sha256,
            rows: finished.rows,
            ..record.clone()
        },
    )?;
    Ok(Some(finished.rows))
}

/// Makes the done record describe the file again after a crash between publish and record.
fn repair_done_record(job: &Job, name: &str, record: &DoneRecord, path: &Path) -> Result<()> {
    let size = std::fs::metadata(path)?.len();
    if size == record.bytes {
        return Ok(());
    }
    let (sha256, bytes) = sha256_of(std::fs::File::open(path)?)?;
    tracing::warn!(
        shard = name,
        "done record was stale (interrupted update); repaired"
    );
    job.write_done(
        name,
        &DoneRecord {
            bytes,
            sha256,
            ..record.clone()
        },
    )?;
    Ok(())
}

/// The original images of a shard's rows: the `image` column when the job embedded images,
/// otherwise the bytes read back from the input shards named in `source`.
pub struct Originals {
    from_sources: HashMap<String, Vec<u8>>,
    max_pixels: u64,
}

impl Originals {
    /// Reads what the rows do not carry themselves (one pass per source shard).
    pub fn read(rows: &[Row], max_pixels: u64) -> Result<Self> {
        let mut wanted: HashMap<&str, HashSet<&str>> = HashMap::new();
        for row in rows.iter().filter(|r| r.image.is_none()) {
            wanted
                .entry(row.source.as_str())
                .or_default()
                .insert(row.key.as_str());
        }
        let mut found = HashMap::new();
        for (source, keys) in wanted {
            let input = open_input(source).with_context(|| {
                format!("the shard does not embed images and its source {source} cannot be opened")
            })?;
            for event in WdsReader::new(input, ReaderLimits::default()) {
                match event {
                    Ok(WdsEvent::Sample(s)) if keys.contains(s.key.as_str()) => {
                        found.insert(s.key, s.image);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(anyhow!(e)).with_context(|| format!("cannot read {source}"))
                    }
                }
            }
            if let Some(missing) = keys.iter().find(|k| !found.contains_key(**k)) {
                bail!("key {missing:?} not found in the source shard {source}");
            }
        }
        Ok(Self {
            from_sources: found,
            max_pixels,
        })
    }

    /// The original encoded image of `row`.
    pub fn bytes<'a>(&'a self, row: &'a Row) -> Option<&'a [u8]> {
        row.image
            .as_deref()
            .or_else(|| self.from_sources.get(&row.key).map(Vec::as_slice))
    }

    /// Decodes the original image of `row`.
    pub fn decode(&self, row: &Row) -> Result<RgbImage> {
        let bytes = self
            .bytes(row)
            .ok_or_else(|| anyhow!("no image for key {}", row.key))?;
        decode_rgb(bytes, self.max_pixels)
            .with_context(|| format!("cannot decode the image of {}", row.key))
    }

    /// `f` of every row's decoded original, in parallel.
    pub fn map<T: Send>(
        &self,
        rows: &[Row],
        f: impl Fn(&Row, RgbImage) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        rows.par_iter()
            .map(|row| f(row, self.decode(row)?))
            .collect()
    }
}
