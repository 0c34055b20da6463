//! clip_benchmark's zero-shot metrics on embeddings and scores.
//!
//! - Classification: `acc1`, `acc5` (only with at least five classes) and
//!   `mean_per_class_recall` (scikit-learn's balanced accuracy of the argmax prediction: the
//!   recall of every class that has samples, averaged).
//! - Retrieval: with scores = texts · imagesᵀ, `image_retrieval_recall@k` is the share of
//!   captions whose image is among the k best images for that caption, and
//!   `text_retrieval_recall@k` the share of images with at least one of their captions among
//!   the k best captions for that image (an image without captions counts as a miss, as in
//!   clip_benchmark).
//!
//! **Ties.** Equal scores are ranked by lower index first, as a stable descending sort and as
//! `argmax` (which clip_benchmark's per-class recall uses). clip_benchmark ranks with
//! `torch.topk`, whose order among equal scores is unspecified (it differs with the size and
//! between CPU and CUDA), so where a tie straddles the top-k boundary its number depends on
//! torch's internals; everywhere else the two agree. Real data has such ties: ImageNet's two
//! "crane" and two "maillot" classes have identical prompts and so identical classifier
//! columns. NaN scores rank below every number.
//!
//! A k larger than the number of candidates counts every candidate (clip_benchmark's
//! `torch.topk` would fail).

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Zero-shot classification metrics, with clip_benchmark's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    /// Top-1 accuracy.
    pub acc1: f64,
    /// Top-5 accuracy; `None` (clip_benchmark: NaN) with fewer than five classes.
    pub acc5: Option<f64>,
    /// Balanced accuracy of the top-1 prediction.
    pub mean_per_class_recall: f64,
}

/// `a` ranks before `b` (higher score first; NaN last). Index order breaks the remaining ties.
fn beats(a: f32, b: f32) -> bool {
    a > b || (b.is_nan() && !a.is_nan())
}

/// Rank (0 = best) of candidate `target` in `row` with the documented tie rule.
fn rank_of(row: &[f32], target: usize) -> usize {
    let s = row[target];
    let mut rank = 0;
    for (j, &v) in row.iter().enumerate() {
        if beats(v, s) || (j < target && v == s) {
            rank += 1;
        }
    }
    rank
}

