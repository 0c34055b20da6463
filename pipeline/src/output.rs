//! A shard's parquet output on its way to being published: written under a temporary name
//! through a hashing writer, finished, then committed by the caller (`reinforce`, `import-wds`,
//! and the rewrites of `embed` / `caption` all publish the same way).

use anyhow::{Context, Result};
use dfndr_shards::format::{FileMeta, Layout, ShardWriter, WriterOptions};
use dfndr_shards::job::HashingWriter;
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
