//! A whole training run: config, resume from the newest checkpoint, the step loop over the
//! loader, metrics, plots and checkpoints in the output folder.
//!
//! Output folder:
//! - `checkpoints/ckpt-SSSSSSSS/`: see [`crate::checkpoint`]; the run resumes from the newest;
//! - `metrics.jsonl`: one JSON object per step (every loss term, learning rate, gradient norm,
//!   logit scale, skipped rows, seconds split into data / forward / backward / optimiser);
//! - `eval.jsonl`: with `[eval]`, one line per evaluation and dataset in clip_benchmark's
//!   layout plus the step (the metrics also go to `metrics.jsonl` as `eval`);
//! - `metrics.png`: plots of the loss terms, learning rate, gradient norm, logit scale,
//!   throughput and evaluations so far;
//! - `events.out.tfevents.*.dfndr`: the same for TensorBoard (`tensorboard --logdir OUT`);
//! - `config.json`: the resolved config of the run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use dfndr_teachers::weights::StateDict;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::loader::StudentInput;
use crate::data::{DataConfig, Dataset, Loader, Position};
use crate::error::{Result, TrainError};
use crate::eval::in_training::{EvalSection, TrainingEval};
use crate::eval::EvalReport;
use crate::loss::{LossConfig, TeacherLayout};
use crate::optim::{cosine_lr, AdamW, AdamWConfig};
use crate::plot;
use crate::step::{train_step_accumulated, Plan, Recompute};
use crate::student::{Student, StudentConfig};
use crate::tensorboard::EventWriter;

/// The student of a run: a student config file, or the config inline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StudentSpec {
    /// `[student] file = "configs/students/NAME.toml"` (relative to the train config).
    File {
        /// The student config's path.
        file: PathBuf,
        /// Overrides the student's `norm.ghost_batch`: BatchNorm over slices of this many
        /// samples, as Apple's per-GPU batches.
        #[serde(default)]
        ghost_batch: Option<usize>,
    },
    /// The student's numbers inline.
    Inline(Box<StudentConfig>),
}

/// `optim.grad_checkpointing`: which towers recompute their activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GradCheckpointing {
    /// Both towers (`true`) or neither (`false`).
    All(bool),
    /// One tower: `"image"` or `"text"`.
    Tower(TowerName),
}

/// A student's tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TowerName {
    /// The image tower.
    Image,
    /// The text tower.
    Text,
}

impl Default for GradCheckpointing {
    fn default() -> Self {
        GradCheckpointing::All(false)
    }
}

impl GradCheckpointing {
    /// The towers that recompute.
    pub fn recompute(self) -> Recompute {
        match self {
            GradCheckpointing::All(on) => Recompute {
                image: on,
                text: on,
            },
            GradCheckpointing::Tower(TowerName::Image) => Recompute {
                image: true,
                text: false,
            },
            GradCheckpointing::Tower(TowerName::Text) => Recompute {
                image: false,
                text: true,
            },
        }
    }
}

/// `[optim]`: batch, schedule and AdamW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Samples per step (on one device).
    pub batch_size: usize,
    /// Optimisation steps of the whole run.
    pub steps: u64,
    /// Gradient accumulation: each step's batch is forwarded and differentiated in this many
    /// equal micro-batches (OpenCLIP's `--accum-freq`; memory holds one micro-batch), and the
    /// loss still sees the whole batch. Default 1.
    #[serde(default = "default_micro_batches")]
    pub micro_batches: usize,
    /// Activation recomputation (OpenCLIP's `--grad-checkpointing`): the towers keep only
    /// each block's input and forward every block again in the backward pass. Same numbers,
    /// a fraction of the activation memory, about one more forward pass of time. `true`
    /// (both towers), `"image"` or `"text"` (one tower), or `false` (the default).
    #[serde(default)]
    pub grad_checkpointing: GradCheckpointing,
    /// Peak learning rate (Apple: 1e-3).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Linear warm-up steps (Apple: 1000).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this (Apple: 1.0); absent: no clipping.
    #[serde(default = "default_clip")]
    pub grad_clip: Option<f64>,
    /// AdamW.
    #[serde(flatten)]
    pub adamw: AdamWConfig,
}

fn default_micro_batches() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-3
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}

/// `[checkpoint]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps (and at the end).
    #[serde(default = "default_every")]
    pub every_steps: u64,
    /// Checkpoints kept.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_every() -> u64 {
    1000
}
fn default_keep() -> usize {
    3
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: default_every(),
            keep: default_keep(),
        }
    }
}

