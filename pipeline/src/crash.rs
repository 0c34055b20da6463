//! Fault injection for the job-control tests: crashes at the steps of the shard protocol, and
//! stages that are slow or hang.
//!
//! The exactly-once guarantee is only worth something if it survives a process dying at each
//! step of the shard protocol, so the tests make the real binary die there. With
//! `DFNDR_CRASH_AT=POINT` (optionally `POINT:SHARD`) the process sends itself SIGKILL (no
//! destructors, no cleanup, no core dump) when it reaches that point. Unset, this is a
//! no-op; the variable is deliberately undocumented for users.

/// The steps of the shard protocol a crash can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The claim was created.
    Claimed,
    /// The output was fully written under its temporary name.
    TempWritten,
    /// The output was renamed into place; no done record yet.
    Renamed,
    /// The done record was written; the claim is not released yet.
    DoneWritten,
}

impl CrashPoint {
    fn name(self) -> &'static str {
        match self {
            CrashPoint::Claimed => "claimed",
            CrashPoint::TempWritten => "temp_written",
            CrashPoint::Renamed => "renamed",
            CrashPoint::DoneWritten => "done_written",
        }
    }
}

/// Aborts the process if `DFNDR_CRASH_AT` names this point (and this shard, if it names one).
pub fn crash_point(point: CrashPoint, shard: &str) {
    let Ok(spec) = std::env::var("DFNDR_CRASH_AT") else {
        return;
    };
    let (at, only) = match spec.split_once(':') {
        Some((at, only)) => (at, Some(only)),
        None => (spec.as_str(), None),
    };
    if at == point.name() && only.is_none_or(|s| s == shard) {
        eprintln!(
            "DFNDR_CRASH_AT: killing this process at {} of shard {shard}",
            point.name()
        );
        let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
        std::process::abort();
    }
}

/// Slows or blocks a stage for the liveness and slow-consumer tests: with
/// `DFNDR_TEST_PACE=STAGE:MS` the stage sleeps MS milliseconds per batch, with
/// `DFNDR_TEST_PACE=STAGE:hang` it blocks for good at its first batch (a stand-in for a read or
/// a device that never returns). Unset, this is a no-op; deliberately undocumented for users.
pub fn pace(stage: &str) {
    let Ok(spec) = std::env::var("DFNDR_TEST_PACE") else {
        return;
    };
    let Some((at, how)) = spec.split_once(':') else {
        return;
    };
    if at != stage {
        return;
    }
    if how == "hang" {
        eprintln!("DFNDR_TEST_PACE: the {stage} stage hangs");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    if let Ok(ms) = how.parse::<u64>() {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
