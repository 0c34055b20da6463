//! Job control, driving the real binary: crashes at every step of the shard protocol,
//! several workers on one output, stale claims, config changes, finished jobs.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Runs one worker to completion on `config` and asserts success.
fn run_ok(config: &Path, extra: &[&str]) -> String {
    let out = run(reinforce(config).args(extra));
    assert!(out.status.success(), "dfndr failed:\n{}", text(&out));
    text(&out)
}

/// A reference output of an uninterrupted run, to compare interrupted ones with.
fn reference_hashes(tmp: &Path, input: &str) -> std::collections::BTreeMap<String, String> {
    let out = tmp.join("reference-out");
    let cfg_dir = tmp.join("reference-cfg");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let config = write_config(&cfg_dir, input, &out, "");
    run_ok(&config, &[]);
    shard_hashes(&out)
}

/// The invariants of a finished output: one done record and one parquet per shard, nothing
/// left over in claims, no temporary files.
fn assert_clean_finished(out: &Path, shards: &[&str]) {
    let done = done_records(out);
    assert_eq!(done.keys().map(String::as_str).collect::<Vec<_>>(), shards);
    let files = all_files(out);
    let temporaries: Vec<&String> = files.iter().filter(|f| f.contains(".tmp-")).collect();
    assert!(
        temporaries.is_empty(),
        "temporary files left: {temporaries:?}"
    );
    let claims: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("_progress/claims"))
        .collect();
    assert!(claims.is_empty(), "claims left: {claims:?}");
    for name in shards {
        assert!(files.contains(&format!("shards/{name}.parquet")));
    }
    assert!(files.contains(&"manifest.json".to_string()));
}

#[test]
fn crash_at_every_step_resumes_to_exactly_once_output() {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-{{00000..00001}}.tar", demo_dir().display());
    let reference = reference_hashes(tmp.path(), &input);
    assert_eq!(reference.len(), 2);

    for point in ["claimed", "temp_written", "renamed", "done_written"] {
        for target in ["demo-00000", "demo-00001"] {
            let case = tmp.path().join(format!("{point}-{target}"));
            std::fs::create_dir_all(&case).unwrap();
            let out = case.join("out");
            let config = write_config(&case, &input, &out, "");
            let crashed =
                run(reinforce(&config).env("DFNDR_CRASH_AT", format!("{point}:{target}")));
            assert!(!crashed.status.success(), "{point}: the process must die");
            assert!(
                text(&crashed).contains("DFNDR_CRASH_AT"),
                "{point}: crash not reached"
            );
            let done_before = done_records(&out);
            assert_eq!(
                done_before.contains_key(target),
                point == "done_written",
                "{point}: done record of {target} before resume"
            );

            // Resume: the dead worker's claim (same host, dead pid) is taken over at once.
            let log = run_ok(&config, &[]);
            let redone = shards_done_in_log(&log);
            if point == "done_written" {
                assert!(
                    !redone.contains(&target.to_string()),
                    "{point}: done shard was redone"
                );
            } else {
                assert!(
                    redone.contains(&target.to_string()),
                    "{point}: {target} not redone: {log}"
                );
            }
            assert_eq!(
                shard_hashes(&out),
                reference,
                "{point}/{target}: output differs from an uninterrupted run"
            );
            assert_clean_finished(&out, &["demo-00000", "demo-00001"]);
            let rows: u64 = done_records(&out)
                .values()
                .map(|r| r["rows"].as_u64().unwrap())
                .sum();
            assert_eq!(rows, 25);
        }
    }
}

#[test]
fn concurrent_workers_process_every_shard_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = make_shards(&tmp.path().join("in"), 12, 6);
    let names = shard_names(&shards);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let input = format!("{}/shard-*.tar", tmp.path().join("in").display());
    let reference = reference_hashes(tmp.path(), &input);

    for workers in [2, 4] {
        let out = tmp.path().join(format!("out-{workers}"));
        let config = write_config(tmp.path(), &input, &out, "batch_size = 2");
        let logs = run_workers(|| reinforce(&config), workers);
        let mut processed: Vec<String> = logs.iter().flat_map(|l| shards_done_in_log(l)).collect();
        processed.sort();
        assert_eq!(
            processed, names,
            "{workers} workers: every shard processed exactly once"
        );
        assert_clean_finished(&out, &name_refs);
        assert_eq!(shard_hashes(&out), reference);
    }
}

