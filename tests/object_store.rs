//! Object stores, against a real S3-compatible server (moto, see `common::s3`): the storage
//! contract, input resolution, and the job's exactly-once and takeover guarantees on `s3://`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use std::time::{Duration, Instant};

use common::s3::{new_bucket, s3_env, s3_server};
use common::*;
use dfndr_shards::shardlist::{resolve_inputs, ShardListError};
use dfndr_shards::store::{CloudStore, Store, StoreError};

/// `dfndr reinforce` pointed at the test server.
fn reinforce_s3(config: &Path) -> std::process::Command {
    let mut cmd = reinforce(config);
    cmd.envs(s3_env(&s3_server().endpoint));
    cmd
}

fn dfndr_s3() -> std::process::Command {
    let mut cmd = dfndr();
    cmd.envs(s3_env(&s3_server().endpoint));
    cmd
}

/// Uploads local files into `dir_url`.
fn upload(dir_url: &str, files: &[std::path::PathBuf]) {
    let store = CloudStore::open(dir_url).unwrap();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy();
        store.put(&name, &std::fs::read(f).unwrap()).unwrap();
    }
}

/// Writes a job config with object-store `input` and `output`.
fn s3_config(dir: &Path, input: &str, output: &str, extra: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!("[job]\ninput = [{input:?}]\noutput = {output:?}\n{extra}\n"),
    )
    .unwrap();
    path
}

/// The done records of an object-store output: shard name -> (sha256, rows).
fn s3_done(output: &str) -> BTreeMap<String, (String, u64)> {
    let store = CloudStore::open(output).unwrap();
    let mut done = BTreeMap::new();
    for name in store.list("_progress/done").unwrap() {
        let record: serde_json::Value =
            serde_json::from_slice(&store.get(&format!("_progress/done/{name}")).unwrap()).unwrap();
        done.insert(
            name.trim_end_matches(".json").to_string(),
            (
                record["sha256"].as_str().unwrap().to_string(),
                record["rows"].as_u64().unwrap(),
            ),
        );
    }
    done
}

/// A finished object-store output: every shard's parquet present, no claim left, a manifest.
fn assert_s3_finished(output: &str, names: &[String]) {
    let store = CloudStore::open(output).unwrap();
    let parquet: Vec<String> = names.iter().map(|n| format!("{n}.parquet")).collect();
    assert_eq!(store.list("shards").unwrap(), parquet);
    assert!(store.list("_progress/claims").unwrap().is_empty());
    assert!(store.stat("manifest.json").unwrap().is_some());
}

