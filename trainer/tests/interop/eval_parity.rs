//! Zero-shot evaluation against clip_benchmark and OpenCLIP (goldens of
//! `tests/fixtures/eval_goldens.py`): the metrics on fixed embeddings, ties included, and the
//! zero-shot classifier and logits of a tiny random-weight OpenCLIP ViT.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::device::Compute;
use dfndr_teachers::weights::{StateDict, WeightSource};
use dfndr_teachers::{ClipConfig, ClipModel, Resample};
use dfndr_trainer::eval::classifier::zero_shot_classifier;
use dfndr_trainer::eval::metrics;
use dfndr_trainer::eval::{ClipTowers, ImageTransform, Towers};
use serde_json::Value;

use crate::common::max_abs;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/eval")
        .join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn matrix(v: &Value) -> (Vec<f32>, usize, usize) {
    let rows = v.as_array().unwrap();
    let cols = rows[0].as_array().unwrap().len();
    let flat = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    (flat, rows.len(), cols)
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn normalized(v: &Value) -> Tensor {
    let (flat, n, d) = matrix(v);
    dfndr_teachers::l2_normalize(&Tensor::from_vec(flat, (n, d), &Device::Cpu).unwrap()).unwrap()
}

/// Checks `ours` against the golden: equal to the stable-rule numbers everywhere, and to
/// clip_benchmark's wherever the order of ties cannot change them.
fn check(case: &str, key: &str, ours: Option<f64>, golden: &Value) -> bool {
    let stable = golden["stable"][key].as_f64();
    let cb = golden["clip_benchmark"][key].as_f64();
    let determined = golden["determined"][key].as_bool().unwrap_or(true);
    match (ours, stable) {
        (Some(o), Some(s)) => assert!((o - s).abs() < 1e-9, "{case} {key}: {o} vs stable {s}"),
        (None, None) => {}
        other => panic!("{case} {key}: {other:?}"),
    }
    if determined {
        match (ours, cb) {
            (Some(o), Some(c)) => {
                // clip_benchmark averages in float32.
                assert!(
                    (o - c).abs() < 1e-6,
                    "{case} {key}: {o} vs clip_benchmark {c}"
                )
            }
            (None, None) => {}
            other => panic!("{case} {key}: {other:?}"),
        }
    }
    !determined
}

#[test]
fn classification_metrics_equal_clip_benchmark() {
    let golden = json("metrics.json");
    let mut undetermined = 0;
    for case in golden["classification"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let images = normalized(&case["image_emb"]);
        let (w, d, c) = matrix(&case["classifier"]);
        let w = Tensor::from_vec(w, (d, c), &Device::Cpu).unwrap();
        let logits = (images.matmul(&w).unwrap() * 100.0).unwrap();
        let logits: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let labels = indices(&case["labels"]);
        let m = metrics::classification(&logits, c, &labels).unwrap();
        for (key, v) in [
            ("acc1", Some(m.acc1)),
            ("acc5", m.acc5),
            ("mean_per_class_recall", Some(m.mean_per_class_recall)),
        ] {
            undetermined += usize::from(check(name, key, v, case));
        }
    }
    // The tie case must exercise the boundary, or it tests nothing beyond the others.
    assert!(undetermined > 0);
}

#[test]
fn retrieval_metrics_equal_clip_benchmark_with_several_captions_and_ties() {
    let golden = json("metrics.json");
    let mut determined_with_ties = 0;
    for case in golden["retrieval"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let images = normalized(&case["image_emb"]);
        let texts = normalized(&case["text_emb"]);
        let scores: Vec<f32> = texts
            .matmul(&images.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ks = indices(&case["ks"]);
        let index = indices(&case["texts_image_index"]);
        let m = metrics::retrieval(&scores, images.dim(0).unwrap(), &index, &ks).unwrap();
        for k in &ks {
            for key in [
                format!("image_retrieval_recall@{k}"),
                format!("text_retrieval_recall@{k}"),
            ] {
                let undetermined = check(name, &key, m.get(&key).copied(), case);
                if name.contains("ties") && !undetermined {
                    determined_with_ties += 1;
                }
            }
        }
        let mean = (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2.0;
        assert_eq!(m["mean_recall@1"], mean);
    }
    assert!(determined_with_ties > 0);
}

fn tiny_vit() -> (ClipTowers, HashMap<String, Tensor>, Value) {
    let golden = json("classifier.json");
    let cfg: ClipConfig = serde_json::from_value(golden["arch"].clone()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(fixture("classifier.safetensors"), &Device::Cpu).unwrap();
    let weights: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone())))
        .collect();
    tensors.retain(|k, _| !k.starts_with("model."));
    let source = WeightSource::Tensors(StateDict {
        tensors: weights,
        path: fixture("classifier.safetensors"),
    });
    let model = ClipModel::load(&cfg, &source, &Compute::cpu(), Kernels::Fused, "tiny").unwrap();
    let towers = ClipTowers {
        model,
        transform: ImageTransform {
            size: 32,
            interpolation: Resample::Bicubic,
            mean: [0.0; 3],
            std: [1.0; 3],
        },
        device: Device::Cpu,
    };
    (towers, tensors, golden)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn zero_shot_classifier_and_logits_equal_openclip() {
    let (towers, tensors, golden) = tiny_vit();
    let classnames = strings(&golden["classnames"]);
    let templates = strings(&golden["templates"]);
    // A batch that splits the prompts unevenly across classes.
    let mut calls = Vec::new();
    let w =
        zero_shot_classifier(&towers, &classnames, &templates, 3, &mut |n| calls.push(n)).unwrap();
    assert_eq!(calls.last(), Some(&(classnames.len() * templates.len())));
    let expected = &tensors["classifier"];
    assert_eq!(w.dims(), expected.dims());
    let diff = max_abs(&w, expected);
    eprintln!("classifier max |dfndr - OpenCLIP| = {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");

    let img =
        dfndr_teachers::l2_normalize(&towers.encode_images(&tensors["images"]).unwrap()).unwrap();
    let logits = (img.matmul(&w).unwrap() * 100.0).unwrap();
    let ldiff = max_abs(&logits, &tensors["logits"]);
    eprintln!("logits max |dfndr - OpenCLIP| = {ldiff:.2e}");
    assert!(ldiff < 1e-2, "{ldiff}");
}
