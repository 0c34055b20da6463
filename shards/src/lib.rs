//! dfndr-shards: everything dfndr knows about data at rest.
//!
//! - [`wds`]: streaming webdataset (img2dataset layout) tar reader with counted skips.
//! - [`shardlist`]: brace patterns, globs and list files resolved to input shards.
//! - [`store`]: the storage interface (read, list, atomic put, put-if-absent, delete) and its
//!   local file-system implementation.
//! - [`cloud`]: the same interface on object stores (`s3://`, `gs://`, `az://`), with the
//!   `cloud` feature (on by default); crates that only read local data leave it off and keep
//!   the HTTP/TLS stack out of their build.
//! - [`location`]: which locations are object stores, and the clients' settings.
//! - [`mod@format`]: the DFNDR v1 parquet format (writer, reader, metadata).
//! - [`apple`]: Apple's reinforced webdataset layout (export and import), `.npy` / `.npz`.
//! - [`spool`]: input shards fetched to local files (ahead of use) before they are read.
//! - [`originals`]: the original image of each row (its `image` column or its source shard,
//!   streamed in row order).
//! - [`job`]: claims, heartbeats, done and failed records, manifest, config fingerprint.

pub mod apple;
/// Object stores: the real clients with the `cloud` feature (default), a stub without it.
#[cfg(feature = "cloud")]
pub mod cloud;
#[cfg(not(feature = "cloud"))]
#[path = "cloud_off.rs"]
pub mod cloud;
pub mod format;
pub mod job;
pub mod location;
pub mod originals;
pub mod shardlist;
pub mod spool;
pub mod store;
pub mod wds;