/// `[loss]`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    /// Weights of the terms.
    #[serde(flatten)]
    pub weights: LossConfig,
    /// Each teacher's logit scale in the distillation target, overriding the dataset's
    /// metadata (Apple's DFNDR scripts: 70 60).
    #[serde(default)]
    pub teacher_logit_scales: Option<Vec<f64>>,
}

/// A training config (`configs/train/*.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of every random choice (data order, views, captions, initial weights).
    #[serde(default)]
    pub seed: u64,
    /// The student.
    pub student: StudentSpec,
    /// Initial weights for a fresh run (not a resumed one): an OpenCLIP or Apple checkpoint
    /// of the student's architecture (`open_clip_model.safetensors`, `mobileclip2_s0.pt`),
    /// matched by OpenCLIP's key names.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// The dataset.
    pub data: DataConfig,
    /// Optimisation.
    pub optim: OptimConfig,
    /// Loss.
    #[serde(default)]
    pub loss: LossSection,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Zero-shot evaluation every N steps and at the end.
    #[serde(default)]
    pub eval: Option<EvalSection>,
}

impl TrainConfig {
    /// Reads a config and its student (`student.file` is relative to the config's folder;
    /// `data.path` is used as written, relative to the working directory like every dfndr
    /// path), and checks every value.
    pub fn load(path: &Path) -> Result<(Self, StudentConfig)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        let config: TrainConfig = toml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        let student = match &config.student {
            StudentSpec::Inline(s) => (**s).clone(),
            StudentSpec::File { file, ghost_batch } => {
                let full = path.parent().unwrap_or(Path::new(".")).join(file);
                let text = std::fs::read_to_string(&full).map_err(|e| {
                    TrainError::Config(format!("student.file {}: {e}", full.display()))
                })?;
                let mut student: StudentConfig = toml::from_str(&text)
                    .map_err(|e| TrainError::Config(format!("{}: {e}", full.display())))?;
                if ghost_batch.is_some() {
                    student.norm.ghost_batch = *ghost_batch;
                }
                student
            }
        };
        config.validate(&student)?;
        Ok((config, student))
    }

    /// Checks values before anything runs, naming the field.
    pub fn validate(&self, student: &StudentConfig) -> Result<()> {
        let bad = |field: &str, why: String| Err(TrainError::Config(format!("{field}: {why}")));
        student.vision_tower()?;
        if student.vision.inference_mode {
            return bad(
                "student.vision.inference_mode",
                "a reparameterised (fused) student evaluates only; train the branched form \
                 and export it with --reparameterize"
                    .into(),
            );
        }
        if student.norm.ghost_batch == Some(0) {
            return bad("ghost_batch", "must be at least 1".into());
        }
        let o = &self.optim;
        if o.batch_size == 0 {
            return bad("optim.batch_size", "must be at least 1".into());
        }
        if o.micro_batches == 0 || !o.batch_size.is_multiple_of(o.micro_batches) {
            return bad(
                "optim.micro_batches",
                format!(
                    "{} does not divide batch_size {}",
                    o.micro_batches, o.batch_size
                ),
            );
        }
        if o.steps == 0 {
            return bad("optim.steps", "must be at least 1".into());
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optim.lr", format!("{} is not a positive number", o.lr));
        }
        if let Some(c) = o.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return bad("optim.grad_clip", format!("{c} is not a positive number"));
            }
        }
        for (field, v) in [
            ("optim.beta1", o.adamw.beta1),
            ("optim.beta2", o.adamw.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, format!("{v} is not in [0, 1)"));
            }
        }
        if !(o.adamw.eps.is_finite() && o.adamw.eps > 0.0) {
            return bad("optim.eps", format!("{} is not positive", o.adamw.eps));
        }
        if o.adamw.weight_decay < 0.0 {
            return bad("optim.weight_decay", "must not be negative".into());
        }
        if self.checkpoint.every_steps == 0 {
            return bad("checkpoint.every_steps", "must be at least 1".into());
        }
        if self.data.shuffle_buffer == 0 {
            return bad("data.shuffle_buffer", "must be at least 1".into());
        }
        regex::Regex::new(&self.data.syn_text_regex)
            .map_err(|e| TrainError::Config(format!("data.syn_text_regex: {e}")))?;
        Ok(())
    }
}

