//! `dfndr embed`: adds teacher embeddings to the shards of an existing DFNDR output (e.g. one
//! written without teachers, or imported), replaying each row's stored views.
//!
//! Each shard is rewritten to a staged file, published atomically and its done record
//! updated; a rerun skips shards that already carry this ensemble's embeddings (and repairs a
//! done record left stale by a crash between the two steps).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dfndr_augment::decode::decode_rgb;
use dfndr_augment::params::AugConfig;
use dfndr_augment::rgb::RgbImage;
use dfndr_shards::format::{
    FileMeta, Layout, Row, ShardReader, ShardWriter, WriterOptions, SCHEMA_VERSION,
};
use dfndr_shards::job::{sha256_of, DoneRecord, HashingWriter, Job, WorkerIdentity};
use dfndr_shards::store::{local_path_of, open_input, open_store};
use dfndr_shards::wds::{ReaderLimits, WdsEvent, WdsReader};
use rayon::prelude::*;

use crate::config::JobConfig;
use crate::embed::EmbedStage;
use crate::paug::from_stored;
use crate::progress::Progress;

/// Embeds every done shard of `output` with the config's teachers.
pub fn run(
    config: &JobConfig,
    output: &str,
    device: Option<&str>,
    progress: &Progress,
) -> Result<ExitCode> {
    if config.teachers.is_empty() {
        bail!("the config has no [[teachers]]: nothing to embed with");
    }
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
    let stage = EmbedStage::load(&config.teachers, &config.embed, device)?;
    let infos = stage.teacher_infos();
    progress.set_total(done.len());
    let (mut embedded, mut skipped) = (0usize, 0usize);
    for (name, record) in &done {
        let path = root.join(&record.output);
        progress.shard_started(name);
        let started = Instant::now();
        let outcome = embed_shard(&job, &stage, &infos, config, name, record, &path, progress)
            .with_context(|| format!("cannot embed shard {name} ({})", path.display()))?;
        match outcome {
            Some(rows) => {
                embedded += 1;
                tracing::info!(shard = %name, rows, seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "shard embedded");
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
        "{embedded} shards embedded, {skipped} already had these teachers' embeddings ({} done shards)",
        done.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Embeds one shard; `None` when it already had these embeddings.
#[allow(clippy::too_many_arguments)]
fn embed_shard(
    job: &Job,
    stage: &EmbedStage,
    infos: &[dfndr_shards::format::TeacherInfo],
    config: &JobConfig,
    name: &str,
    record: &DoneRecord,
    path: &Path,
    progress: &Progress,
) -> Result<Option<u64>> {
    let reader = ShardReader::open_path(path)?;
    let meta: FileMeta = reader.meta().clone();
    let old: Layout = reader.layout().clone();
    if old.text_emb && meta.teachers.as_slice() == infos {
        repair_done_record(job, name, record, path)?;
        return Ok(None);
    }
    let aug: Option<AugConfig> = if old.paug {
        Some(
            serde_json::from_value(meta.augmentation.clone())
                .context("the shard's augmentation metadata is not a dfndr augmentation config")?,
        )
    } else {
        None
    };
    let mut rows: Vec<Row> = reader.rows()?.collect::<Result<_, _>>()?;
    let originals = if aug.is_some() {
        originals_of(&rows)?
    } else {
        HashMap::new()
    };

    let layout = Layout {
        emb: Some(stage.emb_layout()),
        image_emb: old.paug,
        text_emb: true,
        syn: old
            .syn
            .iter()
            .map(|s| dfndr_shards::format::SynLayout {
                tag: s.tag.clone(),
                with_emb: true,
            })
            .collect(),
        ..old.clone()
    };
    let meta = FileMeta {
        teachers: infos.to_vec(),
        ..meta
    };
    for batch in rows.chunks_mut(config.job.batch_size.max(1)) {
        if let Some(aug) = &aug {
            let views: Vec<Vec<RgbImage>> = batch
                .par_iter()
                .map(|row| {
                    let bytes = row
                        .image
                        .as_deref()
                        .or_else(|| originals.get(&row.key).map(Vec::as_slice))
                        .ok_or_else(|| anyhow!("no image for key {}", row.key))?;
                    let img = decode_rgb(bytes, config.reader.max_pixels)
                        .with_context(|| format!("cannot decode the image of {}", row.key))?;
                    row.paug
                        .iter()
                        .map(|p| Ok(aug.replay(&img, &from_stored(p)?, aug.size)))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?;
            let groups: Vec<&[RgbImage]> = views.iter().map(Vec::as_slice).collect();
            for (row, embs) in batch.iter_mut().zip(stage.embed_view_groups(&groups)?) {
                row.image_emb = embs;
            }
        }
        // Per row: the ground-truth caption, then every synthetic caption.
        let texts: Vec<Vec<&str>> = batch
            .iter()
            .map(|row| {
                std::iter::once(row.caption.as_str())
                    .chain(
                        row.syn
                            .iter()
                            .flat_map(|s| s.texts.iter().map(String::as_str)),
                    )
                    .collect()
            })
            .collect();
        let text_embs = stage.embed_text_groups(&texts)?;
        for (row, embs) in batch.iter_mut().zip(text_embs) {
            let mut embs = embs.into_iter();
            row.text_emb = embs.next().into_iter().collect();
            for syn in row.syn.iter_mut() {
                syn.emb = embs.by_ref().take(syn.texts.len()).collect();
            }
        }
        progress.samples(batch.len() as u64);
    }

    let store = job.store();
    store.discard_abandoned_staged(&record.output)?;
    let staged = store.create_staged(&record.output)?;
    let mut writer = ShardWriter::new(
        HashingWriter::new(staged),
        layout,
        &meta,
        WriterOptions {
            row_group_rows: config.output.row_group_rows,
        },
    )?;
    for row in &rows {
        writer.write_row(row)?;
    }
    let (n, hashing) = writer.into_inner()?;
    let (mut staged, bytes, sha256) = hashing.finish();
    staged.flush().context("cannot flush the output")?;
    staged.commit()?;
    job.write_done(
        name,
        &DoneRecord {
            bytes,
            sha256,
            rows: n,
            ..record.clone()
        },
    )?;
    Ok(Some(n))
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
        "done record was stale (interrupted embed); repaired"
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

/// The original image bytes of rows without an `image` column, read from their source
/// shards (one pass per source).
fn originals_of(rows: &[Row]) -> Result<HashMap<String, Vec<u8>>> {
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
                Err(e) => return Err(anyhow!(e)).with_context(|| format!("cannot read {source}")),
            }
        }
        if let Some(missing) = keys.iter().find(|k| !found.contains_key(**k)) {
            bail!("key {missing:?} not found in the source shard {source}");
        }
    }
    Ok(found)
}
