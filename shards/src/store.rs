//! The storage interface every dfndr component writes and reads through.
//!
//! Job control needs five primitives from a location: read, list, atomic put (replace),
//! put-if-absent (the claim) and delete, plus staged writes for large outputs that must only
//! become visible once complete. The local file system implements them with `O_EXCL`,
//! temporary files, `fsync` and `rename`; object stores implement the same contract with
//! conditional puts and multipart uploads, so callers never know which one they talk to.
//!
//! Paths given to a [`Store`] are relative, `/`-separated and never contain `..`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::cloud::{is_cloud_url, scheme_of, CloudStore};

/// Errors of a storage operation, each naming the location involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// An I/O error at a location. (The message includes the cause, so it is not also
    /// exposed as `source()`: error reports would print it twice.)
    #[error("{path}: {error}")]
    Io {
        /// Full location (root plus relative path).
        path: String,
        /// The underlying error.
        error: io::Error,
    },
    /// A relative path that would escape the store root or is otherwise unusable.
    #[error("invalid storage path {0:?}: paths are relative, '/'-separated and contain no '..'")]
    InvalidPath(String),
    /// A URL whose scheme dfndr cannot open.
    #[error("{0}: unsupported storage scheme (dfndr reads and writes local paths, file://, s3://, gs:// and az:// URLs)")]
    UnsupportedScheme(String),
    /// An object-store URL that does not name a bucket.
    #[error("invalid object-store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An object-store request that failed (after the client's retries).
    #[error("{path}: {error}")]
    Remote {
        /// Full location.
        path: String,
        /// The store's error message.
        error: String,
    },
    /// A write into a bucket or container that does not exist.
    #[error("{path}: {error}")]
    NoBucket {
        /// Full location.
        path: String,
        /// The store's error message.
        error: String,
    },
    /// An object-store URL in a build without object-store support.
    #[error("{0}: this build has no object-store support (dfndr-shards' `cloud` feature)")]
    NoCloudSupport(String),
    /// A command that needs a local path was given an object-store URL.
    #[error("{0}: this needs a local path or file:// URL, not an object-store URL")]
    NotLocal(String),
}

impl StoreError {
    /// Whether the error may go away by itself (a failed request, an I/O error), as opposed
    /// to a location that is wrong as written (bad URL, unsupported scheme, missing object)
    /// or that the user must fix (no permission, a read-only file system).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Io { error, .. } => !matches!(
                error.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            ),
            StoreError::Remote { .. } => true,
            _ => false,
        }
    }
}

/// Size and modification time of a stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Size in bytes.
    pub size: u64,
    /// Last modification, seconds since the Unix epoch.
    pub modified_unix: u64,
}

/// A write that becomes visible at its final path only when [`StagedWrite::commit`] succeeds.
/// Dropping it without committing discards the data.
pub trait StagedWrite: Write + Send {
    /// Flushes, makes the data durable and publishes it atomically; returns the bytes written.
    fn commit(self: Box<Self>) -> Result<u64, StoreError>;
}

