//! Every shipped student and training config loads, validates and builds its student.

use std::path::Path;

use candle_core::Device;
use dfndr_trainer::run::TrainConfig;
use dfndr_trainer::{Student, StudentConfig};

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

#[test]
fn shipped_students_build() {
    for path in configs("students") {
        let cfg: StudentConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Student::new(&cfg, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
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
