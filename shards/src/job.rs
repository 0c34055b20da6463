//! Job control: claims with heartbeats and lease takeover, done and failed records, the
//! manifest, the dataset card's config fingerprint and worker placement.
//!
//! The protocol (SPEC section 4), per shard `NAME`:
//! 1. claim: create `_progress/claims/NAME` only if absent; a claim whose heartbeat is older
//!    than the lease (or whose process is provably dead) may be taken over, by exactly one
//!    worker, through a put-if-absent marker `_progress/takeovers/NAME/<stale token>`;
//! 2. write `shards/NAME.parquet` through a staged write (temporary, then atomic rename);
//! 3. write `_progress/done/NAME.json` last, with the output's size and sha256;
//! 4. release the claim.
//!
//! A shard is done iff its done record exists and the output has the recorded size (the
//! sha256 is re-checked by `dfndr verify` or on request). Everything else found on resume
//! (claims of dead workers, outputs without a done record, temporaries) is redone.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

/// The dataset card at the root of an output.
pub const CARD_PATH: &str = "dfndr.json";
/// The consolidated view of all done shards.
pub const MANIFEST_PATH: &str = "manifest.json";
/// Folder of the parquet shards.
pub const SHARDS_DIR: &str = "shards";
/// Folder of the claims (leases).
pub const CLAIMS_DIR: &str = "_progress/claims";
/// Folder of the done records.
pub const DONE_DIR: &str = "_progress/done";
/// Folder of the failed records.
pub const FAILED_DIR: &str = "_progress/failed";
/// Folder of the takeover markers (one sub-folder per shard).
pub const TAKEOVERS_DIR: &str = "_progress/takeovers";

/// Errors of job control.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record could not be parsed.
    #[error("{path}: corrupt record: {error}")]
    CorruptRecord {
        /// Location of the record.
        path: String,
        /// The parse error (in the message, hence not also `source()`).
        error: serde_json::Error,
    },
    /// The output belongs to a job with another configuration.
    #[error("{output} was created by a job with config fingerprint {existing}, but this config has fingerprint {current}.\nChanging the config of a started job would mix incompatible shards. Use a new output location, or pass --force to adopt the new config (shards done under the old one are then redone).")]
    FingerprintMismatch {
        /// Output location.
        output: String,
        /// Fingerprint recorded in the dataset card.
        existing: String,
        /// Fingerprint of the config given now.
        current: String,
    },
    /// The output location holds something that is not a dfndr output.
    #[error("{0}")]
    Card(String),
    /// Rank or world size are inconsistent.
    #[error("{0}")]
    Placement(String),
}

/// Seconds since the Unix epoch as a float (records keep sub-second precision).
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Who a worker process is: enough to tell, from another process, whether it may be dead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// Display name, e.g. `rank3@node17:4711`.
    pub worker: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Linux boot id: a dead-process check on the same host is valid only within one boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// PID namespace: the same pid in another container is another process.
    #[serde(default)]
    pub pid_ns: Option<String>,
}

impl WorkerIdentity {
    /// The identity of the current process, with `rank` in its display name.
    pub fn current(rank: usize) -> Self {
        let host = hostname();
        let pid = std::process::id();
        WorkerIdentity {
            worker: format!("rank{rank}@{host}:{pid}"),
            host,
            pid,
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .ok()
                .map(|p| p.display().to_string()),
        }
    }

    /// True when `other` ran on this very host, boot and PID namespace and its process no
    /// longer exists: then its claim is certainly abandoned and need not wait for the lease.
    pub fn knows_dead(&self, other: &WorkerIdentity) -> bool {
        let same_place = self.host == other.host
            && self.boot_id.is_some()
            && self.boot_id == other.boot_id
            && self.pid_ns.is_some()
            && self.pid_ns == other.pid_ns;
        same_place
            && other.pid != self.pid
            && !std::path::Path::new(&format!("/proc/{}", other.pid)).exists()
    }
}

pub(crate) fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub(crate) fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The content of `_progress/claims/NAME`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClaimRecord {
    /// The claiming worker.
    #[serde(flatten)]
    pub identity: WorkerIdentity,
    /// Random token distinguishing this claim from any earlier or later one.
    pub token: String,
    /// When the claim was taken.
    pub claimed_unix: f64,
    /// Last heartbeat.
    pub heartbeat_unix: f64,
}