/// A storage location: a local directory ([`LocalStore`]) or an object-store prefix
/// ([`CloudStore`]).
pub trait Store: Send + Sync {
    /// Human-readable location of the root (used in messages and records).
    fn root_uri(&self) -> String;
    /// Location of `path` under the root, as a user would type it.
    fn uri_of(&self, path: &str) -> String;
    /// Opens an object for streaming reads.
    fn open_read(&self, path: &str) -> Result<Box<dyn Read + Send>, StoreError>;
    /// Reads a whole (small) object.
    fn get(&self, path: &str) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.open_read(path)?
            .read_to_end(&mut out)
            .map_err(|error| StoreError::Io {
                path: self.uri_of(path),
                error,
            })?;
        Ok(out)
    }
    /// Copies a whole object into `out`, calling `progress` with the bytes copied so far as
    /// the copy advances; returns the object's size. Object stores download it in ranged,
    /// individually retried chunks, so the copy does not depend on how fast `out` is.
    fn download_to(
        &self,
        path: &str,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<u64, StoreError> {
        let uri = self.uri_of(path);
        let mut reader = self.open_read(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut copied = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(copied),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(StoreError::Io { path: uri, error }),
            };
            out.write_all(&buf[..n]).map_err(|error| StoreError::Io {
                path: format!("local copy of {uri}"),
                error,
            })?;
            copied += n as u64;
            progress(copied);
        }
    }
    /// Size and modification time, or `None` if the object does not exist.
    fn stat(&self, path: &str) -> Result<Option<ObjectMeta>, StoreError>;
    /// Names (relative to `dir`) of the objects directly inside `dir`, sorted; empty if
    /// `dir` does not exist.
    fn list(&self, dir: &str) -> Result<Vec<String>, StoreError>;
    /// Writes an object atomically, replacing any previous version.
    fn put(&self, path: &str, data: &[u8]) -> Result<(), StoreError>;
    /// Creates an object only if none exists; returns `false` (and writes nothing) if one does.
    /// Exactly one of several concurrent callers wins.
    fn put_if_absent(&self, path: &str, data: &[u8]) -> Result<bool, StoreError>;
    /// Deletes an object; deleting a missing object is not an error.
    fn delete(&self, path: &str) -> Result<(), StoreError>;
    /// Starts a staged write of a large object (see [`StagedWrite`]).
    fn create_staged(&self, path: &str) -> Result<Box<dyn StagedWrite>, StoreError>;
    /// Discards what staged writes to `path` left behind when their process died before
    /// committing (temporary files, unfinished uploads); returns how many were removed.
    fn discard_abandoned_staged(&self, path: &str) -> Result<usize, StoreError>;
    /// Removes the temporary files of writes whose process is known to be dead (killed before
    /// it could clean up); returns how many. Stores without temporaries remove nothing.
    fn sweep_dead_temporaries(&self) -> Result<usize, StoreError> {
        Ok(0)
    }
    /// The local file behind `path`, when the store is a local directory.
    fn local_file(&self, _path: &str) -> Option<PathBuf> {
        None
    }
}

/// Opens the store for an output location: a local path, a `file://` URL or an object-store
/// URL (`s3://bucket/prefix`, `gs://...`, `az://...`).
pub fn open_store(location: &str) -> Result<Arc<dyn Store>, StoreError> {
    if is_cloud_url(location) {
        return Ok(Arc::new(CloudStore::open(location)?));
    }
    let path = local_path_of(location)?;
    Ok(Arc::new(LocalStore::new(path)))
}

/// Opens one file or object (a local path, `file://` or object-store URL) as the store of its
/// parent plus its name in that store.
pub fn open_parent(uri: &str) -> Result<(Arc<dyn Store>, String), StoreError> {
    if is_cloud_url(uri) {
        let (store, key) = CloudStore::open_object(uri)?;
        return Ok((Arc::new(store), key));
    }
    let path = local_path_of(uri)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| StoreError::InvalidPath(uri.to_string()))?;
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((Arc::new(LocalStore::new(parent)), name))
}

/// The local path named by `location` (a plain path or a `file://` URL); object-store URLs
/// are [`StoreError::NotLocal`], other URL schemes [`StoreError::UnsupportedScheme`].
pub fn local_path_of(location: &str) -> Result<PathBuf, StoreError> {
    match scheme_of(location).as_deref() {
        Some("file") => {
            // file:///abs/path or file://localhost/abs/path
            let rest = &location["file://".len()..];
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            Ok(PathBuf::from(rest))
        }
        Some(_) if is_cloud_url(location) => Err(StoreError::NotLocal(location.to_string())),
        Some(_) => Err(StoreError::UnsupportedScheme(location.to_string())),
        None => Ok(PathBuf::from(location)),
    }
}

/// A file on the local disk holding an object's bytes: the file itself for local stores, a
/// downloaded temporary copy (removed on drop) for object stores. Parquet readers need
/// random access, which a download to disk gives without holding a shard in memory.
#[derive(Debug)]
pub struct LocalCopy {
    path: PathBuf,
    _temp: Option<tempfile::TempPath>,
}

