//! `dfndr`: builds MobileCLIP2-style reinforced image-text datasets.

mod config;
mod crash;
mod inspect;
mod paug;
mod progress;
mod reinforce;
mod show_aug;
mod status;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dfndr_shards::format::SCHEMA_VERSION;
use dfndr_shards::job::{now_unix, Job, Placement, WorkerIdentity};
use dfndr_shards::shardlist::resolve_inputs;
use dfndr_shards::store::open_store;

use crate::config::JobConfig;
use crate::progress::Progress;

const LONG_ABOUT: &str = "\
dfndr turns webdataset image-text shards (img2dataset layout) into a reinforced dataset in the
DFNDR parquet format, with job control that survives crashes and scales to many workers.

Quick start:
  dfndr reinforce --config configs/demo.toml --output demo-out
  dfndr status demo-out
  dfndr inspect demo-out/shards/demo-00000.parquet --rows 3
  dfndr show-aug demo-out/shards/demo-00000.parquet --key 000000000 --out views

Run the same command again to resume a job; start it on more machines to scale it out.";

#[derive(Parser)]
#[command(name = "dfndr", version, about = "Builds MobileCLIP2-style reinforced image-text datasets", long_about = LONG_ABOUT)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace, or a tracing filter directive).
    #[arg(long, global = true, env = "DFNDR_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Process input shards into DFNDR parquet shards (resumable, any number of workers).
    #[command(long_about = "\
Process input shards into DFNDR parquet shards.

Every worker started with the same config and output cooperates: each claims one shard at a
time, writes it to a temporary name, publishes it atomically and records it as done. Run the
same command again after a crash or preemption and it resumes where the job stopped; start it
on more machines (or with --rank/--world-size, SLURM or a Kubernetes Indexed Job) to scale out.

Stages in this version: read (streaming tar), decode (RGB, bounded size), write.

Exit status: 0 when every shard of the job is done, 1 when some shards failed (see `dfndr
status`), 2 on a usage or configuration error, 130 when interrupted.")]
    Reinforce(ReinforceArgs),
    /// Show the progress of a job: shards done, in progress, failed; rows; skip reasons.
    Status {
        /// Output location of the job.
        output: String,
        /// Print machine-readable JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-check every done shard: size, sha256, schema version, row count, embeddings.
    Verify {
        /// Output location of the job.
        output: String,
    },
    /// Render the stored augmentation views of one sample as PNG files and a contact sheet.
    #[command(long_about = "\
Render the stored augmentation views of one sample as PNG files and a contact sheet.

Replays the `paug` parameters of the row with KEY exactly as the trainer will: crop box in
original pixels, optional flip, RandAugment ops. The original image comes from the shard's
`image` column when the job embedded images, otherwise from the input shard named in the
row's `source`. Writes original.png, view-K.png per view and contact.png (the original with
each view's crop box drawn in that view's colour, then the views) into --out.")]
    ShowAug {
        /// A DFNDR parquet shard with a paug column.
        shard: PathBuf,
        /// Webdataset key of the sample (see `dfndr inspect SHARD`).
        #[arg(long)]
        key: String,
        /// Folder for the PNG files.
        #[arg(long, default_value = "show-aug")]
        out: PathBuf,
        /// Render the views at this size instead of the job's crop size.
        #[arg(long)]
        size: Option<u32>,
    },
    /// Show what a webdataset tar or a DFNDR parquet file contains.
    Inspect {
        /// A `.tar` shard or a `.parquet` DFNDR shard.
        file: PathBuf,
        /// Number of samples / rows to print.
        #[arg(long, default_value_t = 5)]
        rows: usize,
    },
}

