//! Shared helpers of the trainer's tests: the goldens written by
//! `tests/fixtures/student_goldens.py` and tensor comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/student/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/student")
        .join(name)
}

/// The tiny MobileCLIP2-S0 of `student_goldens.py` (weights: `s0_tiny.safetensors`).
pub const TINY_S0: &str = r#"
embed_dim = 32
[vision]
image_size = 64
[vision.fastvit]
layers = [1, 2, 1, 1]
embed_dims = [16, 32, 64, 128]
mlp_ratios = [3.0, 3.0, 3.0, 3.0]
token_mixers = ["repmixer", "repmixer", "repmixer", "attention"]
se_downsamples = [false, false, true, true]
pos_embs = [false, false, false, true]
[text]
context_length = 77
vocab_size = 1000
width = 64
heads = 2
layers = 2
no_causal_mask = true
"#;

/// Every tensor of a golden safetensors file.
pub fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

/// A golden JSON file.
pub fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// Values as float64.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest absolute difference.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `‖a − b‖ / ‖b‖` (norm-wise relative difference; absolute when `b` is zero).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (va, vb) = (values(a), values(b));
    let diff: f64 = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = vb.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

/// Token rows of an int64 `[B, L]` tensor.
pub fn token_rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

/// The config of a student small enough for unit tests: FastViT with one block per stage
/// (widths 8 to 64) at 32 px and one 32-wide text layer without a causal mask, with the given
/// embedding width, context length, vocabulary (`None`: OpenCLIP's) and ghost BatchNorm.
pub fn tiny_student(
    embed_dim: usize,
    context_length: usize,
    vocab_size: Option<usize>,
    ghost_batch: Option<usize>,
) -> String {
    let vocab = vocab_size.map_or(String::new(), |v| format!("vocab_size = {v}\n"));
    let norm = ghost_batch.map_or(String::new(), |g| format!("[norm]\nghost_batch = {g}\n"));
    format!(
        r#"embed_dim = {embed_dim}
[vision]
image_size = 32
[vision.fastvit]
layers = [1, 1, 1, 1]
embed_dims = [8, 16, 32, 64]
mlp_ratios = [2.0, 2.0, 2.0, 2.0]
token_mixers = ["repmixer", "repmixer", "repmixer", "attention"]
se_downsamples = [false, false, true, true]
pos_embs = [false, false, false, true]
[text]
context_length = {context_length}
{vocab}width = 32
heads = 2
layers = 1
no_causal_mask = true
{norm}"#
    )
}

/// A state dict's `{key: shape}` JSON as sorted `(key, shape)` pairs.
pub fn golden_layout(keys: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = keys
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let dims = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), dims)
        })
        .collect();
    v.sort();
    v
}

/// A student's parameters and buffers as sorted `(key, shape)` pairs (no copies).
pub fn student_layout(s: &dfndr_trainer::Student) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = s
        .parameters()
        .unwrap()
        .into_iter()
        .chain(s.buffers().unwrap())
        .map(|(k, v)| (k, v.as_tensor().dims().to_vec()))
        .collect();
    v.sort();
    v
}
