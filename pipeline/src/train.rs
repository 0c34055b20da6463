//! `dfndr train`: distils a student on a DFNDR dataset (the loop is
//! [`dfndr_trainer::run::train`]; this adds the progress bar, signals and exit statuses).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use dfndr_trainer::eval::EvalReport;
use dfndr_trainer::run::{train, Observer, StepLog, TrainConfig};
use dfndr_trainer::TrainError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::exit::{self, UsageResult};

/// The progress bar of a run, and a log line per checkpoint.
struct Bar {
    bar: ProgressBar,
}

impl Observer for Bar {
    fn started(&mut self, step: u64, steps: u64, resumed_from: Option<&Path>) {
        self.bar.set_length(steps);
        self.bar.set_position(step);
        self.bar.reset_eta();
        if let Some(path) = resumed_from {
            tracing::info!(checkpoint = %path.display(), step, "resuming");
        }
    }

    fn step(&mut self, log: &StepLog) {
        self.bar.set_position(log.step);
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.1} samples/s",
            log.loss, log.lr, log.samples_per_s
        ));
        if !self.bar.is_hidden() {
            return;
        }
        // Without a terminal (logs, CI) a line every tenth of a second would flood; one per
        // step is what a training log looks like.
        tracing::info!(
            step = log.step,
            loss = log.loss,
            lr = log.lr,
            samples_per_s = log.samples_per_s,
            "step"
        );
    }

    fn evaluated(&mut self, step: u64, reports: &[EvalReport]) {
        for r in reports {
            let metrics: Vec<String> = r
                .metrics
                .iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k} {v:.4}")))
                .collect();
            self.bar.suspend(
                || tracing::info!(step, dataset = %r.dataset, "eval: {}", metrics.join(", ")),
            );
        }
    }

    fn checkpoint(&mut self, path: &Path) {
        self.bar
            .suspend(|| tracing::info!(checkpoint = %path.display(), "checkpoint written"));
    }
}

/// Runs `dfndr train`.
pub fn run(
    config: &Path,
    data: Option<&str>,
    init: Option<&Path>,
    output: &Path,
    progress: bool,
) -> Result<ExitCode> {
    let (mut config, student) = TrainConfig::load(config).usage()?;
    if let Some(data) = data {
        config.data.path = data.to_string();
    }
    if let Some(init) = init {
        config.init = Some(init.to_path_buf());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install the signal handlers")?;
    }
    let target = if progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressDrawTarget::stderr_with_hz(4)
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(config.optim.steps), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} {bar:30.cyan/blue} elapsed {elapsed_precise} eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut observer = Bar { bar: bar.clone() };
    let summary = train(&config, &student, output, &stop, &mut observer).map_err(|e| {
        bar.abandon();
        let user = matches!(
            e,
            TrainError::Config(_) | TrainError::Data(_) | TrainError::Weights(_)
        );
        let err = anyhow::Error::new(e);
        if user {
            anyhow::Error::new(exit::Usage(err))
        } else {
            err
        }
    })?;
    bar.finish();
    match (summary.first_loss, summary.last_loss) {
        (Some(first), Some(last)) => eprintln!(
            "trained to step {} (mean loss of the first 5 steps {first:.4}, of the last 5 {last:.4}); checkpoint {}",
            summary.steps,
            summary
                .checkpoint
                .as_deref()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string())
        ),
        _ => eprintln!(
            "nothing to do: {} already holds {} of {} steps",
            output.display(),
            summary.steps,
            config.optim.steps
        ),
    }
    if summary.interrupted {
        eprintln!("interrupted; rerun the same command to resume");
        return Ok(exit::code(exit::INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// The default output folder of a config: `train-out/NAME`.
pub fn default_output(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map_or_else(|| "run".into(), |s| s.to_string_lossy().to_string());
    PathBuf::from("train-out").join(stem)
}
