//! Checkpoints restore a run exactly: training k steps, checkpointing, and continuing in a
//! fresh process-like state (a new student with other random weights, a new optimiser) gives
//! the same losses and bit-identical weights as an uninterrupted run.

use candle_core::{Device, Tensor};
use dfndr_trainer::checkpoint;
use dfndr_trainer::loss::{LossConfig, TeacherLayout};
use dfndr_trainer::optim::{cosine_lr, AdamW, AdamWConfig};
use dfndr_trainer::step::{l2_normalize, train_step, Batch};
use dfndr_trainer::{Student, StudentConfig};

fn tiny() -> String {
    crate::common::tiny_student(16, 12, Some(64), Some(2))
}

fn batches() -> Vec<Batch> {
    let dev = Device::Cpu;
    (0..6)
        .map(|i| {
            let b = 4;
            let tokens = |off: u32| -> Vec<Vec<u32>> {
                (0..b as u32)
                    .map(|r| (0..12).map(|p| (r * 7 + p * 3 + off + i) % 63).collect())
                    .collect()
            };
            let teacher =
                || l2_normalize(&Tensor::randn(0f32, 1.0, (b, 12), &dev).unwrap()).unwrap();
            Batch {
                images: Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &dev).unwrap(),
                text_gt: tokens(1),
                text_syn: tokens(5),
                teacher_image: teacher(),
                teacher_gt: teacher(),
                teacher_syn: teacher(),
            }
        })
        .collect()
}

fn fresh() -> (Student, AdamW) {
    let cfg: StudentConfig = toml::from_str(&tiny()).unwrap();
    let s = Student::new(&cfg, &Device::Cpu).unwrap();
    let opt = AdamW::new(s.parameters().unwrap(), AdamWConfig::default());
    (s, opt)
}

fn run(s: &Student, opt: &mut AdamW, batches: &[Batch], steps: std::ops::Range<u64>) -> Vec<f64> {
    let layout = TeacherLayout {
        dims: vec![6, 6],
        scales: vec![70.0, 60.0],
    };
    let loss = LossConfig::default();
    steps
        .map(|i| {
            let lr = cosine_lr(1e-3, 2, 6, i);
            train_step(s, opt, &batches[i as usize], &layout, &loss, lr, Some(1.0))
                .unwrap()
                .loss
                .total
        })
        .collect()
}

fn bits(s: &Student) -> Vec<(String, Vec<u32>)> {
    s.state_dict()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn resumed_run_equals_uninterrupted_run_bit_for_bit() {
    let data = batches();
    let (a, mut opt_a) = fresh();
    let init = tempfile::tempdir().unwrap();
    // Both runs start from the same weights.
    checkpoint::save(init.path(), 0, &a, &opt_a, serde_json::json!({}), 1).unwrap();
    let whole = run(&a, &mut opt_a, &data, 0..6);

    let dir = tempfile::tempdir().unwrap();
    let (b, mut opt_b) = fresh();
    checkpoint::load(
        &checkpoint::latest(init.path()).unwrap().unwrap(),
        &b,
        &mut opt_b,
    )
    .unwrap();
    let mut first = run(&b, &mut opt_b, &data, 0..3);
    checkpoint::save(
        dir.path(),
        3,
        &b,
        &opt_b,
        serde_json::json!({"position": 3}),
        2,
    )
    .unwrap();
    drop((b, opt_b));

    let (c, mut opt_c) = fresh();
    let path = checkpoint::latest(dir.path()).unwrap().unwrap();
    let state = checkpoint::load(&path, &c, &mut opt_c).unwrap();
    assert_eq!(state.step, 3);
    assert_eq!(state.resume["position"], 3);
    first.extend(run(&c, &mut opt_c, &data, 3..6));
    assert_eq!(first, whole, "losses differ after resuming");
    assert!(bits(&c) == bits(&a), "weights differ after resuming");
}

#[test]
fn only_the_newest_checkpoints_are_kept_and_partial_ones_ignored() {
    let (s, opt) = fresh();
    let dir = tempfile::tempdir().unwrap();
    for step in [10, 20, 30, 40] {
        checkpoint::save(dir.path(), step, &s, &opt, serde_json::json!({}), 2).unwrap();
    }
    // A writer killed mid-checkpoint leaves only a hidden temporary folder.
    std::fs::create_dir(dir.path().join(".ckpt-00000050.tmp")).unwrap();
    let steps: Vec<u64> = checkpoint::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![30, 40]);
    let latest = checkpoint::latest(dir.path()).unwrap().unwrap();
    assert!(latest.ends_with("ckpt-00000040"));
}

#[test]
fn a_checkpoint_of_another_architecture_is_refused_with_the_keys_named() {
    let (s, opt) = fresh();
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint::save(dir.path(), 1, &s, &opt, serde_json::json!({}), 1).unwrap();
    let other: StudentConfig =
        toml::from_str(&tiny().replace("layers = [1, 1, 1, 1]", "layers = [1, 2, 1, 1]")).unwrap();
    let t = Student::new(&other, &Device::Cpu).unwrap();
    let mut opt_t = AdamW::new(t.parameters().unwrap(), AdamWConfig::default());
    let err = checkpoint::load(&path, &t, &mut opt_t)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing") && err.contains("stages.1.blocks.1"),
        "{err}"
    );
}
