//! One optimisation step of a student on a batch of reinforced samples: forward (the image
//! tower once, the text tower once over ground-truth and synthetic captions together), Apple's
//! loss, backward, clipping, AdamW, logit-scale clamp — OpenCLIP's order.

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::error::{Result, TrainError};
use crate::layers::Mode;
use crate::loss::{dr_loss, CaptionSet, LossConfig, LossInputs, LossTerms, Rows, TeacherLayout};
use crate::optim::{clip_factor, grad_norm, AdamW};
use crate::recompute::{Tape, Units};
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

/// How a step computes its gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Gradient accumulation: the batch in this many equal micro-batches (OpenCLIP's
    /// `--accum-freq`).
    pub micro_batches: usize,
    /// Activation recomputation (OpenCLIP's `--grad-checkpointing`, see [`crate::recompute`]):
    /// the chosen towers keep only each block's input and forward every block again in the
    /// backward pass.
    pub recompute: Recompute,
}

/// Which towers recompute their activations in the backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompute {
    /// The image tower.
    pub image: bool,
    /// The text tower.
    pub text: bool,
}

impl Recompute {
    /// Neither tower.
    pub const NONE: Recompute = Recompute {
        image: false,
        text: false,
    };
    /// Both towers.
    pub const BOTH: Recompute = Recompute {
        image: true,
        text: true,
    };

    /// Whether any tower recomputes.
    pub fn any(self) -> bool {
        self.image || self.text
    }
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            micro_batches: 1,
            recompute: Recompute::NONE,
        }
    }
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

/// A batch's student features: L2-normalised image, ground-truth and synthetic text
/// features.
#[derive(Clone, Debug)]
pub struct Features {
    /// `[B, E]` image features.
    pub image: Tensor,
    /// `[B, E]` ground-truth caption features.
    pub gt: Tensor,
    /// `[B, E]` synthetic caption features.
    pub syn: Tensor,
}

impl Features {
    fn detach(&self) -> Self {
        Self {
            image: self.image.detach(),
            gt: self.gt.detach(),
            syn: self.syn.detach(),
        }
    }

    /// The features of several batches, in order.
    fn cat(parts: &[&Features]) -> Result<Self> {
        let cat = |f: &dyn Fn(&Features) -> &Tensor| -> Result<Tensor> {
            let v: Vec<&Tensor> = parts.iter().map(|p| f(p)).collect();
            Ok(Tensor::cat(&v, 0)?)
        };
        Ok(Self {
            image: cat(&|p| &p.image)?,
            gt: cat(&|p| &p.gt)?,
            syn: cat(&|p| &p.syn)?,
        })
    }
}

/// The student's features of `batch`: the image tower once, the text tower once over
/// `[gt; syn]` (Apple's step), split after.
pub fn features(student: &Student, batch: &Batch, mode: Mode) -> Result<Features> {
    let b = check_rows(batch)?;
    let image = l2_normalize(&student.encode_image(&batch.images, mode)?)?;
    let text = l2_normalize(&student.encode_text(&text_rows(batch))?)?;
    Ok(Features {
        image,
        gt: text.narrow(0, 0, b)?,
        syn: text.narrow(0, b, b)?,
    })
}

