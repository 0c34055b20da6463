//! Object stores (`s3://`, `gs://`, `az://`) behind the [`Store`] contract, through the
//! `object_store` crate.
//!
//! The guarantees are the local file system's, built from the stores' own primitives:
//! - a claim is a conditional put (`If-None-Match: *` on S3 and Azure, `ifGenerationMatch=0` on
//!   GCS): exactly one of several concurrent creators succeeds;
//! - a put replaces an object atomically (readers see the old or the new object, never a mix);
//! - a staged write is one put when small, else a multipart upload, which is invisible until it
//!   is completed: a worker that dies mid-write leaves no object behind. (Its uploaded parts stay
//!   until the bucket's lifecycle rule for incomplete multipart uploads removes them; the
//!   `object_store` API cannot list them.)
//!
//! Credentials and endpoints come from the usual environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for S3-compatible servers,
//! `AWS_ALLOW_HTTP`, instance and web-identity credentials; `GOOGLE_SERVICE_ACCOUNT` or
//! `GOOGLE_APPLICATION_CREDENTIALS`; `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ...).
//!
//! dfndr's pipeline is synchronous threads; the async client runs on one small shared tokio
//! runtime and every call blocks on it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use tokio::runtime::Runtime;

use crate::store::{ObjectMeta, StagedWrite, Store, StoreError};

/// Default size of one multipart-upload part (S3 allows 10,000 parts: objects up to 160 GB).
pub const DEFAULT_PART_SIZE: usize = 16 << 20;
/// Parts of one staged write uploaded concurrently.
const UPLOAD_CONCURRENCY: usize = 4;

pub use crate::location::{
    configure, is_cloud_url, scheme_of, settings, ClientSettings, CloudKind,
};

/// The runtime every object-store call blocks on.
fn runtime() -> Result<&'static Runtime, StoreError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("dfndr-object-store")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| StoreError::Remote {
            path: "object store".into(),
            error: format!("cannot start the I/O runtime: {e}"),
        })
}

/// One bucket (or container) of an object store, opened once per process.
#[derive(Debug)]
struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// `scheme://bucket`, as the user wrote it.
    root: String,
}

/// Splits `scheme://bucket/key/parts` into (`scheme://bucket`, `key/parts`).
fn split_bucket(url: &str) -> Result<(String, String), StoreError> {
    let bad = || StoreError::InvalidUrl {
        url: url.to_string(),
        reason: "expected SCHEME://BUCKET/PATH".into(),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad());
    }
    Ok((
        format!("{scheme}://{bucket}"),
        key.trim_matches('/').to_string(),
    ))
}

/// The bucket named by `root` (`scheme://bucket`), built from the environment on first use.
fn bucket(root: &str) -> Result<Arc<Bucket>, StoreError> {
    static BUCKETS: OnceLock<Mutex<HashMap<String, Arc<Bucket>>>> = OnceLock::new();
    let buckets = BUCKETS.get_or_init(Default::default);
    let mut open = buckets.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = open.get(root) {
        return Ok(b.clone());
    }
    // reqwest's TLS needs a process-wide crypto provider; an error means one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scheme = scheme_of(root).unwrap_or_default();
    let settings = settings();
    // Set key by key: `with_client_options` would drop what `from_env` read (AWS_ALLOW_HTTP).
    let timeouts = [
        (ClientConfigKey::Timeout, settings.request_timeout),
        (ClientConfigKey::ConnectTimeout, settings.connect_timeout),
    ]
    .map(|(key, d)| (key, format!("{}ms", d.as_millis().max(1))));
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: settings.max_retries,
        retry_timeout: settings.retry_timeout,
    };
    let built: Result<Arc<dyn ObjectStore>, object_store::Error> =
        match CloudKind::of_scheme(&scheme) {
            Some(CloudKind::S3) => {
                // s3a:// is Hadoop's name for the same thing.
                let url = root.replacen("s3a://", "s3://", 1);
                let mut b = AmazonS3Builder::from_env().with_url(url).with_retry(retry);
                for (key, value) in &timeouts {
                    b = b.with_config(AmazonS3ConfigKey::Client(*key), value);
                }
                b.build().map(|s| Arc::new(s) as _)
            }
            Some(CloudKind::Gcs) => {
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_url(root)
                    .with_retry(retry);
                for (key, value) in &timeouts {
                    b = b.with_config(GoogleConfigKey::Client(*key), value);
                }
                b.build().map(|s| Arc::new(s) as _)
            }
            Some(CloudKind::Azure) => {
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_url(root)
                    .with_retry(retry);
                for (key, value) in &timeouts {
                    b = b.with_config(AzureConfigKey::Client(*key), value);
                }
                b.build().map(|s| Arc::new(s) as _)
            }
            None => return Err(StoreError::UnsupportedScheme(root.to_string())),
        };
    let store = built.map_err(|e| StoreError::Remote {
        path: root.to_string(),
        error: format!("cannot open the object store: {e}"),
    })?;
    let b = Arc::new(Bucket {
        store,
        root: root.to_string(),
    });
    open.insert(root.to_string(), b.clone());
    Ok(b)
}