/// One logged step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepLog {
    /// Step number (1-based: steps completed).
    pub step: u64,
    /// Epoch of the batch.
    pub epoch: u64,
    /// Weighted total loss.
    pub loss: f64,
    /// Unweighted terms.
    pub contrastive_gt: f64,
    /// Unweighted terms.
    pub contrastive_syn: f64,
    /// Unweighted terms.
    pub distill_gt: f64,
    /// Unweighted terms.
    pub distill_syn: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// exp(logit_scale) after the step.
    pub logit_scale: f64,
    /// Rows skipped while loading this step's batch, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Samples per second of this step (data wait included).
    pub samples_per_s: f64,
    /// Seconds waiting for the batch.
    pub data_seconds: f64,
    /// Seconds in forward and loss.
    pub forward_seconds: f64,
    /// Seconds in backward.
    pub backward_seconds: f64,
    /// Seconds in clipping and AdamW.
    pub optimizer_seconds: f64,
    /// Unix time when the step ended (seconds).
    #[serde(default)]
    pub time: f64,
    /// Evaluation results after this step, `DATASET/METRIC` (clip_benchmark's metric names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub eval: BTreeMap<String, f64>,
}

/// What the caller sees while a run goes on.
pub trait Observer {
    /// The run starts at `step` of `steps` (`step > 0` after a resume).
    fn started(&mut self, _step: u64, _steps: u64, _resumed_from: Option<&Path>) {}
    /// One step done.
    fn step(&mut self, _log: &StepLog) {}
    /// A checkpoint was written.
    fn checkpoint(&mut self, _path: &Path) {}
    /// The evaluations after `step` are done.
    fn evaluated(&mut self, _step: u64, _reports: &[EvalReport]) {}
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps completed in total.
    pub steps: u64,
    /// Whether `stop` ended it before the last step.
    pub interrupted: bool,
    /// Mean loss of the first (up to) five steps of this invocation.
    pub first_loss: Option<f64>,
    /// Mean loss of its last (up to) five steps.
    pub last_loss: Option<f64>,
    /// The last checkpoint.
    pub checkpoint: Option<PathBuf>,
}

/// State saved in each checkpoint besides model and optimiser.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ResumeState {
    position: Position,
    skipped: BTreeMap<String, u64>,
}

const METRICS: &str = "metrics.jsonl";
/// The plots, redrawn at every checkpoint.
const PLOT: &str = "metrics.png";
/// Evaluation results in clip_benchmark's layout, one line per dataset and evaluation, with
/// the step.
const EVAL_RESULTS: &str = "eval.jsonl";

