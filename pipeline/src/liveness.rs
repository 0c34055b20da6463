//! Liveness by progress: a worker is alive while its shard advances, not while some thread
//! of it runs.
//!
//! Every stage reports each batch it finishes (and the input spool each chunk it downloads)
//! with [`Liveness::beat`]. The claim's heartbeat thread renews the claim only while the last
//! beat is recent: a worker blocked on a read that never returns or on a hung device stops
//! renewing, says why and exits with status 3, so that another worker takes its shard over
//! when the lease expires.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the shard last made progress.
#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last_ms: AtomicU64,
    /// Progress may stop for this long before the worker counts as hung.
    pub stall: Duration,
}

impl Liveness {
    /// Starts counting now.
    pub fn new(stall: Duration) -> Liveness {
        Liveness {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            stall,
        }
    }

    /// Records progress.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the last progress.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Whether progress has stopped for longer than the stall limit.
    pub fn stalled(&self) -> bool {
        self.idle() > self.stall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_resets_the_idle_time() {
        let l = Liveness::new(Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        assert!(l.stalled());
        l.beat();
        assert!(!l.stalled());
        assert!(l.idle() < Duration::from_millis(30));
    }
}