/// A prefix of an object-store bucket: the [`Store`] of outputs at `s3://`, `gs://`, `az://`
/// URLs.
#[derive(Debug, Clone)]
pub struct CloudStore {
    bucket: Arc<Bucket>,
    /// Key prefix without leading or trailing `/` (empty for the bucket root).
    prefix: String,
    part_size: usize,
}

impl CloudStore {
    /// Opens the store at `url` (`s3://bucket/prefix`, `gs://...`, `az://container/prefix`).
    pub fn open(url: &str) -> Result<CloudStore, StoreError> {
        let (root, prefix) = split_bucket(url)?;
        Ok(CloudStore {
            bucket: bucket(&root)?,
            prefix,
            part_size: DEFAULT_PART_SIZE,
        })
    }

    /// The store of the bucket holding object `url`, and the object's key in it.
    pub fn open_object(url: &str) -> Result<(CloudStore, String), StoreError> {
        let (root, key) = split_bucket(url)?;
        if key.is_empty() {
            return Err(StoreError::InvalidUrl {
                url: url.to_string(),
                reason: "names a bucket, not an object".into(),
            });
        }
        Ok((CloudStore::open(&root)?, key))
    }

    /// The same store with another multipart part size (at least 5 MiB on S3, except for the
    /// last part).
    pub fn with_part_size(mut self, part_size: usize) -> CloudStore {
        self.part_size = part_size.max(1);
        self
    }