/// The student's features of `batch` as [`features`] computes them, the towers `which` names
/// keeping only their units' inputs: their outputs are then leaves, and
/// [`Recomputed::backward`] carries those leaves' gradients through the towers.
fn features_recomputed<'a>(
    student: &'a Student,
    batch: &Batch,
    ids: &'a [Vec<u32>],
    which: Recompute,
) -> Result<(Features, Recomputed<'a>)> {
    let b = check_rows(batch)?;
    let (image_out, image) = if which.image {
        let units = student.image_units();
        let (tape, out) = units.forward(&batch.images)?;
        let leaf = candle_core::Var::from_tensor(&out)?;
        (leaf.as_tensor().clone(), Some((units, tape, leaf)))
    } else {
        (student.encode_image(&batch.images, Mode::Train)?, None)
    };
    let (text_out, text) = if which.text {
        let units = student.text_units(ids)?;
        let none = Tensor::zeros((), candle_core::DType::F32, student.device())?;
        let (tape, out) = units.forward(&none)?;
        let leaf = candle_core::Var::from_tensor(&out)?;
        (leaf.as_tensor().clone(), Some((units, tape, leaf)))
    } else {
        (student.encode_text(ids)?, None)
    };
    let image_f = l2_normalize(&image_out)?;
    let text_f = l2_normalize(&text_out)?;
    Ok((
        Features {
            image: image_f,
            gt: text_f.narrow(0, 0, b)?,
            syn: text_f.narrow(0, b, b)?,
        },
        Recomputed { image, text },
    ))
}

/// A recomputing tower: its units, their saved inputs and its output as a leaf.
type RecomputedTower<'a> = (Units<'a>, Tape, candle_core::Var);

/// The towers of [`features_recomputed`] that wait for their outputs' gradients.
struct Recomputed<'a> {
    image: Option<RecomputedTower<'a>>,
    text: Option<RecomputedTower<'a>>,
}

impl Recomputed<'_> {
    /// Takes the recomputing towers' output gradients out of `grads` (the loss's backward
    /// pass) and adds those towers' parameter gradients.
    fn backward(self, grads: &mut GradStore) -> Result<()> {
        for (units, tape, leaf) in [self.text, self.image].into_iter().flatten() {
            let Some(g) = grads.remove(leaf.as_tensor()) else {
                return Err(TrainError::Internal(
                    "the loss does not depend on a tower".into(),
                ));
            };
            units.backward(tape, g, grads)?;
        }
        Ok(())
    }
}

/// The token rows of a batch as the text tower takes them: ground truth, then synthetic.
fn text_rows(batch: &Batch) -> Vec<Vec<u32>> {
    let mut ids = batch.text_gt.clone();
    ids.extend(batch.text_syn.iter().cloned());
    ids
}

/// The batch size, checked against the caption rows.
fn check_rows(batch: &Batch) -> Result<usize> {
    let b = batch.images.dim(0)?;
    if batch.text_gt.len() != b || batch.text_syn.len() != b {
        return Err(TrainError::Batch(format!(
            "{b} images but {} ground-truth and {} synthetic captions",
            batch.text_gt.len(),
            batch.text_syn.len()
        )));
    }
    Ok(b)
}

/// The loss of `batch` with the graph back to every parameter, as `plan.recompute` asks, and
/// its gradients.
fn differentiate(
    student: &Student,
    batch: &Batch,
    recompute: Recompute,
    loss: impl FnOnce(&Features) -> Result<LossTerms>,
) -> Result<(LossTerms, GradStore, std::time::Duration)> {
    if recompute.any() {
        let ids = text_rows(batch);
        let (f, towers) = features_recomputed(student, batch, &ids, recompute)?;
        let terms = loss(&f)?;
        let t = std::time::Instant::now();
        let mut grads = terms.total.backward()?;
        towers.backward(&mut grads)?;
        Ok((terms, grads, t.elapsed()))
    } else {
        let f = features(student, batch, Mode::Train)?;
        let terms = loss(&f)?;
        let t = std::time::Instant::now();
        let grads = terms.total.backward()?;
        Ok((terms, grads, t.elapsed()))
    }
}

/// The teacher embeddings of a batch, as the loss reads them.
struct Teachers<'a> {
    image: &'a Tensor,
    gt: &'a Tensor,
    syn: &'a Tensor,
}

