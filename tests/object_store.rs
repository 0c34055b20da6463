//! Object stores, against real servers from the package registries: moto for `s3://`
//! (`common::s3`), fake-gcs-server for `gs://` (`common::gcs`) and Azurite for `az://`
//! (`common::azurite`). One set of tests runs on each: the storage contract, input resolution,
//! and the job's exactly-once and takeover guarantees.
//!
//! Where an emulator lacks a feature the test prints `EMULATOR GAP: STORE: FEATURE: WHAT
//! HAPPENS`, checks that dfndr fails cleanly on it, and tests the rest.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::emulator::gap;
use common::*;
use dfndr_shards::shardlist::{resolve_inputs, ShardListError};
use dfndr_shards::store::{open_store, CloudStore, Store, StoreError};

/// The object stores under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    S3,
    Gcs,
    Azure,
}

/// Store features an emulator may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feature {
    /// Puts through dfndr's client (plain, conditional, staged).
    Writes,
    /// Create-only puts: the claims.
    ConditionalPut,
    /// Multipart uploads: large staged writes.
    Multipart,
}

impl Backend {
    fn scheme(self) -> &'static str {
        match self {
            Backend::S3 => "s3",
            Backend::Gcs => "gs",
            Backend::Azure => "az",
        }
    }

    /// The environment that points dfndr at this store's emulator (started on first use).
    /// (`common::s3` is spelled out: the `mod s3` of the tests below shadows it.)
    fn env(self) -> Vec<(&'static str, String)> {
        match self {
            Backend::S3 => common::s3::s3_env(&common::s3::s3_server().endpoint),
            Backend::Gcs => gcs::gcs_env(&gcs::fake_gcs().endpoint),
            Backend::Azure => azurite::azure_env(&azurite::azurite().endpoint),
        }
    }

    /// A new, empty bucket (container); its `scheme://name` URL.
    fn new_bucket(self, label: &str) -> String {
        match self {
            Backend::S3 => common::s3::new_bucket(label),
            Backend::Gcs => gcs::new_bucket(label),
            Backend::Azure => azurite::new_container(label),
        }
    }

    /// What the server answers a write to a bucket that does not exist with.
    fn missing_bucket_code(self) -> &'static str {
        match self {
            Backend::S3 => "NoSuchBucket",
            Backend::Gcs => "Not Found",
            Backend::Azure => "ContainerNotFound",
        }
    }

    /// Why this store's emulator cannot do `feature`, if it cannot.
    fn lacks(self, feature: Feature) -> Option<&'static str> {
        match (self, feature) {
            (Backend::Gcs, Feature::Writes | Feature::ConditionalPut) => Some(
                "fake-gcs-server 1.54.0 does not implement the XML API's object upload that \
                 dfndr's client sends (PUT /BUCKET/KEY, with x-goog-if-generation-match: 0 for \
                 a claim): it answers 400 invalid uploadType",
            ),
            (Backend::Gcs, Feature::Multipart) => Some(
                "fake-gcs-server 1.54.0 does not implement XML API multipart uploads \
                 (POST /BUCKET/KEY?uploads): it answers 400 invalid uploadType",
            ),
            _ => None,
        }
    }

    /// What the error of a write this store's emulator lacks says.
    fn gap_error(self) -> &'static str {
        match self {
            Backend::Gcs => "400 Bad Request",
            _ => unreachable!("{self:?}: no write is listed as lacking"),
        }
    }

    /// Puts `data` at `path` of `store`: through dfndr's client, or through the emulator's own
    /// API where it does not take the client's writes.
    fn put(self, store: &CloudStore, path: &str, data: &[u8]) {
        match self {
            Backend::Gcs => gcs::seed(&store.uri_of(path), data),
            _ => store.put(path, data).unwrap(),
        }
    }

    /// The `dfndr` binary pointed at this store's emulator.
    fn dfndr(self) -> std::process::Command {
        let mut cmd = dfndr();
        cmd.envs(self.env());
        cmd
    }

    /// `dfndr reinforce --config CONFIG` pointed at this store's emulator.
    fn reinforce(self, config: &Path) -> std::process::Command {
        let mut cmd = reinforce(config);
        cmd.envs(self.env());
        cmd
    }

    /// Where a test job writes its outputs: `bucket`, or a local folder under `tmp` (reported
    /// as a gap) where the emulator does not take dfndr's writes.
    fn output_root(self, bucket: &str, tmp: &Path) -> String {
        match self.lacks(Feature::Writes) {
            None => bucket.to_string(),
            Some(why) => {
                gap(
                    self.scheme(),
                    "job output on the store",
                    &format!("{why}; the job reads its input from the store and writes its output to a local folder"),
                );
                tmp.join("local-out").display().to_string()
            }
        }
    }
}