#[test]
fn stale_claim_is_taken_over_and_live_claim_is_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-{{00000..00001}}.tar", demo_dir().display());
    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, "lease_seconds = 2.0");
    let claims = out.join("_progress/claims");
    std::fs::create_dir_all(&claims).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let claim = |worker: &str, heartbeat: f64| {
        serde_json::json!({
            "worker": worker, "host": "another-host", "pid": 1, "token": format!("t-{worker}"),
            "claimed_unix": heartbeat, "heartbeat_unix": heartbeat
        })
        .to_string()
    };
    // demo-00000: a worker that died an hour ago; demo-00001: one that looks alive right now.
    std::fs::write(claims.join("demo-00000"), claim("dead", now - 3600.0)).unwrap();
    std::fs::write(claims.join("demo-00001"), claim("alive", now)).unwrap();

    let started = Instant::now();
    let log = run_ok(&config, &[]);
    let elapsed = started.elapsed();
    assert!(log.contains("took over a stale claim"), "{log}");
    let mut done = shards_done_in_log(&log);
    done.sort();
    assert_eq!(done, ["demo-00000", "demo-00001"]);
    // The live claim had to expire (2 s lease) before it was taken over.
    assert!(
        elapsed >= Duration::from_millis(1500),
        "took over a live claim after {elapsed:?}"
    );
    assert_clean_finished(&out, &["demo-00000", "demo-00001"]);
}

#[test]
fn changed_config_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-00000.tar", demo_dir().display());
    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, "");
    run_ok(&config, &[]);
    let changed = write_config(tmp.path(), &input, &out, "[output]\nembed_images = true");
    let refused = run(&mut reinforce(&changed));
    assert_eq!(refused.status.code(), Some(2));
    let msg = text(&refused);
    assert!(
        msg.contains("config fingerprint") && msg.contains("--force"),
        "{msg}"
    );
    // Worker-only settings do not change the fingerprint.
    let tuned = write_config(
        tmp.path(),
        &input,
        &out,
        "lease_seconds = 60.0\nbatch_size = 3",
    );
    run_ok(&tuned, &[]);
    run_ok(&changed, &["--force"]);
}

#[test]
fn second_run_of_finished_job_does_no_work() {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-{{00000..00001}}.tar", demo_dir().display());
    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, "");
    run_ok(&config, &[]);
    let mtimes = || -> Vec<std::time::SystemTime> {
        ["demo-00000", "demo-00001"]
            .iter()
            .map(|n| {
                let path = out.join(format!("shards/{n}.parquet"));
                std::fs::metadata(path).unwrap().modified().unwrap()
            })
            .collect()
    };
    let before = mtimes();
    let done_before = done_records(&out);
    let log = run_ok(&config, &[]);
    assert!(shards_done_in_log(&log).is_empty(), "{log}");
    assert!(
        log.contains("2 of 2 shards done (0 by this worker, 2 already done)"),
        "{log}"
    );
    assert_eq!(before, mtimes());
    assert_eq!(done_before, done_records(&out));
}

#[test]
fn output_not_matching_its_done_record_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-00000.tar", demo_dir().display());
    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, "");
    run_ok(&config, &[]);
    let reference = shard_hashes(&out);
    let path = out.join("shards/demo-00000.parquet");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&path, bytes).unwrap();
    let log = run_ok(&config, &[]);
    assert_eq!(shards_done_in_log(&log), ["demo-00000"]);
    assert_eq!(shard_hashes(&out), reference);
}