#[test]
fn store_contract_holds_on_s3() {
    let bucket = new_bucket("contract");
    let store = CloudStore::open(&format!("{bucket}/out")).unwrap();
    assert_eq!(store.root_uri(), format!("{bucket}/out"));

    store.put("m.json", b"1").unwrap();
    store.put("m.json", b"22").unwrap();
    assert_eq!(store.get("m.json").unwrap(), b"22");
    assert_eq!(store.stat("m.json").unwrap().unwrap().size, 2);
    assert!(store.stat("none").unwrap().is_none());
    assert!(matches!(store.get("none"), Err(StoreError::NotFound(_))));
    store.put("dir/b", b"b").unwrap();
    store.put("dir/a", b"a").unwrap();
    store.put("dir/sub/c", b"c").unwrap();
    assert_eq!(store.list("dir").unwrap(), ["a", "b"]);
    assert_eq!(store.list("").unwrap(), ["m.json"]);
    assert!(store.list("missing").unwrap().is_empty());
    store.delete("m.json").unwrap();
    store.delete("m.json").unwrap();
    assert!(store.stat("m.json").unwrap().is_none());
    assert!(matches!(
        store.put("../escape", b""),
        Err(StoreError::InvalidPath(_))
    ));

    // The claim: of 8 concurrent creators exactly one wins, and its content is what stays.
    let winners: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                s.spawn(move || {
                    store
                        .put_if_absent("claims/x", format!("worker {i}").as_bytes())
                        .unwrap()
                        .then_some(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        store.get("claims/x").unwrap(),
        format!("worker {}", winners[0]).into_bytes()
    );
    assert!(!store.put_if_absent("claims/x", b"late").unwrap());

    // Staged writes: invisible until commit, whether one put or a multipart upload.
    let data: Vec<u8> = (0..12u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let multipart = store.clone().with_part_size(5 << 20);
    let mut w = multipart.create_staged("shards/big.parquet").unwrap();
    for chunk in data.chunks(1 << 20) {
        w.write_all(chunk).unwrap();
    }
    assert!(store.stat("shards/big.parquet").unwrap().is_none());
    assert!(store.list("shards").unwrap().is_empty());
    assert_eq!(w.commit().unwrap(), data.len() as u64);
    let mut back = Vec::new();
    store
        .open_read("shards/big.parquet")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(
        back == data,
        "multipart object differs from what was written"
    );

    let mut small = store.create_staged("shards/small.parquet").unwrap();
    small.write_all(b"small").unwrap();
    assert!(store.stat("shards/small.parquet").unwrap().is_none());
    small.commit().unwrap();
    assert_eq!(store.get("shards/small.parquet").unwrap(), b"small");

    // A writer that stops before commit (in any state) leaves nothing visible.
    for size in [3usize, 11 << 20] {
        let mut w = multipart.create_staged("shards/dropped.parquet").unwrap();
        w.write_all(&data[..size]).unwrap();
        drop(w);
        assert!(store.stat("shards/dropped.parquet").unwrap().is_none());
    }
    assert_eq!(
        store.list("shards").unwrap(),
        ["big.parquet", "small.parquet"]
    );
}

#[test]
fn inputs_resolve_on_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = new_bucket("inputs");
    let shards = make_shards(&tmp.path().join("in"), 3, 2);
    upload(&format!("{bucket}/in"), &shards);
    let list = "# shards\nshard-00000.tar\n\nshard-{00001..00002}.tar\n";
    CloudStore::open(&format!("{bucket}/lists"))
        .unwrap()
        .put("all.txt", list.replace("shard-", "../in/shard-").as_bytes())
        .unwrap();
    CloudStore::open(&format!("{bucket}/in"))
        .unwrap()
        .put("list.txt", list.as_bytes())
        .unwrap();

    let names = |patterns: &[&str]| -> Vec<(String, String)> {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        resolve_inputs(&patterns)
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.uri))
            .collect()
    };
    let expected: Vec<(String, String)> = (0..3)
        .map(|i| {
            (
                format!("shard-{i:05}"),
                format!("{bucket}/in/shard-{i:05}.tar"),
            )
        })
        .collect();
    assert_eq!(names(&[&format!("{bucket}/in/shard-*.tar")]), expected);
    assert_eq!(
        names(&[&format!("{bucket}/in/shard-{{00000..00002}}.tar")]),
        expected
    );
    assert_eq!(names(&[&format!("{bucket}/in/list.txt")]), expected);

    let err = |pattern: String| resolve_inputs(&[pattern]).unwrap_err();
    assert!(matches!(
        err(format!("{bucket}/*/shard-00000.tar")),
        ShardListError::CloudGlobInPrefix { .. }
    ));
    assert!(matches!(
        err(format!("{bucket}/in/none-*.tar")),
        ShardListError::NoMatch { .. }
    ));
    let missing_list = err(format!("{bucket}/in/missing.txt")).to_string();
    assert!(missing_list.contains("not found"), "{missing_list}");
}

/// A test job on S3: `n` uploaded shards of 4 samples in a new bucket, their names, the input
/// glob, and `BUCKET/reference`, the output of one uninterrupted worker with `extra` config.
struct S3Job {
    tmp: tempfile::TempDir,
    bucket: String,
    names: Vec<String>,
    input: String,
    reference: String,
}

fn s3_job_with_reference(label: &str, n: usize, extra: &str) -> S3Job {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = new_bucket(label);
    let shards = make_shards(&tmp.path().join("in"), n, 4);
    upload(&format!("{bucket}/in"), &shards);
    let input = format!("{bucket}/in/shard-*.tar");
    let reference = format!("{bucket}/reference");
    let config = s3_config(&tmp.path().join("ref"), &input, &reference, extra);
    let out = run(&mut reinforce_s3(&config));
    assert!(out.status.success(), "{}", text(&out));
    S3Job {
        names: shard_names(&shards),
        tmp,
        bucket,
        input,
        reference,
    }
}

