//! The zero-shot classifier, built as OpenCLIP's `build_zero_shot_classifier` and
//! clip_benchmark's `zero_shot_classifier` build it: every template filled with every class
//! name, each text embedding L2-normalised, the mean per class, renormalised.

use candle_core::Tensor;
use dfndr_teachers::l2_normalize;

use super::prompts::{check_templates, fill};
use super::towers::{text_embeddings, Towers};
use crate::error::{Result, TrainError};

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
    let all = text_embeddings(towers, &prompts, batch_size, progress)?;
    let dim = all.dim(1)?;
    let per_class = all
        .reshape((classnames.len(), templates.len(), dim))?
        .mean(1)?;
    Ok(l2_normalize(&per_class)?.t()?.contiguous()?)
}
