//! Shared helpers of the end-to-end tests: run the real `dfndr` binary on shards the tests
//! build themselves.

#![allow(dead_code)]

pub mod azurite;
pub mod emulator;
pub mod gcs;
pub mod proxy;
pub mod s3;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `dfndr` binary built by cargo for these tests.
pub fn dfndr() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dfndr"));
    test_env(&mut cmd);
    cmd
}

/// The `dfndr` binary run by qemu's user-mode emulator as the CPU model `cpu` (e.g. an AVX2
/// machine without AVX-512), so that every kernel dispatcher, gemm's included, takes that
/// CPU's path. `make qemu-user` installs the emulator.
pub fn dfndr_on_cpu(cpu: &str) -> Command {
    let qemu = "qemu-x86_64";
    let present = Command::new(qemu)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        present,
        "this test runs dfndr on an emulated CPU: run `make qemu-user` (Debian's qemu-user)"
    );
    let mut cmd = Command::new(qemu);
    cmd.args(["-cpu", cpu]).arg(env!("CARGO_BIN_EXE_dfndr"));
    test_env(&mut cmd);
    cmd
}

/// The environment of every dfndr the tests start: no fault injection, no scheduler
/// placement from the caller's shell.
fn test_env(cmd: &mut Command) {
    cmd.env_remove("DFNDR_CRASH_AT")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX")
        .env("DFNDR_LOG", "info");
}

/// Runs a command and returns its output, printing it for failing tests.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("cannot start dfndr");
    eprintln!(
        "$ {:?}\n--- status {:?}\n--- stdout\n{}--- stderr\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// stdout and stderr of an output as one string.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The bundled demo shards.
pub fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo")
}

/// The encoded image of every sample of a webdataset tar, by sample key.
pub fn images_by_key(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    tar_members(path)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".jpg") || n.ends_with(".png") || n.ends_with(".webp"))
        .map(|(n, b)| (n.split('.').next().unwrap_or_default().to_string(), b))
        .collect()
}

/// All (member name, bytes) of a tar file, in order.
pub fn tar_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        out.push((name, data));
    }
    out
}

/// The images of the demo shards with their extension: valid images for building new shards.
pub fn demo_images() -> Vec<(String, Vec<u8>)> {
    let mut images = Vec::new();
    for shard in ["demo-00000.tar", "demo-00001.tar"] {
        for (name, data) in tar_members(&demo_dir().join(shard)) {
            let ext = name.rsplit('.').next().unwrap_or("").to_string();
            if ["jpg", "png", "webp"].contains(&ext.as_str()) {
                images.push((ext, data));
            }
        }
    }
    images
}

/// Builds a tar from (member name, bytes) pairs.
pub fn build_tar(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Writes `n` shards of `per_shard` valid samples each into `dir` as `shard-NNNNN.tar`.
pub fn make_shards(dir: &Path, n: usize, per_shard: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let images = demo_images();
    let small: Vec<&(String, Vec<u8>)> = images.iter().filter(|(_, d)| d.len() < 20_000).collect();
    let mut paths = Vec::new();
    for s in 0..n {
        let mut members = Vec::new();
        for i in 0..per_shard {
            let key = format!("{s:05}{i:04}");
            let (ext, data) = small[(s * per_shard + i) % small.len()];
            members.push((format!("{key}.{ext}"), data.clone()));
            members.push((
                format!("{key}.txt"),
                format!("sample {i} of shard {s}").into_bytes(),
            ));
            members.push((
                format!("{key}.json"),
                format!("{{\"url\": \"https://example.com/{key}.{ext}\"}}").into_bytes(),
            ));
        }
        let path = dir.join(format!("shard-{s:05}.tar"));
        std::fs::write(&path, build_tar(&members)).unwrap();
        paths.push(path);
    }
    paths
}

/// The shard names (file stems) of shard paths.
pub fn shard_names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Writes a job config with `input`, `output` and extra TOML lines.
pub fn write_config(dir: &Path, input: &str, output: &Path, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    let text = format!(
        "[job]\ninput = [{input:?}]\noutput = {:?}\n{extra}\n",
        output.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Done records of an output, by shard name.
pub fn done_records(out: &Path) -> BTreeMap<String, serde_json::Value> {
    let mut records = BTreeMap::new();
    let dir = out.join("_progress/done");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".json") {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
                records.insert(stem.to_string(), v);
            }
        }
    }
    records
}

