//! The worker loop every command that produces shards runs (`reinforce`, `import-wds`,
//! `embed`, `caption`): claims, heartbeats, takeover of dead workers' shards, signals,
//! failed-shard records with retries, and liveness by progress. What happens to one claimed
//! shard is the [`ShardTask`]'s business.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Result;
use dfndr_shards::job::{ClaimOutcome, ClaimRecord, DoneRecord, Job, Placement};
use dfndr_shards::shardlist::ShardRef;

use crate::crash::{crash_point, CrashPoint};
use crate::exit;
use crate::liveness::Liveness;
use crate::output;
use crate::progress::Progress;

/// How a worker's run ended.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// Shards in the job.
    pub shards: usize,
    /// Shards done (by anyone) when the worker stopped.
    pub done: usize,
    /// Shards done by this worker in this run.
    pub done_here: usize,
    /// Shards already done when this run looked at them.
    pub already_done: usize,
    /// Failed shards (by name) with their last error.
    pub failed: BTreeMap<String, String>,
    /// Rows written by this worker.
    pub rows: u64,
    /// Samples skipped by this worker, by reason.
    pub skipped: BTreeMap<String, u64>,
}

/// Result of one shard.
pub enum ShardResult {
    /// Published; the record describes it (the task has written it).
    Done(DoneRecord),
    /// The claim was lost (we stalled past the lease and another worker took over).
    Lost,
    /// Interrupted by a signal.
    Interrupted,
}

/// What a task sees while it works on a claimed shard.
pub struct ShardContext<'a> {
    /// The task's job control (claims, records).
    pub job: &'a Job,
    /// Our claim.
    pub claim: &'a ClaimRecord,
    /// Set when the heartbeat found the claim taken over.
    pub lost: &'a AtomicBool,
    /// Set on SIGINT/SIGTERM.
    pub interrupted: &'a AtomicBool,
    /// Where every finished batch must be reported.
    pub liveness: &'a Liveness,
    /// Progress bars.
    pub progress: &'a Progress,
}

impl ShardContext<'_> {
    /// Why the task must stop now, if it must: the claim was lost or a signal came.
    pub fn stopped(&self) -> Option<ShardResult> {
        if self.lost.load(Ordering::SeqCst) {
            Some(ShardResult::Lost)
        } else if self.interrupted.load(Ordering::SeqCst) {
            Some(ShardResult::Interrupted)
        } else {
            None
        }
    }

    /// The last steps of the shard protocol for an output written under a temporary name:
    /// publish it if the claim is still ours (output, then done record, with the crash points
    /// the job-control tests stop at), or leave the shard to the worker that took it over.
    pub fn publish(
        &self,
        name: &str,
        finished: output::Finished,
        producer: output::Producer<'_>,
    ) -> Result<ShardResult> {
        crash_point(CrashPoint::TempWritten, name);
        if !self.may_publish(name)? {
            return Ok(ShardResult::Lost);
        }
        let record = finished.commit(producer)?;
        crash_point(CrashPoint::Renamed, name);
        self.job.write_done(name, &record)?;
        crash_point(CrashPoint::DoneWritten, name);
        Ok(ShardResult::Done(record))
    }

    /// Whether we may publish: the claim is still ours. Publishing after losing it would race
    /// the new holder; its output is the same, so leaving it the work is always safe.
    pub fn may_publish(&self, name: &str) -> Result<bool> {
        Ok(!self.lost.load(Ordering::SeqCst) && self.job.still_holds(name, self.claim)?)
    }
}

