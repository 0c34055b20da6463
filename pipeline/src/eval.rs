//! `dfndr eval`: zero-shot classification and retrieval of any loadable model on one or more
//! datasets (the work is [`dfndr_trainer::eval`]; this adds the model loading, progress bar
//! and the results file).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dfndr_teachers::device::Compute;
use dfndr_trainer::eval::prompts::{imagenet_classnames, named_or_file, openai_imagenet_templates};
use dfndr_trainer::eval::{evaluate, DataOptions, EvalData, EvalProgress, EvalSettings};
use dfndr_trainer::models::{self, ModelSource};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::exit::UsageResult;
use crate::model_args::ModelArgs;

/// What `dfndr eval` was asked.
pub struct EvalArgs {
    /// The model.
    pub model: ModelArgs,
    /// Datasets (folders or DFNDR outputs).
    pub data: Vec<String>,
    /// `auto`, `zeroshot_classification` or `zeroshot_retrieval`.
    pub task: String,
    /// Class names: a file, or `imagenet`.
    pub classnames: Option<String>,
    /// Templates: a file, or `openai-imagenet`.
    pub templates: Option<String>,
    /// Webdataset split.
    pub split: String,
    /// DFNDR datasets: synthetic captions too.
    pub synthetic_captions: bool,
    /// Batch size.
    pub batch_size: usize,
    /// Retrieval k values.
    pub recall_k: Vec<usize>,
    /// At most this many samples per dataset.
    pub limit: Option<u64>,
    /// JSON-lines file the results are appended to.
    pub output: Option<PathBuf>,
    /// Progress bar on a terminal.
    pub progress: bool,
}

struct Bar(ProgressBar);

impl EvalProgress for Bar {
    fn phase(&mut self, name: &str, total: Option<u64>) {
        self.0.set_position(0);
        match total {
            Some(n) => self.0.set_length(n),
            // A webdataset's size is known only once read: a count without a bar.
            None => self.0.unset_length(),
        }
        self.0.set_message(name.to_string());
        self.0.reset_eta();
    }
    fn advance(&mut self, n: u64) {
        self.0.inc(n);
    }
}

/// Runs `dfndr eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.data.is_empty() {
        bail!("nothing to evaluate: give --data DIR (an image folder, a clip_benchmark webdataset or a dfndr output)");
    }
    if !["auto", "zeroshot_classification", "zeroshot_retrieval"].contains(&args.task.as_str()) {
        return Err(crate::exit::usage(format!(
            "--task {}: expected auto, zeroshot_classification or zeroshot_retrieval",
            args.task
        )));
    }
    let source = args.model.source()?;
    let compute = Compute::parse(&args.model.device, &args.model.precision).usage()?;
    // Students evaluate in their reparameterised form: the same outputs, faster.
    let model = models::load(&source, &compute)
        .and_then(models::LoadedModel::into_inference)
        .usage()?;
    let transform = args.model.apply(model.towers().transform())?;
    if matches!(&source, ModelSource::Spec { weights, .. } if weights.starts_with("random:")) {
        eprintln!("warning: RANDOM weights: the numbers are those of an untrained model");
    }
    let settings = EvalSettings {
        batch_size: args.batch_size,
        classnames: named_or_file(args.classnames.as_deref(), "imagenet", imagenet_classnames)
            .usage()?,
        templates: named_or_file(
            args.templates.as_deref(),
            "openai-imagenet",
            openai_imagenet_templates,
        )
        .usage()?,
        recall_ks: args.recall_k.clone(),
        limit: args.limit,
        data: DataOptions {
            split: args.split.clone(),
            synthetic_captions: args.synthetic_captions,
            ..DataOptions::default()
        },
        transform: Some(transform),
        ..EvalSettings::default()
    };
    let mut out = match &args.output {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            )
        }
        None => None,
    };
    for location in &args.data {
        let data = EvalData::open(location, &settings.data).usage()?;
        if args.task != "auto" && args.task != data.task.name() {
            return Err(crate::exit::usage(format!(
                "{location} is a {} dataset, not {}",
                data.task.name(),
                args.task
            )));
        }
        let target = if args.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{} {{msg}} {{pos}}/{{len}} {{bar:30.cyan/blue}} {{elapsed_precise}} eta {{eta}}",
                data.name
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let report = evaluate(model.towers(), &data, &settings, &mut Bar(bar.clone()))
            .with_context(|| format!("evaluation on {location} failed"))?;
        bar.finish_and_clear();
        let metrics: Vec<String> = report
            .metrics
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k} {v:.4}"),
                None => format!("{k} n/a"),
            })
            .collect();
        eprintln!(
            "{} ({}, {} images{}): {}{}",
            report.dataset,
            report.task,
            report.samples,
            if report.captions > 0 {
                format!(", {} captions", report.captions)
            } else {
                String::new()
            },
            metrics.join(", "),
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!("; left out {:?}", report.skipped)
            }
        );
        let line = report.result_line(&model.label, &model.weights).to_string();
        match out.as_mut() {
            Some(f) => writeln!(f, "{line}").context("cannot write the results")?,
            None => println!("{line}"),
        }
    }
    Ok(())
}
