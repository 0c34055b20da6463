//! CoCa captioning throughput on CPU: `coca_ViT-L-14` with the weights and images the
//! reference script saved, 5 top-p captions of length 30 per image (MobileCLIP2's settings),
//! image encoding once per image and KV-cached decoding. Run through `bench/captioner.sh`.
//!
//! `--device cuda:N` / `--precision bf16` run it on a GPU (a `--features cuda` build).
//!
//! `--model` names another CoCa architecture (default `coca_ViT-L-14`).
//!
//! Usage: captioner_bench --weights FILE --images FILE [--batch B] [--captions N]
//!                        [--device D] [--precision P] [--model NAME]
//! Prints one JSON line on stdout.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use dfndr_captioner::{
    generate, CaptionRng, CocaConfig, CocaModel, GenerationConfig, RowRequest, SpecialTokens,
};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::device::Compute;
use dfndr_teachers::weights::{StateDict, WeightSource};

fn main() -> Result<()> {
    // As `dfndr` does at start-up.
    dfndr_teachers::memory::reuse_large_buffers();
    let mut weights = None;
    let mut images = None;
    let mut batch = 4usize;
    let mut captions = 5usize;
    let mut device = "cpu".to_string();
    let mut precision = "auto".to_string();
    let mut arch = "coca_ViT-L-14".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--weights" => weights = Some(value()?),
            "--images" => images = Some(value()?),
            "--batch" => batch = value()?.parse()?,
            "--captions" => captions = value()?.parse()?,
            "--device" => device = value()?,
            "--precision" => precision = value()?,
            "--model" => arch = value()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let (Some(weights), Some(images)) = (weights, images) else {
        bail!("usage: captioner_bench --weights FILE --images FILE [--batch B] [--captions N]");
    };
    let config = CocaConfig::named(&arch)?;
    let state = StateDict::load(std::path::Path::new(&weights))?;
    let compute = Compute::parse(&device, &precision)?;
    let model = CocaModel::load(
        &config,
        &WeightSource::Tensors(state),
        &compute,
        Kernels::Fused,
        &arch,
    )?;
    let all = candle_core::safetensors::load(&images, &compute.device)?;
    let images = all
        .get("images")
        .context("no `images` tensor")?
        .narrow(0, 0, batch)?;
    let cfg = GenerationConfig::default();
    let rows = |n: usize| -> Vec<RowRequest> {
        (0..n)
            .flat_map(|i| {
                (0..captions).map(move |c| RowRequest {
                    image: i,
                    rng: CaptionRng::for_caption(0, "bench", &format!("{i}"), c as u32),
                })
            })
            .collect()
    };
    // Warm-up (thread pools, first-touch allocations).
    model.encode_image(&images.narrow(0, 0, 1)?)?;

    let run = |images: &candle_core::Tensor| -> Result<(f64, f64, usize)> {
        let n = images.dim(0)?;
        let t0 = Instant::now();
        let ctx = model.encode_image(images)?;
        compute.device.synchronize()?;
        let encode = t0.elapsed().as_secs_f64();
        let mut requests = rows(n);
        let t1 = Instant::now();
        let ids = generate(&model, &ctx, &mut requests, &cfg, SpecialTokens::default())?;
        let decode = t1.elapsed().as_secs_f64();
        let early = ids
            .iter()
            .filter(|r| r[1..cfg.seq_len - 1].iter().any(|&t| t == 49407 || t == 0))
            .count();
        Ok((encode, decode, early))
    };
    let (encode, decode, early) = run(&images)?;
    let (e1, d1, _) = run(&images.narrow(0, 0, 1)?)?;
    let n = batch * captions;
    println!(
        "{}",
        serde_json::json!({
            "impl": "dfndr (KV-cached)",
            "compute": compute.describe(),
            "images": batch, "captions_per_image": captions,
            "threads": rayon::current_num_threads(),
            "seq_len": cfg.seq_len,
            "seconds": encode + decode, "captions_per_s": n as f64 / (encode + decode),
            "encode_seconds": encode, "decode_seconds": decode,
            "rows_ended_early": early,
            "batch1_seconds_per_image": e1 + d1,
            "batch1_encode_seconds": e1, "batch1_decode_seconds": d1,
        })
    );
    Ok(())
}