#[test]
fn failed_shards_are_recorded_retried_and_given_up() {
    let tmp = tempfile::tempdir().unwrap();
    let input_dir = tmp.path().join("in");
    make_shards(&input_dir, 1, 3);
    std::fs::write(
        input_dir.join("shard-00001.tar"),
        b"this is not a tar file at all, just text",
    )
    .unwrap();
    // shard-00002.tar does not exist
    let input = format!("{}/shard-{{00000..00002}}.tar", input_dir.display());
    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, "max_attempts = 2");
    for attempt in 1..=3 {
        let res = run(&mut reinforce(&config));
        assert_eq!(res.status.code(), Some(1), "attempt {attempt}");
        assert!(text(&res).contains("2 shards failed"), "{}", text(&res));
        let failed: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("_progress/failed/shard-00002.json")).unwrap(),
        )
        .unwrap();
        // The third run gives up: attempts stay at the limit.
        assert_eq!(failed["attempts"].as_u64().unwrap(), attempt.min(2));
        assert!(
            failed["error"]
                .as_str()
                .unwrap()
                .contains("shard-00002.tar"),
            "{failed}"
        );
    }
    let status = run(dfndr().args(["status"]).arg(&out));
    let s = text(&status);
    assert!(status.status.success());
    assert!(
        s.contains("3 total: 1 done, 0 in progress, 2 failed, 0 pending"),
        "{s}"
    );
    assert!(s.contains("gave up"), "{s}");
    assert!(s.contains("not a tar"), "{s}");
    // --retry-failed tries again; once the input is fixed the shard completes.
    make_shards(&tmp.path().join("fixed"), 3, 2);
    std::fs::copy(
        tmp.path().join("fixed/shard-00001.tar"),
        input_dir.join("shard-00001.tar"),
    )
    .unwrap();
    let res = run(dfndr()
        .args(["reinforce", "--no-progress", "--retry-failed", "--config"])
        .arg(&config));
    assert_eq!(res.status.code(), Some(1));
    assert!(text(&res).contains("1 shards failed"), "{}", text(&res));
    assert!(!out.join("_progress/failed/shard-00001.json").exists());
    assert!(out.join("_progress/done/shard-00001.json").exists());
}