/// Trains `student` as `config` says into `output`, resuming from its newest checkpoint.
/// `stop` ends the run cleanly (a checkpoint is written) when set.
pub fn train(
    config: &TrainConfig,
    student_config: &StudentConfig,
    output: &Path,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<RunSummary> {
    let io = |what: &Path, e: std::io::Error| TrainError::Io(format!("{}: {e}", what.display()));
    std::fs::create_dir_all(output).map_err(|e| io(output, e))?;
    let ckpt_dir = output.join("checkpoints");
    let resolved = serde_json::json!({ "train": config, "student": student_config });
    std::fs::write(
        output.join("config.json"),
        serde_json::to_vec_pretty(&resolved).map_err(|e| TrainError::Internal(e.to_string()))?,
    )
    .map_err(|e| io(&output.join("config.json"), e))?;

    let student = Student::with_seed(student_config, config.seed, &Device::Cpu)?;
    let mut optimizer = AdamW::new(student.parameters()?, config.optim.adamw.clone());
    let latest = checkpoint::latest(&ckpt_dir)?;
    let (mut step, mut resume) = match &latest {
        Some(path) => {
            let state = checkpoint::load(path, &student, &mut optimizer)?;
            let resume: ResumeState = serde_json::from_value(state.resume).map_err(|e| {
                TrainError::Weights(format!("{}: resume state: {e}", path.display()))
            })?;
            (state.step, resume)
        }
        None => {
            if let Some(init) = &config.init {
                let weights = StateDict::load(init)
                    .map_err(|e| TrainError::Weights(format!("init {}: {e}", init.display())))?;
                let report = student
                    .load(&weights.tensors, true)
                    .map_err(|e| TrainError::Weights(format!("init {}: {e}", init.display())))?;
                tracing::info!(init = %init.display(), tensors = report.loaded, "initial weights loaded");
            }
            (
                0,
                ResumeState {
                    position: Position::default(),
                    skipped: BTreeMap::new(),
                },
            )
        }
    };
    let mut history = read_metrics(&output.join(METRICS), step)?;
    write_metrics(&output.join(METRICS), &history)?;
    truncate_eval_results(&output.join(EVAL_RESULTS), step)?;
    let mut events = tensorboard_from(output, &history)?;
    let mut summary = RunSummary {
        steps: step,
        interrupted: false,
        first_loss: None,
        last_loss: None,
        checkpoint: latest.clone(),
    };
    observer.started(step, config.optim.steps, latest.as_deref());
    if step >= config.optim.steps {
        return Ok(summary);
    }

    let dataset = Dataset::open(&config.data.path)?;
    let vision = &student_config.vision;
    let loader = Loader::start(
        dataset,
        &config.data,
        StudentInput {
            size: vision.image_size as u32,
            mean: student_config.preprocess.mean,
            std: student_config.preprocess.std,
            context_length: student.context_length(),
        },
        config.optim.batch_size,
        config.seed,
        resume.position,
    )?;
    let layout = teacher_layout(&loader.requirements().teachers, &config.loss)?;
    let evals = config.eval.as_ref().map(TrainingEval::open).transpose()?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(output.join(METRICS))
        .map_err(|e| io(&output.join(METRICS), e))?;
    let save = |step: u64, resume: &ResumeState, optimizer: &AdamW| -> Result<PathBuf> {
        let value =
            serde_json::to_value(resume).map_err(|e| TrainError::Internal(e.to_string()))?;
        checkpoint::save(
            &ckpt_dir,
            step,
            &student,
            optimizer,
            value,
            config.checkpoint.keep,
        )
    };
    let mut losses = Vec::new();
    while step < config.optim.steps {
        if stop.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let waited = Instant::now();
        let loaded = loader.next_batch()?;
        let data_seconds = waited.elapsed().as_secs_f64();
        let lr = cosine_lr(
            config.optim.lr,
            config.optim.warmup_steps,
            config.optim.steps,
            step,
        );
        // Stochastic depth draws from the run's seed and the step, so a resumed run drops
        // the same blocks as an uninterrupted one.
        student.set_forward_seed(crate::vit::splitmix(config.seed ^ (step << 20)));
        let report = train_step_accumulated(
            &student,
            &mut optimizer,
            &loaded.batch,
            Plan {
                micro_batches: config.optim.micro_batches,
                recompute: config.optim.grad_checkpointing.recompute(),
            },
            &layout,
            &config.loss.weights,
            lr,
            config.optim.grad_clip,
        )?;
        step += 1;
        resume.position = loaded.position;
        for (k, v) in &loaded.skipped {
            *resume.skipped.entry(k.clone()).or_default() += v;
        }
        let total = data_seconds
            + report.forward_seconds
            + report.backward_seconds
            + report.optimizer_seconds;
        let log = StepLog {
            step,
            epoch: loaded.position.epoch,
            loss: report.loss.total,
            contrastive_gt: report.loss.contrastive_gt,
            contrastive_syn: report.loss.contrastive_syn,
            distill_gt: report.loss.distill_gt,
            distill_syn: report.loss.distill_syn,
            lr,
            grad_norm: report.grad_norm,
            logit_scale: report.logit_scale,
            skipped: loaded.skipped,
            samples_per_s: config.optim.batch_size as f64 / total.max(1e-9),
            data_seconds,
            forward_seconds: report.forward_seconds,
            backward_seconds: report.backward_seconds,
            optimizer_seconds: report.optimizer_seconds,
            time: unix_now(),
            eval: BTreeMap::new(),
        };
        let mut log = log;
        if let Some(evals) = evals.as_ref().filter(|e| e.due(step, config.optim.steps)) {
            let reports = evals.run(&student)?;
            append_eval_results(&output.join(EVAL_RESULTS), step, &reports)?;
            for r in &reports {
                for (metric, value) in &r.metrics {
                    if let Some(v) = value {
                        log.eval.insert(format!("{}/{metric}", r.dataset), *v);
                    }
                }
            }
            observer.evaluated(step, &reports);
        }
        let line = serde_json::to_string(&log).map_err(|e| TrainError::Internal(e.to_string()))?;
        writeln!(metrics, "{line}")
            .and_then(|_| metrics.flush())
            .map_err(|e| io(&output.join(METRICS), e))?;
        losses.push(log.loss);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        summary.first_loss = Some(mean(&losses[..losses.len().min(5)]));
        summary.last_loss = Some(mean(&losses[losses.len().saturating_sub(5)..]));
        write_events(&mut events, &log)?;
        history.push(log.clone());
        observer.step(&log);
        if step % config.checkpoint.every_steps == 0 || step == config.optim.steps {
            let path = save(step, &resume, &optimizer)?;
            plot::write_metrics_png(&output.join(PLOT), &history)?;
            observer.checkpoint(&path);
            summary.checkpoint = Some(path);
        }
    }
    if summary.interrupted
        && summary.checkpoint.as_deref() != Some(&ckpt_dir.join(format!("ckpt-{step:08}")))
        && step > 0
    {
        let path = save(step, &resume, &optimizer)?;
        plot::write_metrics_png(&output.join(PLOT), &history)?;
        observer.checkpoint(&path);
        summary.checkpoint = Some(path);
    }
    summary.steps = step;
    Ok(summary)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A fresh TensorBoard event file in `output` holding `history` (the steps up to the
/// checkpoint the run continues from): older event files of dfndr are removed, so steps redone
/// after a resume appear once, as in `metrics.jsonl`.
fn tensorboard_from(output: &Path, history: &[StepLog]) -> Result<EventWriter> {
    let entries = std::fs::read_dir(output)
        .map_err(|e| TrainError::Io(format!("{}: {e}", output.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("events.out.tfevents.") && name.ends_with(".dfndr") {
            std::fs::remove_file(entry.path())
                .map_err(|e| TrainError::Io(format!("{}: {e}", entry.path().display())))?;
        }
    }
    let mut events = EventWriter::create(output)?;
    for log in history {
        write_events(&mut events, log)?;
    }
    Ok(events)
}

/// One step's scalars: loss terms, learning rate, gradient norm, logit scale, throughput and
/// time split, and its evaluations (`eval/DATASET/METRIC`).
fn write_events(events: &mut EventWriter, log: &StepLog) -> Result<()> {
    let mut values: Vec<(String, f64)> = vec![
        ("loss/total".into(), log.loss),
        ("loss/contrastive_gt".into(), log.contrastive_gt),
        ("loss/contrastive_syn".into(), log.contrastive_syn),
        ("loss/distill_gt".into(), log.distill_gt),
        ("loss/distill_syn".into(), log.distill_syn),
        ("train/lr".into(), log.lr),
        ("train/grad_norm".into(), log.grad_norm),
        ("train/logit_scale".into(), log.logit_scale),
        ("perf/samples_per_s".into(), log.samples_per_s),
        ("perf/data_seconds".into(), log.data_seconds),
        ("perf/forward_seconds".into(), log.forward_seconds),
        ("perf/backward_seconds".into(), log.backward_seconds),
        ("perf/optimizer_seconds".into(), log.optimizer_seconds),
    ];
    for (k, v) in &log.eval {
        values.push((format!("eval/{k}"), *v));
    }
    let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    events.scalars(log.step, log.time, &refs)?;
    events.flush()
}

/// Drops the evaluation results of steps after `step` (redone after a resume).
fn truncate_eval_results(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::Io(format!("{}: {e}", path.display()))),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// Appends `reports` to the evaluation results file (clip_benchmark's layout plus the step).
fn append_eval_results(path: &Path, step: u64, reports: &[EvalReport]) -> Result<()> {
    let mut text = String::new();
    for r in reports {
        let mut line = r.result_line("student", &format!("step {step}"));
        line["step"] = serde_json::json!(step);
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.flush())
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// The dataset's teacher layout with the config's logit-scale override.
fn teacher_layout(found: &TeacherLayout, loss: &LossSection) -> Result<TeacherLayout> {
    let mut layout = found.clone();
    if let Some(scales) = &loss.teacher_logit_scales {
        if scales.len() != layout.dims.len() {
            return Err(TrainError::Config(format!(
                "loss.teacher_logit_scales: {} values for the dataset's {} teachers",
                scales.len(),
                layout.dims.len()
            )));
        }
        layout.scales = scales.clone();
    }
    Ok(layout)
}

/// The logged steps up to `step` (a killed run may have logged steps after its last
/// checkpoint; those are redone and logged again).
fn read_metrics(path: &Path, step: u64) -> Result<Vec<StepLog>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::Io(format!("{}: {e}", path.display()))),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .filter(|l| l.step <= step)
        .collect())
}

fn write_metrics(path: &Path, logs: &[StepLog]) -> Result<()> {
    let mut text = String::new();
    for l in logs {
        text.push_str(&serde_json::to_string(l).map_err(|e| TrainError::Internal(e.to_string()))?);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}
