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

/// Some shards failed.
pub const SHARDS_FAILED: u8 = 1;
/// The user must fix the command or the config.
pub const USAGE: u8 = 2;
/// A runtime or storage error: worth retrying.
pub const RUNTIME: u8 = 3;
/// Stopped by a signal.
pub const INTERRUPTED: u8 = 130;

/// An error the user must fix (exit status 2): a bad flag, config, path or dataset. Other
/// errors are runtime errors (exit status 3).
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

/// The exit status of an error: [`USAGE`] when anything in its chain is a [`Usage`], else
/// [`RUNTIME`].
pub fn status_of(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<Usage>()) {
        USAGE
    } else {
        RUNTIME
    }
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
    fn usage_errors_are_found_under_any_context() {
        let e: anyhow::Result<()> = Err(std::io::Error::other("bad toml")).usage();
        let e = e.context("cannot load the job").unwrap_err();
        assert_eq!(status_of(&e), USAGE);
        assert_eq!(format!("{e:#}"), "cannot load the job: bad toml");
        let runtime = anyhow::anyhow!("connection reset").context("cannot list");
        assert_eq!(status_of(&runtime), RUNTIME);
        assert_eq!(status_of(&usage("no output")), USAGE);
    }
}
