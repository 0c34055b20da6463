//! Object stores under the conditions of a long job: model stages far slower than the
//! store's timeouts, connections cut mid-download, and a store that goes away before a shard
//! is published (S3 via moto, through a fault-injecting proxy, see `common::proxy`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::s3::{new_bucket, s3_env, s3_server};
use common::*;
use dfndr_shards::format::{Row, ShardReader};
use dfndr_shards::store::{CloudStore, Store};

/// Small timeouts and retries, so that a test meets them in seconds.
const TIGHT_STORAGE: &str = "[storage]\nrequest_timeout_seconds = 1.0\nconnect_timeout_seconds = 1.0\nmax_retries = 3\nretry_timeout_seconds = 20.0\ndownload_chunk_mib = 1\n";

/// The rows of a parquet shard, without the `source` column (it names the input location,
/// which differs between a local and an object-store run of the same shard).
fn rows(path: &Path) -> Vec<Row> {
    ShardReader::open_path(path)
        .unwrap()
        .rows()
        .unwrap()
        .map(|r| Row {
            source: String::new(),
            ..r.unwrap()
        })
        .collect()
}

/// Uploads demo shard 00001 (12 samples, 1.2 MB: two 1 MiB download chunks) to a new bucket;
/// returns its URL.
fn uploaded_demo_shard(label: &str) -> String {
    let bucket = new_bucket(label);
    let store = CloudStore::open(&format!("{bucket}/in")).unwrap();
    let bytes = std::fs::read(demo_dir().join("demo-00001.tar")).unwrap();
    store.put("demo-00001.tar", &bytes).unwrap();
    format!("{bucket}/in/demo-00001.tar")
}

/// The reference: the same shard and config, read from the local disk.
fn local_reference(dir: &Path, extra: &str) -> Vec<Row> {
    let out = dir.join("local-out");
    let d = dir.join("local");
    std::fs::create_dir_all(&d).unwrap();
    let input = demo_dir().join("demo-00001.tar").display().to_string();
    let config = write_config(&d, &input, &out, extra);
    let o = run(&mut reinforce(&config));
    assert!(o.status.success());
    rows(&out.join("shards/demo-00001.parquet"))
}

/// `dfndr reinforce` of `input` into a local output, talking to the store at `endpoint`.
fn reinforce_from(
    dir: &Path,
    name: &str,
    input: &str,
    extra: &str,
    endpoint: &str,
) -> (std::process::Command, PathBuf) {
    let out = dir.join(format!("{name}-out"));
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let config = write_config(&d, input, &out, extra);
    let mut cmd = reinforce(&config);
    cmd.envs(s3_env(endpoint));
    (cmd, out)
}

#[test]
fn a_shard_processed_far_slower_than_the_request_timeout_completes_and_equals_a_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("batch_size = 2\n{TIGHT_STORAGE}");
    let reference = local_reference(dir.path(), &extra);
    let input = uploaded_demo_shard("slow");
    let (mut cmd, out) = reinforce_from(dir.path(), "slow", &input, &extra, &s3_server().endpoint);
    // 6 batches of 600 ms: the shard takes several times the 1 s request timeout.
    cmd.env("DFNDR_TEST_PACE", "decode:600");
    let started = Instant::now();
    let o = run(&mut cmd);
    let seconds = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        seconds > 3.0,
        "the shard was not slow enough: {seconds:.1} s"
    );
    let got = rows(&out.join("shards/demo-00001.parquet"));
    assert_eq!(got.len(), 12);
    assert_eq!(got, reference);
    eprintln!("slow consumer: shard took {seconds:.1} s against a 1 s request timeout");
}

#[test]
fn a_download_cut_mid_body_is_resumed_and_the_shard_equals_a_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let reference = local_reference(dir.path(), TIGHT_STORAGE);
    let input = uploaded_demo_shard("cut");
    // The first two responses to the shard's GET are reset after 300 kB.
    let proxy = Proxy::start(&s3_server().endpoint, 2, 300_000);
    let (mut cmd, out) = reinforce_from(dir.path(), "cut", &input, TIGHT_STORAGE, &proxy.endpoint);
    let o = run(&mut cmd);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(proxy.cuts_made(), 2, "the proxy did not cut the download");
    assert_eq!(rows(&out.join("shards/demo-00001.parquet")), reference);
    eprintln!(
        "connection cut: 2 cuts at 300 kB, {} GETs of the shard, output equal to the local run",
        proxy.tar_gets()
    );
}

