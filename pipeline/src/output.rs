//! A shard's parquet output on its way to being published: written under a temporary name
//! through a hashing writer, finished, then committed by the caller (`reinforce`, `import-wds`,
//! and the rewrites of `embed` / `caption` all publish the same way).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use dfndr_shards::format::{FileMeta, Layout, ShardWriter, WriterOptions};
use dfndr_shards::job::HashingWriter;
use dfndr_shards::job::{now_unix, DoneRecord};
use dfndr_shards::store::{StagedWrite, Store};

/// The parquet writer of a staged output.
pub type OutputWriter = ShardWriter<HashingWriter<Box<dyn StagedWrite>>>;

/// Starts the staged output `path` of `store`.
pub fn open(
    store: &dyn Store,
    path: &str,
    layout: Layout,
    meta: &FileMeta,
    row_group_rows: usize,
) -> Result<OutputWriter> {
    let staged = store.create_staged(path)?;
    Ok(ShardWriter::new(
        HashingWriter::new(staged),
        layout,
        meta,
        WriterOptions { row_group_rows },
    )?)
}

/// A finished output: complete and flushed, not yet visible.
pub struct Finished {
    /// Rows written.
    pub rows: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
    /// The staged write, to commit (publish) or drop (discard).
    pub staged: Box<dyn StagedWrite>,
}

impl Finished {
    /// Publishes the output (the staged write becomes visible at its path) and returns the
    /// done record that describes it; the caller writes the record.
    pub fn commit(self, producer: Producer<'_>) -> Result<DoneRecord> {
        self.staged.commit()?;
        Ok(DoneRecord {
            input: producer.input.to_string(),
            output: producer.output.to_string(),
            rows: self.rows,
            skipped: producer.skipped,
            bytes: self.bytes,
            sha256: self.sha256,
            seconds: producer.started.elapsed().as_secs_f64(),
            worker: producer.worker.to_string(),
            finished_unix: now_unix(),
            config_fingerprint: producer.fingerprint.to_string(),
            stage_seconds: producer.stage_seconds,
        })
    }
}

/// What a done record says about how its output was produced.
pub struct Producer<'a> {
    /// Input shard URI.
    pub input: &'a str,
    /// Output path relative to the output root.
    pub output: &'a str,
    /// Skipped samples by reason.
    pub skipped: BTreeMap<String, u64>,
    /// When work on the shard started.
    pub started: Instant,
    /// The worker.
    pub worker: &'a str,
    /// Config fingerprint.
    pub fingerprint: &'a str,
    /// Per-stage working seconds (empty when not measured).
    pub stage_seconds: BTreeMap<String, f64>,
}

/// Writes the parquet footer and flushes; errors name `uri`.
pub fn finish(writer: OutputWriter, uri: &str) -> Result<Finished> {
    let (rows, hashing) = writer
        .into_inner()
        .with_context(|| format!("cannot write {uri}"))?;
    let (mut staged, bytes, sha256) = hashing.finish();
    std::io::Write::flush(&mut staged).with_context(|| format!("cannot write {uri}"))?;
    Ok(Finished {
        rows,
        bytes,
        sha256,
        staged,
    })
}