/// One kind of work on shards, run by the [`Executor`].
pub trait ShardTask: Sync {
    /// Past participle for messages ("done", "embedded", "imported").
    fn verb(&self) -> &'static str;
    /// Whether `shard` needs no more work. Called for shards whose record the listing shows,
    /// and again right after claiming.
    fn is_done(&self, shard: &ShardRef) -> Result<bool>;
    /// Starts fetching the input of a shard this worker will probably take next.
    fn prefetch(&self, _shard: &ShardRef) {}
    /// Processes a claimed shard: publishes its output and writes its done record, or says
    /// why it stopped.
    fn process(&self, shard: &ShardRef, ctx: &ShardContext<'_>) -> Result<ShardResult>;
}

/// The worker loop, fixed for a run.
pub struct Executor {
    /// Job control of the task (claims, failed and done records).
    pub job: Job,
    /// This worker's place among the workers.
    pub placement: Placement,
    /// Failed attempts after which a shard is given up.
    pub max_attempts: u32,
    /// Retry shards whose failed attempts reached the limit.
    pub retry_failed: bool,
    /// Set on SIGINT/SIGTERM: finish nothing more, release claims, exit.
    pub interrupted: Arc<AtomicBool>,
    /// When the current shard last made progress.
    pub liveness: Arc<Liveness>,
}

impl Executor {
    /// Runs the worker loop until every shard is done or has failed for good.
    pub fn run(
        &self,
        task: &dyn ShardTask,
        shards: &[ShardRef],
        progress: &Progress,
    ) -> Result<RunSummary> {
        let mut summary = RunSummary {
            shards: shards.len(),
            ..RunSummary::default()
        };
        let order = self.placement.work_order(shards.len());
        let mut attempted: HashSet<usize> = HashSet::new();
        let mut verified_done: HashSet<usize> = HashSet::new();
        let poll = Duration::from_secs_f64((self.job.lease().as_secs_f64() / 4.0).clamp(0.05, 5.0));
        let mut first_pass = true;
        loop {
            let done_names = self.job.done_names()?;
            let mut waiting_on_others = false;
            for &i in &order {
                if self.interrupted.load(Ordering::SeqCst) {
                    return Ok(self.finish(task, summary, shards, progress));
                }
                let shard = &shards[i];
                if verified_done.contains(&i) || attempted.contains(&i) {
                    continue;
                }
                // "Done" means: record present and output of the recorded size. Checked once
                // per shard and run; the listing alone is not trusted.
                if done_names.contains(&shard.name) && task.is_done(shard)? {
                    verified_done.insert(i);
                    self.job.clear_claim_of_done(&shard.name)?;
                    if first_pass {
                        summary.already_done += 1;
                    }
                    progress.shard_finished(0);
                    continue;
                }
                if let Some(failed) = self.job.failed_record(&shard.name)? {
                    if failed.attempts >= self.max_attempts && !self.retry_failed {
                        attempted.insert(i);
                        summary.failed.insert(shard.name.clone(), failed.error);
                        progress.shard_finished(0);
                        continue;
                    }
                }
                let mut claim = match self.job.claim(&shard.name)? {
                    ClaimOutcome::Claimed { claim, took_over } => {
                        if let Some(prev) = took_over {
                            tracing::warn!(shard = %shard.name, previous = %prev, "took over a stale claim");
                        }
                        claim
                    }
                    ClaimOutcome::HeldByOther(_) => {
                        waiting_on_others = true;
                        continue;
                    }
                };
                crash_point(CrashPoint::Claimed, &shard.name);
                // Between our listing and our claim another worker may have finished it.
                if task.is_done(shard)? {
                    self.job.release(&shard.name, &claim)?;
                    verified_done.insert(i);
                    progress.shard_finished(0);
                    continue;
                }
                attempted.insert(i);
                // The next shard this worker will probably take downloads meanwhile.
                if let Some(&next) = order.iter().find(|&&j| {
                    j != i
                        && !attempted.contains(&j)
                        && !verified_done.contains(&j)
                        && !done_names.contains(&shards[j].name)
                }) {
                    task.prefetch(&shards[next]);
                }
                match self.process_with_heartbeat(task, shard, &mut claim, progress) {
                    Ok(ShardResult::Done(record)) => {
                        self.job.release_after_publish(&shard.name, &claim);
                        summary.done_here += 1;
                        summary.rows += record.rows;
                        for (reason, n) in &record.skipped {
                            *summary.skipped.entry(reason.clone()).or_default() += n;
                        }
                        verified_done.insert(i);
                        progress.shard_finished(record.rows);
                        tracing::info!(
                            shard = %shard.name,
                            rows = record.rows,
                            skipped = record.skipped.values().sum::<u64>(),
                            seconds = format!("{:.2}", record.seconds),
                            "shard {}", task.verb()
                        );
                    }
                    Ok(ShardResult::Lost) => {
                        tracing::warn!(shard = %shard.name, "claim lost to another worker (stalled past the lease); shard left to it");
                        // The new holder finishes it; keep watching in case it dies too.
                        attempted.remove(&i);
                        waiting_on_others = true;
                    }
                    Ok(ShardResult::Interrupted) => {
                        self.job.release(&shard.name, &claim)?;
                        return Ok(self.finish(task, summary, shards, progress));
                    }
                    Err(err) => {
                        let message = format!("{err:#}");
                        let record = self.job.write_failed(&shard.name, &shard.uri, &message)?;
                        self.job.release(&shard.name, &claim)?;
                        tracing::error!(shard = %shard.name, attempts = record.attempts, error = %message, "shard failed");
                        summary.failed.insert(shard.name.clone(), message);
                        progress.shard_finished(0);
                    }
                }
            }
            first_pass = false;
            if !waiting_on_others {
                break;
            }
            // Other workers hold the remaining shards: stay to take over if one of them dies.
            progress.set_message("waiting for shards claimed by other workers");
            let deadline = Instant::now() + poll;
            while Instant::now() < deadline {
                if self.interrupted.load(Ordering::SeqCst) {
                    return Ok(self.finish(task, summary, shards, progress));
                }
                std::thread::sleep(Duration::from_millis(50).min(poll));
            }
        }
        Ok(self.finish(task, summary, shards, progress))
    }

