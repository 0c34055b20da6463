//! The generation loop with OpenCLIP `generate()`'s semantics for top-p, top-k and greedy
//! decoding, on top of the cached decoder (beam search lives in [`crate::beam`]).
//!
//! Per row: start with start-of-text; at every step the logits of the last position go
//! through the minimum-length and repetition-penalty processors and the strategy's filter;
//! a row whose last token is end-of-text *or the pad id* (0, the real BPE token "!") is
//! finished and receives padding; end-of-text is forced at position `seq_len - 1`. Finished
//! rows cost nothing, and the last step needs no model call at all (its token is forced).

use candle_core::Tensor;
use rayon::prelude::*;

use crate::beam::beam_search;
use crate::decode::DecodeSession;
use crate::error::{CaptionError, Result};
use crate::model::{CocaModel, ImageContext};
use crate::rng::CaptionRng;
use crate::sampling::{choose, process, GenerationConfig, Strategy};

/// Special token ids of the vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Start of text (49406 in the CLIP vocabulary).
    pub sot: u32,
    /// End of text (49407).
    pub eos: u32,
    /// Padding (0).
    pub pad: u32,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            sot: dfndr_teachers::tokenizer::SOT,
            eos: dfndr_teachers::tokenizer::EOT,
            pad: dfndr_teachers::tokenizer::PAD,
        }
    }
}

/// One caption to generate: which image of the batch, and its random stream.
#[derive(Clone, Debug)]
pub struct RowRequest {
    /// Index of the image in the encoded batch.
    pub image: usize,
    /// The row's own generator (unused by greedy decoding).
    pub rng: CaptionRng,
}

/// Generates one token row per request. Each row starts with `sot` and is `seq_len` long:
/// after its end-of-text (or a sampled pad id) it holds `pad`, exactly like OpenCLIP's
/// `generate(..., fixed_output_length=True)`.
pub fn generate(
    model: &CocaModel,
    image: &ImageContext,
    rows: &mut [RowRequest],
    cfg: &GenerationConfig,
    special: SpecialTokens,
) -> Result<Vec<Vec<u32>>> {
    let vocab = model.config().multimodal.vocab_size;
    let decoder_context = model
        .text()
        .context_length()
        .min(model.decoder().context_length());
    cfg.validate(decoder_context)?;
    for id in [special.sot, special.eos, special.pad] {
        if id as usize >= vocab {
            return Err(CaptionError::InvalidGeneration(format!(
                "special token {id} is outside the vocabulary of {vocab}"
            )));
        }
    }
    if cfg.strategy == Strategy::BeamSearch {
        // Deterministic: one search per image, shared by all its rows.
        let mut unique: Vec<usize> = rows.iter().map(|r| r.image).collect();
        unique.sort_unstable();
        unique.dedup();
        let found = beam_search(model, image, &unique, cfg, special)?;
        return Ok(rows
            .iter()
            .map(|r| {
                let i = unique.binary_search(&r.image).unwrap_or(0);
                found[i].clone()
            })
            .collect());
    }
    let mut out: Vec<Vec<u32>> = rows.iter().map(|_| vec![special.sot]).collect();
    if rows.is_empty() {
        return Ok(out);
    }
    // Positions fed: every token but the last, which is forced.
    let capacity = cfg.seq_len - 1;
    let mut session = DecodeSession::new(
        model,
        image,
        rows.iter().map(|r| r.image).collect(),
        capacity,
    )?;
    let finished = |row: &[u32]| {
        row.last()
            .is_some_and(|&t| t == special.eos || t == special.pad)
    };
    for cur_len in 1..cfg.seq_len {
        let active: Vec<usize> = (0..rows.len()).filter(|&r| !finished(&out[r])).collect();
        if active.is_empty() {
            break;
        }
        if cur_len + 1 == cfg.seq_len {
            for &r in &active {
                out[r].push(special.eos);
            }
            break;
        }
        let last: Vec<u32> = active.iter().map(|&r| out[r][cur_len - 1]).collect();
        let logits = session.step(&active, &last)?;
        let logits = host_rows(&logits, active.len(), vocab)?;
        // Filtering a 49,408-token row costs about a millisecond: rows in parallel.
        let mut work: Vec<(Vec<f32>, &[u32], &mut CaptionRng)> = Vec::with_capacity(active.len());
        let mut logits = logits.into_iter();
        let mut next_active = active.iter().peekable();
        for (r, row) in rows.iter_mut().enumerate() {
            if next_active.peek() == Some(&&r) {
                next_active.next();
                if let Some(l) = logits.next() {
                    work.push((l, out[r].as_slice(), &mut row.rng));
                }
            }
        }
        let next: Vec<u32> = work
            .into_par_iter()
            .map(|(mut row_logits, prefix, rng)| {
                process(&mut row_logits, prefix, special.eos, cfg);
                choose(&row_logits, cfg, rng)
            })
            .collect();
        for (&r, tok) in active.iter().zip(next) {
            out[r].push(tok);
        }
    }
    for row in &mut out {
        row.resize(cfg.seq_len, special.pad);
    }
    Ok(out)
}

/// Logits `[rows, vocab]` as host rows.
pub(crate) fn host_rows(logits: &Tensor, rows: usize, vocab: usize) -> Result<Vec<Vec<f32>>> {
    let flat = logits
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    if flat.len() != rows * vocab {
        return Err(CaptionError::Input(format!(
            "decoder returned {} logits for {rows} rows of {vocab}",
            flat.len()
        )));
    }
    Ok(flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
}