/// The content of `_progress/done/NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DoneRecord {
    /// Input shard URI.
    pub input: String,
    /// Output path relative to the output root.
    pub output: String,
    /// Rows written.
    pub rows: u64,
    /// Skipped samples by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Size of the output in bytes.
    pub bytes: u64,
    /// sha256 of the output, lowercase hex.
    pub sha256: String,
    /// Wall-clock seconds spent on the shard.
    pub seconds: f64,
    /// The worker that produced it.
    pub worker: String,
    /// Completion time.
    pub finished_unix: f64,
    /// Fingerprint of the config the shard was produced with.
    pub config_fingerprint: String,
    /// Seconds each stage of the producing job spent working on the shard (not waiting), by
    /// stage name; empty in records of other producers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stage_seconds: BTreeMap<String, f64>,
}

/// The content of `_progress/failed/NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailedRecord {
    /// Input shard URI.
    pub input: String,
    /// The error, with its causes.
    pub error: String,
    /// How many attempts failed so far (over all runs).
    pub attempts: u32,
    /// The worker of the last attempt.
    pub worker: String,
    /// Time of the last failure.
    pub failed_unix: f64,
}

/// One done shard in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestShard {
    /// Shard name.
    pub name: String,
    /// Input shard URI.
    pub input: String,
    /// Output path relative to the output root.
    pub output: String,
    /// Rows.
    pub rows: u64,
    /// Output size.
    pub bytes: u64,
    /// Output sha256.
    pub sha256: String,
}

/// One failed shard in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFailure {
    /// Shard name.
    pub name: String,
    /// Input shard URI.
    pub input: String,
    /// Last error.
    pub error: String,
    /// Failed attempts.
    pub attempts: u32,
}

/// `manifest.json`: every done shard and the totals, rebuilt from the done records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// DFNDR schema version of the shards.
    pub schema_version: u32,
    /// When this manifest was rebuilt.
    pub generated_unix: f64,
    /// Done shards, by name.
    pub shards: Vec<ManifestShard>,
    /// Shards whose last attempt failed and that are not done.
    pub failed: Vec<ManifestFailure>,
    /// Sum of rows over done shards.
    pub total_rows: u64,
    /// Sum of output bytes over done shards.
    pub total_bytes: u64,
    /// Skipped samples by reason over done shards.
    pub skipped: BTreeMap<String, u64>,
}

/// What an attempt to claim a shard found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The shard is ours; `took_over` names the worker whose stale claim was replaced.
    Claimed {
        /// Our claim.
        claim: ClaimRecord,
        /// The previous, stale holder, if any.
        took_over: Option<String>,
    },
    /// Another live worker holds it.
    HeldByOther(ClaimRecord),
}

/// Where a worker stands in the job: its rank among `world_size` workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// This worker's index.
    pub rank: usize,
    /// Number of workers the job was started with.
    pub world_size: usize,
    /// Where the values came from (flags, SLURM, Kubernetes, default).
    pub source: &'static str,
}

impl Placement {
    /// Rank and world size from the flags, else `SLURM_ARRAY_TASK_ID`/`SLURM_ARRAY_TASK_COUNT`
    /// (combined with `SLURM_PROCID`/`SLURM_NTASKS` when an array task runs several tasks),
    /// else `SLURM_PROCID`/`SLURM_NTASKS`, else `JOB_COMPLETION_INDEX` (Kubernetes
    /// Indexed Job, with the world size from `DFNDR_WORLD_SIZE` or the `--world-size` flag),
    /// else a single worker. `env` looks a variable up (the process environment in
    /// production, a map in tests).
    pub fn resolve(
        rank: Option<usize>,
        world_size: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Placement, JobError> {
        let num = |name: &str| -> Result<Option<usize>, JobError> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    JobError::Placement(format!(
                        "environment variable {name}={v:?} is not a non-negative integer"
                    ))
                }),
            }
        };
        let (rank, world_size, source) = if rank.is_some() || world_size.is_some() {
            let world = match world_size {
                Some(w) => w,
                None => num("DFNDR_WORLD_SIZE")?.unwrap_or(1),
            };
            (rank.unwrap_or(0), world, "flags")
        } else if let (Some(r), Some(w)) =
            (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?)
        {
            // An array job: array indices may start above 0. Each array task may itself run
            // several tasks (one per GPU of its node): rank = index x tasks + task.
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = r.saturating_sub(min);
            match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(task), Some(tasks)) if tasks > 1 => {
                    (index * tasks + task, w * tasks, "SLURM array x tasks")
                }
                _ => (index, w, "SLURM array"),
            }
        } else if let (Some(r), Some(w)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            (r, w, "SLURM tasks")
        } else if let Some(r) = num("JOB_COMPLETION_INDEX")? {
            (
                r,
                num("DFNDR_WORLD_SIZE")?.unwrap_or(1).max(r + 1),
                "Kubernetes",
            )
        } else {
            (0, 1, "default")
        };
        if world_size == 0 {
            return Err(JobError::Placement("world size must be at least 1".into()));
        }
        if rank >= world_size {
            return Err(JobError::Placement(format!(
                "rank {rank} is not below world size {world_size} (from {source})"
            )));
        }
        Ok(Placement {
            rank,
            world_size,
            source,
        })
    }

    /// The order in which this worker visits `n` shards: its own stride first
    /// (`rank, rank + world, …`), then everyone else's, starting with the next rank's stride,
    /// so that a finished worker steals from the others instead of idling.
    pub fn work_order(&self, n: usize) -> Vec<usize> {
        let w = self.world_size.max(1);
        let mut order = Vec::with_capacity(n);
        for offset in 0..w {
            let r = (self.rank + offset) % w;
            if offset == 0 {
                order.extend((r..n).step_by(w));
            } else {
                // Steal from the tail of other strides: their owners work from the head.
                let theirs: Vec<usize> = (r..n).step_by(w).collect();
                order.extend(theirs.into_iter().rev());
            }
        }
        order
    }
}

