//! `dfndr status OUT`: where a job stands.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use dfndr_shards::job::{now_unix, Job, WorkerIdentity};
use dfndr_shards::shardlist::resolve_inputs;
use dfndr_shards::store::open_store;
use serde::Serialize;

use crate::config::JobConfig;

/// A shard currently claimed.
#[derive(Debug, Serialize)]
struct InProgress {
    name: String,
    worker: String,
    heartbeat_age_s: f64,
    stale: bool,
}

/// A failed shard.
#[derive(Debug, Serialize)]
struct Failed {
    name: String,
    attempts: u32,
    final_failure: bool,
    error: String,
}

/// Everything `status` reports.
#[derive(Debug, Serialize)]
struct Status {
    output: String,
    config_fingerprint: String,
    shards_total: Option<usize>,
    shards_done: usize,
    shards_in_progress: usize,
    shards_failed: usize,
    shards_pending: Option<usize>,
    rows: u64,
    bytes: u64,
    skipped: BTreeMap<String, u64>,
    worker_seconds: f64,
    samples_per_worker_second: f64,
    wall_seconds: f64,
    samples_per_second: f64,
    /// Per stage, its working seconds as a share of the shards' wall seconds (stages run
    /// concurrently, so the shares do not add up to 1; the largest is the bottleneck).
    stage_busy_share: BTreeMap<String, f64>,
    in_progress: Vec<InProgress>,
    failed: Vec<Failed>,
    /// Done shards written under another config fingerprint than the dataset card's (left
    /// from before a `--force` change of config; the next run redoes them).
    fingerprint_mismatch: Vec<String>,
    input_error: Option<String>,
}

