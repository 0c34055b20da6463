//! Checkpoint interchange with OpenCLIP, both ways (goldens of
//! `tests/fixtures/interchange_goldens.py`):
//!
//! - a MobileCLIP2-S0 that dfndr exports (torch.save `.bin` and safetensors, with
//!   `open_clip_config.json`) is the file OpenCLIP loaded for the goldens, byte for byte, and
//!   OpenCLIP's embeddings of it equal dfndr's (L2-normalised, as `dfndr encode` gives them)
//!   within 1e-4;
//! - an OpenCLIP training checkpoint (`torch.save({"epoch", "name", "state_dict"})` with
//!   DistributedDataParallel's `module.` prefix) loads into the student with every tensor equal.
//!
//! The S0 has random weights re-drawn so that its image features differ between images
//! (a fresh init with BatchNorm's identity statistics gives nearly the same features for
//! every image, which would make the image-side comparison vacuous). Set
//! `DFNDR_INTERCHANGE_OUT=DIR` to keep the exported files (the golden script does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::common::max_abs;
use dfndr_teachers::weights::{sha256_file, StateDict};
use dfndr_teachers::WeightsRef;
use dfndr_trainer::eval::Towers;
use dfndr_trainer::export::{export_student, ExportFormat};
use dfndr_trainer::models::{builtin_student, load_student};
use dfndr_trainer::{Student, StudentConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/interchange")
        .join(name)
}

/// SplitMix64 from a name and a counter.
fn uniform(name: &str, n: usize) -> Vec<f64> {
    let mut state = name.bytes().fold(0x1234_5678_9abc_def0u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn set(var: &candle_core::Var, values: Vec<f64>) {
    let dims = var.as_tensor().dims().to_vec();
    let v: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
    var.set(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap())
        .unwrap();
}

/// MobileCLIP2-S0 from seed 7 with every matrix and kernel re-drawn uniformly with variance
/// 1/fan_in, 1-d parameters (norm weights around 1, biases and layer scales small) and the
/// BatchNorm statistics randomised.
fn s0() -> Student {
    let config: StudentConfig = builtin_student("MobileCLIP2-S0").unwrap();
    let student = Student::with_seed(&config, 7, &Device::Cpu).unwrap();
    for (name, var) in student.parameters().unwrap() {
        let dims = var.as_tensor().dims().to_vec();
        let n: usize = dims.iter().product();
        let u = uniform(&name, n);
        if name.ends_with(".gamma") || name.contains("layer_scale") {
            set(&var, u.iter().map(|x| 0.05 + 0.15 * x).collect());
        } else if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let a = (3.0 / fan_in as f64).sqrt();
            set(&var, u.iter().map(|x| (2.0 * x - 1.0) * a).collect());
        } else if dims.len() == 1 && name.ends_with("weight") {
            set(&var, u.iter().map(|x| 0.5 + x).collect());
        } else if dims.len() == 1 {
            set(&var, u.iter().map(|x| 0.4 * x - 0.2).collect());
        }
    }
    for (name, var) in student.buffers().unwrap() {
        let n = var.as_tensor().elem_count();
        let u = uniform(&name, n);
        if name.ends_with("running_mean") {
            set(&var, u.iter().map(|x| x - 0.5).collect());
        } else if name.ends_with("running_var") {
            set(&var, u.iter().map(|x| 0.5 + 1.5 * x).collect());
        }
    }
    student
}

fn encode(student: &Student, golden: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let images = (golden["images_u8"].to_dtype(DType::F32).unwrap() / 255.0).unwrap();
    let ids: Vec<Vec<u32>> = golden["text_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect();
    (
        student.encode_images(&images).unwrap(),
        student.encode_texts(&ids).unwrap(),
    )
}

#[test]
fn openclip_loads_dfndr_s0_exports_and_gives_the_same_embeddings() {
    let keep = std::env::var_os("DFNDR_INTERCHANGE_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.as_deref().unwrap_or(tmp.path());
    let student = s0();
    // Exported first: the golden script keeps these files to make the goldens from.
    let exports: Vec<_> = [
        (ExportFormat::Torch, "pt"),
        (ExportFormat::Safetensors, "safetensors"),
    ]
    .into_iter()
    .map(|(format, folder)| {
        let written = export_student(&student, &root.join(folder), format).unwrap();
        (folder, written)
    })
    .collect();
    let golden =
        candle_core::safetensors::load(fixture("s0_export.io.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("s0_export.json")).unwrap()).unwrap();
    // The golden's token rows are OpenCLIP's tokenizer's: dfndr's gives the same.
    let texts: Vec<&str> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let ids = dfndr_teachers::tokenizer::Tokenizer::global().tokenize_batch(&texts, 77);
    let golden_ids: Vec<Vec<i64>> = golden["text_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let ids: Vec<Vec<i64>> = ids
        .into_iter()
        .map(|r| r.into_iter().map(i64::from).collect())
        .collect();
    assert_eq!(ids, golden_ids);
    let (image_ref, text_ref) = encode(&student, &golden);
    for (folder, written) in exports {
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(written.config.as_ref().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(config, meta["open_clip_config"], "{folder}");
        // The same bytes OpenCLIP loaded when the goldens were made.
        assert_eq!(
            sha256_file(&written.weights).unwrap(),
            meta["sha256"][folder].as_str().unwrap(),
            "{folder}: the exported file is not the one the goldens were made from"
        );
    }
    // As `dfndr encode` gives them: L2-normalised.
    let norm = |t: &Tensor| dfndr_teachers::l2_normalize(t).unwrap();
    let di = max_abs(&norm(&image_ref), &norm(&golden["image_emb"]));
    let dt = max_abs(&norm(&text_ref), &norm(&golden["text_emb"]));
    let raw = max_abs(&image_ref, &golden["image_emb"]) as f32
        / golden["image_emb"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    let g = norm(&golden["image_emb"]);
    let spread = max_abs(&g.get(0).unwrap(), &g.get(1).unwrap());
    eprintln!(
        "S0 export, normalised embeddings: image |dfndr - OpenCLIP| {di:.2e}, text {dt:.2e}; \
         the two images differ by {spread:.2e}; raw image embeddings relative {raw:.2e}"
    );
    assert!(di < 1e-4 && dt < 1e-4, "image {di}, text {dt}");
    // The comparison means something: the two images' embeddings differ by far more than
    // the tolerance.
    assert!(spread > 10.0 * 1e-4, "{spread}");
    let scale = Towers::logit_scale(&student).unwrap();
    let expected = meta["logit_scale"].as_f64().unwrap() as f32;
    assert!(
        (scale - expected).abs() < 1e-5 * expected,
        "{scale} vs {expected}"
    );
}

#[test]
fn dfndr_loads_openclip_training_checkpoints() {
    let path: &Path = &fixture("openclip_tiny_checkpoint.pt");
    let config: StudentConfig = toml::from_str(crate::common::TINY_S0).unwrap();
    let student = load_student(&config, &WeightsRef::Path(path.to_path_buf())).unwrap();
    let expected = crate::common::load("s0_tiny.safetensors");
    let got = student.state_dict().unwrap();
    assert_eq!(got.len(), expected.len());
    for (k, v) in &got {
        assert_eq!(max_abs(v, &expected[k]), 0.0, "{k}");
    }
    // The raw file has the DDP prefix and training metadata around the state dict.
    let raw = StateDict::load(path).unwrap();
    assert!(raw.tensors.keys().all(|k| !k.starts_with("module.")));
}
