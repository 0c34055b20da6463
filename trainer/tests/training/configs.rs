//! Every shipped student and training config loads, validates and builds its student.

use std::path::Path;

use candle_core::Device;
use dfndr_trainer::run::TrainConfig;
use dfndr_trainer::{Student, StudentConfig};

use crate::common::{golden_layout, student_layout};

fn configs(folder: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(folder);
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn shipped_training_configs_load() {
    let all = configs("train");
    assert!(all.len() >= 3);
    for path in all {
        let (config, student) =
            TrainConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(config.optim.steps > 0 && config.optim.batch_size > 0);
        if path.ends_with("s0-dfndr2b.toml") {
            assert_eq!(student.norm.ghost_batch, Some(512));
            assert_eq!(config.loss.teacher_logit_scales, Some(vec![70.0, 60.0]));
            assert_eq!(config.data.syn_text_regex, "^syn_text_dfn_mscoco38k$");
        }
    }
}

/// Every shipped student builds; the six MobileCLIP2 students at full size have exactly
/// OpenCLIP's keys and shapes, its parameter counts, its model config when exported, and
/// Apple's preprocessing (`tests/fixtures/variants/full.json`, from OpenCLIP 3.3.0 and timm
/// 1.0.31); the FastViT students' reparameterised forms have exactly the keys and shapes of
/// timm's `reparameterize_model`.
#[test]
fn shipped_students_build_with_openclips_layout() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/variants/full.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for path in configs("students") {
        let cfg: StudentConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The layout does not depend on the values: zero-filled weights build in a fraction
        // of the time of drawn ones (the large students hold ~400M values).
        let student = Student::for_loading(&cfg, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let Some(name) = dfndr_trainer::models::openclip_name(&cfg) else {
            continue;
        };
        let (_, g) = golden
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, g)| g["openclip_name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name}: no golden layout"));
        assert_eq!(
            student_layout(&student),
            golden_layout(&g["keys"]),
            "{name}: keys and shapes"
        );
        assert_eq!(
            student.num_params().unwrap() as u64,
            g["num_params"].as_u64().unwrap(),
            "{name}: parameters"
        );
        assert_eq!(
            dfndr_trainer::export::open_clip_model_cfg(&cfg).unwrap(),
            g["model_config"],
            "{name}: OpenCLIP model config"
        );
        let p = &g["preprocess"];
        assert_eq!(
            cfg.vision.image_size as u64,
            p["size"].as_u64().unwrap(),
            "{name}"
        );
        let close = |a: &[f32; 3], b: &serde_json::Value| {
            a.iter()
                .zip(b.as_array().unwrap())
                .all(|(x, y)| (*x as f64 - y.as_f64().unwrap()).abs() < 1e-7)
        };
        assert!(close(&cfg.preprocess.mean, &p["mean"]), "{name}: mean");
        assert!(close(&cfg.preprocess.std, &p["std"]), "{name}: std");
        let interpolation = format!("{:?}", cfg.preprocess.interpolation).to_lowercase();
        assert_eq!(
            interpolation,
            p["interpolation"].as_str().unwrap(),
            "{name}"
        );
        drop(student);
        if let Some(fused_keys) = g.get("fused_keys") {
            let mut fused_cfg = cfg.clone();
            fused_cfg.vision.inference_mode = true;
            let fused = Student::for_loading(&fused_cfg, &Device::Cpu).unwrap();
            assert_eq!(
                student_layout(&fused),
                golden_layout(fused_keys),
                "{name}: fused keys"
            );
            assert_eq!(
                fused.num_params().unwrap() as u64,
                g["fused_num_params"].as_u64().unwrap(),
                "{name}: fused parameters"
            );
        }
        checked += 1;
    }
    assert_eq!(
        checked, 6,
        "every MobileCLIP2 variant has a shipped student"
    );
}

/// A wrong field value is refused with the field named, before anything runs.
#[test]
fn bad_values_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/students/tiny.toml");
    for (edit, field) in [
        ("lr = 1e-3", "optim.lr"),
        ("beta2 = 1.5", "optim.beta2"),
        ("grad_clip = -1.0", "optim.grad_clip"),
    ] {
        let (key, _) = edit.split_once(" = ").unwrap();
        let bad = edit.replace("1e-3", "-1.0");
        let text = format!(
            "[student]\nfile = {:?}\n[data]\npath = \"x\"\n[optim]\nbatch_size = 2\nsteps = 3\n{}\n",
            tiny.display().to_string(),
            if key == "lr" { bad } else { edit.to_string() }
        );
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).unwrap();
        let err = TrainConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains(field), "{edit}: {err}");
    }
    let p = dir.path().join("u.toml");
    std::fs::write(&p, format!("[student]\nfile = {:?}\n[data]\npath = \"x\"\n[optim]\nbatch_size = 2\nsteps = 3\nsetps = 4\n", tiny.display().to_string())).unwrap();
    let err = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(err.contains("setps"), "{err}");
}
