//! Progress display: indicatif bars on a terminal, nothing (but log lines) elsewhere.
//!
//! Log lines go through [`LogWriter`], which suspends the bars while a line is printed so the
//! two never tear each other apart.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// The bars of one `reinforce` run.
#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
    shards: ProgressBar,
    samples: ProgressBar,
}

impl Progress {
    /// Bars drawn to stderr when it is a terminal (and `enabled`), hidden otherwise.
    pub fn new(enabled: bool) -> Progress {
        let multi = if enabled && std::io::stderr().is_terminal() {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4))
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        };
        let shards = multi.add(ProgressBar::new(0));
        shards.set_style(
            ProgressStyle::with_template(
                "{spinner} shards {bar:30.cyan/blue} {pos}/{len}  elapsed {elapsed_precise}  eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let samples = multi.add(ProgressBar::new_spinner());
        samples.set_style(
            ProgressStyle::with_template("  samples {human_pos}  {rate} samples/s  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner())
                .with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.1}", state.per_sec());
                    },
                ),
        );
        shards.enable_steady_tick(Duration::from_millis(250));
        Progress {
            multi,
            shards,
            samples,
        }
    }

    /// A writer for log lines that does not disturb the bars.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter {
            multi: self.multi.clone(),
        }
    }

    /// Sets the number of shards of the job.
    pub fn set_total(&self, shards: usize) {
        self.shards.set_length(shards as u64);
    }

    /// A shard started.
    pub fn shard_started(&self, name: &str) {
        self.samples.set_message(format!("shard {name}"));
    }

    /// A shard was finished (done, skipped as done, or failed).
    pub fn shard_finished(&self, _rows: u64) {
        self.shards.inc(1);
    }

    /// `n` more samples were written.
    pub fn samples(&self, n: u64) {
        self.samples.inc(n);
    }

    /// A status message next to the shard bar.
    pub fn set_message(&self, msg: &str) {
        self.shards.set_message(msg.to_string());
    }

    /// Stops the bars, leaving their last state on screen.
    pub fn finish(&self) {
        self.shards.abandon();
        self.samples.abandon();
    }
}

/// A `tracing` writer that prints above the progress bars.
#[derive(Clone)]
pub struct LogWriter {
    multi: MultiProgress,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.multi.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