#[derive(clap::Args)]
struct ReinforceArgs {
    /// Job config (TOML); see configs/demo.toml for every field and its default.
    #[arg(long)]
    config: PathBuf,
    /// Input shards, overriding job.input: brace patterns (quote them), globs, list files
    /// (.txt/.list/.lst), paths or file:// URLs. Repeat for several.
    #[arg(long)]
    input: Vec<String>,
    /// Output location, overriding job.output.
    #[arg(long)]
    output: Option<String>,
    /// This worker's rank (default: from SLURM or Kubernetes, else 0).
    #[arg(long)]
    rank: Option<usize>,
    /// Number of workers (default: from SLURM or Kubernetes, else 1).
    #[arg(long)]
    world_size: Option<usize>,
    /// Adopt this config even if the output was started with a different one.
    #[arg(long)]
    force: bool,
    /// Retry shards that already failed job.max_attempts times.
    #[arg(long)]
    retry_failed: bool,
    /// Disable progress bars even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = match &cli.command {
        Command::Reinforce(args) => Progress::new(!args.no_progress),
        _ => Progress::new(false),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress.log_writer())
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match cli.command {
        Command::Reinforce(args) => reinforce(args, &progress),
        Command::Status { output, json } => status::run(&output, json).map(|_| ExitCode::SUCCESS),
        Command::Verify { output } => verify::run(&output),
        Command::Inspect { file, rows } => inspect::run(&file, rows).map(|_| ExitCode::SUCCESS),
        Command::ShowAug {
            shard,
            key,
            out,
            size,
        } => show_aug::run(&shard, &key, &out, size).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            progress.finish();
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn reinforce(args: ReinforceArgs, progress: &Progress) -> Result<ExitCode> {
    let mut config = JobConfig::load(&args.config)?;
    if !args.input.is_empty() {
        config.job.input = args.input.clone();
    }
    if let Some(out) = &args.output {
        config.job.output = Some(out.clone());
    }
    let Some(output) = config.job.output.clone() else {
        bail!("no output location: set job.output in the config or pass --output");
    };
    if config.job.input.is_empty() {
        bail!("no input shards: set job.input in the config or pass --input");
    }
    if config.job.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(config.job.threads)
            .build_global()
            .context("cannot start the decoding threads")?;
    }
    let shards = resolve_inputs(&config.job.input).context("cannot resolve the input shards")?;
    if shards.is_empty() {
        bail!("the input patterns {:?} name no shards", config.job.input);
    }
    let placement = Placement::resolve(args.rank, args.world_size, |k| std::env::var(k).ok())?;
    let store = open_store(&output)?;
    let identity = WorkerIdentity::current(placement.rank);
    let job = Job::new(
        store,
        identity,
        Duration::from_secs_f64(config.job.lease_seconds),
    );
    let fingerprint = config.fingerprint();
    let card = serde_json::json!({
        "format": "dfndr",
        "schema_version": SCHEMA_VERSION,
        "dfndr_version": env!("CARGO_PKG_VERSION"),
        "config_fingerprint": fingerprint,
        "seed": config.job.seed,
        "config": config,
        "teachers": [],
        "captioners": [],
        "augmentation": reinforce::augmentation_meta(&config),
        "created_unix": now_unix(),
    });
    if job.init_card(&card, &fingerprint, args.force)? {
        tracing::info!(output = %output, "started a new job");
    }
    tracing::info!(
        shards = shards.len(),
        rank = placement.rank,
        world_size = placement.world_size,
        placement = placement.source,
        worker = %job.identity().worker,
        "worker starting"
    );

    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))
            .context("cannot install the signal handler")?;
    }
    progress.set_total(shards.len());
    let worker = reinforce::Worker {
        job,
        config,
        fingerprint,
        placement,
        retry_failed: args.retry_failed,
        interrupted: Arc::clone(&interrupted),
    };
    let summary = worker.run(&shards, progress)?;
    let skipped: u64 = summary.skipped.values().sum();
    eprintln!(
        "{} of {} shards done ({} by this worker, {} already done); this worker wrote {} rows and skipped {} samples",
        summary.done, summary.shards, summary.done_here, summary.already_done, summary.rows, skipped
    );
    for (reason, n) in &summary.skipped {
        eprintln!("  skipped {n:>8}  {reason}");
    }
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("interrupted: claims released; run the same command again to resume");
        return Ok(ExitCode::from(130));
    }
    if !summary.failed.is_empty() {
        eprintln!("{} shards failed:", summary.failed.len());
        for (name, error) in summary.failed.iter().take(20) {
            eprintln!("  {name}: {}", error.lines().next().unwrap_or(""));
        }
        if summary.failed.len() > 20 {
            eprintln!(
                "  … and {} more (see `dfndr status {output}`)",
                summary.failed.len() - 20
            );
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