    fn finish(
        &self,
        task: &dyn ShardTask,
        mut summary: RunSummary,
        shards: &[ShardRef],
        progress: &Progress,
    ) -> RunSummary {
        progress.finish();
        // Failures of other workers count too: the exit status describes the job.
        if let Ok(failed) = self.job.all_failed() {
            for (name, rec) in failed {
                if shards.iter().any(|s| s.name == name) {
                    summary.failed.entry(name).or_insert(rec.error);
                }
            }
        }
        // A failure stands unless its shard is done for this task since: a done record of
        // another config (before a --force change) does not make up for it. Checked for the
        // failed shards only, which are few.
        summary.failed.retain(|name, _| {
            !shards
                .iter()
                .find(|s| &s.name == name)
                .is_some_and(|s| task.is_done(s).unwrap_or(false))
        });
        let done = self.job.done_names().unwrap_or_default();
        summary.done = shards
            .iter()
            .filter(|s| done.contains(&s.name) && !summary.failed.contains_key(&s.name))
            .count();
        summary
    }

    /// Processes one shard while a helper thread keeps the claim's heartbeat fresh.
    fn process_with_heartbeat(
        &self,
        task: &dyn ShardTask,
        shard: &ShardRef,
        claim: &mut ClaimRecord,
        progress: &Progress,
    ) -> Result<ShardResult> {
        let lost = AtomicBool::new(false);
        let interval = Duration::from_secs_f64(
            (self.job.lease().as_secs_f64() / 4.0)
                .min(self.liveness.stall.as_secs_f64() / 4.0)
                .max(0.01),
        );
        self.liveness.beat();
        let liveness = &*self.liveness;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let mut hb_claim = claim.clone();
        std::thread::scope(|scope| {
            let lost = &lost;
            let job = &self.job;
            let name = shard.name.as_str();
            scope.spawn(move || loop {
                match stop_rx.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if liveness.stalled() {
                            exit_stalled(name, liveness);
                        }
                        match job.heartbeat(name, &mut hb_claim) {
                            Ok(true) => {}
                            Ok(false) => {
                                lost.store(true, Ordering::SeqCst);
                                return;
                            }
                            // A transient storage error must not kill the shard; the lease
                            // leaves room for several missed heartbeats.
                            Err(e) => tracing::warn!(shard = name, error = %e, "heartbeat failed"),
                        }
                    }
                    _ => return,
                }
            });
            let ctx = ShardContext {
                job: &self.job,
                claim,
                lost,
                interrupted: &self.interrupted,
                liveness: &self.liveness,
                progress,
            };
            let result = task.process(shard, &ctx);
            let _ = stop_tx.send(());
            result
        })
    }
}

/// Gives up on a hung shard: the claim is no longer renewed (this thread stops), so another
/// worker takes the shard over once the lease expires; the process exits with the runtime
/// status, since whatever hangs (a read, a device) cannot be interrupted from here.
fn exit_stalled(shard: &str, liveness: &Liveness) -> ! {
    let idle = liveness.idle().as_secs_f64();
    tracing::error!(
        shard,
        idle_seconds = format!("{idle:.1}"),
        stall_seconds = liveness.stall.as_secs_f64(),
        "no progress on the shard for longer than job.stall_seconds (a blocked read or a hung device?); no longer renewing its claim and exiting, so that another worker takes it over after the lease"
    );
    eprintln!("error: shard {shard} made no progress for {idle:.0} s (job.stall_seconds); exiting so that another worker can take it over");
    std::process::exit(i32::from(exit::RUNTIME))
}
