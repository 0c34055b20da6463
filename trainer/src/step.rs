//! One optimisation step of a student on a batch of reinforced samples: forward (the image
//! tower once, the text tower once over ground-truth and synthetic captions together), Apple's
//! loss, backward, clipping, AdamW, logit-scale clamp — OpenCLIP's order.

use candle_core::Tensor;

use crate::error::{Result, TrainError};
use crate::layers::Mode;
use crate::loss::{dr_loss, CaptionSet, LossConfig, LossInputs, LossTerms, Rows, TeacherLayout};
use crate::optim::{clip_grad_norm, AdamW};
use crate::student::Student;

/// The largest logit scale: the raw parameter is clamped to `[0, ln 100]` after every step.
pub const MAX_LOGIT_SCALE: f64 = 100.0;

/// One batch, ready for the model.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Images `[B, 3, S, S]`, normalised for the student.
    pub images: Tensor,
    /// Ground-truth caption tokens, one row per sample.
    pub text_gt: Vec<Vec<u32>>,
    /// Synthetic caption tokens.
    pub text_syn: Vec<Vec<u32>>,
    /// Teacher image embeddings `[B, Σ dims]` of the sample's view.
    pub teacher_image: Tensor,
    /// Teacher embeddings of the ground-truth captions.
    pub teacher_gt: Tensor,
    /// Teacher embeddings of the synthetic captions.
    pub teacher_syn: Tensor,
}

/// The loss's terms as numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossValues {
    /// Unweighted CLIP loss, ground truth.
    pub contrastive_gt: f64,
    /// Unweighted CLIP loss, synthetic.
    pub contrastive_syn: f64,
    /// Unweighted distillation loss, ground truth.
    pub distill_gt: f64,
    /// Unweighted distillation loss, synthetic.
    pub distill_syn: f64,
    /// The weighted total.
    pub total: f64,
}

impl LossValues {
    fn of(terms: &LossTerms) -> Result<Self> {
        let v = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
        };
        Ok(Self {
            contrastive_gt: v(&terms.contrastive_gt)?,
            contrastive_syn: v(&terms.contrastive_syn)?,
            distill_gt: v(&terms.distill_gt)?,
            distill_syn: v(&terms.distill_syn)?,
            total: v(&terms.total)?,
        })
    }
}

/// The loss of `student` on `batch` (single device).
pub fn forward_loss(
    student: &Student,
    batch: &Batch,
    layout: &TeacherLayout,
    config: &LossConfig,
    mode: Mode,
) -> Result<LossTerms> {
    let b = batch.images.dim(0)?;
    if batch.text_gt.len() != b || batch.text_syn.len() != b {
        return Err(TrainError::Batch(format!(
            "{b} images but {} ground-truth and {} synthetic captions",
            batch.text_gt.len(),
            batch.text_syn.len()
        )));
    }
    let image = l2_normalize(&student.encode_image(&batch.images, mode)?)?;
    // Apple's step: one text-tower pass over [gt; syn], split after.
    let mut ids = batch.text_gt.clone();
    ids.extend(batch.text_syn.iter().cloned());
    let text = l2_normalize(&student.encode_text(&ids)?)?;
    let (gt, syn) = (text.narrow(0, 0, b)?, text.narrow(0, b, b)?);
    let scale = student.logit_scale().exp()?;
    dr_loss(
        &LossInputs {
            image: Rows::single(&image),
            teacher_image: Rows::single(&batch.teacher_image),
            gt: CaptionSet {
                student: Rows::single(&gt),
                teacher: Rows::single(&batch.teacher_gt),
            },
            syn: CaptionSet {
                student: Rows::single(&syn),
                teacher: Rows::single(&batch.teacher_syn),
            },
            scale: &scale,
            offset: 0,
        },
        layout,
        config,
    )
}

/// What one step measured.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// The loss before the update.
    pub loss: LossValues,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// exp(logit_scale) after the update and clamp.
    pub logit_scale: f64,
    /// Seconds in the forward pass and the loss.
    pub forward_seconds: f64,
    /// Seconds in the backward pass.
    pub backward_seconds: f64,
    /// Seconds in clipping, the optimiser and the clamp.
    pub optimizer_seconds: f64,
}

/// One training step: loss, backward, clip to `grad_clip` (global L2 norm; `None` for no
/// clipping), AdamW at `lr`, clamp of the logit scale.
pub fn train_step(
    student: &Student,
    optimizer: &mut AdamW,
    batch: &Batch,
    layout: &TeacherLayout,
    config: &LossConfig,
    lr: f64,
    grad_clip: Option<f64>,
) -> Result<StepReport> {
    let t0 = std::time::Instant::now();
    let terms = forward_loss(student, batch, layout, config, Mode::Train)?;
    let loss = LossValues::of(&terms)?;
    if !loss.total.is_finite() {
        return Err(TrainError::Batch(format!(
            "the loss is not finite ({})",
            loss.total
        )));
    }
    let t1 = std::time::Instant::now();
    let mut grads = terms.total.backward()?;
    let t2 = std::time::Instant::now();
    let vars: Vec<_> = student.parameters()?.into_iter().map(|(_, v)| v).collect();
    let grad_norm = match grad_clip {
        Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
        None => clip_grad_norm(&mut grads, &vars, f64::INFINITY)?,
    };
    optimizer.step(&grads, lr)?;
    let clamped = student.logit_scale().clamp(0.0, MAX_LOGIT_SCALE.ln())?;
    set_logit_scale(student, &clamped)?;
    let t3 = std::time::Instant::now();
    Ok(StepReport {
        loss,
        grad_norm,
        lr,
        forward_seconds: (t1 - t0).as_secs_f64(),
        backward_seconds: (t2 - t1).as_secs_f64(),
        optimizer_seconds: (t3 - t2).as_secs_f64(),
        logit_scale: student
            .logit_scale()
            .exp()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?,
    })
}

fn set_logit_scale(student: &Student, value: &Tensor) -> Result<()> {
    for (name, var) in student.parameters()? {
        if name == crate::student::LOGIT_SCALE {
            var.set(&value.detach())?;
            return Ok(());
        }
    }
    Err(TrainError::Internal(
        "the student has no logit_scale".into(),
    ))
}

/// Rows scaled to unit L2 norm (differentiable).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}