/// Each test below, once per store: `s3::NAME`, `gs::NAME`, `az::NAME`.
macro_rules! on_each_store {
    ($($test:ident),* $(,)?) => {
        mod s3 {
            $( #[test] fn $test() { super::$test(super::Backend::S3) } )*
        }
        mod gs {
            $( #[test] fn $test() { super::$test(super::Backend::Gcs) } )*
        }
        mod az {
            $( #[test] fn $test() { super::$test(super::Backend::Azure) } )*
        }
    };
}

on_each_store!(
    store_contract,
    inputs_resolve,
    four_workers_process_every_shard_exactly_once,
    killed_worker_is_taken_over,
    missing_bucket_is_a_clear_error,
);

/// Uploads local files into `dir_url`.
fn upload(backend: Backend, dir_url: &str, files: &[PathBuf]) {
    let store = CloudStore::open(dir_url).unwrap();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy();
        backend.put(&store, &name, &std::fs::read(f).unwrap());
    }
}

/// Writes a job config with `input` and `output` locations.
fn job_config(dir: &Path, input: &str, output: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!("[job]\ninput = [{input:?}]\noutput = {output:?}\n{extra}\n"),
    )
    .unwrap();
    path
}

/// The done records of an output (local or on a store): shard name -> (sha256, rows).
fn done(output: &str) -> BTreeMap<String, (String, u64)> {
    let store = open_store(output).unwrap();
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

/// A finished output: every shard's parquet present, no claim left, a manifest.
fn assert_finished(output: &str, names: &[String]) {
    let store = open_store(output).unwrap();
    let parquet: Vec<String> = names.iter().map(|n| format!("{n}.parquet")).collect();
    assert_eq!(store.list("shards").unwrap(), parquet);
    assert!(store.list("_progress/claims").unwrap().is_empty());
    assert!(store.stat("manifest.json").unwrap().is_some());
}

/// A failed write: a store error naming the object, and nothing written.
fn assert_write_failed(
    backend: Backend,
    store: &CloudStore,
    path: &str,
    result: Result<impl std::fmt::Debug, StoreError>,
) {
    let err = result
        .expect_err("the emulator took a write it is listed as lacking; update Backend::lacks");
    assert!(matches!(err, StoreError::Remote { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&store.uri_of(path)), "{message}");
    assert!(message.contains(backend.gap_error()), "{message}");
    assert!(store.stat(path).unwrap().is_none());
}

fn store_contract(backend: Backend) {
    let scheme = backend.scheme();
    let bucket = backend.new_bucket("contract");
    let store = CloudStore::open(&format!("{bucket}/out")).unwrap();
    assert_eq!(store.root_uri(), format!("{bucket}/out"));

    if let Some(why) = backend.lacks(Feature::Writes) {
        assert_write_failed(backend, &store, "m.json", store.put("m.json", b"1"));
        gap(
            scheme,
            "put (atomic replace)",
            &format!(
                "{why}; dfndr reports a store error naming the object. The reads, listing and \
                 deletes are checked on objects put through the emulator's JSON API"
            ),
        );
    }
    backend.put(&store, "m.json", b"1");
    backend.put(&store, "m.json", b"22");
    assert_eq!(store.get("m.json").unwrap(), b"22");
    assert_eq!(store.stat("m.json").unwrap().unwrap().size, 2);
    assert!(store.stat("none").unwrap().is_none());
    assert!(matches!(store.get("none"), Err(StoreError::NotFound(_))));
    backend.put(&store, "dir/b", b"b");
    backend.put(&store, "dir/a", b"a");
    backend.put(&store, "dir/sub/c", b"c");
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
    if let Some(why) = backend.lacks(Feature::ConditionalPut) {
        assert_write_failed(
            backend,
            &store,
            "claims/x",
            store.put_if_absent("claims/x", b"worker"),
        );
        gap(
            scheme,
            "conditional put (claims, 8 concurrent claimers)",
            &format!("{why}; a claim fails with a store error naming the object, so no worker can wrongly believe it won"),
        );
    } else {
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
    }

    // Staged writes: invisible until commit, whether one put or a multipart upload (parts of
    // 5 MiB, S3's minimum).
    let data: Vec<u8> = (0..12u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let multipart = store.clone().with_part_size(5 << 20);
    let mut w = multipart.create_staged("shards/big.parquet").unwrap();
    let written = data
        .chunks(1 << 20)
        .try_for_each(|chunk| w.write_all(chunk));
    assert!(store.stat("shards/big.parquet").unwrap().is_none());
    assert!(store.list("shards").unwrap().is_empty());
    if let Some(why) = backend.lacks(Feature::Multipart) {
        let err = written.expect_err("multipart upload started; update Backend::lacks");
        let message = err.to_string();
        assert!(
            message.contains(&store.uri_of("shards/big.parquet")),
            "{message}"
        );
        assert!(message.contains(backend.gap_error()), "{message}");
        drop(w);
        assert!(store.stat("shards/big.parquet").unwrap().is_none());
        gap(
            scheme,
            "multipart staged write (commit, abort)",
            &format!("{why}; the write fails with an error naming the object and leaves nothing"),
        );
    } else {
        written.unwrap();
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
    }

    let mut small = store.create_staged("shards/small.parquet").unwrap();
    small.write_all(b"small").unwrap();
    assert!(store.stat("shards/small.parquet").unwrap().is_none());
    if let Some(why) = backend.lacks(Feature::Writes) {
        assert_write_failed(backend, &store, "shards/small.parquet", small.commit());
        gap(
            scheme,
            "small staged write (one put on commit)",
            &format!("{why}; commit fails with a store error naming the object and leaves nothing"),
        );
    } else {
        small.commit().unwrap();
        assert_eq!(store.get("shards/small.parquet").unwrap(), b"small");
    }

    // A writer that stops before commit (in any state) leaves nothing visible.
    for size in [3usize, 11 << 20] {
        let mut w = multipart.create_staged("shards/dropped.parquet").unwrap();
        let written = w.write_all(&data[..size]);
        if backend.lacks(Feature::Multipart).is_none() {
            written.unwrap();
        }
        drop(w);
        assert!(store.stat("shards/dropped.parquet").unwrap().is_none());
    }
    let committed = [
        ("big.parquet", Feature::Multipart),
        ("small.parquet", Feature::Writes),
    ];
    let expected: Vec<&str> = committed
        .iter()
        .filter(|(_, feature)| backend.lacks(*feature).is_none())
        .map(|(name, _)| *name)
        .collect();
    assert_eq!(store.list("shards").unwrap(), expected);

    // Streamed reads of an object put around the client, where the client cannot write.
    if backend.lacks(Feature::Writes).is_some() {
        backend.put(&store, "shards/seeded.bin", &data);
        let mut back = Vec::new();
        store
            .open_read("shards/seeded.bin")
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data, "streamed object differs from what was put");
    }
}

fn inputs_resolve(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = backend.new_bucket("inputs");
    let shards = make_shards(&tmp.path().join("in"), 3, 2);
    upload(backend, &format!("{bucket}/in"), &shards);
    let list = "# shards\nshard-00000.tar\n\nshard-{00001..00002}.tar\n";
    backend.put(
        &CloudStore::open(&format!("{bucket}/lists")).unwrap(),
        "all.txt",
        list.replace("shard-", "../in/shard-").as_bytes(),
    );
    backend.put(
        &CloudStore::open(&format!("{bucket}/in")).unwrap(),
        "list.txt",
        list.as_bytes(),
    );

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

/// A test job on a store: `n` uploaded shards of 4 samples in a new bucket, their names, the
/// input glob, the root of its outputs (the bucket, or a local folder where the emulator does
/// not take dfndr's writes), and `ROOT/reference`, the output of one uninterrupted worker with
/// `extra` config.
struct StoreJob {
    tmp: tempfile::TempDir,
    root: String,
    names: Vec<String>,
    input: String,
    reference: String,
}

fn job_with_reference(backend: Backend, label: &str, n: usize, extra: &str) -> StoreJob {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = backend.new_bucket(label);
    let shards = make_shards(&tmp.path().join("in"), n, 4);
    upload(backend, &format!("{bucket}/in"), &shards);
    let input = format!("{bucket}/in/shard-*.tar");
    let root = backend.output_root(&bucket, tmp.path());
    let reference = format!("{root}/reference");
    let config = job_config(&tmp.path().join("ref"), &input, &reference, extra);
    let out = run(&mut backend.reinforce(&config));
    assert!(out.status.success(), "{}", text(&out));
    StoreJob {
        names: shard_names(&shards),
        tmp,
        root,
        input,
        reference,
    }
}

fn four_workers_process_every_shard_exactly_once(backend: Backend) {
    let StoreJob {
        tmp,
        root,
        names,
        input,
        reference,
    } = job_with_reference(backend, "workers", 12, "batch_size = 2");

    let output = format!("{root}/out");
    let config = job_config(&tmp.path().join("four"), &input, &output, "batch_size = 2");
    let logs = run_workers(|| backend.reinforce(&config), 4);
    let mut processed: Vec<String> = logs.iter().flat_map(|l| shards_done_in_log(l)).collect();
    processed.sort();
    assert_eq!(processed, names, "every shard processed exactly once");
    assert_finished(&output, &names);
    assert_eq!(done(&output), done(&reference));

    let status = run(backend.dfndr().args(["status", &output]));
    assert!(status.status.success());
    assert!(text(&status).contains("12 done"), "{}", text(&status));
    let verify = run(backend.dfndr().args(["verify", &output]));
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("12 of 12 done shards verified"));

    // Reading tools and the export work on object-store locations as on local ones.
    let shard = format!("{output}/shards/shard-00003.parquet");
    let inspect = run(backend.dfndr().args(["inspect", &shard, "--rows", "1"]));
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert!(text(&inspect).contains("000030000"), "{}", text(&inspect));
    let input_shard = input.replace("shard-*.tar", "shard-00003.tar");
    let inspect = run(backend
        .dfndr()
        .args(["inspect", &input_shard, "--rows", "1"]));
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert!(text(&inspect).contains("000030000"), "{}", text(&inspect));
    let apple = format!("{root}/apple");
    let export = run(backend
        .dfndr()
        .args(["export-wds", &output, &apple, "--no-progress"]));
    assert!(export.status.success(), "{}", text(&export));
    let mut exported: Vec<String> = names.iter().map(|n| format!("{n}.tar")).collect();
    exported.push("config.json".into());
    exported.sort();
    assert_eq!(open_store(&apple).unwrap().list("").unwrap(), exported);

    // `dfndr embed` runs on the store's output like on a local one.
    let teachers = job_config(&tmp.path().join("embed"), &input, &output, TINY_TEACHERS);
    let embed = run(backend
        .dfndr()
        .args(["embed", "--no-progress", "--config"])
        .arg(&teachers)
        .arg(&output));
    assert!(embed.status.success(), "{}", text(&embed));
    assert!(
        text(&embed).contains("12 of 12 shards embedded (12 by this worker"),
        "{}",
        text(&embed)
    );
    let verify = run(backend.dfndr().args(["verify", &output]));
    assert!(verify.status.success(), "{}", text(&verify));
}

fn killed_worker_is_taken_over(backend: Backend) {
    let StoreJob {
        tmp,
        root,
        names,
        input,
        reference,
    } = job_with_reference(backend, "takeover", 3, "");

    // A worker killed (SIGKILL) with its output written but not published.
    let output = format!("{root}/crashed");
    let config = job_config(&tmp.path().join("crash"), &input, &output, "");
    let crashed = run(backend
        .reinforce(&config)
        .env("DFNDR_CRASH_AT", "temp_written:shard-00001"));
    assert!(!crashed.status.success());
    assert!(text(&crashed).contains("DFNDR_CRASH_AT"));
    let store = open_store(&output).unwrap();
    assert!(store.stat("shards/shard-00001.parquet").unwrap().is_none());
    assert!(store
        .stat("_progress/claims/shard-00001")
        .unwrap()
        .is_some());
    let log = text(&run(&mut backend.reinforce(&config)));
    assert!(shards_done_in_log(&log).contains(&"shard-00001".to_string()));
    assert_finished(&output, &names);
    assert_eq!(done(&output), done(&reference));

    // A worker on another node that died holding a claim: taken over once the lease expires.
    let output = format!("{root}/lease");
    let config = job_config(
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
    open_store(&output)
        .unwrap()
        .put("_progress/claims/shard-00002", claim.to_string().as_bytes())
        .unwrap();
    let started = Instant::now();
    let out = run(&mut backend.reinforce(&config));
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
    assert_finished(&output, &names);
    assert_eq!(done(&output), done(&reference));
}

fn missing_bucket_is_a_clear_error(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-00000.tar", demo_dir().display());
    let output = format!(
        "{}://dfndr-no-such-bucket-{}/out",
        backend.scheme(),
        std::process::id()
    );
    let config = job_config(tmp.path(), &input, &output, "");
    let out = run(&mut backend.reinforce(&config));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains(&output), "the error names the location: {log}");
    assert!(log.contains(backend.missing_bucket_code()), "{log}");
    assert!(log.contains("does the bucket exist?"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
