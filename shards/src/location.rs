//! Which locations are object stores, and how dfndr's object-store clients are set up:
//! compiled with or without the `cloud` feature, so that every crate can tell an object-store
//! URL from a path and give a clear error when it cannot open one.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How dfndr's object-store clients behave: timeouts, retries and the chunk size of input
/// downloads. Set once per process with [`configure`] before the first store is opened (the
/// `[storage]` section of a job config); buckets opened earlier keep the settings they were
/// built with.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    /// Every request, from connecting until its body is complete, must finish within this
    /// (one download chunk, one upload part, a claim, a listing).
    pub request_timeout: Duration,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Retries of a failed request (and of a failed download chunk), with exponential
    /// backoff.
    pub max_retries: usize,
    /// No request is retried once this long has passed since its first try.
    pub retry_timeout: Duration,
    /// Objects are downloaded in ranged requests of this many bytes, each retried on its
    /// own, so a download of any size survives slow readers and cut connections.
    pub download_chunk_bytes: u64,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            max_retries: 10,
            retry_timeout: Duration::from_secs(300),
            download_chunk_bytes: 32 << 20,
        }
    }
}

fn settings_cell() -> &'static Mutex<ClientSettings> {
    static SETTINGS: OnceLock<Mutex<ClientSettings>> = OnceLock::new();
    SETTINGS.get_or_init(Default::default)
}

/// Sets the client settings of the stores opened from now on.
pub fn configure(settings: ClientSettings) {
    *settings_cell().lock().unwrap_or_else(|e| e.into_inner()) = settings;
}

/// The client settings in force.
pub fn settings() -> ClientSettings {
    settings_cell()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The object-store families dfndr opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudKind {
    /// Amazon S3 and S3-compatible servers (`s3://`, `s3a://`).
    S3,
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Azure Blob Storage (`az://`, `azure://`, `abfs://`, `abfss://`, `adl://`).
    Azure,
}

impl CloudKind {
    /// The family of a URL scheme (lowercase), if it is an object store.
    pub fn of_scheme(scheme: &str) -> Option<CloudKind> {
        match scheme {
            "s3" | "s3a" => Some(CloudKind::S3),
            "gs" => Some(CloudKind::Gcs),
            "az" | "azure" | "abfs" | "abfss" | "adl" => Some(CloudKind::Azure),
            _ => None,
        }
    }
}

/// The scheme of `location` in lowercase, if it looks like a URL (`scheme://...`).
pub fn scheme_of(location: &str) -> Option<String> {
    let (scheme, _) = location.split_once("://")?;
    let ok = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then(|| scheme.to_ascii_lowercase())
}

/// Whether `location` names an object store (`s3://`, `gs://`, `az://`, ...).
pub fn is_cloud_url(location: &str) -> bool {
    scheme_of(location).is_some_and(|s| CloudKind::of_scheme(&s).is_some())
}
