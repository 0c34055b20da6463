//! Writes a small state dict with `save_torch`, for checking the files with real torch:
//!
//! ```text
//! cargo run -p dfndr-teachers --example torch_save_demo -- OUT_DIR
//! /root/ref-venv/bin/python tests/fixtures/torch_save_check.py OUT_DIR
//! ```
//!
//! `OUT_DIR/wrapped.pt` is `torch.save({"state_dict": sd}, ...)` (OpenCLIP's layout),
//! `OUT_DIR/bare.pt` is `torch.save(sd, ...)`, and `OUT_DIR/expected.safetensors` holds the same
//! tensors for comparison.
//!
//! With a second argument, a checkpoint in any format `StateDict::load` reads, its tensors are
//! also written (sorted by name) to `OUT_DIR/converted.pt` in OpenCLIP's layout, e.g. to try
//! `open_clip.create_model(NAME, pretrained="OUT_DIR/converted.pt")`.

use std::collections::HashMap;
use std::path::PathBuf;

use dfndr_teachers::weights::{save_torch, StateDict};
use dfndr_teachers::{DType, Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .ok_or("usage: torch_save_demo OUT_DIR")?,
    );
    std::fs::create_dir_all(&out)?;
    let cpu = &Device::Cpu;
    let ramp = |n: usize| {
        (0..n)
            .map(|i| (i as f32 * 0.731).sin() * 3.0)
            .collect::<Vec<_>>()
    };
    let tensors: Vec<(String, Tensor)> = vec![
        ("logit_scale".into(), Tensor::new(4.6052f32, cpu)?),
        (
            "visual.conv1.weight".into(),
            Tensor::from_vec(ramp(8 * 3 * 4 * 4), (8, 3, 4, 4), cpu)?,
        ),
        // Written from a transposed (non-contiguous) view.
        (
            "text_projection".into(),
            Tensor::from_vec(ramp(5 * 6), (5, 6), cpu)?.t()?,
        ),
        (
            "visual.ln.weight_f16".into(),
            Tensor::from_vec(ramp(17), 17, cpu)?.to_dtype(DType::F16)?,
        ),
        (
            "visual.ln.bias_bf16".into(),
            Tensor::from_vec(ramp(9), (3, 3), cpu)?.to_dtype(DType::BF16)?,
        ),
        (
            "double".into(),
            Tensor::from_vec(vec![1e-300f64, -2.5, 3.25], 3, cpu)?,
        ),
        (
            "positions".into(),
            Tensor::from_vec(vec![0i64, -1, (1 << 40) + 7, i64::MIN], (2, 2), cpu)?,
        ),
        (
            "mask".into(),
            Tensor::from_vec(vec![0u8, 1, 255], (1, 3), cpu)?,
        ),
    ];
    save_torch(&out.join("wrapped.pt"), &tensors, Some("state_dict"))?;
    save_torch(&out.join("bare.pt"), &tensors, None)?;
    let expected: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&expected, out.join("expected.safetensors"))?;
    for (name, t) in &tensors {
        println!("{name} {:?} {:?}", t.dims(), t.dtype());
    }
    if let Some(checkpoint) = std::env::args_os().nth(2) {
        let state = StateDict::load(&PathBuf::from(checkpoint))?;
        let mut converted: Vec<(String, Tensor)> = state.tensors.into_iter().collect();
        converted.sort_by(|a, b| a.0.cmp(&b.0));
        save_torch(&out.join("converted.pt"), &converted, Some("state_dict"))?;
        println!("converted {} tensors", converted.len());
    }
    println!("wrote {}", out.display());
    Ok(())
}