/// Every file under `dir`, relative, sorted (to check for leftovers).
pub fn all_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// sha256 (hex) of every parquet shard of an output, by file name.
pub fn shard_hashes(out: &Path) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut hashes = BTreeMap::new();
    for e in std::fs::read_dir(out.join("shards")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            let digest = sha2::Sha256::digest(std::fs::read(&p).unwrap());
            hashes.insert(name, digest.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
    hashes
}

/// Counts the `shard done` log lines per shard in a worker's stderr.
pub fn shards_done_in_log(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains("shard done"))
        .filter_map(|l| {
            let at = l.find("shard=")? + "shard=".len();
            Some(l[at..].split_whitespace().next()?.to_string())
        })
        .collect()
}

/// `dfndr reinforce --no-progress --config CONFIG`, ready for more arguments.
pub fn reinforce(config: &Path) -> Command {
    let mut cmd = dfndr();
    cmd.args(["reinforce", "--no-progress", "--config"])
        .arg(config);
    cmd
}

/// Starts `n` workers at once (`--rank R --world-size n` added to each `worker()` command) and
/// returns their logs once all have finished; every worker must succeed.
pub fn run_workers(worker: impl Fn() -> Command, n: usize) -> Vec<String> {
    let children: Vec<std::process::Child> = (0..n)
        .map(|rank| {
            worker()
                .args(["--rank", &rank.to_string(), "--world-size", &n.to_string()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let log = text(&out);
            eprintln!("--- worker\n{log}");
            assert!(out.status.success(), "worker failed:\n{log}");
            log
        })
        .collect()
}

/// Two tiny random teachers: one at the view size, one that needs the views resized.
pub const TINY_TEACHERS: &str = r#"
[[teachers]]
name = "a"
weights = "random:11"
logit_scale = 70.0
[teachers.arch]
embed_dim = 24
quick_gelu = true
[teachers.arch.vision]
image_size = 64
patch_size = 16
width = 32
layers = 2
head_width = 16
[teachers.arch.text]
width = 32
heads = 2
layers = 2

[[teachers]]
name = "b"
weights = "random:12"
[teachers.arch]
embed_dim = 16
[teachers.arch.vision]
image_size = 32
patch_size = 8
width = 32
layers = 1
head_width = 16
[teachers.arch.text]
width = 32
heads = 4
layers = 1
"#;

/// A finished `dfndr reinforce` over demo shard 00000 with `extra` config, in a fresh folder.
pub struct DemoRun {
    /// Holds the config and the output (removed on drop).
    pub dir: tempfile::TempDir,
    /// The output folder.
    pub out: PathBuf,
    /// The input shard.
    pub shard: PathBuf,
    /// The command's output (status, stdout, stderr).
    pub output: Output,
}

/// Runs `dfndr reinforce` over demo shard 00000 with `extra` appended to the config.
pub fn reinforce_demo_shard(extra: &str) -> DemoRun {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let shard = demo_dir().join("demo-00000.tar");
    let config = write_config(dir.path(), &shard.display().to_string(), &out, extra);
    let output = run(&mut reinforce(&config));
    DemoRun {
        dir,
        out,
        shard,
        output,
    }
}

/// Whether two stored embeddings agree within dfndr's promise across batch compositions and
/// CPU feature levels: every component at most one float16 step apart (a step is at most
/// 2^-10 of the value), plus 1e-5 for values near zero.
pub fn within_one_f16_step(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(p, q)| (p - q).abs() <= p.abs().max(q.abs()) * (1.0 / 1024.0) + 1e-5)
}