impl LocalCopy {
    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A local file with the content of `path` in `store` (see [`LocalCopy`]).
pub fn local_copy(store: &dyn Store, path: &str) -> Result<LocalCopy, StoreError> {
    if let Some(local) = store.local_file(path) {
        return Ok(LocalCopy {
            path: local,
            _temp: None,
        });
    }
    let uri = store.uri_of(path);
    let temp_error = |error: io::Error| StoreError::Io {
        path: format!("temporary copy of {uri}"),
        error,
    };
    let mut file = tempfile::NamedTempFile::new().map_err(temp_error)?;
    {
        let mut out = io::BufWriter::with_capacity(1 << 20, file.as_file_mut());
        store.download_to(path, &mut out, &|_| {})?;
        out.flush().map_err(temp_error)?;
    }
    let temp = file.into_temp_path();
    Ok(LocalCopy {
        path: temp.to_path_buf(),
        _temp: Some(temp),
    })
}

/// A local copy of one file or object named by a path or URL (see [`LocalCopy`]).
pub fn local_copy_of(uri: &str) -> Result<LocalCopy, StoreError> {
    let (store, name) = open_parent(uri)?;
    local_copy(&*store, &name)
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    if source.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound(path.display().to_string())
    } else {
        StoreError::Io {
            path: path.display().to_string(),
            error: source,
        }
    }
}

/// A directory on a local (or network-mounted POSIX) file system.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// Distinguishes temporary files of concurrent writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// A store rooted at `root` (created lazily on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn resolve(&self, path: &str) -> Result<PathBuf, StoreError> {
        let rel = Path::new(path);
        let ok = !path.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !ok {
            return Err(StoreError::InvalidPath(path.to_string()));
        }
        Ok(self.root.join(rel))
    }

    fn ensure_parent(&self, full: &Path) -> Result<(), StoreError> {
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        Ok(())
    }

    /// A unique temporary name next to `full`, hidden from listings by its leading dot:
    /// `.NAME.tmp-PLACE-PID-N`, where PLACE identifies this host, boot and PID namespace so
    /// that a later process can tell whether the writer is dead.
    fn temp_path(full: &Path) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = full
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        full.with_file_name(format!(
            ".{name}.tmp-{}-{}-{n}",
            place_tag(),
            std::process::id()
        ))
    }
}

/// A short tag of this host, boot and PID namespace: a PID is only meaningful within them.
fn place_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        use sha2::Digest;
        let place = format!(
            "{}\n{}\n{}",
            crate::job::hostname(),
            crate::job::read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            fs::read_link("/proc/self/ns/pid")
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        crate::job::hex(&sha2::Sha256::digest(place.as_bytes())[..4])
    })
}

/// The writer PID of a temporary file name made by [`LocalStore::temp_path`] in this place.
fn temp_writer_pid(file_name: &str) -> Option<u32> {
    let (_, rest) = file_name.rsplit_once(".tmp-")?;
    let mut parts = rest.split('-');
    let (tag, pid, n) = (parts.next()?, parts.next()?, parts.next()?);
    if tag != place_tag() || parts.next().is_some() || n.parse::<u64>().is_err() {
        return None;
    }
    pid.parse().ok()
}