fn loss_of(
    f: &Features,
    t: &Teachers,
    scale: &Tensor,
    layout: &TeacherLayout,
    config: &LossConfig,
) -> Result<LossTerms> {
    dr_loss(
        &LossInputs {
            image: Rows::single(&f.image),
            teacher_image: Rows::single(t.image),
            gt: CaptionSet {
                student: Rows::single(&f.gt),
                teacher: Rows::single(t.gt),
            },
            syn: CaptionSet {
                student: Rows::single(&f.syn),
                teacher: Rows::single(t.syn),
            },
            scale,
            offset: 0,
        },
        layout,
        config,
    )
}

/// The loss of `student` on `batch` (single device).
pub fn forward_loss(
    student: &Student,
    batch: &Batch,
    layout: &TeacherLayout,
    config: &LossConfig,
    mode: Mode,
) -> Result<LossTerms> {
    let f = features(student, batch, mode)?;
    let scale = student.logit_scale().exp()?;
    let t = Teachers {
        image: &batch.teacher_image,
        gt: &batch.teacher_gt,
        syn: &batch.teacher_syn,
    };
    loss_of(&f, &t, &scale, layout, config)
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
    train_step_accumulated(
        student,
        optimizer,
        batch,
        Plan::default(),
        layout,
        config,
        lr,
        grad_clip,
    )
}

/// [`train_step`] as `plan` says: with activation recomputation or not, and over `batch`
/// split into `plan.micro_batches` micro-batches with OpenCLIP's gradient accumulation: a pass without gradients caches every micro-batch's features, then each
/// micro-batch is forwarded again and the loss over the whole batch (its live features, the
/// others cached) is differentiated. The towers' gradients are those of the whole batch's
/// loss; as in OpenCLIP, the logit scale gets `accum` times its gradient and BatchNorm's
/// running statistics are updated twice per micro-batch. Memory holds one micro-batch's
/// activations.
#[allow(clippy::too_many_arguments)]
pub fn train_step_accumulated(
    student: &Student,
    optimizer: &mut AdamW,
    batch: &Batch,
    plan: Plan,
    layout: &TeacherLayout,
    config: &LossConfig,
    lr: f64,
    grad_clip: Option<f64>,
) -> Result<StepReport> {
    let vars: Vec<_> = student.parameters()?.into_iter().map(|(_, v)| v).collect();
    let Gradients {
        loss,
        grads,
        forward,
        backward,
    } = gradients(student, batch, plan, layout, config)?;
    let t2 = std::time::Instant::now();
    let grad_norm = grad_norm(&grads, &vars)?;
    let scale = clip_factor(grad_norm, grad_clip.unwrap_or(f64::INFINITY));
    optimizer.step_scaled(&grads, lr, scale)?;
    let clamped = student.logit_scale().clamp(0.0, MAX_LOGIT_SCALE.ln())?;
    set_logit_scale(student, &clamped)?;
    Ok(StepReport {
        loss,
        grad_norm,
        lr,
        forward_seconds: forward.as_secs_f64(),
        backward_seconds: backward.as_secs_f64(),
        optimizer_seconds: t2.elapsed().as_secs_f64(),
        logit_scale: student
            .logit_scale()
            .exp()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?,
    })
}

/// The loss of a batch and the gradients of every parameter, before clipping.
pub struct Gradients {
    /// The loss.
    pub loss: LossValues,
    /// Gradients by parameter.
    pub grads: GradStore,
    /// Time in forward passes and the loss.
    pub forward: std::time::Duration,
    /// Time in backward passes.
    pub backward: std::time::Duration,
}