#[test]
fn sigterm_releases_the_claim_and_the_job_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    make_shards(&tmp.path().join("in"), 40, 30);
    let input = format!("{}/shard-*.tar", tmp.path().join("in").display());
    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, "batch_size = 1");
    let child = reinforce(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first shard is done, i.e. in the middle of the job.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done_records(&out).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let res = child.wait_with_output().unwrap();
    let log = text(&res);
    eprintln!("{log}");
    assert_eq!(res.status.code(), Some(130), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    let done_at_interrupt = done_records(&out).len();
    assert!(
        done_at_interrupt < 40,
        "the job finished before the signal arrived"
    );
    let files = all_files(&out);
    assert!(
        files.iter().all(|f| !f.starts_with("_progress/claims")),
        "{files:?}"
    );
    assert!(files.iter().all(|f| !f.contains(".tmp-")), "{files:?}");

    let log = run_ok(&config, &[]);
    assert_eq!(
        shards_done_in_log(&log).len(),
        40 - done_at_interrupt,
        "{log}"
    );
    let rows: u64 = done_records(&out)
        .values()
        .map(|r| r["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 40 * 30);
}

/// A small deterministic generator for the kill moments (xorshift64*), so a failure can be
/// replayed from the printed seed.
struct Moments(u64);

impl Moments {
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn kill_9_at_20_random_moments_then_restart_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = make_shards(&tmp.path().join("in"), 12, 16);
    let names = shard_names(&shards);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let input = format!("{}/shard-*.tar", tmp.path().join("in").display());
    let extra = format!("batch_size = 8\n[augment]\nsize = 64\n{TINY_TEACHERS}");

    let reference_out = tmp.path().join("reference-out");
    let reference_cfg = tmp.path().join("reference-cfg");
    std::fs::create_dir_all(&reference_cfg).unwrap();
    let config = write_config(&reference_cfg, &input, &reference_out, &extra);
    // The reference run, watched: when its first shard is published (start-up: loading the
    // models, reading, the first pass through the stages) and how long each shard takes after.
    let started = Instant::now();
    let mut child = reinforce(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first_done = None;
    let status = loop {
        if first_done.is_none() && !done_records(&reference_out).is_empty() {
            first_done = Some(started.elapsed());
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(status.success(), "the reference run failed");
    let full = started.elapsed();
    let first_done = first_done.unwrap_or(full);
    let per_shard = (full - first_done) / names.len() as u32;
    let reference = shard_hashes(&reference_out);
    assert_eq!(reference.len(), names.len());

    let out = tmp.path().join("out");
    let config = write_config(tmp.path(), &input, &out, &extra);
    let seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut moments = Moments(seed);
    let mut mid_job = 0;
    let mut done_counts = std::collections::BTreeSet::new();
    for kill in 0..20 {
        // Every other kill lands in the start-up (models loading, shards being read, the
        // first batches in the stages); the others wait for the restart to publish its next
        // shard and land within a quarter of a shard's time after that. So the job advances
        // by about a shard every other restart whatever the machine's load (a fixed schedule
        // from the reference run's timing did not: under `make test`'s parallel load it
        // finished the job halfway through the kills), and most kills hit an unfinished job.
        let u = moments.next();
        let mut child = reinforce(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        if kill % 2 == 0 {
            std::thread::sleep(first_done.mul_f64(0.5 * u));
        } else {
            let before = done_records(&out).len();
            let deadline = started + Duration::from_secs(60).max(full * 20);
            while done_records(&out).len() == before
                && child.try_wait().unwrap().is_none()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(per_shard.mul_f64(0.25 * u));
        }
        let after = started.elapsed();
        let finished_first = child.try_wait().unwrap().is_some();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let done = done_records(&out).len();
        if !finished_first && done < names.len() {
            mid_job += 1;
            done_counts.insert(done);
        }
        eprintln!(
            "kill {kill} (seed {seed:#x}) after {:.3} s: {done} of {} shards done",
            after.as_secs_f64(),
            names.len()
        );
    }
    // The restart after the last kill, bounded: a shard stuck behind a dead worker's claim
    // or takeover marker would otherwise hang here.
    let limit = Duration::from_secs(60).max(full * 20);
    let log_path = tmp.path().join("restart.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = reinforce(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let restarted = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if restarted.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "the restart after 20 kills did not finish within {limit:?}; progress files: \
                 {:?}\nlog:\n{}",
                all_files(&out.join("_progress")),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "restart failed:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert!(
        mid_job >= 10 && done_counts.len() >= 2,
        "only {mid_job} of 20 kills hit an unfinished job, at {} stages of progress (run of \
         {:.2} s)",
        done_counts.len(),
        full.as_secs_f64()
    );
    assert_eq!(
        shard_hashes(&out),
        reference,
        "output after 20 kills differs from an uninterrupted run"
    );
    assert_clean_finished(&out, &name_refs);
    let rows: u64 = done_records(&out)
        .values()
        .map(|r| r["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 12 * 16);
}

/// The dfndr flags a cluster template passes: the `--flag` words of its dfndr command.
fn template_flags(template: &str) -> Vec<String> {
    let body = std::fs::read_to_string(demo_dir().join("../../configs").join(template)).unwrap();
    let command: String = if template.ends_with(".yaml") {
        let args = body.split("args:").nth(1).expect("the template has args");
        args.lines()
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("- "))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        let at = body
            .find("\"$DFNDR\" reinforce")
            .expect("the template runs dfndr");
        body[at..]
            .lines()
            .scan(true, |go_on, l| {
                let line = (*go_on).then(|| l.to_string());
                *go_on = l.trim_end().ends_with('\\');
                line
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    command
        .split_whitespace()
        .map(|w| w.trim_start_matches("- "))
        .filter(|w| w.starts_with("--"))
        .map(|w| w.split('=').next().unwrap_or(w).to_string())
        .collect()
}

#[test]
fn cluster_templates_pass_existing_flags_and_place_workers() {
    let help = text(&run(dfndr().args(["reinforce", "--help"])));
    for template in ["slurm/reinforce.sbatch", "kubernetes/reinforce-job.yaml"] {
        let flags = template_flags(template);
        assert!(
            flags.contains(&"--config".to_string()),
            "{template}: {flags:?}"
        );
        for flag in &flags {
            assert!(
                help.contains(flag.as_str()),
                "{template} passes unknown flag {flag}"
            );
        }
    }
    let yaml =
        std::fs::read_to_string(demo_dir().join("../../configs/kubernetes/reinforce-job.yaml"))
            .unwrap();
    let value = |key: &str| -> String {
        let at = yaml.find(key).unwrap() + key.len();
        let rest = yaml[at..].trim_start_matches([':', ' ', '\n']);
        let rest = rest.trim_start_matches("value:").trim_start();
        rest.split_whitespace()
            .next()
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    assert_eq!(value("completions:"), value("parallelism:"));
    assert_eq!(value("completions:"), value("name: DFNDR_WORLD_SIZE"));

    // The variables the schedulers set place the worker where the templates say.
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-00000.tar", demo_dir().display());
    let config = write_config(tmp.path(), &input, &tmp.path().join("out"), "");
    let cases: [(&[(&str, &str)], &str); 2] = [
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "16"),
                ("SLURM_PROCID", "2"),
                ("SLURM_NTASKS", "8"),
            ],
            "rank=10 world_size=128",
        ),
        (
            &[("JOB_COMPLETION_INDEX", "3"), ("DFNDR_WORLD_SIZE", "16")],
            "rank=3 world_size=16",
        ),
    ];
    for (env, want) in cases {
        let mut cmd = reinforce(&config);
        for var in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT",
            "SLURM_ARRAY_TASK_MIN",
        ] {
            cmd.env_remove(var);
        }
        for var in [
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "JOB_COMPLETION_INDEX",
            "DFNDR_WORLD_SIZE",
        ] {
            cmd.env_remove(var);
        }
        let log = text(&run(cmd.envs(env.iter().copied())));
        assert!(log.contains(want), "{env:?}: expected {want} in\n{log}");
    }
}

/// The real user id of this process (from /proc; 0 = root, whom permissions do not stop).
fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `dfndr reinforce` as an unprivileged user when the tests run as root (so that a read-only
/// directory is read-only for it), with `shell_setup` run first (`ulimit`). The binary is
/// copied into `bin_dir`, a directory that user can read (the build directory may not be
/// reachable for it).
fn reinforce_restricted(bin_dir: &Path, config: &Path, shell_setup: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let bin = bin_dir.join("dfndr");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_dfndr"), &bin).unwrap();
    }
    let script = format!("{shell_setup}; exec \"$0\" reinforce --no-progress --config \"$1\"");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(script).arg(&bin).arg(config);
    if uid() == 0 {
        cmd.uid(65534).gid(65534);
    }
    run(&mut cmd)
}

#[test]
fn write_failures_give_a_clear_error_and_no_done_record() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // Everything readable by the unprivileged user; the outputs writable by it.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let input_dir = tmp.path().join("in");
    make_shards(&input_dir, 2, 40);
    std::fs::set_permissions(&input_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let input = format!("{}/shard-*.tar", input_dir.display());

    // A read-only output directory: refused before any work, with the path in the message.
    let read_only = tmp.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    let cfg_dir = tmp.path().join("cfg-ro");
    std::fs::create_dir(&cfg_dir).unwrap();
    let config = write_config(&cfg_dir, &input, &read_only.join("out"), "");
    std::fs::set_permissions(&cfg_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let res = reinforce_restricted(tmp.path(), &config, "true");
    let log = text(&res);
    assert_eq!(res.status.code(), Some(2), "{log}");
    assert!(
        log.contains("Permission denied") && log.contains("read-only/out"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(done_records(&read_only.join("out")).is_empty());

    // An output that became read-only after the job started: no claim, no done record.
    let started = tmp.path().join("started");
    std::fs::create_dir(&started).unwrap();
    std::fs::set_permissions(&started, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg_dir = tmp.path().join("cfg-started");
    std::fs::create_dir(&cfg_dir).unwrap();
    let out = started.join("out");
    let config = write_config(&cfg_dir, &input, &out, "");
    std::fs::set_permissions(&cfg_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let res = reinforce_restricted(tmp.path(), &config, "true");
    assert!(res.status.success(), "{}", text(&res));
    for dir in [
        "",
        "_progress",
        "_progress/claims",
        "_progress/done",
        "shards",
    ] {
        let path = out.join(dir);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    // The test process may delete as the owner (or root) what the worker may not.
    std::fs::remove_file(out.join("_progress/done/shard-00001.json")).unwrap();
    let res = reinforce_restricted(tmp.path(), &config, "true");
    let log = text(&res);
    assert!(!res.status.success(), "{log}");
    assert!(log.contains("Permission denied"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(done_records(&out).len(), 1, "{log}");

    // A full disk: every file is limited to 64 KiB (ulimit -f), so the parquet outputs cannot
    // be written while the small records can. Each shard fails with the write error.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg_dir = tmp.path().join("cfg-full");
    std::fs::create_dir(&cfg_dir).unwrap();
    // Stored original images make the outputs large.
    let config = write_config(
        &cfg_dir,
        &input,
        &full.join("out"),
        "[output]\nembed_images = true",
    );
    std::fs::set_permissions(&cfg_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let res = reinforce_restricted(tmp.path(), &config, "ulimit -f 64");
    let log = text(&res);
    assert_eq!(res.status.code(), Some(1), "{log}");
    assert!(log.contains("2 shards failed"), "{log}");
    assert!(
        log.contains("cannot write ") && log.contains("shards/shard-00000.parquet: File too large"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(done_records(&full.join("out")).is_empty(), "{log}");
    let status = text(&run(dfndr().args(["status"]).arg(full.join("out"))));
    assert!(
        status.contains("2 failed") && status.contains("File too large"),
        "{status}"
    );
}