/// Job control over an output location.
#[derive(Clone)]
pub struct Job {
    store: Arc<dyn Store>,
    identity: WorkerIdentity,
    lease: Duration,
    /// Folder of the claims, done, failed and takeover records: `_progress` for the job that
    /// produces the shards, `_progress/tasks/TASK` for a task over the done shards.
    progress: String,
}

/// Output path of a shard, relative to the output root.
pub fn output_path(name: &str) -> String {
    format!("{SHARDS_DIR}/{name}.parquet")
}

/// A fresh random-enough token: hashes time, pid, a counter and stack address entropy.
fn new_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes(),
    );
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let local = 0u8;
    h.update((&local as *const u8 as usize).to_le_bytes());
    hex(&h.finalize()[..16])
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Job {
    /// Job control for the output behind `store`, acting as `identity`, with claims expiring
    /// `lease` after their last heartbeat.
    pub fn new(store: Arc<dyn Store>, identity: WorkerIdentity, lease: Duration) -> Self {
        Job {
            store,
            identity,
            lease,
            progress: "_progress".to_string(),
        }
    }

    /// The job control of a task run over this output's done shards (`dfndr embed`, `dfndr
    /// caption`): the same store, worker and lease, with claims, failures and completion
    /// records of its own under `_progress/tasks/TASK`, so that they never mix with the
    /// records of the job that produced the shards.
    pub fn task(&self, task: &str) -> Job {
        Job {
            store: Arc::clone(&self.store),
            identity: self.identity.clone(),
            lease: self.lease,
            progress: format!("_progress/tasks/{task}"),
        }
    }

    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}", self.progress)
    }

    fn claim_path(&self, name: &str) -> String {
        format!("{}/{name}", self.dir("claims"))
    }

    fn done_path(&self, name: &str) -> String {
        format!("{}/{name}.json", self.dir("done"))
    }

    fn failed_path(&self, name: &str) -> String {
        format!("{}/{name}.json", self.dir("failed"))
    }

    /// The output store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// This worker.
    pub fn identity(&self) -> &WorkerIdentity {
        &self.identity
    }

    /// The lease duration.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<Option<T>, JobError> {
        let bytes = match self.store.get(path) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| JobError::CorruptRecord {
                path: self.store.uri_of(path),
                error,
            })
    }

    fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
        // Serialising our own plain records cannot fail; an empty object is a safe fallback.
        let mut v = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }

    /// Creates the dataset card, or checks that the existing one has `fingerprint`.
    /// With `force`, a different fingerprint replaces the card instead of failing.
    /// Returns true when the card was created by this call. Every worker calls this first, so
    /// it also removes the temporary files that killed processes of this host left behind.
    pub fn init_card(
        &self,
        card: &serde_json::Value,
        fingerprint: &str,
        force: bool,
    ) -> Result<bool, JobError> {
        let swept = self.store.sweep_dead_temporaries()?;
        if swept > 0 {
            tracing::info!(files = swept, "removed temporary files of dead workers");
        }
        let bytes = Self::to_json(card);
        if self.store.put_if_absent(CARD_PATH, &bytes)? {
            return Ok(true);
        }
        let existing: serde_json::Value = match self.read_json(CARD_PATH) {
            Ok(Some(v)) => v,
            Ok(None) => return self.init_card(card, fingerprint, force),
            Err(e) => {
                return Err(JobError::Card(format!(
                    "{e}\nThe output location holds a dfndr.json that is not a dfndr dataset card; use another output location."
                )))
            }
        };
        let existing_fp = existing
            .get("config_fingerprint")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if existing_fp == fingerprint {
            return Ok(false);
        }
        if force {
            self.store.put(CARD_PATH, &bytes)?;
            return Ok(false);
        }
        Err(JobError::FingerprintMismatch {
            output: self.store.root_uri(),
            existing: existing_fp,
            current: fingerprint.to_string(),
        })
    }

    /// Reads the dataset card, if the output has one.
    pub fn read_card(&self) -> Result<Option<serde_json::Value>, JobError> {
        self.read_json(CARD_PATH)
    }

    /// The current claim on `name`, if any.
    pub fn read_claim(&self, name: &str) -> Result<Option<ClaimRecord>, JobError> {
        self.read_json(&self.claim_path(name))
    }

    /// Whether `claim` may be taken over now.
    pub fn is_stale(&self, claim: &ClaimRecord, now: f64) -> bool {
        now - claim.heartbeat_unix > self.lease.as_secs_f64()
            || self.identity.knows_dead(&claim.identity)
    }

    fn new_claim(&self) -> ClaimRecord {
        let now = now_unix();
        ClaimRecord {
            identity: self.identity.clone(),
            token: new_token(),
            claimed_unix: now,
            heartbeat_unix: now,
        }
    }

    /// Tries to claim shard `name` (see the module documentation for the protocol).
    pub fn claim(&self, name: &str) -> Result<ClaimOutcome, JobError> {
        let path = self.claim_path(name);
        // A few rounds: the claim may vanish or change between our reads.
        for _ in 0..4 {
            let ours = self.new_claim();
            if self.store.put_if_absent(&path, &Self::to_json(&ours))? {
                return Ok(ClaimOutcome::Claimed {
                    claim: ours,
                    took_over: None,
                });
            }
            let current = match self.read_json::<ClaimRecord>(&path) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                // A claim we cannot parse was left by a crash mid-write on a store without
                // atomic puts; it is judged by its age alone.
                Err(JobError::CorruptRecord { .. }) => {
                    let token = format!("corrupt-{}", hex(&Sha256::digest(name.as_bytes())[..8]));
                    match self.expired_stand_in(&path, token)? {
                        Some(stand_in) => stand_in,
                        None => return Ok(ClaimOutcome::HeldByOther(ours)),
                    }
                }
                Err(e) => return Err(e),
            };
            if !self.is_stale(&current, now_unix()) {
                return Ok(ClaimOutcome::HeldByOther(current));
            }
            if !self.win_takeover(name, &current, &ours)? {
                return Ok(ClaimOutcome::HeldByOther(current));
            }
            // The holder may have sent a heartbeat between our read and the marker.
            match self.read_json::<ClaimRecord>(&path) {
                Ok(Some(again))
                    if again.token == current.token && !self.is_stale(&again, now_unix()) =>
                {
                    return Ok(ClaimOutcome::HeldByOther(again));
                }
                Ok(Some(again)) if again.token != current.token => {
                    return Ok(ClaimOutcome::HeldByOther(again));
                }
                Ok(_) | Err(JobError::CorruptRecord { .. }) => {}
                Err(e) => return Err(e),
            }
            self.store.put(&path, &Self::to_json(&ours))?;
            return Ok(ClaimOutcome::Claimed {
                claim: ours,
                took_over: Some(current.identity.worker),
            });
        }
        // The claim kept changing under us: someone else is actively working on it.
        match self.read_claim(name)? {
            Some(c) => Ok(ClaimOutcome::HeldByOther(c)),
            None => Ok(ClaimOutcome::HeldByOther(self.new_claim())),
        }
    }

    /// A record we cannot parse was left by a crash mid-write on a store without atomic puts;
    /// it is judged by its age alone: `None` while younger than the lease (treat it as live),
    /// else a stale stand-in record with `token`.
    fn expired_stand_in(&self, path: &str, token: String) -> Result<Option<ClaimRecord>, JobError> {
        let age = self
            .store
            .stat(path)?
            .map(|m| now_unix() - m.modified_unix as f64)
            .unwrap_or(0.0);
        Ok((age > self.lease.as_secs_f64()).then(|| ClaimRecord {
            identity: self.identity.clone(),
            token,
            claimed_unix: 0.0,
            heartbeat_unix: 0.0,
        }))
    }

    /// Competes for the takeover of the stale claim `stale`: exactly one worker wins the marker
    /// `_progress/takeovers/NAME/TOKEN`. A marker whose taker is itself stale (it died between
    /// winning the marker and writing its claim) is taken over the same way, by competing for a
    /// marker named after the dead taker's token, so no death leaves a shard stuck.
    fn win_takeover(
        &self,
        name: &str,
        stale: &ClaimRecord,
        ours: &ClaimRecord,
    ) -> Result<bool, JobError> {
        let mut token = stale.token.clone();
        // Each level needs another death inside the takeover window; a few suffice.
        for _ in 0..16 {
            let marker = format!("{}/{name}/{token}", self.dir("takeovers"));
            if self.store.put_if_absent(&marker, &Self::to_json(ours))? {
                return Ok(true);
            }
            let taker = match self.read_json::<ClaimRecord>(&marker) {
                Ok(Some(taker)) => taker,
                // The marker vanished (released with the claim): start over.
                Ok(None) => return Ok(false),
                Err(JobError::CorruptRecord { .. }) => {
                    match self.expired_stand_in(&marker, format!("{token}-corrupt"))? {
                        Some(stand_in) => stand_in,
                        None => return Ok(false),
                    }
                }
                Err(e) => return Err(e),
            };
            if !self.is_stale(&taker, now_unix()) {
                return Ok(false);
            }
            token = taker.token;
        }
        Ok(false)
    }

    /// Refreshes our claim's heartbeat. Returns false when the claim is no longer ours
    /// (taken over after we stalled past the lease): the caller must abandon the shard.
    pub fn heartbeat(&self, name: &str, claim: &mut ClaimRecord) -> Result<bool, JobError> {
        let path = self.claim_path(name);
        match self.read_json::<ClaimRecord>(&path)? {
            Some(current) if current.token == claim.token => {
                claim.heartbeat_unix = now_unix();
                self.store.put(&path, &Self::to_json(claim))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether we still hold the claim.
    pub fn still_holds(&self, name: &str, claim: &ClaimRecord) -> Result<bool, JobError> {
        Ok(matches!(self.read_claim(name)?, Some(c) if c.token == claim.token))
    }

    /// Releases our claim on `name` and its takeover markers.
    pub fn release(&self, name: &str, claim: &ClaimRecord) -> Result<(), JobError> {
        if self.still_holds(name, claim)? {
            self.store.delete(&self.claim_path(name))?;
        }
        self.remove_takeover_markers(name)
    }

    /// Removes a claim left behind on a shard that is already done (its worker died after
    /// writing the done record), so that status does not report it as in progress.
    pub fn clear_claim_of_done(&self, name: &str) -> Result<(), JobError> {
        if let Some(c) = self.read_claim(name)? {
            if self.is_stale(&c, now_unix()) {
                self.store.delete(&self.claim_path(name))?;
            }
        }
        self.remove_takeover_markers(name)
    }

    fn remove_takeover_markers(&self, name: &str) -> Result<(), JobError> {
        let dir = format!("{}/{name}", self.dir("takeovers"));
        for marker in self.store.list(&dir)? {
            self.store.delete(&format!("{dir}/{marker}"))?;
        }
        Ok(())
    }

    /// The done record of `name`, if any.
    pub fn done_record(&self, name: &str) -> Result<Option<DoneRecord>, JobError> {
        self.read_json(&self.done_path(name))
    }

    /// Whether `name` is done for a job with config `fingerprint`: its done record exists,
    /// names that fingerprint, and the output has the recorded size. A shard written under
    /// another config is not done for this one (a job adopted with `--force` redoes it).
    pub fn is_done(&self, name: &str, fingerprint: &str) -> Result<bool, JobError> {
        let Some(rec) = self.done_record(name)? else {
            return Ok(false);
        };
        if rec.config_fingerprint != fingerprint {
            return Ok(false);
        }
        Ok(matches!(self.store.stat(&rec.output)?, Some(m) if m.size == rec.bytes))
    }

    /// Releases our claim on a shard we have just published. The shard is done whatever
    /// happens here, so a storage error is retried a few times and then only logged: a claim
    /// left behind on a done shard is cleared by the next worker that looks at it.
    pub fn release_after_publish(&self, name: &str, claim: &ClaimRecord) {
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=4 {
            match self.release(name, claim) {
                Ok(()) => return,
                Err(e) if attempt < 4 => {
                    tracing::warn!(shard = name, attempt, error = %e, "cannot release the claim of a done shard; retrying");
                    std::thread::sleep(wait);
                    wait *= 4;
                }
                Err(e) => {
                    tracing::warn!(shard = name, error = %e, "cannot release the claim of a done shard; leaving it to be cleared later (the shard is done)");
                }
            }
        }
    }

    /// Names of all shards with a done record (one listing; sizes not checked).
    pub fn done_names(&self) -> Result<HashSet<String>, JobError> {
        Ok(self
            .store
            .list(&self.dir("done"))?
            .into_iter()
            .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
            .collect())
    }

    /// Records `name` as done; the last step of a shard. Clears an earlier failure.
    pub fn write_done(&self, name: &str, record: &DoneRecord) -> Result<(), JobError> {
        self.store
            .put(&self.done_path(name), &Self::to_json(record))?;
        self.store.delete(&self.failed_path(name))?;
        Ok(())
    }

    /// The failed record of `name`, if any.
    pub fn failed_record(&self, name: &str) -> Result<Option<FailedRecord>, JobError> {
        self.read_json(&self.failed_path(name))
    }

    /// Records a failed attempt at `name`, counting it on top of earlier attempts.
    pub fn write_failed(
        &self,
        name: &str,
        input: &str,
        error: &str,
    ) -> Result<FailedRecord, JobError> {
        let attempts = match self.failed_record(name) {
            Ok(Some(prev)) => prev.attempts + 1,
            _ => 1,
        };
        let record = FailedRecord {
            input: input.to_string(),
            error: error.to_string(),
            attempts,
            worker: self.identity.worker.clone(),
            failed_unix: now_unix(),
        };
        self.store
            .put(&self.failed_path(name), &Self::to_json(&record))?;
        Ok(record)
    }

    /// All done records, by shard name.
    pub fn all_done(&self) -> Result<BTreeMap<String, DoneRecord>, JobError> {
        let mut out = BTreeMap::new();
        for name in self.done_names()? {
            if let Some(rec) = self.done_record(&name)? {
                out.insert(name, rec);
            }
        }
        Ok(out)
    }

    /// All failed records, by shard name.
    pub fn all_failed(&self) -> Result<BTreeMap<String, FailedRecord>, JobError> {
        let mut out = BTreeMap::new();
        for file in self.store.list(&self.dir("failed"))? {
            if let Some(name) = file.strip_suffix(".json") {
                if let Some(rec) = self.failed_record(name)? {
                    out.insert(name.to_string(), rec);
                }
            }
        }
        Ok(out)
    }

    /// All current claims, by shard name (unparseable ones are left out).
    pub fn all_claims(&self) -> Result<BTreeMap<String, ClaimRecord>, JobError> {
        let mut out = BTreeMap::new();
        for name in self.store.list(&self.dir("claims"))? {
            if let Ok(Some(c)) = self.read_claim(&name) {
                out.insert(name, c);
            }
        }
        Ok(out)
    }

    /// Rebuilds `manifest.json` from the done and failed records and writes it atomically.
    pub fn rebuild_manifest(&self, schema_version: u32) -> Result<Manifest, JobError> {
        let done = self.all_done()?;
        let failed = self.all_failed()?;
        let mut manifest = Manifest {
            schema_version,
            generated_unix: now_unix(),
            shards: Vec::with_capacity(done.len()),
            failed: Vec::new(),
            total_rows: 0,
            total_bytes: 0,
            skipped: BTreeMap::new(),
        };
        for (name, rec) in &done {
            manifest.total_rows += rec.rows;
            manifest.total_bytes += rec.bytes;
            for (reason, n) in &rec.skipped {
                *manifest.skipped.entry(reason.clone()).or_default() += n;
            }
            manifest.shards.push(ManifestShard {
                name: name.clone(),
                input: rec.input.clone(),
                output: rec.output.clone(),
                rows: rec.rows,
                bytes: rec.bytes,
                sha256: rec.sha256.clone(),
            });
        }
        for (name, rec) in failed {
            if !done.contains_key(&name) {
                manifest.failed.push(ManifestFailure {
                    name,
                    input: rec.input,
                    error: rec.error,
                    attempts: rec.attempts,
                });
            }
        }
        self.store.put(MANIFEST_PATH, &Self::to_json(&manifest))?;
        Ok(manifest)
    }
}

/// A writer that hashes and counts what passes through it, so the done record's sha256
/// needs no second read of the output.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the bytes written and their sha256 (lowercase hex).
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex(&self.hasher.finalize()))
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 (lowercase hex) and size of everything `reader` yields.
pub fn sha256_of(mut reader: impl std::io::Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use std::collections::HashMap;

    fn job(dir: &std::path::Path, worker: &str, lease_s: u64) -> Job {
        let mut id = WorkerIdentity::current(0);
        id.worker = worker.to_string();
        // distinct pids so the dead-process shortcut never applies between test "workers"
        id.pid = std::process::id();
        Job::new(
            Arc::new(LocalStore::new(dir)),
            id,
            Duration::from_secs(lease_s),
        )
    }

    #[test]
    fn claim_is_exclusive_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = job(dir.path(), "a", 60);
        let b = job(dir.path(), "b", 60);
        let ClaimOutcome::Claimed { claim, took_over } = a.claim("s0").unwrap() else {
            panic!("first claim must succeed")
        };
        assert!(took_over.is_none());
        assert!(
            matches!(b.claim("s0").unwrap(), ClaimOutcome::HeldByOther(c) if c.identity.worker == "a")
        );
        a.release("s0", &claim).unwrap();
        assert!(matches!(
            b.claim("s0").unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
    }

    #[test]
    fn stale_claim_is_taken_over_once_and_old_holder_notices() {
        let dir = tempfile::tempdir().unwrap();
        let a = job(dir.path(), "a", 0);
        let b = job(dir.path(), "b", 0);
        let ClaimOutcome::Claimed {
            claim: mut a_claim, ..
        } = a.claim("s0").unwrap()
        else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(20));
        let ClaimOutcome::Claimed {
            claim: b_claim,
            took_over,
        } = b.claim("s0").unwrap()
        else {
            panic!("stale claim must be taken over")
        };
        assert_eq!(took_over.as_deref(), Some("a"));
        // a stalled past its lease: its heartbeat must tell it the shard is no longer its own
        assert!(!a.heartbeat("s0", &mut a_claim).unwrap());
        assert!(b.still_holds("s0", &b_claim).unwrap());
    }

    #[test]
    fn takeover_marker_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let a = job(dir.path(), "a", 3600);
        let ClaimOutcome::Claimed { .. } = a.claim("s0").unwrap() else {
            panic!()
        };
        // age the claim by rewriting its heartbeat
        let mut rec = a.read_claim("s0").unwrap().unwrap();
        rec.heartbeat_unix -= 7200.0;
        a.store()
            .put("_progress/claims/s0", &serde_json::to_vec(&rec).unwrap())
            .unwrap();
        let b = job(dir.path(), "b", 3600);
        let c = job(dir.path(), "c", 3600);
        // b wins the marker for the stale token; c then sees b's fresh claim
        assert!(matches!(
            b.claim("s0").unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
        assert!(
            matches!(c.claim("s0").unwrap(), ClaimOutcome::HeldByOther(h) if h.identity.worker == "b")
        );
    }

    #[test]
    fn taker_that_died_after_winning_the_marker_does_not_block_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let dead = job(dir.path(), "dead", 1);
        let ClaimOutcome::Claimed { claim, .. } = dead.claim("s0").unwrap() else {
            panic!("first claim must succeed")
        };
        // A taker won the marker for that claim's token, then died before writing its claim;
        // its marker record is as old as the lease.
        let past = now_unix() - 10.0;
        let taker = ClaimRecord {
            identity: WorkerIdentity {
                host: "elsewhere".into(),
                ..WorkerIdentity::current(9)
            },
            token: "taker-token".into(),
            claimed_unix: past,
            heartbeat_unix: past,
        };
        dead.store
            .put(
                &format!("{TAKEOVERS_DIR}/s0/{}", claim.token),
                &Job::to_json(&taker),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let b = job(dir.path(), "b", 1);
        let c = job(dir.path(), "c", 1);
        let outcomes = [b.claim("s0").unwrap(), c.claim("s0").unwrap()];
        let won: Vec<bool> = outcomes
            .iter()
            .map(|o| matches!(o, ClaimOutcome::Claimed { .. }))
            .collect();
        assert_eq!(
            won,
            [true, false],
            "exactly one worker takes the shard over"
        );
    }

    #[test]
    fn fingerprint_mismatch_is_refused_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(dir.path(), "a", 60);
        let card = |fp: &str| serde_json::json!({"config_fingerprint": fp});
        assert!(j.init_card(&card("aaa"), "aaa", false).unwrap());
        assert!(!j.init_card(&card("aaa"), "aaa", false).unwrap());
        let err = j.init_card(&card("bbb"), "bbb", false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(!j.init_card(&card("bbb"), "bbb", true).unwrap());
        assert!(!j.init_card(&card("bbb"), "bbb", false).unwrap());
    }

    #[test]
    fn done_requires_matching_output_size() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(dir.path(), "a", 60);
        j.store().put("shards/s0.parquet", b"12345").unwrap();
        let rec = DoneRecord {
            input: "in/s0.tar".into(),
            output: output_path("s0"),
            rows: 3,
            skipped: BTreeMap::from([("no_caption".to_string(), 2)]),
            bytes: 5,
            sha256: "x".into(),
            seconds: 0.1,
            worker: "a".into(),
            finished_unix: now_unix(),
            config_fingerprint: "fp".into(),
            stage_seconds: BTreeMap::new(),
        };
        j.write_failed("s0", "in/s0.tar", "boom").unwrap();
        j.write_done("s0", &rec).unwrap();
        assert!(j.is_done("s0", "fp").unwrap());
        assert!(
            !j.is_done("s0", "other").unwrap(),
            "done under another config is not done for this one"
        );
        assert!(
            j.failed_record("s0").unwrap().is_none(),
            "done clears the failure"
        );
        j.store().put("shards/s0.parquet", b"1234").unwrap();
        assert!(!j.is_done("s0", "fp").unwrap());
        let m = j.rebuild_manifest(1).unwrap();
        assert_eq!(m.total_rows, 3);
        assert_eq!(m.skipped["no_caption"], 2);
    }

    #[test]
    fn failed_attempts_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(dir.path(), "a", 60);
        assert_eq!(j.write_failed("s", "i", "e1").unwrap().attempts, 1);
        assert_eq!(j.write_failed("s", "i", "e2").unwrap().attempts, 2);
        let m = j.rebuild_manifest(1).unwrap();
        assert_eq!(m.failed.len(), 1);
        assert_eq!(m.failed[0].error, "e2");
    }

    #[test]
    fn placement_from_flags_and_environment() {
        let env = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| m.get(k).cloned()
        };
        let p = Placement::resolve(Some(2), Some(4), env(&[("SLURM_PROCID", "1")])).unwrap();
        assert_eq!((p.rank, p.world_size, p.source), (2, 4, "flags"));
        let p = Placement::resolve(
            None,
            None,
            env(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8")]),
        )
        .unwrap();
        assert_eq!((p.rank, p.world_size), (3, 8));
        let p = Placement::resolve(
            None,
            None,
            env(&[
                ("SLURM_ARRAY_TASK_ID", "5"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "2"),
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
            ]),
        )
        .unwrap();
        assert_eq!((p.rank, p.world_size, p.source), (3, 4, "SLURM array"));
        // Array task 2 (of 4, from index 0) running 8 tasks, one per GPU: this is its 6th.
        let p = Placement::resolve(
            None,
            None,
            env(&[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_PROCID", "5"),
                ("SLURM_NTASKS", "8"),
            ]),
        )
        .unwrap();
        assert_eq!((p.rank, p.world_size), (21, 32));
        let p = Placement::resolve(
            None,
            None,
            env(&[("JOB_COMPLETION_INDEX", "2"), ("DFNDR_WORLD_SIZE", "6")]),
        )
        .unwrap();
        assert_eq!((p.rank, p.world_size, p.source), (2, 6, "Kubernetes"));
        let p = Placement::resolve(None, None, env(&[])).unwrap();
        assert_eq!((p.rank, p.world_size), (0, 1));
        assert!(Placement::resolve(Some(4), Some(4), env(&[])).is_err());
        assert!(Placement::resolve(
            None,
            None,
            env(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")])
        )
        .is_err());
    }

    #[test]
    fn work_order_visits_every_shard_once_own_stride_first() {
        for world in 1..5 {
            for rank in 0..world {
                let p = Placement {
                    rank,
                    world_size: world,
                    source: "test",
                };
                let order = p.work_order(11);
                let mut sorted = order.clone();
                sorted.sort();
                assert_eq!(sorted, (0..11).collect::<Vec<_>>());
                let own: Vec<usize> = (rank..11).step_by(world).collect();
                assert_eq!(&order[..own.len()], &own[..]);
            }
        }
    }

    #[test]
    fn hashing_writer_matches_sha256_of() {
        let mut w = HashingWriter::new(Vec::new());
        std::io::Write::write_all(&mut w, b"hello world").unwrap();
        let (inner, n, sha) = w.finish();
        assert_eq!(n, 11);
        assert_eq!(sha, sha256_of(&inner[..]).unwrap().0);
        assert_eq!(
            sha,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }
}