#[test]
fn four_workers_on_s3_process_every_shard_exactly_once() {
    let S3Job {
        tmp,
        bucket,
        names,
        input,
        reference,
    } = s3_job_with_reference("workers", 12, "batch_size = 2");

    let output = format!("{bucket}/out");
    let config = s3_config(&tmp.path().join("four"), &input, &output, "batch_size = 2");
    let logs = run_workers(|| reinforce_s3(&config), 4);
    let mut processed: Vec<String> = logs.iter().flat_map(|l| shards_done_in_log(l)).collect();
    processed.sort();
    assert_eq!(processed, names, "every shard processed exactly once");
    assert_s3_finished(&output, &names);
    assert_eq!(s3_done(&output), s3_done(&reference));

    let status = run(dfndr_s3().args(["status", &output]));
    assert!(status.status.success());
    assert!(text(&status).contains("12 done"), "{}", text(&status));
    let verify = run(dfndr_s3().args(["verify", &output]));
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("12 of 12 done shards verified"));

    // Reading tools and the export work on object-store locations as on local ones.
    let shard = format!("{output}/shards/shard-00003.parquet");
    let inspect = run(dfndr_s3().args(["inspect", &shard, "--rows", "1"]));
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert!(text(&inspect).contains("000030000"), "{}", text(&inspect));
    let apple = format!("{bucket}/apple");
    let export = run(dfndr_s3().args(["export-wds", &output, &apple, "--no-progress"]));
    assert!(export.status.success(), "{}", text(&export));
    let mut exported: Vec<String> = names.iter().map(|n| format!("{n}.tar")).collect();
    exported.push("config.json".into());
    exported.sort();
    assert_eq!(
        CloudStore::open(&apple).unwrap().list("").unwrap(),
        exported
    );
}

#[test]
fn killed_worker_on_s3_is_taken_over() {
    let S3Job {
        tmp,
        bucket,
        names,
        input,
        reference,
    } = s3_job_with_reference("takeover", 3, "");

    // A worker killed (SIGKILL) with its output written but not published.
    let output = format!("{bucket}/crashed");
    let config = s3_config(&tmp.path().join("crash"), &input, &output, "");
    let crashed = run(reinforce_s3(&config).env("DFNDR_CRASH_AT", "temp_written:shard-00001"));
    assert!(!crashed.status.success());
    assert!(text(&crashed).contains("DFNDR_CRASH_AT"));
    let store = CloudStore::open(&output).unwrap();
    assert!(store.stat("shards/shard-00001.parquet").unwrap().is_none());
    assert!(store
        .stat("_progress/claims/shard-00001")
        .unwrap()
        .is_some());
    let log = text(&run(&mut reinforce_s3(&config)));
    assert!(shards_done_in_log(&log).contains(&"shard-00001".to_string()));
    assert_s3_finished(&output, &names);
    assert_eq!(s3_done(&output), s3_done(&reference));

    // A worker on another node that died holding a claim: taken over once the lease expires.
    let output = format!("{bucket}/lease");
    let config = s3_config(
        &tmp.path().join("lease"),
        &input,
        &output,
        "lease_seconds = 2.0",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let claim = serde_json::json!({
        "worker": "gone", "host": "another-host", "pid": 1, "token": "t-gone",
        "claimed_unix": now, "heartbeat_unix": now
    });
    CloudStore::open(&output)
        .unwrap()
        .put("_progress/claims/shard-00002", claim.to_string().as_bytes())
        .unwrap();
    let started = Instant::now();
    let out = run(&mut reinforce_s3(&config));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("took over a stale claim"),
        "{}",
        text(&out)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "a live claim was taken over after {:?}",
        started.elapsed()
    );
    assert_s3_finished(&output, &names);
    assert_eq!(s3_done(&output), s3_done(&reference));
}

#[test]
fn missing_bucket_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-00000.tar", demo_dir().display());
    let output = format!("s3://dfndr-no-such-bucket-{}/out", std::process::id());
    let config = s3_config(tmp.path(), &input, &output, "");
    let out = run(&mut reinforce_s3(&config));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains(&output), "the error names the location: {log}");
    assert!(log.contains("NoSuchBucket"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
