//! Peak memory of a job does not grow with the size of its shards: the staged executor holds
//! a bounded number of batches, and the parquet writer one row group.

mod common;

use common::*;

/// The bound this test states for the config below (tiny teachers, two views per sample,
/// batches of 64): the process's peak resident memory on a single shard of 10,000 samples.
/// Measured on the 2-core dev box: 150-167 MiB, and 162 MiB for 30,000 samples.
const PEAK_BOUND_MIB: f64 = 256.0;
/// How much more a 10,000-sample shard may take than a 1,000-sample one (allocator noise).
const GROWTH_BOUND_MIB: f64 = 48.0;

fn peak_mib(log: &str) -> f64 {
    let line = log
        .lines()
        .find(|l| l.starts_with("peak resident memory"))
        .unwrap_or_else(|| panic!("no peak memory line in:\n{log}"));
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn run_job(dir: &std::path::Path, samples: usize) -> f64 {
    let shards = dir.join(format!("in-{samples}"));
    make_shards(&shards, 1, samples);
    let out = dir.join(format!("out-{samples}"));
    let config = write_config(
        dir,
        &format!("{}/shard-00000.tar", shards.display()),
        &out,
        &format!("batch_size = 64\n{TINY_TEACHERS}"),
    );
    let result = run(&mut reinforce(&config));
    let log = text(&result);
    assert!(result.status.success(), "dfndr failed:\n{log}");
    let rows: u64 = done_records(&out)["shard-00000"]["rows"].as_u64().unwrap();
    assert_eq!(rows, samples as u64);
    peak_mib(&log)
}

#[test]
fn peak_memory_does_not_grow_with_shard_size() {
    let tmp = tempfile::tempdir().unwrap();
    let small = run_job(tmp.path(), 1_000);
    let large = run_job(tmp.path(), 10_000);
    eprintln!("peak resident memory: {small:.1} MiB for 1,000 samples, {large:.1} MiB for 10,000");
    assert!(
        large <= PEAK_BOUND_MIB,
        "10,000 samples took {large:.1} MiB, above the stated bound of {PEAK_BOUND_MIB} MiB"
    );
    assert!(
        large <= small + GROWTH_BOUND_MIB,
        "peak memory grew with the shard: {small:.1} MiB for 1,000 samples, {large:.1} MiB for 10,000"
    );
}
