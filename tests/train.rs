//! `dfndr train` end to end on a dataset `dfndr reinforce` writes: a run killed with SIGKILL
//! at several steps (and one stopped with SIGINT) resumes to the same losses and the same
//! bytes of weights as an uninterrupted run; bad datasets and configs are clear errors or
//! counted skips. Evaluation during training ([eval]) changes nothing of that and resumes
//! with the run; `dfndr eval` on the last checkpoint gives the same numbers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{demo_dir, dfndr, run, text, TINY_TEACHERS};

const CAPTIONER: &str = "[[captioners]]\ntag = \"coca\"\nweights = \"random:5\"\nnum_captions = 2\n[captioners.arch]\nembed_dim = 32\n[captioners.arch.vision]\nimage_size = 64\npatch_size = 16\nwidth = 32\nlayers = 1\nhead_width = 16\nattentional_pool = true\nattn_pooler_heads = 2\nattn_pooler_queries = 8\n[captioners.arch.text]\nwidth = 32\nheads = 2\nlayers = 1\nembed_cls = true\ncontext_length = 76\n[captioners.arch.multimodal]\nwidth = 32\nheads = 2\nlayers = 1\n[captioners.generation]\nseq_len = 10\n";

/// A reinforced copy of the two demo shards (inputs copied, so tests may damage them).
fn dataset(dir: &Path, teachers: bool) -> PathBuf {
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    for s in ["demo-00000.tar", "demo-00001.tar"] {
        std::fs::copy(demo_dir().join(s), inputs.join(s)).unwrap();
    }
    let out = dir.join("data");
    let extra = format!(
        "[augment]\nnum_augmentations = 2\nsize = 64\n{}{CAPTIONER}",
        if teachers { TINY_TEACHERS } else { "" }
    );
    let config = common::write_config(
        dir,
        &format!("{}/demo-{{00000..00001}}.tar", inputs.display()),
        &out,
        &extra,
    );
    let o = run(dfndr().args(["reinforce", "--config"]).arg(&config));
    assert!(o.status.success(), "reinforce failed");
    out
}

