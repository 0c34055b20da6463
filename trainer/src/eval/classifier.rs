//! The zero-shot classifier, built as OpenCLIP's `build_zero_shot_classifier` and
//! clip_benchmark's `zero_shot_classifier` build it: every template filled with every class
//! name, each text embedding L2-normalised, the mean per class, renormalised.

use candle_core::{Device, Tensor};
use dfndr_teachers::tokenizer::Tokenizer;

use super::prompts::{check_templates, fill};
use super::towers::Towers;
use crate::error::{Result, TrainError};
use crate::step::l2_normalize;

/// The classifier `[D, classes]` for `classnames` under `templates`, encoding `batch_size`
/// prompts at a time; `progress` gets the number of prompts encoded so far.
pub fn zero_shot_classifier(
    towers: &dyn Towers,
    classnames: &[String],
    templates: &[String],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    if classnames.is_empty() {
        return Err(TrainError::Config("no class names".into()));
    }
    check_templates(templates)?;
    let prompts: Vec<String> = classnames
        .iter()
        .flat_map(|c| templates.iter().map(move |t| fill(t, c)))
        .collect();
    let tokenizer = Tokenizer::global();
    let mut embeddings = Vec::with_capacity(prompts.len().div_ceil(batch_size.max(1)));
    let mut done = 0;
    for chunk in prompts.chunks(batch_size.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let ids = tokenizer.tokenize_batch(&texts, towers.context_length());
        let e = l2_normalize(&towers.encode_texts(&ids)?.to_device(&Device::Cpu)?)?;
        embeddings.push(e);
        done += chunk.len();
        progress(done);
    }
    let all = Tensor::cat(&embeddings, 0)?;
    let dim = all.dim(1)?;
    let per_class = all
        .reshape((classnames.len(), templates.len(), dim))?
        .mean(1)?;
    Ok(l2_normalize(&per_class)?.t()?.contiguous()?)
}
