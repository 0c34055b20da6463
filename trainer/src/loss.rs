//! Apple's distillation loss for reinforced data (`DRClipLoss` of the MobileCLIP training
//! patch, with `--distill-average-after-softmax`).
//!
//! Per caption set (ground truth, synthetic): a CLIP contrastive term and a distillation term
//! whose target is the mean of each teacher's softmax over its own similarity matrix. The
//! loss is written for data parallelism as Apple runs it (`--local-loss --gather-with-grad`):
//! rows are this rank's samples, columns the whole (gathered) batch; on one device the two
//! are the same tensors.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The loss's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of the contrastive (CLIP) terms (MobileCLIP2: 0).
    #[serde(default)]
    pub contrastive_weight: f64,
    /// Weight of the distillation terms (MobileCLIP2: 1).
    #[serde(default = "default_one")]
    pub distill_weight: f64,
}

fn default_one() -> f64 {
    1.0
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            contrastive_weight: 0.0,
            distill_weight: 1.0,
        }
    }
}

/// How the teachers' concatenated embeddings split, and each teacher's logit scale.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherLayout {
    /// Width of each teacher's slice, in order.
    pub dims: Vec<usize>,
    /// Each teacher's (fixed) logit scale, e.g. 70 and 60 for the DFN2B pair.
    pub scales: Vec<f64>,
}

impl TeacherLayout {
    /// Total width of the concatenated embeddings.
    pub fn width(&self) -> usize {
        self.dims.iter().sum()
    }
}

/// One tensor as this rank sees it: its own rows and the whole batch's (gathered) rows.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    /// This rank's rows `[b, D]`.
    pub local: &'a Tensor,
    /// Every rank's rows `[N, D]`, this rank's at `offset..offset + b`.
    pub global: &'a Tensor,
}

impl<'a> Rows<'a> {
    /// A single device: local and global are the same.
    pub fn single(t: &'a Tensor) -> Self {
        Self {
            local: t,
            global: t,
        }
    }
}

/// One caption set: the student's normalised text features and the teachers' text
/// embeddings.
#[derive(Clone, Copy, Debug)]
pub struct CaptionSet<'a> {
    /// L2-normalised student text features.
    pub student: Rows<'a>,
    /// Teacher text embeddings (concatenated slices, as stored).
    pub teacher: Rows<'a>,
}

/// The loss's terms. `contrastive_*` and `distill_*` are unweighted; `total` applies the
/// weights and is what is differentiated.
#[derive(Clone, Debug)]
pub struct LossTerms {
    /// CLIP loss on ground-truth captions.
    pub contrastive_gt: Tensor,
    /// CLIP loss on synthetic captions.
    pub contrastive_syn: Tensor,
    /// Distillation loss on ground-truth captions.
    pub distill_gt: Tensor,
    /// Distillation loss on synthetic captions.
    pub distill_syn: Tensor,
    /// `w_c·(contrastive_gt + contrastive_syn) + w_d·(distill_gt + distill_syn)`.
    pub total: Tensor,
}

/// Everything one rank feeds the loss.
#[derive(Clone, Copy, Debug)]
pub struct LossInputs<'a> {
    /// L2-normalised student image features.
    pub image: Rows<'a>,
    /// Teacher image embeddings of the samples' views.
    pub teacher_image: Rows<'a>,
    /// Ground-truth captions.
    pub gt: CaptionSet<'a>,
    /// Synthetic captions.
    pub syn: CaptionSet<'a>,
    /// `exp(logit_scale)`, a scalar.
    pub scale: &'a Tensor,
    /// Global index of this rank's first row.
    pub offset: usize,
}

/// Apple's loss of one rank's rows against the whole batch's columns.
pub fn dr_loss(
    inputs: &LossInputs,
    layout: &TeacherLayout,
    config: &LossConfig,
) -> Result<LossTerms> {
    let terms = |set: CaptionSet| {
        caption_terms(
            inputs.image,
            inputs.teacher_image,
            set,
            inputs.scale,
            inputs.offset,
            layout,
        )
    };
    let (contrastive_gt, distill_gt) = terms(inputs.gt)?;
    let (contrastive_syn, distill_syn) = terms(inputs.syn)?;
    let total = (((&contrastive_gt + &contrastive_syn)? * config.contrastive_weight)?
        + ((&distill_gt + &distill_syn)? * config.distill_weight)?)?;
    Ok(LossTerms {
        contrastive_gt,
        contrastive_syn,
        distill_gt,
        distill_syn,
        total,
    })
}

/// `(contrastive, distill)` of one caption set.
fn caption_terms(
    image: Rows,
    teacher_image: Rows,
    set: CaptionSet,
    scale: &Tensor,
    offset: usize,
    layout: &TeacherLayout,
) -> Result<(Tensor, Tensor)> {
    let b = image.local.dim(0)?;
    for (what, t) in [
        ("teacher image embeddings", teacher_image.local),
        ("teacher text embeddings", set.teacher.local),
    ] {
        if t.dims() != [b, layout.width()] {
            return Err(TrainError::Batch(format!(
                "{what} have shape {:?}, expected [{b}, {}] (teacher dims {:?})",
                t.dims(),
                layout.width(),
                layout.dims
            )));
        }
    }
    let logits_i2t = image
        .local
        .matmul(&set.student.global.t()?)?
        .broadcast_mul(scale)?;
    let logits_t2i = set
        .student
        .local
        .matmul(&image.global.t()?)?
        .broadcast_mul(scale)?;
    let labels: Vec<u32> = (offset..offset + b).map(|i| i as u32).collect();
    let labels = Tensor::from_vec(labels, b, image.local.device())?;
    let contrastive = ((candle_nn::loss::cross_entropy(&logits_i2t, &labels)?
        + candle_nn::loss::cross_entropy(&logits_t2i, &labels)?)?
        * 0.5)?;
    let target_i2t = teacher_target(teacher_image.local, set.teacher.global, layout)?;
    let target_t2i = teacher_target(set.teacher.local, teacher_image.global, layout)?;
    let distill = ((soft_cross_entropy(&target_i2t, &logits_i2t)?
        + soft_cross_entropy(&target_t2i, &logits_t2i)?)?
        * 0.5)?;
    Ok((contrastive, distill))
}

/// `(1/K)·Σ_k softmax_rows(t_k · A_k · B_kᵀ)` over the teachers' slices: the target
/// distribution, averaged after the softmax. Constant (no gradient).
fn teacher_target(rows: &Tensor, cols: &Tensor, layout: &TeacherLayout) -> Result<Tensor> {
    let rows = rows.detach();
    let cols = cols.detach();
    let mut sum: Option<Tensor> = None;
    let mut start = 0;
    for (&dim, &scale) in layout.dims.iter().zip(&layout.scales) {
        let a = rows.narrow(1, start, dim)?;
        let bm = cols.narrow(1, start, dim)?;
        let p = candle_nn::ops::softmax(&(a.matmul(&bm.t()?)? * scale)?, D::Minus1)?;
        sum = Some(match sum {
            Some(s) => (s + p)?,
            None => p,
        });
        start += dim;
    }
    match sum {
        Some(s) => Ok((s / layout.dims.len() as f64)?),
        None => Err(TrainError::Config(
            "no teachers in the teacher layout".into(),
        )),
    }
}

/// `−mean_rows Σ_j P_ij · log_softmax(L)_ij`.
fn soft_cross_entropy(target: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((target * log_p)?.sum(D::Minus1)?.mean(0)?.neg()?)
}