/// The gradients of the loss of `batch`, computed as `plan` says (see
/// [`train_step_accumulated`]).
pub fn gradients(
    student: &Student,
    batch: &Batch,
    plan: Plan,
    layout: &TeacherLayout,
    config: &LossConfig,
) -> Result<Gradients> {
    let t0 = std::time::Instant::now();
    let teachers = Teachers {
        image: &batch.teacher_image,
        gt: &batch.teacher_gt,
        syn: &batch.teacher_syn,
    };
    let vars: Vec<_> = student.parameters()?.into_iter().map(|(_, v)| v).collect();
    let accum = plan.micro_batches;
    let (loss, grads, forward, backward) = if accum <= 1 {
        let mut checked = None;
        let (_, grads, backward) = differentiate(student, batch, plan.recompute, |f| {
            let scale = student.logit_scale().exp()?;
            let terms = loss_of(f, &teachers, &scale, layout, config)?;
            let loss = LossValues::of(&terms)?;
            check_finite(&loss)?;
            checked = Some(loss);
            Ok(terms)
        })?;
        let Some(loss) = checked else {
            return Err(TrainError::Internal("the loss was not computed".into()));
        };
        (loss, grads, t0.elapsed() - backward, backward)
    } else {
        let parts = split(batch, accum)?;
        // Each micro-batch draws its own stochastic-depth masks, the same in its cached and
        // its live forward.
        let base_seed = student.forward_seed();
        let part_seed = |j: usize| crate::vit::splitmix(base_seed ^ (j as u64 + 1));
        let cached = parts
            .iter()
            .enumerate()
            .map(|(j, p)| {
                student.set_forward_seed(part_seed(j));
                if plan.recompute.any() {
                    let ids = text_rows(p);
                    let (f, _) = features_recomputed(student, p, &ids, plan.recompute)?;
                    Ok(f.detach())
                } else {
                    Ok(features(student, p, Mode::Train)?.detach())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let all: Vec<&Features> = cached.iter().collect();
        let scale = student.logit_scale().exp()?;
        let loss = LossValues::of(&loss_of(
            &Features::cat(&all)?,
            &teachers,
            &scale,
            layout,
            config,
        )?)?;
        check_finite(&loss)?;
        let (mut forward, mut backward) = (t0.elapsed(), std::time::Duration::ZERO);
        let mut total: Option<GradStore> = None;
        for (j, part) in parts.iter().enumerate() {
            let ta = std::time::Instant::now();
            student.set_forward_seed(part_seed(j));
            let (_, grads, back) = differentiate(student, part, plan.recompute, |live| {
                let mut mixed = all.clone();
                mixed[j] = live;
                let scale = student.logit_scale().exp()?;
                loss_of(&Features::cat(&mixed)?, &teachers, &scale, layout, config)
            })?;
            forward += ta.elapsed() - back;
            backward += back;
            total = Some(match total {
                None => grads,
                Some(mut acc) => {
                    for var in &vars {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            let sum = match acc.get(var.as_tensor()) {
                                Some(a) => (a + g)?,
                                None => g.clone(),
                            };
                            acc.insert(var.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let Some(grads) = total else {
            return Err(TrainError::Internal("no micro-batch".into()));
        };
        (loss, grads, forward, backward)
    };
    Ok(Gradients {
        loss,
        grads,
        forward,
        backward,
    })
}

fn check_finite(loss: &LossValues) -> Result<()> {
    if loss.total.is_finite() {
        Ok(())
    } else {
        Err(TrainError::Batch(format!(
            "the loss is not finite ({})",
            loss.total
        )))
    }
}

/// `batch` as `parts` consecutive micro-batches of equal size.
fn split(batch: &Batch, parts: usize) -> Result<Vec<Batch>> {
    let b = batch.images.dim(0)?;
    if !b.is_multiple_of(parts) {
        return Err(TrainError::Batch(format!(
            "a batch of {b} does not split into {parts} equal micro-batches"
        )));
    }
    let m = b / parts;
    (0..parts)
        .map(|j| {
            let rows = |t: &Tensor| t.narrow(0, j * m, m);
            Ok(Batch {
                images: rows(&batch.images)?,
                text_gt: batch.text_gt[j * m..(j + 1) * m].to_vec(),
                text_syn: batch.text_syn[j * m..(j + 1) * m].to_vec(),
                teacher_image: rows(&batch.teacher_image)?,
                teacher_gt: rows(&batch.teacher_gt)?,
                teacher_syn: rows(&batch.teacher_syn)?,
            })
        })
        .collect()
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
