//! The DFNDR parquet format, version 1: one parquet file per input shard, one row per kept sample.
//!
//! - [`schema`]: [`Layout`] (which optional columns a file has) and its arrow schema.
//! - [`row`]: the plain in-memory [`Row`] the pipeline produces and the trainer consumes.
//! - [`meta`]: [`FileMeta`], the self-describing key-value metadata of every file.
//! - [`writer`]: [`ShardWriter`], streaming rows into a zstd parquet file one row group at a time.
//! - [`reader`]: [`ShardReader`], checking the schema version first and decoding rows batch by batch.
//! - `physical`: the reader's checks of codecs, row counts, chunk ranges and page headers.
//! - [`values`]: the valid ranges of stored values (crop boxes, op indices, magnitudes), checked
//!   on write and on read.
//!
//! The user-facing description of the format is `docs/FORMAT.md`; the two must agree.

pub mod meta;
mod physical;
pub mod reader;
pub mod row;
pub mod schema;
pub mod values;
pub mod writer;

pub use meta::{CaptionerInfo, FileMeta, TeacherInfo};
pub use reader::{Rows, ShardReader};
pub use row::{AugOp, Paug, Row, SynCaptions, NUM_AUG_OPS};
pub use schema::{col, EmbDtype, EmbLayout, Layout, SynLayout};
pub use values::{
    magnitude_range, PaugError, ValueError, ValueLimits, MAX_AUG_SIZE, MAX_OPS_PER_VIEW, OP_NAMES,
};
pub use writer::{ShardWriter, WriterOptions};

/// The DFNDR format version this build writes and the only one it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything that can go wrong while describing, writing or reading a DFNDR file.
///
/// Messages name the offending column, metadata key or row so that a user holding a bad file
/// knows what to look at without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The bytes are not a parquet file at all (wrong magic, truncated footer, corrupt metadata).
    #[error("not a DFNDR file: it is not a readable parquet file ({0})")]
    NotParquet(#[source] parquet::errors::ParquetError),

    /// A parquet file without the `dfndr.schema_version` key-value entry.
    #[error("not a DFNDR file: key-value metadata has no dfndr.schema_version")]
    NotDfndr,

    /// A DFNDR file of a schema version this build cannot read.
    #[error(
        "unsupported DFNDR schema version: the file is version {found}, but this dfndr ({}) reads version {supported} only; upgrade dfndr, or re-export the file with a dfndr that writes version {supported}",
        env!("CARGO_PKG_VERSION")
    )]
    UnsupportedSchemaVersion {
        /// Version stored in the file.
        found: u32,
        /// Version this build reads ([`SCHEMA_VERSION`]).
        supported: u32,
    },

    /// A column chunk uses a compression codec this build cannot decode (DFNDR writes zstd;
    /// files rewritten by other tools may use their defaults, e.g. pyarrow's snappy).
    #[error(
        "column `{column}` is compressed with {codec}, which this dfndr cannot decode; DFNDR files use ZSTD: rewrite the file with zstd (pyarrow: pq.write_table(table, path, compression=\"zstd\"))"
    )]
    UnsupportedCompression {
        /// Parquet leaf column path of the first offending chunk.
        column: String,
        /// The codec, as parquet names it.
        codec: String,
    },

    /// A required key-value metadata entry is absent.
    #[error("DFNDR metadata is incomplete: key-value metadata has no {key}")]
    MissingMetadata {
        /// The missing key, e.g. `dfndr.teachers`.
        key: &'static str,
    },

    /// A key-value metadata entry is present but cannot be decoded.
    #[error("DFNDR metadata entry {key} is invalid: {reason}")]
    BadMetadata {
        /// The offending key.
        key: &'static str,
        /// What is wrong with its value.
        reason: String,
    },

    /// The [`FileMeta`] handed to the writer is inconsistent (e.g. a non-finite logit scale).
    #[error("invalid DFNDR file metadata: {0}")]
    InvalidMeta(String),

    /// The arrow schema is not a DFNDR v1 schema.
    #[error("not a DFNDR v1 schema: column `{column}`: {reason}")]
    Schema {
        /// The offending column (or the column that was expected where it is missing).
        column: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A [`Layout`] that cannot describe a valid file (bad synthetic-caption tag, embedding
    /// columns without an embedding layout, ...).
    #[error("invalid DFNDR layout: {0}")]
    InvalidLayout(String),

    /// A row that does not match the layout, refused by the writer or found by the reader.
    #[error("row {index} (key {key:?}) does not match the layout: {reason}")]
    RowMismatch {
        /// Zero-based index of the row in the file (as written or as read).
        index: u64,
        /// The row's `key`, or empty when it could not be decoded.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A stored value outside its valid range (a crop box outside the image, an unknown op, a
    /// NaN magnitude, ...), refused by the writer or found by the reader.
    #[error("row {index}, key {key}: {problem}")]
    InvalidValue {
        /// Zero-based index of the row in the file (as written or as read).
        index: u64,
        /// The row's `key`.
        key: String,
        /// The field and what is wrong with it.
        problem: values::ValueError,
    },

    /// The parquet decoder gave up on corrupt data (including failures the parquet crate
    /// reports by panicking, which are caught).
    #[error("corrupt parquet data while {0}")]
    Corrupt(String),

    /// Invalid [`WriterOptions`] or reader options.
    #[error("invalid option: {0}")]
    InvalidOptions(String),

    /// A previous write failed part-way, so the buffered row group may be inconsistent.
    #[error("the shard writer is unusable after an earlier error; discard the partial output")]
    WriterPoisoned,

    /// Error from the parquet library while writing or reading data pages.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),

    /// Error from arrow while assembling or decoding record batches.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),

    /// I/O error (opening a file by path).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