/// Makes a rename or a newly created file durable by syncing its directory.
fn sync_dir(dir: &Path) {
    // Best effort: some file systems refuse fsync on directories; the data itself is synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Store for LocalStore {
    fn root_uri(&self) -> String {
        self.root.display().to_string()
    }

    fn uri_of(&self, path: &str) -> String {
        self.root.join(path).display().to_string()
    }

    fn local_file(&self, path: &str) -> Option<PathBuf> {
        self.resolve(path).ok()
    }

    fn sweep_dead_temporaries(&self) -> Result<usize, StoreError> {
        fn sweep(dir: &Path, removed: &mut usize) -> Result<(), StoreError> {
            let entries = match fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error(dir, e)),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    sweep(&path, removed)?;
                    continue;
                }
                let Some(pid) = temp_writer_pid(&name) else {
                    continue;
                };
                let dead =
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists();
                if dead {
                    match fs::remove_file(&path) {
                        Ok(()) => *removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_error(&path, e)),
                    }
                }
            }
            Ok(())
        }
        let mut removed = 0;
        sweep(&self.root, &mut removed)?;
        Ok(removed)
    }

    fn open_read(&self, path: &str) -> Result<Box<dyn Read + Send>, StoreError> {
        let full = self.resolve(path)?;
        let file = File::open(&full).map_err(|e| io_error(&full, e))?;
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, file)))
    }

    fn stat(&self, path: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let full = self.resolve(path)?;
        match fs::metadata(&full) {
            Ok(m) => {
                let modified_unix = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Ok(Some(ObjectMeta {
                    size: m.len(),
                    modified_unix,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&full, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let full = if dir.is_empty() {
            self.root.clone()
        } else {
            self.resolve(dir)?
        };
        let entries = match fs::read_dir(&full) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&full, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&full, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporary files of in-flight writes are not objects yet.
            if name.starts_with('.') {
                continue;
            }
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn put(&self, path: &str, data: &[u8]) -> Result<(), StoreError> {
        let mut w = self.create_staged(path)?;
        w.write_all(data).map_err(|e| StoreError::Io {
            path: self.uri_of(path),
            error: e,
        })?;
        w.commit().map(|_| ())
    }

    fn put_if_absent(&self, path: &str, data: &[u8]) -> Result<bool, StoreError> {
        let full = self.resolve(path)?;
        self.ensure_parent(&full)?;
        // Write the content under a temporary name first, then hard-link it into place:
        // link(2) fails if the target exists, so the object appears atomically and complete
        // (a crash never leaves a claim with partial content, which O_EXCL alone could).
        let tmp = Self::temp_path(&full);
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_error(&tmp, e))?;
            f.write_all(data).map_err(|e| io_error(&tmp, e))?;
            f.sync_all().map_err(|e| io_error(&tmp, e))?;
            match fs::hard_link(&tmp, &full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                // File systems without hard links: O_EXCL still has exactly one winner.
                Err(_) => match OpenOptions::new().write(true).create_new(true).open(&full) {
                    Ok(mut f) => {
                        f.write_all(data).map_err(|e| io_error(&full, e))?;
                        f.sync_all().map_err(|e| io_error(&full, e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                    Err(e) => return Err(io_error(&full, e)),
                },
            }
            if let Some(parent) = full.parent() {
                sync_dir(parent);
            }
            Ok(true)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn delete(&self, path: &str) -> Result<(), StoreError> {
        let full = self.resolve(path)?;
        match fs::remove_file(&full) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&full, e)),
        }
    }

    fn discard_abandoned_staged(&self, path: &str) -> Result<usize, StoreError> {
        let full = self.resolve(path)?;
        let (Some(dir), Some(name)) = (full.parent(), full.file_name()) else {
            return Ok(0);
        };
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error(dir, e)),
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let p = entry.path();
                match fs::remove_file(&p) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(&p, e)),
                }
            }
        }
        Ok(removed)
    }

    fn create_staged(&self, path: &str) -> Result<Box<dyn StagedWrite>, StoreError> {
        let full = self.resolve(path)?;
        self.ensure_parent(&full)?;
        let tmp = Self::temp_path(&full);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(&tmp, e))?;
        Ok(Box::new(LocalStaged {
            writer: Some(io::BufWriter::with_capacity(1 << 20, file)),
            tmp,
            dest: full,
            written: 0,
        }))
    }
}

/// A staged local write: a hidden temporary file renamed into place on commit.
struct LocalStaged {
    writer: Option<io::BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    written: u64,
}

