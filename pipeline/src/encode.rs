//! `dfndr encode`: embeddings of single images or texts under one CLIP model (a student, a
//! teacher, any OpenCLIP ViT), as JSON or `.npy`, for checking a model by hand against
//! OpenCLIP.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dfndr_augment::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
use dfndr_teachers::device::Compute;
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::{l2_normalize, Device, Tensor};
use dfndr_trainer::models;

use crate::exit::UsageResult;
use crate::model_args::ModelArgs;

/// What to encode and how.
pub struct EncodeArgs {
    /// The model.
    pub model: ModelArgs,
    /// Image files.
    pub images: Vec<PathBuf>,
    /// Texts.
    pub texts: Vec<String>,
    /// `.json` or `.npy` output; stdout JSON when absent.
    pub out: Option<PathBuf>,
    /// Skip the L2 normalisation (OpenCLIP's `normalize=False`).
    pub no_normalize: bool,
}

/// Runs the command.
pub fn run(args: &EncodeArgs) -> Result<()> {
    if args.images.is_empty() && args.texts.is_empty() {
        bail!("nothing to encode: give --image FILE and/or --text STRING");
    }
    let source = args.model.source()?;
    let compute = Compute::parse(&args.model.device, &args.model.precision).usage()?;
    // Students encode in their reparameterised form: the same embeddings, faster.
    let loaded = models::load(&source, &compute)
        .and_then(models::LoadedModel::into_inference)
        .usage()?;
    if args
        .model
        .weights
        .as_deref()
        .is_some_and(|w| w.starts_with("random:"))
    {
        eprintln!("warning: RANDOM weights: the embeddings are meaningless");
    }
    let towers = loaded.towers();
    let transform = args.model.apply(towers.transform())?;
    let finish = |t: Tensor| -> Result<Vec<Vec<f32>>> {
        let t = t.to_device(&Device::Cpu)?;
        let t = if args.no_normalize {
            t
        } else {
            l2_normalize(&t)?
        };
        Ok(t.to_vec2::<f32>()?)
    };
    let size = transform.size;
    let mut pixels = Vec::with_capacity(args.images.len() * 3 * size * size);
    for file in &args.images {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let img = decode_rgb(&bytes, DEFAULT_MAX_PIXELS)
            .with_context(|| format!("cannot decode {}", file.display()))?;
        pixels.extend(transform.apply(&img));
    }
    let image_emb = if args.images.is_empty() {
        Vec::new()
    } else {
        let batch = Tensor::from_vec(pixels, (args.images.len(), 3, size, size), &towers.device())?;
        finish(towers.encode_images(&batch)?)?
    };
    let text_emb = if args.texts.is_empty() {
        Vec::new()
    } else {
        let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
        let ids = Tokenizer::global().tokenize_batch(&texts, towers.context_length());
        finish(towers.encode_texts(&ids)?)?
    };
    let dim = image_emb
        .first()
        .or(text_emb.first())
        .map_or(0, |r| r.len());

    match &args.out {
        Some(path) if path.extension().is_some_and(|e| e == "npy") => {
            let rows: Vec<&Vec<f32>> = image_emb.iter().chain(&text_emb).collect();
            write_npy(path, &rows, dim)?;
            eprintln!(
                "wrote {} x {dim} float32 to {} (rows: {} images, then {} texts)",
                rows.len(),
                path.display(),
                image_emb.len(),
                text_emb.len()
            );
        }
        out => {
            // Teacher-style models were hashed while loading; a student file is hashed here.
            let weights_sha256 = match (&loaded.weights_sha256, &source) {
                (Some(h), _) => Some(h.clone()),
                (None, models::ModelSource::Spec { weights, .. })
                    if std::path::Path::new(weights).is_file() =>
                {
                    Some(dfndr_teachers::weights::sha256_file(std::path::Path::new(
                        weights,
                    ))?)
                }
                _ => None,
            };
            let json = serde_json::json!({
                "model": loaded.label,
                "weights": loaded.weights,
                "weights_sha256": weights_sha256,
                "dim": dim,
                "normalized": !args.no_normalize,
                "logit_scale": towers.logit_scale()?,
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