/// Prints the status of the job at `output`.
pub fn run(output: &str, json: bool) -> Result<()> {
    let store = open_store(output)?;
    let reader = Job::new(store, WorkerIdentity::current(0), Duration::from_secs(300));
    let Some(card) = reader.read_card()? else {
        bail!("{output} is not a dfndr output: it has no dfndr.json (start a job with `dfndr reinforce`)");
    };
    let card_config: Option<JobConfig> = card
        .get("config")
        .and_then(|c| serde_json::from_value(c.clone()).ok());
    let defaults = JobConfig::default();
    let section = card_config.as_ref().map_or(&defaults.job, |c| &c.job);
    let max_attempts = section.max_attempts;
    // Staleness is judged with the job's own lease.
    let job = Job::new(
        reader.store().clone(),
        reader.identity().clone(),
        Duration::from_secs_f64(section.lease_seconds),
    );

    let done = job.all_done()?;
    let failed = job.all_failed()?;
    let claims = job.all_claims()?;
    let (names, input_error) = match card_config.as_ref().map(|c| resolve_inputs(&c.job.input)) {
        Some(Ok(shards)) => (
            Some(shards.into_iter().map(|s| s.name).collect::<Vec<_>>()),
            None,
        ),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (
            None,
            Some("the dataset card has no readable config".to_string()),
        ),
    };

    let now = now_unix();
    let in_progress: Vec<InProgress> = claims
        .iter()
        .filter(|(name, _)| !done.contains_key(*name))
        .map(|(name, c)| InProgress {
            name: name.clone(),
            worker: c.identity.worker.clone(),
            heartbeat_age_s: (now - c.heartbeat_unix).max(0.0),
            stale: job.is_stale(c, now),
        })
        .collect();
    let failed_list: Vec<Failed> = failed
        .iter()
        .filter(|(name, _)| !done.contains_key(*name))
        .map(|(name, f)| Failed {
            name: name.clone(),
            attempts: f.attempts,
            final_failure: f.attempts >= max_attempts,
            error: f.error.clone(),
        })
        .collect();

    let mut skipped = BTreeMap::new();
    let mut stage_seconds: BTreeMap<&str, f64> = BTreeMap::new();
    let (mut rows, mut bytes, mut worker_seconds) = (0u64, 0u64, 0f64);
    let (mut first_start, mut last_end) = (f64::INFINITY, 0f64);
    for rec in done.values() {
        rows += rec.rows;
        bytes += rec.bytes;
        worker_seconds += rec.seconds;
        first_start = first_start.min(rec.finished_unix - rec.seconds);
        last_end = last_end.max(rec.finished_unix);
        for (reason, n) in &rec.skipped {
            *skipped.entry(reason.clone()).or_insert(0) += n;
        }
        for (stage, seconds) in &rec.stage_seconds {
            *stage_seconds.entry(stage.as_str()).or_insert(0.0) += seconds;
        }
    }
    // Only records that carry stage timings count towards the shares' denominator.
    let timed_seconds: f64 = done
        .values()
        .filter(|r| !r.stage_seconds.is_empty())
        .map(|r| r.seconds)
        .sum();
    let stage_busy_share = stage_seconds
        .into_iter()
        .filter(|_| timed_seconds > 0.0)
        .map(|(stage, seconds)| (stage.to_string(), seconds / timed_seconds))
        .collect();
    let wall_seconds = if done.is_empty() {
        0.0
    } else {
        (last_end - first_start).max(0.0)
    };
    let shards_total = names.as_ref().map(|n| n.len());
    let shards_pending = names.as_ref().map(|n| {
        n.iter()
            .filter(|name| {
                !done.contains_key(*name)
                    && !claims.contains_key(*name)
                    && !failed.contains_key(*name)
            })
            .count()
    });
    let config_fingerprint = card
        .get("config_fingerprint")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let fingerprint_mismatch = done
        .iter()
        .filter(|(_, rec)| rec.config_fingerprint != config_fingerprint)
        .map(|(name, _)| name.clone())
        .collect();
    let status = Status {
        output: output.to_string(),
        config_fingerprint,
        shards_total,
        shards_done: done.len(),
        shards_in_progress: in_progress.len(),
        shards_failed: failed_list.len(),
        shards_pending,
        rows,
        bytes,
        skipped,
        worker_seconds,
        samples_per_worker_second: if worker_seconds > 0.0 {
            rows as f64 / worker_seconds
        } else {
            0.0
        },
        wall_seconds,
        samples_per_second: if wall_seconds > 0.0 {
            rows as f64 / wall_seconds
        } else {
            0.0
        },
        stage_busy_share,
        in_progress,
        failed: failed_list,
        fingerprint_mismatch,
        input_error,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn print_text(s: &Status) {
    println!("job        {}", s.output);
    println!("config     {}", s.config_fingerprint);
    let total = s
        .shards_total
        .map(|t| t.to_string())
        .unwrap_or_else(|| "?".into());
    let pending = s
        .shards_pending
        .map(|t| t.to_string())
        .unwrap_or_else(|| "?".into());
    println!(
        "shards     {total} total: {} done, {} in progress, {} failed, {pending} pending",
        s.shards_done, s.shards_in_progress, s.shards_failed
    );
    let skipped: u64 = s.skipped.values().sum();
    println!("rows       {} written, {} samples skipped", s.rows, skipped);
    println!("output     {}", human_bytes(s.bytes));
    if s.rows > 0 {
        println!(
            "throughput {:.1} samples/s over {:.1} s of wall time ({:.1} samples/s per worker)",
            s.samples_per_second, s.wall_seconds, s.samples_per_worker_second
        );
    }
    if !s.stage_busy_share.is_empty() {
        // In pipeline order, not alphabetical.
        let order = ["read", "decode", "caption", "teachers", "write"];
        let shares: Vec<String> = order
            .iter()
            .filter_map(|st| {
                s.stage_busy_share
                    .get(*st)
                    .map(|v| format!("{st} {:.0}%", v * 100.0))
            })
            .collect();
        println!("stages     busy share of shard time: {}", shares.join(", "));
    }
    if let Some(e) = &s.input_error {
        println!("inputs     cannot list the job's inputs ({e}); pending count unknown");
    }
    if !s.skipped.is_empty() {
        println!("skip reasons:");
        for (reason, n) in &s.skipped {
            println!("  {n:>10}  {reason}");
        }
    }
    if !s.in_progress.is_empty() {
        println!("in progress:");
        for p in &s.in_progress {
            let stale = if p.stale {
                "  (stale: will be taken over)"
            } else {
                ""
            };
            println!(
                "  {}  {}  heartbeat {:.0} s ago{stale}",
                p.name, p.worker, p.heartbeat_age_s
            );
        }
    }
    if !s.fingerprint_mismatch.is_empty() {
        println!(
            "{} done shards were written under another config fingerprint than the dataset \
             card's; the next run of the current config redoes them:",
            s.fingerprint_mismatch.len()
        );
        for name in s.fingerprint_mismatch.iter().take(20) {
            println!("  {name}");
        }
        if s.fingerprint_mismatch.len() > 20 {
            println!("  … and {} more", s.fingerprint_mismatch.len() - 20);
        }
    }
    if !s.failed.is_empty() {
        println!("failed:");
        for f in &s.failed {
            let state = if f.final_failure {
                "gave up"
            } else {
                "will retry"
            };
            println!(
                "  {}  {} attempt(s), {state}: {}",
                f.name,
                f.attempts,
                f.error.lines().next().unwrap_or("")
            );
        }
    }
}