impl Write for LocalStaged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| io::Error::other("staged write already finished"))?;
        let n = w.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl StagedWrite for LocalStaged {
    fn commit(mut self: Box<Self>) -> Result<u64, StoreError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| StoreError::InvalidPath(self.dest.display().to_string()))?;
        let file = writer
            .into_inner()
            .map_err(|e| io_error(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_error(&self.tmp, e))?;
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(|e| io_error(&self.dest, e))?;
        if let Some(parent) = self.dest.parent() {
            sync_dir(parent);
        }
        Ok(self.written)
    }
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        // Not committed: the temporary file must not linger.
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_if_absent_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        assert!(store.put_if_absent("a/claim", b"first").unwrap());
        assert!(!store.put_if_absent("a/claim", b"second").unwrap());
        assert_eq!(store.get("a/claim").unwrap(), b"first");
        // no temporary files are left behind
        assert_eq!(fs::read_dir(dir.path().join("a")).unwrap().count(), 1);
    }

    #[test]
    fn staged_write_is_invisible_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let mut w = store.create_staged("out/x.parquet").unwrap();
        w.write_all(b"hello").unwrap();
        assert!(store.stat("out/x.parquet").unwrap().is_none());
        assert!(store.list("out").unwrap().is_empty());
        assert_eq!(w.commit().unwrap(), 5);
        assert_eq!(store.stat("out/x.parquet").unwrap().unwrap().size, 5);

        let mut w = store.create_staged("out/y.parquet").unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        // a writer that died without dropping leaves its temporary file; it is discarded
        let mut w = store.create_staged("out/z.parquet").unwrap();
        w.write_all(b"partial").unwrap();
        std::mem::forget(w);
        assert_eq!(store.discard_abandoned_staged("out/z.parquet").unwrap(), 1);
        assert_eq!(store.list("out").unwrap(), vec!["x.parquet".to_string()]);
        assert_eq!(fs::read_dir(dir.path().join("out")).unwrap().count(), 1);
    }

    #[test]
    fn temporaries_of_dead_processes_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("_progress/claims/a", b"x").unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let tag = place_tag();
        let dead = [
            format!(".dfndr.json.tmp-{tag}-{dead_pid}-0"),
            format!("_progress/claims/.a.tmp-{tag}-{dead_pid}-3"),
        ];
        let kept = [
            // this (live) process, another place, and a file that only looks similar
            format!("shards/.x.parquet.tmp-{tag}-{}-1", std::process::id()),
            format!(".m.tmp-00000000-{dead_pid}-0"),
            format!("_progress/claims/.b.tmp-{tag}-{dead_pid}"),
        ];
        for f in dead.iter().chain(&kept) {
            let p = dir.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"partial").unwrap();
        }
        assert_eq!(store.sweep_dead_temporaries().unwrap(), 2);
        for f in &dead {
            assert!(!dir.path().join(f).exists(), "{f} not swept");
        }
        for f in &kept {
            assert!(dir.path().join(f).exists(), "{f} swept");
        }
        assert_eq!(store.get("_progress/claims/a").unwrap(), b"x");
    }

    #[test]
    fn put_replaces_and_delete_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("m.json", b"1").unwrap();
        store.put("m.json", b"22").unwrap();
        assert_eq!(store.get("m.json").unwrap(), b"22");
        store.delete("m.json").unwrap();
        store.delete("m.json").unwrap();
        assert!(matches!(store.get("m.json"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn paths_cannot_escape_the_root() {
        let store = LocalStore::new("/tmp/x");
        assert!(matches!(
            store.put("../evil", b""),
            Err(StoreError::InvalidPath(_))
        ));
        assert!(matches!(
            store.put("/abs", b""),
            Err(StoreError::InvalidPath(_))
        ));
    }

    #[test]
    fn urls_map_to_local_paths_or_are_refused() {
        assert_eq!(
            local_path_of("file:///data/x.tar").unwrap(),
            PathBuf::from("/data/x.tar")
        );
        assert_eq!(
            local_path_of("rel/x.tar").unwrap(),
            PathBuf::from("rel/x.tar")
        );
        assert!(matches!(
            local_path_of("s3://bucket/x.tar"),
            Err(StoreError::NotLocal(_))
        ));
        assert!(matches!(
            local_path_of("ftp://host/x.tar"),
            Err(StoreError::UnsupportedScheme(_))
        ));
    }
}