/// A training config over `data` (steps, checkpoint interval and extra TOML).
fn train_config(dir: &Path, data: &Path, steps: u64, every: u64, extra: &str) -> PathBuf {
    let students = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/students/tiny.toml");
    let text = format!(
        "seed = 3\n[student]\nfile = {:?}\n[data]\npath = {:?}\nshuffle_buffer = 8\n[optim]\nbatch_size = 4\nsteps = {steps}\nlr = 2e-3\nwarmup_steps = 2\n[checkpoint]\nevery_steps = {every}\nkeep = 2\n{extra}",
        students.display().to_string(),
        data.display().to_string()
    );
    let path = dir.join(format!("train-{steps}-{every}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn train(config: &Path, out: &Path) -> Command {
    let mut cmd = dfndr();
    cmd.args(["train", "--no-progress", "--config"])
        .arg(config)
        .arg("--output")
        .arg(out);
    cmd
}

fn losses(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // The loss's exact decimal form: equal runs print equal digits.
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// Starts a run, waits until it has logged `steps` steps, and kills it with `signal`.
fn interrupt_at(config: &Path, out: &Path, steps: usize, signal: &str) -> std::process::ExitStatus {
    let mut child = train(config, out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while steps_logged(out) < steps {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "no progress to step {steps}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap()
}

fn final_weights(out: &Path, steps: u64) -> Vec<u8> {
    std::fs::read(out.join(format!("checkpoints/ckpt-{steps:08}/model.safetensors"))).unwrap()
}

/// Records of the run's only TensorBoard event file (TFRecord framing: length, its CRC, data,
/// data CRC).
fn event_records(out: &Path) -> usize {
    let files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents."))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let (mut at, mut n) = (0, 0);
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 12 + len + 4;
        n += 1;
    }
    assert_eq!(at, bytes.len());
    n
}

fn eval_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn killed_and_interrupted_runs_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    // Evaluation during training must not change the run, and its results resume too.
    let eval = format!(
        "[eval]\nevery_steps = 5\n[[eval.datasets]]\npath = {:?}\nname = \"held\"\n",
        data.display().to_string()
    );
    let config = train_config(dir.path(), &data, 14, 3, &eval);

    let whole = dir.path().join("whole");
    let o = run(&mut train(&config, &whole));
    assert!(o.status.success());
    let reference = losses(&whole);
    assert_eq!(reference.len(), 14);
    assert!(whole.join("metrics.png").exists() && whole.join("config.json").exists());

    // Killed twice without warning (once possibly while a checkpoint is written), stopped
    // once with SIGINT (exit 130 after a checkpoint), then run to the end.
    let broken = dir.path().join("broken");
    let s = interrupt_at(&config, &broken, 4, "-KILL");
    assert!(!s.success());
    let s = interrupt_at(&config, &broken, 8, "-KILL");
    assert!(!s.success());
    let s = interrupt_at(&config, &broken, 10, "-INT");
    assert_eq!(s.code(), Some(130), "SIGINT: {s:?}");
    let o = run(&mut train(&config, &broken));
    assert!(o.status.success());
    assert!(text(&o).contains("resuming"), "the last run did not resume");
    assert_eq!(
        losses(&broken),
        reference,
        "the resumed run's losses differ"
    );
    assert!(
        final_weights(&broken, 14) == final_weights(&whole, 14),
        "weights differ"
    );
    // One TensorBoard event file per run folder, with one event per step after the
    // file-version event: the steps redone after each resume appear once.
    assert_eq!(event_records(&whole), 1 + 14);
    assert_eq!(event_records(&broken), 1 + 14);
    let evals = eval_lines(&whole);
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [5, 10, 14]);
    let metrics = |v: &[serde_json::Value]| -> Vec<serde_json::Value> {
        v.iter().map(|e| e["metrics"].clone()).collect()
    };
    assert_eq!(metrics(&eval_lines(&broken)), metrics(&evals));
    assert_eq!(evals[0]["dataset"], "held");
    assert_eq!(evals[0]["task"], "zeroshot_retrieval");
    let logged = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    let step10: serde_json::Value = serde_json::from_str(logged.lines().nth(9).unwrap()).unwrap();
    assert_eq!(
        step10["eval"]["held/mean_recall@1"],
        evals[1]["metrics"]["mean_recall@1"]
    );
    // `dfndr eval` on the run's last checkpoint gives the in-training numbers.
    let o = run(dfndr()
        .args(["eval", "--no-progress", "--checkpoint"])
        .arg(&whole)
        .arg("--data")
        .arg(&data));
    assert!(o.status.success(), "{}", text(&o));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(line["metrics"], evals[2]["metrics"]);
    // `dfndr export` writes it as OpenCLIP's torch.save file, which dfndr reads back to the
    // same embeddings.
    let exported = dir.path().join("exported");
    let o = run(dfndr()
        .args(["export", "--format", "pt", "--checkpoint"])
        .arg(&whole)
        .arg("--out")
        .arg(&exported));
    assert!(o.status.success(), "{}", text(&o));
    let image = dir.path().join("in/probe.jpg");
    let (_, jpg) = common::demo_images()
        .into_iter()
        .find(|(ext, _)| ext == "jpg")
        .unwrap();
    std::fs::write(&image, jpg).unwrap();
    let embed = |source: &[&str]| -> serde_json::Value {
        let o = run(dfndr()
            .arg("encode")
            .args(source)
            .arg("--image")
            .arg(&image)
            .args(["--text", "a photo"]));
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        serde_json::json!([v["images"][0]["embedding"], v["texts"][0]["embedding"]])
    };
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/students/tiny.toml");
    let weights = exported.join("open_clip_pytorch_model.bin");
    assert_eq!(
        embed(&[
            "--model",
            tiny.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap()
        ]),
        embed(&["--checkpoint", whole.to_str().unwrap()])
    );
    // `--reparameterize` writes the fused inference form under timm's `reparam_conv` keys;
    // it loads as it is and encodes the same.
    let fused = dir.path().join("fused");
    let o = run(dfndr()
        .args(["export", "--reparameterize", "--checkpoint"])
        .arg(&whole)
        .arg("--out")
        .arg(&fused));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("fused inference form"), "{}", text(&o));
    let file = fused.join("open_clip_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + header_len]).to_string();
    assert!(
        header.contains("visual.trunk.stem.0.reparam_conv.weight"),
        "{header}"
    );
    assert!(header.contains("token_mixer.reparam_conv.bias"), "{header}");
    assert!(!header.contains("conv_kxk") && !header.contains("token_mixer.mixer"));
    assert_eq!(
        embed(&[
            "--model",
            tiny.to_str().unwrap(),
            "--weights",
            file.to_str().unwrap()
        ]),
        embed(&["--checkpoint", whole.to_str().unwrap()])
    );

    // A finished run has nothing left to do.
    let o = run(&mut train(&config, &whole));
    assert!(o.status.success() && text(&o).contains("nothing to do"));

    // --init starts a fresh run from a checkpoint's weights (OpenCLIP key names): its first
    // loss is the trained model's, not a fresh one's.
    let init = whole.join("checkpoints/ckpt-00000014/model.safetensors");
    let short = train_config(dir.path(), &data, 1, 1, "");
    let from_init = dir.path().join("from-init");
    let o = run(train(&short, &from_init).arg("--init").arg(&init));
    assert!(o.status.success() && text(&o).contains("initial weights loaded"));
    let fresh = dir.path().join("fresh");
    assert!(run(&mut train(&short, &fresh)).status.success());
    assert_ne!(losses(&from_init), losses(&fresh));
    // Weights of another architecture are refused, naming the keys.
    let other = dir.path().join("other.toml");
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/students/tiny.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(tiny)
            .unwrap()
            .replace("layers = [1, 1, 1, 1]", "layers = [1, 2, 1, 1]"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(&short).unwrap().replace(
        &format!(
            "file = {:?}",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs/students/tiny.toml")
                .display()
                .to_string()
        ),
        &format!("file = {:?}", other.display().to_string()),
    );
    std::fs::write(&short, cfg).unwrap();
    let o = run(train(&short, &dir.path().join("mismatch"))
        .arg("--init")
        .arg(&init));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("missing") && text(&o).contains("stages.1.blocks.1"),
        "{}",
        text(&o)
    );
}

#[test]
fn bad_datasets_and_configs_are_clear_errors_or_counted_skips() {
    let dir = tempfile::tempdir().unwrap();

    // No teacher embeddings: an error naming the columns, exit status 2.
    let bare_dir = dir.path().join("bare");
    let bare = dataset(&bare_dir, false);
    let o = run(&mut train(
        &train_config(&bare_dir, &bare, 2, 2, ""),
        &dir.path().join("o1"),
    ));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("image_emb"), "{}", text(&o));

    // Config errors name the field before anything runs.
    let good_dir = dir.path().join("good");
    let data = dataset(&good_dir, true);
    let cfg = train_config(&good_dir, &data, 2, 2, "")
        .display()
        .to_string();
    let bad = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("batch_size = 4", "batch_size = 0");
    std::fs::write(&cfg, bad).unwrap();
    let o = run(&mut train(Path::new(&cfg), &dir.path().join("o2")));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("optim.batch_size"), "{}", text(&o));
    let o = run(&mut train(
        &train_config(
            &good_dir,
            &data,
            2,
            2,
            "[loss]\nteacher_logit_scales = [70.0]\n",
        ),
        &dir.path().join("o3"),
    ));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("loss.teacher_logit_scales"),
        "{}",
        text(&o)
    );
    let o = run(&mut train(
        &train_config(&good_dir, &data, 2, 2, "").with_file_name("missing.toml"),
        &dir.path().join("o4"),
    ));
    assert_eq!(o.status.code(), Some(2));

    // A corrupted original and a vanished source shard are counted skips; training goes on.
    let inputs = good_dir.join("in");
    let tar0 = inputs.join("demo-00000.tar");
    let mut members = common::tar_members(&tar0);
    let (name, bytes) = members
        .iter_mut()
        .find(|(n, _)| n.ends_with(".jpg") || n.ends_with(".png"))
        .unwrap();
    let corrupted = name.clone();
    *bytes = b"not an image any more".to_vec();
    std::fs::write(&tar0, common::build_tar(&members)).unwrap();
    std::fs::remove_file(inputs.join("demo-00001.tar")).unwrap();
    let out = dir.path().join("o5");
    // Seven batches of 4 cover an epoch of the 25 rows.
    let cfg = train_config(&good_dir, &data, 7, 7, "");
    let o = run(&mut train(&cfg, &out));
    assert!(o.status.success(), "training with damaged inputs failed");
    let mut skipped = std::collections::BTreeMap::<String, u64>::new();
    for line in std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for (k, n) in v["skipped"].as_object().unwrap() {
            *skipped.entry(k.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    assert!(
        skipped.get("undecodable_image").copied().unwrap_or(0) >= 1,
        "{corrupted}: {skipped:?}"
    );
    assert!(
        skipped.get("missing_original").copied().unwrap_or(0)
            + skipped.get("unreadable_original").copied().unwrap_or(0)
            >= 1,
        "{skipped:?}"
    );

    // An unreadable parquet shard is skipped and counted, not a crash.
    let shard = data.join("shards/demo-00001.parquet");
    std::fs::write(&shard, b"PAR1 truncated").unwrap();
    let out = dir.path().join("o6");
    let o = run(&mut train(&train_config(&good_dir, &data, 2, 2, ""), &out));
    assert!(o.status.success(), "an unreadable shard stopped training");
}