#[test]
fn a_download_cut_every_time_is_a_recorded_failure_then_a_clean_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let reference = local_reference(dir.path(), TIGHT_STORAGE);
    let input = uploaded_demo_shard("cutall");
    // Every response to the shard's GET is reset inside its headers: no retry can advance.
    let proxy = Proxy::start(&s3_server().endpoint, usize::MAX, 10);
    let (mut cmd, out) =
        reinforce_from(dir.path(), "cutall", &input, TIGHT_STORAGE, &proxy.endpoint);
    let o = run(&mut cmd);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let failed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("_progress/failed/demo-00001.json")).unwrap(),
    )
    .unwrap();
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("demo-00001.tar"), "{error}");
    assert!(
        !out.join("shards/demo-00001.parquet").exists(),
        "a truncated shard was published"
    );
    drop(proxy);
    // The store is healthy again: the same command retries the shard.
    let mut again = reinforce(&out.parent().unwrap().join("cutall/job.toml"));
    again.envs(s3_env(&s3_server().endpoint));
    let o = run(&mut again);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(rows(&out.join("shards/demo-00001.parquet")), reference);
}

#[test]
fn a_store_lost_before_publishing_exits_with_the_retryable_status_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = new_bucket("publish");
    let output = format!("{bucket}/out");
    let proxy = Proxy::start(&s3_server().endpoint, 0, 0);
    let d = dir.path().join("job");
    std::fs::create_dir_all(&d).unwrap();
    let config = d.join("job.toml");
    let input = demo_dir().join("demo-00000.tar").display().to_string();
    std::fs::write(
        &config,
        format!("[job]\ninput = [{input:?}]\noutput = {output:?}\nbatch_size = 2\n{TIGHT_STORAGE}"),
    )
    .unwrap();
    let mut cmd = reinforce(&config);
    cmd.envs(s3_env(&proxy.endpoint))
        .env("DFNDR_TEST_PACE", "decode:500")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Once the shard is claimed, the store goes away: the publish cannot succeed.
    let store = CloudStore::open(&output).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.list("_progress/claims").unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the shard was never claimed");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.refuse_all();
    let o = child.wait_with_output().unwrap();
    let log = text(&o);
    eprintln!("{log}");
    assert_eq!(o.status.code(), Some(3), "{log}");
    assert!(
        store.list("shards").unwrap().is_empty(),
        "nothing may be published"
    );
    // The store is back: a rerun takes the shard over (its worker is dead) and finishes.
    let mut again = reinforce(&config);
    again.envs(s3_env(&s3_server().endpoint));
    let o = run(&mut again);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(store.list("shards").unwrap(), ["demo-00000.parquet"]);
}

#[test]
fn the_next_shard_downloads_while_the_current_one_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = new_bucket("prefetch");
    let store = CloudStore::open(&format!("{bucket}/in")).unwrap();
    for name in ["demo-00000.tar", "demo-00001.tar"] {
        store
            .put(name, &std::fs::read(demo_dir().join(name)).unwrap())
            .unwrap();
    }
    let proxy = Proxy::start(&s3_server().endpoint, 0, 0);
    let input = format!("{bucket}/in/demo-{{00000..00001}}.tar");
    let extra = format!("batch_size = 4\n{TIGHT_STORAGE}");
    let (mut cmd, out) = reinforce_from(dir.path(), "prefetch", &input, &extra, &proxy.endpoint);
    let child = cmd
        .env("DFNDR_TEST_PACE", "decode:700")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both shards are fetched before the first one is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.tar_gets() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second shard was never fetched"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        done_records(&out).is_empty(),
        "the second shard was fetched only after the first was done"
    );
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(done_records(&out).len(), 2);
    // Each shard was downloaded once (prefetched, then used): one GET per 1 MiB chunk, one
    // for demo-00000 (640 kB) and two for demo-00001 (1.2 MB).
    assert_eq!(proxy.tar_gets(), 3, "{}", text(&o));
}