    fn key(&self, path: &str) -> Result<ObjectPath, StoreError> {
        let ok = !path.is_empty()
            && path
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !ok {
            return Err(StoreError::InvalidPath(path.to_string()));
        }
        let full = if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        };
        ObjectPath::parse(&full).map_err(|_| StoreError::InvalidPath(path.to_string()))
    }

    fn remote(&self, path: &str, error: object_store::Error) -> StoreError {
        match error {
            object_store::Error::NotFound { .. } => StoreError::NotFound(self.uri_of(path)),
            error => StoreError::Remote {
                path: self.uri_of(path),
                error: one_line(&error.to_string()),
            },
        }
    }

    /// A failed write. "Not found" on a write means the bucket itself is missing, which must
    /// not read as "object absent" to callers.
    fn remote_write(&self, path: &str, error: object_store::Error) -> StoreError {
        match error {
            object_store::Error::NotFound { .. } => StoreError::NoBucket {
                path: self.uri_of(path),
                error: format!("{} (does the bucket exist?)", one_line(&error.to_string())),
            },
            error => StoreError::Remote {
                path: self.uri_of(path),
                error: one_line(&error.to_string()),
            },
        }
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> Result<F::Output, StoreError> {
        Ok(runtime()?.block_on(future))
    }

    /// Downloads `path` in ranged requests of [`ClientSettings::download_chunk_bytes`], each
    /// with its own timeout and retries, pinned to the version first seen (its ETag): a
    /// connection cut mid-body costs one chunk, never the download, and an object replaced
    /// meanwhile is an error rather than a mix of two versions. Returns the bytes written,
    /// which always equal the object's size.
    fn download_chunked(
        &self,
        path: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<u64, StoreError> {
        let settings = settings();
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        let head_key = key.clone();
        let meta = self
            .block_on(async move { store.head(&head_key).await })?
            .map_err(|e| self.remote(path, e))?;
        let chunk = settings.download_chunk_bytes.max(1);
        let mut offset = 0u64;
        while offset < meta.size {
            let end = (offset + chunk).min(meta.size);
            let bytes = self.get_chunk(path, &key, meta.e_tag.clone(), offset..end, &settings)?;
            out.write_all(&bytes).map_err(|error| StoreError::Io {
                path: format!("local copy of {}", self.uri_of(path)),
                error,
            })?;
            offset = end;
            progress(offset);
        }
        Ok(offset)
    }

    /// One byte range of an object, retried with backoff on any failure but a missing or
    /// changed object; a short body counts as a failure.
    fn get_chunk(
        &self,
        path: &str,
        key: &ObjectPath,
        e_tag: Option<String>,
        range: std::ops::Range<u64>,
        settings: &ClientSettings,
    ) -> Result<Bytes, StoreError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0usize;
        loop {
            let store = self.bucket.store.clone();
            let (key, e_tag, r) = (key.clone(), e_tag.clone(), range.clone());
            let result = self.block_on(async move {
                let opts = GetOptions {
                    if_match: e_tag,
                    range: Some(GetRange::Bounded(r)),
                    ..GetOptions::default()
                };
                store.get_opts(&key, opts).await?.bytes().await
            })?;
            let want = range.end - range.start;
            let error = match result {
                Ok(bytes) if bytes.len() as u64 == want => return Ok(bytes),
                Ok(bytes) => format!(
                    "bytes {}..{}: the server sent {} of {want} bytes",
                    range.start,
                    range.end,
                    bytes.len()
                ),
                Err(e @ object_store::Error::NotFound { .. }) => return Err(self.remote(path, e)),
                Err(object_store::Error::Precondition { .. }) => {
                    return Err(StoreError::Remote {
                        path: self.uri_of(path),
                        error: "the object was replaced while it was being read".into(),
                    })
                }
                Err(e) => format!(
                    "bytes {}..{}: {}",
                    range.start,
                    range.end,
                    one_line(&e.to_string())
                ),
            };
            attempt += 1;
            if attempt > settings.max_retries || started.elapsed() >= settings.retry_timeout {
                return Err(StoreError::Remote {
                    path: self.uri_of(path),
                    error: format!("{error} (gave up after {attempt} attempts)"),
                });
            }
            tracing::warn!(object = %self.uri_of(path), attempt, error = %error, "download chunk failed; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

impl Store for CloudStore {
    fn root_uri(&self) -> String {
        if self.prefix.is_empty() {
            self.bucket.root.clone()
        } else {
            format!("{}/{}", self.bucket.root, self.prefix)
        }
    }

    fn uri_of(&self, path: &str) -> String {
        format!("{}/{path}", self.root_uri())
    }

    fn open_read(&self, path: &str) -> Result<Box<dyn Read + Send>, StoreError> {
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        let result = self
            .block_on(async move { store.get(&key).await })?
            .map_err(|e| self.remote(path, e))?;
        Ok(Box::new(StreamReader {
            stream: result.into_stream(),
            chunk: Bytes::new(),
            uri: self.uri_of(path),
        }))
    }

    fn download_to(
        &self,
        path: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<u64, StoreError> {
        self.download_chunked(path, out, progress)
    }

    fn get(&self, path: &str) -> Result<Vec<u8>, StoreError> {
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        let bytes = self
            .block_on(async move { store.get(&key).await?.bytes().await })?
            .map_err(|e| self.remote(path, e))?;
        Ok(bytes.to_vec())
    }

    fn stat(&self, path: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        match self.block_on(async move { store.head(&key).await })? {
            Ok(meta) => Ok(Some(ObjectMeta {
                size: meta.size,
                modified_unix: meta.last_modified.timestamp().max(0) as u64,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.remote(path, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let prefix = if dir.is_empty() {
            (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()))
        } else {
            Some(self.key(dir)?)
        };
        let store = self.bucket.store.clone();
        let listed = self
            .block_on(async move { store.list_with_delimiter(prefix.as_ref()).await })?
            .map_err(|e| self.remote(dir, e))?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    fn put(&self, path: &str, data: &[u8]) -> Result<(), StoreError> {
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        let payload = PutPayload::from(data.to_vec());
        self.block_on(async move { store.put(&key, payload).await })?
            .map_err(|e| self.remote_write(path, e))?;
        Ok(())
    }

    fn put_if_absent(&self, path: &str, data: &[u8]) -> Result<bool, StoreError> {
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        let payload = PutPayload::from(data.to_vec());
        let opts = PutOptions::from(PutMode::Create);
        match self.block_on(async move { store.put_opts(&key, payload, opts).await })? {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e @ object_store::Error::NotImplemented { .. }) => Err(StoreError::Remote {
                path: self.uri_of(path),
                error: format!(
                    "{e}; claims need conditional puts (on S3-compatible servers leave \
                     AWS_CONDITIONAL_PUT unset or set it to etag)"
                ),
            }),
            Err(e) => Err(self.remote_write(path, e)),
        }
    }

    fn delete(&self, path: &str) -> Result<(), StoreError> {
        let key = self.key(path)?;
        let store = self.bucket.store.clone();
        match self.block_on(async move { store.delete(&key).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.remote(path, e)),
        }
    }

    fn create_staged(&self, path: &str) -> Result<Box<dyn StagedWrite>, StoreError> {
        Ok(Box::new(CloudStaged {
            store: self.clone(),
            key: self.key(path)?,
            path: path.to_string(),
            buffer: Vec::new(),
            upload: None,
            written: 0,
        }))
    }

    fn discard_abandoned_staged(&self, _path: &str) -> Result<usize, StoreError> {
        // An unfinished multipart upload is never visible as an object, so nothing a dead
        // writer left can be mistaken for output; its parts are the lifecycle rule's job.
        Ok(0)
    }
}

/// A store error message on one line: the XML error document a server returns is reduced to
/// its `Code` and `Message`.
fn one_line(message: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = message.find(&open)? + open.len();
        let end = message[start..].find(&format!("</{name}>"))?;
        let value = message[start..start + end].trim();
        let value = value
            .strip_prefix("<![CDATA[")
            .and_then(|v| v.strip_suffix("]]>"))
            .unwrap_or(value);
        Some(value.trim().to_string())
    };
    let (head, details) = match (message.find("<?xml"), tag("Code")) {
        (Some(at), Some(code)) => {
            let text = tag("Message").map(|m| format!(": {m}")).unwrap_or_default();
            (&message[..at], format!("{code}{text}"))
        }
        _ => (message, String::new()),
    };
    let head = head.split_whitespace().collect::<Vec<_>>().join(" ");
    match (head.is_empty(), details.is_empty()) {
        (_, true) => head,
        (true, false) => details,
        (false, false) => format!("{} {details}", head.trim_end_matches(':')),
    }
}

/// Streams an object's body through `Read`.
struct StreamReader {
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
    uri: String,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            let next = runtime()
                .map_err(io::Error::other)?
                .block_on(self.stream.next());
            match next {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => {
                    return Err(io::Error::other(format!("reading {}: {e}", self.uri)));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// A staged object-store write: buffered, then one put (small objects) or a multipart upload
/// completed on commit; dropped without commit, the upload is aborted.
struct CloudStaged {
    store: CloudStore,
    key: ObjectPath,
    path: String,
    /// Data not yet handed to a multipart upload.
    buffer: Vec<u8>,
    upload: Option<WriteMultipart>,
    written: u64,
}

impl CloudStaged {
    fn io_error(&self, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("{}: {e}", self.store.uri_of(&self.path)))
    }
}

impl Write for CloudStaged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let rt = runtime().map_err(io::Error::other)?;
        self.written += buf.len() as u64;
        match self.upload.as_mut() {
            None => {
                self.buffer.extend_from_slice(buf);
                if self.buffer.len() >= self.store.part_size {
                    let store = self.store.bucket.store.clone();
                    let key = self.key.clone();
                    let upload = rt
                        .block_on(async move { store.put_multipart(&key).await })
                        .map_err(|e| self.io_error(e))?;
                    let mut upload =
                        WriteMultipart::new_with_chunk_size(upload, self.store.part_size);
                    // Part uploads are spawned onto the runtime.
                    let _guard = rt.enter();
                    upload.write(&std::mem::take(&mut self.buffer));
                    self.upload = Some(upload);
                }
            }
            Some(upload) => {
                let _guard = rt.enter();
                upload.write(buf);
                let waited = rt.block_on(upload.wait_for_capacity(UPLOAD_CONCURRENCY));
                waited.map_err(|e| self.io_error(e))?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl StagedWrite for CloudStaged {
    fn commit(mut self: Box<Self>) -> Result<u64, StoreError> {
        let rt = runtime()?;
        let result = match self.upload.take() {
            None => {
                let store = self.store.bucket.store.clone();
                let key = self.key.clone();
                let payload = PutPayload::from(std::mem::take(&mut self.buffer));
                rt.block_on(async move { store.put(&key, payload).await })
            }
            Some(upload) => rt.block_on(upload.finish()),
        };
        result.map_err(|e| self.store.remote_write(&self.path, e))?;
        Ok(self.written)
    }
}

impl Drop for CloudStaged {
    fn drop(&mut self) {
        // Not committed: abort the upload so its parts do not linger (best effort).
        if let (Some(upload), Ok(rt)) = (self.upload.take(), runtime()) {
            let _ = rt.block_on(upload.abort());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_buckets() {
        assert_eq!(scheme_of("S3://b/k").as_deref(), Some("s3"));
        assert_eq!(scheme_of("/data/x://y"), None);
        assert!(is_cloud_url("gs://bucket/x"));
        assert!(is_cloud_url("az://container/x"));
        assert!(!is_cloud_url("file:///x"));
        assert!(!is_cloud_url("http://host/x"));
        assert_eq!(
            split_bucket("s3://b/a/b/").unwrap(),
            ("s3://b".to_string(), "a/b".to_string())
        );
        assert_eq!(
            split_bucket("gs://b").unwrap(),
            ("gs://b".to_string(), String::new())
        );
        assert!(split_bucket("s3:///key").is_err());
    }

    #[test]
    fn server_errors_are_reduced_to_one_line() {
        let raw = "Error performing PUT http://h/b/k in 84ms - Server returned non-2xx status \
                   code: 404 Not Found: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\n  \
                   <Code>NoSuchBucket</Code>\n  <Message><![CDATA[The specified bucket does not exist\
                   ]]></Message>\n</Error>";
        assert_eq!(
            one_line(raw),
            "Error performing PUT http://h/b/k in 84ms - Server returned non-2xx status code: \
             404 Not Found NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(one_line("timed out\n  after 30s"), "timed out after 30s");
    }
}
