//! `dfndr encode`: embeddings of single images or texts under one CLIP model, as JSON or
//! `.npy`, for checking a teacher by hand against OpenCLIP.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dfndr_augment::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::{
    l2_normalize, ArchSpec, ClipConfig, ClipModel, LoadedWeights, Preprocess, Resample, Tensor,
    WeightsRef,
};

use crate::embed::preprocess_image;

/// What to encode and how.
pub struct EncodeArgs {
    /// Built-in architecture name or a TOML file with explicit numbers.
    pub model: String,
    /// `PATH`, `hf-hub:ORG/NAME` or `random:SEED`.
    pub weights: String,
    /// Image files.
    pub images: Vec<PathBuf>,
    /// Texts.
    pub texts: Vec<String>,
    /// `.json` or `.npy` output; stdout JSON when absent.
    pub out: Option<PathBuf>,
    /// Compute device.
    pub device: String,
    /// Compute precision: auto, f32 or bf16.
    pub precision: String,
    /// Skip the L2 normalisation (OpenCLIP's `normalize=False`).
    pub no_normalize: bool,
    /// Resize filter of the preprocessing.
    pub interpolation: Resample,
    /// Normalisation mean.
    pub mean: [f32; 3],
    /// Normalisation std.
    pub std: [f32; 3],
}

/// Resolves `--model`: a built-in name, or a TOML file holding a `ClipConfig`.
fn arch_of(model: &str) -> Result<(ClipConfig, String)> {
    let path = Path::new(model);
    if model.ends_with(".toml") || path.is_file() {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {model}"))?;
        let cfg: ClipConfig = toml::from_str(&text)
            .with_context(|| format!("{model} is not an architecture TOML"))?;
        let spec = ArchSpec::Explicit(Box::new(cfg));
        return Ok((spec.resolve()?, spec.label()));
    }
    let spec = ArchSpec::Named(model.to_string());
    Ok((spec.resolve()?, model.to_string()))
}

/// Runs the command.
pub fn run(args: &EncodeArgs) -> Result<()> {
    if args.images.is_empty() && args.texts.is_empty() {
        bail!("nothing to encode: give --image FILE and/or --text STRING");
    }
    let (cfg, label) = arch_of(&args.model)?;
    let compute = dfndr_teachers::device::Compute::parse(&args.device, &args.precision)?;
    let device = compute.device.clone();
    let reference = WeightsRef::parse(&args.weights)?;
    let weights = LoadedWeights::load(&reference)?;
    if matches!(reference, WeightsRef::Random(_)) {
        eprintln!("warning: RANDOM weights ({reference}): the embeddings are meaningless");
    }
    let model = ClipModel::load(&cfg, &weights.source, &compute, Kernels::Fused, &label)?;
    drop(weights.source);
    let finish = |t: Tensor| -> Result<Vec<Vec<f32>>> {
        let t = if args.no_normalize {
            t
        } else {
            l2_normalize(&t)?
        };
        Ok(t.to_vec2::<f32>()?)
    };

    let size = cfg.vision.image_size;
    let preprocess = Preprocess {
        image_size: Some(size),
        interpolation: args.interpolation,
        mean: args.mean,
        std: args.std,
    };
    let mut pixels = Vec::with_capacity(args.images.len() * 3 * size * size);
    for file in &args.images {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let img = decode_rgb(&bytes, DEFAULT_MAX_PIXELS)
            .with_context(|| format!("cannot decode {}", file.display()))?;
        pixels.extend(preprocess_image(&img, &preprocess, size));
    }
    let image_emb = if args.images.is_empty() {
        Vec::new()
    } else {
        let batch = Tensor::from_vec(pixels, (args.images.len(), 3, size, size), &device)?;
        finish(model.encode_image(&batch)?)?
    };
    let text_emb = if args.texts.is_empty() {
        Vec::new()
    } else {
        let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
        let ids = Tokenizer::global().tokenize_batch(&texts, cfg.text.context_length);
        finish(model.encode_text(&ids)?)?
    };

    match &args.out {
        Some(path) if path.extension().is_some_and(|e| e == "npy") => {
            let rows: Vec<&Vec<f32>> = image_emb.iter().chain(&text_emb).collect();
            write_npy(path, &rows, cfg.embed_dim)?;
            eprintln!(
                "wrote {} x {} float32 to {} (rows: {} images, then {} texts)",
                rows.len(),
                cfg.embed_dim,
                path.display(),
                image_emb.len(),
                text_emb.len()
            );
        }
        out => {
            let json = serde_json::json!({
                "model": label,
                "weights": reference.to_string(),
                "weights_sha256": weights.sha256,
                "dim": cfg.embed_dim,
                "normalized": !args.no_normalize,
                "logit_scale": model.logit_scale_log()?.exp(),
                "images": args.images.iter().zip(&image_emb).map(|(f, e)| serde_json::json!({"file": f, "embedding": e})).collect::<Vec<_>>(),
                "texts": args.texts.iter().zip(&text_emb).map(|(t, e)| serde_json::json!({"text": t, "embedding": e})).collect::<Vec<_>>(),
            });
            let text = serde_json::to_string_pretty(&json)?;
            match out {
                Some(path) => std::fs::write(path, text + "\n")
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => println!("{text}"),
            }
        }
    }
    Ok(())
}

/// Writes float32 rows as a NumPy `.npy` file (format 1.0, C order).
fn write_npy(path: &Path, rows: &[&Vec<f32>], dim: usize) -> Result<()> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
        rows.len()
    );
    // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.len() * dim * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for row in rows {
        for v in row.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&out)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
