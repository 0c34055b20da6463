//! What a scheduler and a user can rely on from a worker: exit statuses by class, liveness by
//! progress (a hung worker exits and its shard is taken over), no silently mixed datasets
//! after a config change, and the SIMD level switch.

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;
use dfndr_shards::format::ShardReader;

fn status_json(out: &Path) -> serde_json::Value {
    let o = run(dfndr().args(["status", "--json"]).arg(out));
    assert!(o.status.success());
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn exit_statuses_tell_usage_errors_from_failed_shards_and_runtime_errors() {
    let dir = tempfile::tempdir().unwrap();
    // 2: usage and configuration errors.
    let o = run(dfndr().args(["reinforce", "--config", "/nonexistent/job.toml"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[job]\nimput = []\n").unwrap();
    let o = run(&mut reinforce(&bad));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("imput"));
    let shards = make_shards(&dir.path().join("in"), 1, 3);
    let out = dir.path().join("out");
    let config = write_config(dir.path(), &shards[0].display().to_string(), &out, "");
    let o = run(reinforce(&config).env("DFNDR_SIMD", "avx3"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("DFNDR_SIMD"), "{}", text(&o));
    let o = run(reinforce(&config).args(["--input", "/nonexistent/*.tar"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // 0: done.
    assert_eq!(run(&mut reinforce(&config)).status.code(), Some(0));
    // 1: a shard failed (not a tar).
    let junk = dir.path().join("in/junk.tar");
    std::fs::write(&junk, b"this is not a tar archive, not even close").unwrap();
    let o = run(reinforce(&config).args(["--input"]).arg(&junk));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // 3: the store cannot be reached (nothing listens on port 9).
    let s3 = dir.path().join("s3.toml");
    std::fs::write(
        &s3,
        format!(
            "[job]\ninput = [{:?}]\noutput = \"s3://nowhere/out\"\n[storage]\nmax_retries = 0\nconnect_timeout_seconds = 1.0\n",
            shards[0].display().to_string()
        ),
    )
    .unwrap();
    let o = run(reinforce(&s3)
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_REGION", "us-east-1"));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn a_worker_that_makes_no_progress_exits_and_another_worker_finishes_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(&dir.path().join("in"), 2, 6);
    let out = dir.path().join("out");
    let input = format!(
        "{}/shard-{{00000..00001}}.tar",
        dir.path().join("in").display()
    );
    let config = write_config(
        dir.path(),
        &input,
        &out,
        "stall_seconds = 2.0\nlease_seconds = 4.0\nbatch_size = 2\n",
    );
    let started = Instant::now();
    let o = run(reinforce(&config).env("DFNDR_TEST_PACE", "decode:hang"));
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("no progress"), "{}", text(&o));
    // Stall limit, one heartbeat tick (0.5 s) and start-up.
    assert!(seconds < 6.0, "the hung worker took {seconds:.1} s to exit");
    assert!(done_records(&out).is_empty());
    eprintln!(
        "watchdog: hung worker exited with status 3 after {seconds:.2} s (stall_seconds = 2)"
    );
    let o = run(&mut reinforce(&config));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        done_records(&out).into_keys().collect::<Vec<_>>(),
        shard_names(&shards)
    );
}

#[test]
fn a_config_changed_with_force_redoes_every_shard_of_the_old_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let shards = make_shards(&dir.path().join("in"), 2, 4);
    let out = dir.path().join("out");
    let input = format!(
        "{}/shard-{{00000..00001}}.tar",
        dir.path().join("in").display()
    );
    let old = write_config(dir.path(), &input, &out, "seed = 1\n");
    assert!(run(&mut reinforce(&old)).status.success());
    let old_fp = status_json(&out)["config_fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let new_dir = dir.path().join("new");
    std::fs::create_dir_all(&new_dir).unwrap();
    let new = write_config(&new_dir, &input, &out, "seed = 2\n");
    let o = run(&mut reinforce(&new));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    // Adopted with --force, and killed at its first claim: the card has the new fingerprint,
    // both done shards the old one.
    let o = run(reinforce(&new)
        .arg("--force")
        .env("DFNDR_CRASH_AT", "claimed"));
    assert!(!o.status.success());
    let status = status_json(&out);
    let new_fp = status["config_fingerprint"].as_str().unwrap().to_string();
    assert_ne!(new_fp, old_fp);
    assert_eq!(
        status["fingerprint_mismatch"],
        serde_json::json!(shard_names(&shards))
    );
    let o = run(dfndr().arg("status").arg(&out));
    assert!(text(&o).contains("2 done shards were written under another config fingerprint"));
    let o = run(dfndr().arg("verify").arg(&out));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("written under config fingerprint"));
    // A shard that fails under the new config is a failure, although the old config's done
    // record is still there.
    let source = std::fs::read(&shards[1]).unwrap();
    std::fs::write(&shards[1], b"no longer a tar archive").unwrap();
    let o = run(&mut reinforce(&new));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("shard-00001"), "{}", text(&o));
    std::fs::write(&shards[1], source).unwrap();
    // The rerun redoes both; nothing of the old config remains done.
    let o = run(reinforce(&new).arg("--retry-failed"));
    assert!(o.status.success(), "{}", text(&o));
    for (name, record) in done_records(&out) {
        assert_eq!(record["config_fingerprint"], new_fp.as_str(), "{name}");
    }
    assert!(status_json(&out)["fingerprint_mismatch"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(run(dfndr().arg("verify").arg(&out)).status.success());
}

/// A run at each SIMD level stores the same rows as the run at the machine's own level, with
/// embeddings within one float16 step.
#[test]
fn every_simd_level_gives_the_same_rows_within_one_float16_step() {
    let dir = tempfile::tempdir().unwrap();
    let shard = demo_dir().join("demo-00000.tar").display().to_string();
    let read = |out: &Path| {
        ShardReader::open_path(out.join("shards/demo-00000.parquet"))
            .unwrap()
            .rows()
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    };
    let mut base = None;
    for level in ["auto", "avx2", "scalar"] {
        let d = dir.path().join(level);
        std::fs::create_dir_all(&d).unwrap();
        let out = d.join("out");
        let config = write_config(
            &d,
            &shard,
            &out,
            &format!("batch_size = 5\n{TINY_TEACHERS}"),
        );
        let o = run(reinforce(&config).env("DFNDR_SIMD", level));
        assert!(o.status.success(), "{}", text(&o));
        if level == "scalar" {
            assert!(text(&o).contains("simd=scalar"), "{}", text(&o));
        }
        let rows = read(&out);
        let Some(base) = &base else {
            base = Some(rows);
            continue;
        };
        assert_eq!(rows.len(), base.len());
        let (mut worst, mut differing, mut total) = (0f32, 0usize, 0usize);
        for (a, b) in rows.iter().zip(base) {
            assert_eq!((&a.key, &a.paug, &a.caption), (&b.key, &b.paug, &b.caption));
            let embs = |r: &dfndr_shards::format::Row| {
                r.image_emb
                    .iter()
                    .chain(&r.text_emb)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            for (x, y) in embs(a).iter().zip(&embs(b)) {
                assert!(
                    within_one_f16_step(x, y),
                    "{level} {}: {x:?} vs {y:?}",
                    a.key
                );
                for (p, q) in x.iter().zip(y) {
                    worst = worst.max((p - q).abs());
                    differing += usize::from(p != q);
                    total += 1;
                }
            }
        }
        eprintln!(
            "simd {level}: {differing} of {total} stored values differ from the native level's, by at most {worst:e}"
        );
    }
}
