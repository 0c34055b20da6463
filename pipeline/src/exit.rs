//! Exit statuses a scheduler can act on.
//!
//! | status | meaning | what a scheduler should do |
//! |---|---|---|
//! | 0 | every shard of the job is done | nothing |
//! | 1 | some shards failed (bad input; recorded with their errors) | look at `dfndr status` |
//! | 2 | usage or configuration error | fix the command or config; retrying cannot help |
//! | 3 | runtime or storage error (store unreachable, hung worker, ...) | retry later |
//! | 130 | interrupted (SIGINT / SIGTERM); claims were released | requeue |

use std::fmt;
use std::process::ExitCode;

use dfndr_shards::job::JobError;
use dfndr_shards::shardlist::ShardListError;
use dfndr_shards::store::StoreError;

/// Some shards failed.
pub const SHARDS_FAILED: u8 = 1;
/// The user must fix the command or the config.
pub const USAGE: u8 = 2;
/// A runtime or storage error: worth retrying.
pub const RUNTIME: u8 = 3;
/// Stopped by a signal.
pub const INTERRUPTED: u8 = 130;

/// An error the user must fix (exit status 2) that its type does not tell: a bad flag, config
/// or dataset.
#[derive(Debug)]
pub struct Usage(pub anyhow::Error);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Usage {}

/// Marks the error of a result as the user's to fix.
pub trait UsageResult<T> {
    /// `Err(e)` becomes `Err(Usage(e))`.
    fn usage(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> UsageResult<T> for Result<T, E> {
    fn usage(self) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::Error::new(Usage(e.into())))
    }
}

/// A usage error with this message.
pub fn usage(message: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Usage(anyhow::anyhow!("{message}")))
}

/// The exit status of an error: the first error in its chain that tells whose it is decides
/// (see [`whose`]); with none, `default` (runtime for the commands that run workers, usage for
/// those that read what the user names).
pub fn status_of(err: &anyhow::Error, default: u8) -> u8 {
    err.chain().find_map(whose).unwrap_or(default)
}

/// Whether an error is the user's to fix ([`USAGE`]) or may go away by itself ([`RUNTIME`]),
/// when its type says so: a [`Usage`] mark; a store location wrong as written, a missing
/// bucket or no permission (usage) against a failed request or I/O error (runtime); an output
/// of another config, a foreign output or a bad placement; a shard pattern that cannot name
/// shards. A missing object says neither.
fn whose(e: &(dyn std::error::Error + 'static)) -> Option<u8> {
    let store = |e: &StoreError| match e {
        StoreError::NotFound(_) => None,
        e if e.is_transient() => Some(RUNTIME),
        _ => Some(USAGE),
    };
    if e.is::<Usage>() {
        return Some(USAGE);
    }
    if let Some(e) = e.downcast_ref::<StoreError>() {
        return store(e);
    }
    if let Some(e) = e.downcast_ref::<JobError>() {
        return match e {
            JobError::Store(e) => store(e),
            JobError::CorruptRecord { .. } => None,
            JobError::FingerprintMismatch { .. } | JobError::Card(_) | JobError::Placement(_) => {
                Some(USAGE)
            }
        };
    }
    if let Some(e) = e.downcast_ref::<ShardListError>() {
        return match e {
            ShardListError::Store(e) => store(e),
            _ => Some(USAGE),
        };
    }
    None
}

/// The process exit code of a status.
pub fn code(status: u8) -> ExitCode {
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_first_error_that_tells_whose_it_is_decides() {
        let e: anyhow::Result<()> = Err(std::io::Error::other("bad toml")).usage();
        let e = e.context("cannot load the job").unwrap_err();
        assert_eq!(status_of(&e, RUNTIME), USAGE);
        assert_eq!(format!("{e:#}"), "cannot load the job: bad toml");
        let plain = anyhow::anyhow!("connection reset").context("cannot list");
        assert_eq!(status_of(&plain, RUNTIME), RUNTIME);
        assert_eq!(status_of(&plain, USAGE), USAGE);
        assert_eq!(status_of(&usage("no output"), RUNTIME), USAGE);
        let remote = anyhow::Error::new(JobError::Store(StoreError::Remote {
            path: "s3://b/x".into(),
            error: "timed out".into(),
        }))
        .context("cannot claim");
        assert_eq!(status_of(&remote, USAGE), RUNTIME);
        let denied = anyhow::Error::new(StoreError::Io {
            path: "/out".into(),
            error: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert_eq!(status_of(&denied, RUNTIME), USAGE);
        let missing = anyhow::Error::new(StoreError::NotFound("/x".into()));
        assert_eq!(status_of(&missing, RUNTIME), RUNTIME);
        let pattern = anyhow::Error::new(ShardListError::NoMatch {
            pattern: "/in/*.tar".into(),
        });
        assert_eq!(status_of(&pattern, RUNTIME), USAGE);
    }
}