/// Classification metrics of `logits` (`[labels.len(), num_classes]`, row major).
pub fn classification(
    logits: &[f32],
    num_classes: usize,
    labels: &[usize],
) -> Result<ClassificationMetrics> {
    let n = labels.len();
    if n == 0 || num_classes == 0 {
        return Err(TrainError::Data(
            "zero-shot classification of an empty dataset".into(),
        ));
    }
    if logits.len() != n * num_classes {
        return Err(TrainError::Internal(format!(
            "{} logits for {n} samples of {num_classes} classes",
            logits.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l >= num_classes) {
        return Err(TrainError::Data(format!(
            "label {bad} out of range for {num_classes} classes"
        )));
    }
    let ranks: Vec<usize> = logits
        .par_chunks(num_classes)
        .zip(labels.par_iter())
        .map(|(row, &l)| rank_of(row, l))
        .collect();
    let share = |k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / n as f64;
    // Per-class recall: the prediction is the top-ranked class (the first maximum).
    let mut hits = vec![0usize; num_classes];
    let mut support = vec![0usize; num_classes];
    for (&l, &r) in labels.iter().zip(&ranks) {
        support[l] += 1;
        if r == 0 {
            hits[l] += 1;
        }
    }
    let recalls: Vec<f64> = (0..num_classes)
        .filter(|&c| support[c] > 0)
        .map(|c| hits[c] as f64 / support[c] as f64)
        .collect();
    Ok(ClassificationMetrics {
        acc1: share(1),
        acc5: (num_classes >= 5).then(|| share(5)),
        mean_per_class_recall: recalls.iter().sum::<f64>() / recalls.len() as f64,
    })
}

/// Retrieval metrics of `scores` (`[texts, images]`, row major: caption `t` against image
/// `i`), where caption `t` belongs to image `text_image[t]`. Keys are clip_benchmark's
/// (`image_retrieval_recall@K`, `text_retrieval_recall@K`) plus `mean_recall@1` when 1 is
/// among `ks`.
pub fn retrieval(
    scores: &[f32],
    num_images: usize,
    text_image: &[usize],
    ks: &[usize],
) -> Result<BTreeMap<String, f64>> {
    let m = text_image.len();
    if m == 0 || num_images == 0 {
        return Err(TrainError::Data(
            "retrieval needs at least one image and one caption".into(),
        ));
    }
    if scores.len() != m * num_images {
        return Err(TrainError::Internal(format!(
            "{} scores for {m} captions and {num_images} images",
            scores.len()
        )));
    }
    if let Some(bad) = text_image.iter().find(|&&i| i >= num_images) {
        return Err(TrainError::Data(format!(
            "caption of image {bad}, but there are {num_images} images"
        )));
    }
    // Text to image: the rank of each caption's image in its row.
    let image_ranks: Vec<usize> = scores
        .par_chunks(num_images)
        .zip(text_image.par_iter())
        .map(|(row, &i)| rank_of(row, i))
        .collect();
    // Image to text: the best rank among the image's captions in its column. The best
    // caption under the tie rule is the highest score, lowest index; its rank is the count
    // of captions that beat it.
    let mut captions: Vec<Vec<usize>> = vec![Vec::new(); num_images];
    for (t, &i) in text_image.iter().enumerate() {
        captions[i].push(t);
    }
    let text_ranks: Vec<Option<usize>> = (0..num_images)
        .into_par_iter()
        .map(|i| {
            let column = |t: usize| scores[t * num_images + i];
            let best = captions[i].iter().copied().reduce(|a, b| {
                if beats(column(b), column(a)) {
                    b
                } else {
                    a
                }
            })?;
            let s = column(best);
            Some(
                (0..m)
                    .filter(|&t| beats(column(t), s) || (t < best && column(t) == s))
                    .count(),
            )
        })
        .collect();
    let mut out = BTreeMap::new();
    for &k in ks {
        let i2t = image_ranks.iter().filter(|&&r| r < k).count() as f64 / m as f64;
        let t2i = text_ranks
            .iter()
            .filter(|r| r.is_some_and(|r| r < k))
            .count() as f64
            / num_images as f64;
        out.insert(format!("image_retrieval_recall@{k}"), i2t);
        out.insert(format!("text_retrieval_recall@{k}"), t2i);
        if k == 1 {
            out.insert("mean_recall@1".into(), (i2t + t2i) / 2.0);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_rank_lower_index_first_and_nan_last() {
        let row = [0.5, 1.0, f32::NAN, 1.0, 0.2];
        assert_eq!(rank_of(&row, 1), 0);
        assert_eq!(rank_of(&row, 3), 1);
        assert_eq!(rank_of(&row, 0), 2);
        assert_eq!(rank_of(&row, 4), 3);
        assert_eq!(rank_of(&row, 2), 4);
    }

    #[test]
    fn classification_by_hand() {
        // Three samples, two classes: hit, miss, tie (lower index wins: class 0).
        let logits = [2.0, 1.0, 0.0, 3.0, 1.0, 1.0];
        let m = classification(&logits, 2, &[0, 0, 1]).unwrap();
        assert_eq!(m.acc1, 1.0 / 3.0);
        assert_eq!(m.acc5, None);
        // Class 0: 1 of 2; class 1: 0 of 1.
        assert_eq!(m.mean_per_class_recall, 0.25);
        assert!(classification(&logits, 2, &[0, 0, 2]).is_err());
        assert!(classification(&[], 2, &[]).is_err());
    }

    #[test]
    fn retrieval_by_hand_with_an_image_without_captions() {
        // Two images; captions 0 and 1 of image 0, none of image 1.
        let scores = [0.9, 0.1, 0.2, 0.8];
        let r = retrieval(&scores, 2, &[0, 0], &[1, 5]).unwrap();
        assert_eq!(r["image_retrieval_recall@1"], 0.5);
        assert_eq!(r["text_retrieval_recall@1"], 0.5);
        assert_eq!(r["image_retrieval_recall@5"], 1.0);
        assert_eq!(r["mean_recall@1"], 0.5);
    }
}
