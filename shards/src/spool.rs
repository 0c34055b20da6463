//! Input shards fetched to local files before they are read, the next ones while the current
//! one is processed.
//!
//! Reading a tar straight from an object store ties one HTTP response to the speed of the
//! model stages: a shard that takes an hour to process keeps a response open for an hour, and
//! servers and clients time out long before. Spooling decouples the two: a shard is downloaded
//! in ranged, individually retried chunks (see [`crate::cloud::ClientSettings`]) to a file in
//! the spool folder, and the reader streams that file at any pace. Downloading the next shards
//! in the background overlaps I/O with compute. Local inputs are read in place.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use crate::store::{is_cloud_url, local_path_of, open_parent, StoreError};

/// Called with no argument whenever a download makes progress (a chunk arrived): lets a
/// watchdog tell a slow download from a hung one.
pub type OnProgress = Arc<dyn Fn() + Send + Sync>;

/// An input shard on the local disk: the input itself, or a spooled copy removed on drop.
#[derive(Debug)]
pub struct SpooledInput {
    path: PathBuf,
    _temp: Option<tempfile::TempPath>,
}

impl SpooledInput {
    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the file for streaming reads.
    pub fn open(&self) -> Result<Box<dyn Read + Send>, StoreError> {
        let file = File::open(&self.path).map_err(|error| StoreError::Io {
            path: self.path.display().to_string(),
            error,
        })?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
    }
}

/// Fetches `uri` into a new file in `dir` (the system's temporary folder when `None`); a
/// local input is returned in place.
pub fn fetch(
    uri: &str,
    dir: Option<&Path>,
    on_progress: &dyn Fn(),
) -> Result<SpooledInput, StoreError> {
    if !is_cloud_url(uri) {
        let path = local_path_of(uri)?;
        // Opened once here so that a missing input fails now, with the input's name.
        File::open(&path).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(path.display().to_string()),
            _ => StoreError::Io {
                path: path.display().to_string(),
                error,
            },
        })?;
        return Ok(SpooledInput { path, _temp: None });
    }
    let (store, key) = open_parent(uri)?;
    let spool_error = |error: io::Error| StoreError::Io {
        path: format!("spool file for {uri}"),
        error,
    };
    let mut file = match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(spool_error)?;
            tempfile::Builder::new()
                .prefix(".dfndr-spool-")
                .tempfile_in(dir)
        }
        None => tempfile::Builder::new().prefix(".dfndr-spool-").tempfile(),
    }
    .map_err(spool_error)?;
    {
        let mut out = io::BufWriter::with_capacity(1 << 20, file.as_file_mut());
        store.download_to(&key, &mut out, &|_| on_progress())?;
        io::Write::flush(&mut out).map_err(spool_error)?;
    }
    let temp = file.into_temp_path();
    Ok(SpooledInput {
        path: temp.to_path_buf(),
        _temp: Some(temp),
    })
}

/// A download running on its own thread.
struct Pending {
    uri: String,
    result: Receiver<Result<SpooledInput, StoreError>>,
}

/// Fetches input shards, keeping up to `ahead` downloads of later shards running in the
/// background.
pub struct Spool {
    dir: Option<PathBuf>,
    ahead: usize,
    on_progress: OnProgress,
    pending: Mutex<VecDeque<Pending>>,
}

impl Spool {
    /// A spool in `dir` (the system's temporary folder when `None`) that fetches up to
    /// `ahead` shards in advance.
    pub fn new(dir: Option<PathBuf>, ahead: usize, on_progress: OnProgress) -> Spool {
        Spool {
            dir,
            ahead,
            on_progress,
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// A spool in the system's temporary folder that fetches only on demand, for commands
    /// that read one shard at a time with no watchdog.
    pub fn on_demand() -> Spool {
        Spool::new(None, 0, Arc::new(|| {}))
    }

    /// The local file of `uri`: the one fetched in advance (waiting for it to finish), else
    /// fetched now.
    pub fn take(&self, uri: &str) -> Result<SpooledInput, StoreError> {
        let pending = {
            let mut queue = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let at = queue.iter().position(|p| p.uri == uri);
            at.and_then(|i| queue.remove(i))
        };
        if let Some(p) = pending {
            if let Ok(Ok(input)) = p.result.recv() {
                return Ok(input);
            }
            // The download failed (or its thread died): try again here, where a second
            // failure is the shard's error.
        }
        let on_progress = self.on_progress.clone();
        fetch(uri, self.dir.as_deref(), &move || on_progress())
    }

    /// Starts downloading `uri` in the background if it is on an object store and not
    /// already on its way. The oldest download is dropped (its file removed when it ends)
    /// when more than `ahead` are pending.
    pub fn prefetch(&self, uri: &str) {
        if self.ahead == 0 || !is_cloud_url(uri) {
            return;
        }
        let mut queue = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if queue.iter().any(|p| p.uri == uri) {
            return;
        }
        while queue.len() >= self.ahead {
            queue.pop_front();
        }
        let (tx, rx) = mpsc::channel();
        let (dir, owned, on_progress) =
            (self.dir.clone(), uri.to_string(), self.on_progress.clone());
        let spawned = std::thread::Builder::new()
            .name("dfndr-prefetch".into())
            .spawn(move || {
                let result = fetch(&owned, dir.as_deref(), &move || on_progress());
                if let Err(e) = &result {
                    tracing::debug!(input = %owned, error = %e, "prefetch failed; the shard will be fetched again when it is processed");
                }
                let _ = tx.send(result);
            });
        if spawned.is_ok() {
            queue.push_back(Pending {
                uri: uri.to_string(),
                result: rx,
            });
        }
    }
}
