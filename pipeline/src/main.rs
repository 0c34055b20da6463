//! `dfndr`: builds MobileCLIP2-style reinforced image-text datasets.

mod caption;
mod caption_existing;
mod config;
mod crash;
mod embed;
mod embed_existing;
mod encode;
mod eval;
mod executor;
mod exit;
mod export;
mod import;
mod inspect;
mod liveness;
mod model_args;
mod output;
mod progress;
mod reinforce;
mod rewrite;
mod show_aug;
mod stages;
mod status;
mod train;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dfndr_shards::format::SCHEMA_VERSION;
use dfndr_shards::job::{now_unix, Job, Placement, WorkerIdentity};
use dfndr_shards::shardlist::{resolve_inputs, ShardRef};
use dfndr_shards::spool::Spool;
use dfndr_shards::store::{local_copy_of, open_store};

use crate::config::JobConfig;
use crate::exit::{usage, UsageResult};
use crate::liveness::Liveness;
use crate::progress::Progress;

const LONG_ABOUT: &str = "\
dfndr turns webdataset image-text shards (img2dataset layout) into a reinforced dataset in the
DFNDR parquet format, with job control that survives crashes and scales to many workers.

Quick start:
  dfndr reinforce --config configs/demo.toml --output demo-out
  dfndr status demo-out
  dfndr inspect demo-out/shards/demo-00000.parquet --rows 3
  dfndr show-aug demo-out/shards/demo-00000.parquet --key 000000000 --out views
  dfndr encode --model ViT-B-32 --weights random:0 --text \"a photo of a cat\"

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

Stages, each on its own thread and overlapping the others: read (streaming tar), decode (RGB,
bounded size) and augmentation parameters (paug), synthetic captions ([[captioners]] in the
config; syn_text_TAG), teacher embeddings of every view and caption ([[teachers]]; image_emb,
text_emb, syn_text_TAG_emb), write. `dfndr status` shows how busy each stage was.

Exit status: 0 when every shard of the job is done, 1 when some shards failed (see `dfndr
status`), 2 on a usage or configuration error (retrying cannot help), 3 on a runtime or
storage error such as an unreachable store or a worker hung for job.stall_seconds (retry
later), 130 when interrupted (claims released).")]
    Reinforce(ReinforceArgs),
    /// Distil a MobileCLIP2 student on a DFNDR dataset (resumes from its checkpoints).
    #[command(long_about = "\
Distil a MobileCLIP2 student on a DFNDR dataset.

The config (configs/train/*.toml) names the student (configs/students/*.toml), the dataset (a
dfndr output folder, local or on an object store), the optimiser and schedule (AdamW with
OpenCLIP's weight-decay groups, cosine with linear warm-up, gradient clipping), Apple's loss
weights and the checkpoint interval. Each sample is a stored augmentation view replayed at the
student's size with its teacher embedding, the ground-truth caption and one synthetic caption
with theirs.

The output folder gets checkpoints/ (model in OpenCLIP's key names, optimiser moments, data
position; the newest few kept), metrics.jsonl (every loss term, learning rate, gradient norm,
logit scale, skips and the step time split into data/forward/backward/optimiser; with [eval],
the evaluation metrics), TensorBoard event files (tensorboard --logdir OUT), metrics.png (plots
of the same), eval.jsonl (with [eval]: clip_benchmark-layout results per evaluation) and
config.json. Run the same command again after a crash or preemption and it continues from the
newest checkpoint; on the CPU the result equals an uninterrupted run's bit for bit.

Exit status: 0 when the run reached its last step, 2 on a configuration or dataset error
(retrying cannot help), 3 on a runtime error, 130 when interrupted (a checkpoint was written).")]
    Train {
        /// Training config (e.g. configs/train/s0-demo.toml).
        #[arg(long)]
        config: PathBuf,
        /// Output folder (default: train-out/CONFIG_NAME).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Dataset location, overriding data.path of the config.
        #[arg(long)]
        data: Option<String>,
        /// Initial weights of a fresh run: an OpenCLIP or Apple checkpoint of the student
        /// (open_clip_model.safetensors, mobileclip2_s0.pt), overriding init of the config.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Disable the progress bar even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Add teacher embeddings to the shards of an existing output.
    #[command(long_about = "\
Add teacher embeddings to the done shards of an existing output.

Uses the [[teachers]] and [embed] sections of --config. Every row's stored views (paug) are
replayed on its original image (from the `image` column, else from the input shard named in
`source`, streamed in row order) and embedded, the ground-truth caption and every
syn_text_TAG caption get text embeddings, and each shard is rewritten atomically with its done
record updated. A row whose original image is missing or does not decode is dropped and counted
(missing_original, undecodable_image). Runs in the worker loop of `dfndr reinforce`: any number
of workers on one output (local or object store), claims and takeover, retries, liveness,
SIGINT/SIGTERM release, the same exit statuses; shards that already carry this ensemble's
embeddings are skipped, so the command can be rerun after a crash. Run it while no `dfndr
reinforce` worker is writing to the same output.")]
    Embed {
        /// Job config with the [[teachers]] to use.
        #[arg(long)]
        config: PathBuf,
        /// Output location of the job (default: job.output of the config).
        output: Option<String>,
        /// Compute device (cpu, cuda, cuda:N), overriding embed.device.
        #[arg(long)]
        device: Option<String>,
        /// Disable progress bars even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Add synthetic captions to the shards of an existing output.
    #[command(long_about = "\
Add synthetic captions to the done shards of an existing output.

Uses the [[captioners]] and [caption] sections of --config (and job.seed: captions are seeded by
seed, tag, sample key and caption index, so they equal what `dfndr reinforce` would have written).
Every row's original image (from the `image` column, else from the input shard named in `source`)
is captioned and the syn_text_TAG column of each captioner is added or replaced; every other
column is kept as it is. A replaced column loses its stale text embeddings: run `dfndr embed`
afterwards to embed the new captions. Each shard is rewritten atomically with its done record
updated; a row whose original image is missing or does not decode is dropped and counted. Runs
in the worker loop of `dfndr reinforce` (any number of workers, local or object-store outputs,
claims, retries, liveness); shards that already carry these captioners' columns are skipped, so
the command can be rerun after a crash. Run it while no `dfndr reinforce` worker is writing to
the same output.")]
    Caption {
        /// Job config with the [[captioners]] to use.
        #[arg(long)]
        config: PathBuf,
        /// Output location of the job (default: job.output of the config).
        output: Option<String>,
        /// Compute device (cpu, cuda, cuda:N), overriding caption.device.
        #[arg(long)]
        device: Option<String>,
        /// Disable progress bars even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Embed single images or texts with one CLIP model (JSON or .npy), to check a teacher.
    #[command(long_about = "\
Embed single images or texts with one CLIP model (a student, a teacher, any OpenCLIP ViT), to
check a model by hand against OpenCLIP.

Images get the model's eval preprocessing (shorter side resized to the model's image size,
centre crop, normalisation; OpenCLIP's defaults, or the student config's); texts are tokenised
with the CLIP tokenizer at the model's context length. The embeddings are L2-normalised unless --no-normalize is given (OpenCLIP's
encode_image/encode_text default to unnormalised).

Output: JSON on stdout, or --out FILE.json, or --out FILE.npy (float32 [N, D]: the images in
order, then the texts).

Examples:
  dfndr encode --model ViT-L-14-quickgelu --weights hf-hub:apple/DFN2B-CLIP-ViT-L-14 \\
      --image cat.jpg --text \"a photo of a cat\"
  dfndr encode --model my-arch.toml --weights ckpt.safetensors --image a.jpg --out a.npy
  dfndr encode --model MobileCLIP2-S0 --weights mobileclip2_s0.pt --text \"a dog\"
  dfndr encode --checkpoint train-out/s0-demo --image a.jpg")]
    Encode(EncodeCli),
    /// Write a student as OpenCLIP loads it (safetensors or torch.save) with open_clip_config.json.
    #[command(long_about = "\
Write a student (a training checkpoint, or --model/--weights) as OpenCLIP loads it, into the
folder --out:
  - open_clip_model.safetensors (--format safetensors, the default), or
    open_clip_pytorch_model.bin (--format pt: torch.save({\"state_dict\": ...}), the layout of
    OpenCLIP's training checkpoints and Apple's .pt releases);
  - open_clip_config.json: OpenCLIP's model config (model_cfg, as model_configs/MobileCLIP2-S0.json)
    and the evaluation preprocessing (preprocess_cfg).

Keys are OpenCLIP's (visual.trunk.*, text.*, logit_scale), in the train-time (branched) form.

In Python:
  model, _, preprocess = open_clip.create_model_and_transforms('local-dir:OUT')
  model = open_clip.create_model('MobileCLIP2-S0', pretrained='OUT/open_clip_pytorch_model.bin')

Examples:
  dfndr export --checkpoint train-out/s0-dfndr12m --out s0-export/
  dfndr export --checkpoint train-out/s0-dfndr12m --format pt --out s0-export-pt/")]
    Export(ExportCli),
    /// Zero-shot classification and image-text retrieval of a model, with clip_benchmark's metrics.
    #[command(long_about = "\
Zero-shot classification and image-text retrieval of a model, with clip_benchmark's metrics.

The model is a training checkpoint (--checkpoint) or any model dfndr loads (--model and
--weights: MobileCLIP2 students from OpenCLIP's or Apple's files, OpenCLIP ViTs). Each --data
is recognised by its layout:
  - an image folder (ROOT/CLASS/IMAGE): zero-shot classification; class names from
    ROOT/classnames.txt or the folder names (underscores as spaces);
  - a clip_benchmark webdataset (clip_benchmark_export_wds): classification (cls) or, with
    dataset_type.txt = retrieval, image-text retrieval (txt: one caption per line);
  - a dfndr output: retrieval of each original image against its ground-truth caption.

Classification builds the classifier as OpenCLIP and clip_benchmark do (every template with every
class name, each embedding normalised, the mean per class, renormalised; OpenAI's 80 ImageNet
templates unless the dataset or --templates brings others) and reports acc1, acc5 (with five or
more classes) and mean_per_class_recall. Retrieval reports image_retrieval_recall@k (per caption)
and text_retrieval_recall@k (per image: any of its captions in the top k), and mean_recall@1.
Equal scores rank by lower index first (clip_benchmark's torch.topk leaves their order open).

Each result is one JSON line in clip_benchmark's layout (dataset, model, pretrained, task,
metrics, language) plus samples, captions, skipped and seconds, appended to --output or printed.

Examples:
  dfndr eval --checkpoint train-out/s0-dfndr12m --data imagenet-val/ --output results.jsonl
  dfndr eval --model MobileCLIP2-S0 --weights mobileclip2_s0.pt --data wds_flickr1k/ \\
      --data wds_imagenet1k/ --output results.jsonl")]
    Eval(EvalCli),
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
        /// A DFNDR parquet shard with a paug column (a path or an s3://, gs://, az:// URL).
        shard: String,
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
    /// Write a DFNDR output as webdataset tars in Apple's DataCompDR/DFNDR layout.
    #[command(long_about = "\
Write the done shards of a DFNDR output as webdataset tars in Apple's layout, which the OpenCLIP
training patch of apple/ml-mobileclip reads with --dataset-reinforcement.

Each shard NAME becomes DEST/NAME.tar with, per sample: KEY.jpg|png|webp (the original image,
from the `image` column or read back from the input shard; a GIF becomes a PNG of its first
frame), KEY.txt (caption), KEY.syn.json ({\"syn_text_TAG\": [...]} per captioner),
KEY.paug.json ({\"param_aug\": [...]}, Apple's compressed augmentation parameters), KEY.npz
(float32 image_emb [K, D] and text_emb [1+N, D]: the ground truth, then the synthetic captions;
with several captioners text_emb [1, D] and syn_text_TAG_emb [N, D] each) and KEY.json (key,
url, source, width, height). DEST/config.json holds the augmentation config in the form of
--dataset-reinforcement-config, the teachers' architectures, dimensions and logit scales.

Example:
  dfndr export-wds out/ apple-wds/
  # then, in the patched OpenCLIP: --train-data 'apple-wds/{...}.tar' --dataset-reinforcement \\
  #   --dataset-reinforcement-config apple-wds/config.json")]
    ExportWds {
        /// The DFNDR output to export (a folder or an object-store prefix).
        output: String,
        /// Directory for the tars and config.json (created if missing), or an object-store
        /// prefix (s3://bucket/path, ...).
        dest: String,
        /// Disable progress bars even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Read webdataset tars in Apple's layout (DataCompDR, RayGen) into a DFNDR output.
    #[command(long_about = "\
Read webdataset tars in Apple's reinforced layout (DataCompDR, RayGen's DFNDR, `dfndr export-wds`)
into a DFNDR output: one parquet shard per tar, with done records, manifest and resume as for
`dfndr reinforce` (done shards are skipped when run again).

Apple's tars carry no metadata, so --config describes them: [augment] (num_augmentations = the
views per sample, and the transforms, which fix the paug.json layout), [[teachers]] in
embedding order with their arch and logit_scale (no weights are loaded; `weights` is recorded
as given), [[captioners]] whose tags name the syn.json lists (syn_text_TAG, or DataCompDR's
syn_text when there is one captioner), [embed].dtype and [output]. Samples need KEY.paug.json,
KEY.syn.json when captioners are configured, and KEY.npz (image_emb [K, D]; text_emb [1+N, D],
or text_emb [1, D] plus syn_text_TAG_emb) when teachers are.

Example:
  dfndr import-wds --config datacompdr12m.toml --input 'datacompdr/{00000000..00001023}.tar' \\
      --output dr-parquet/")]
    ImportWds {
        #[command(flatten)]
        job: JobArgs,
        /// Disable progress bars even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Show what a webdataset tar or a DFNDR parquet file contains.
    Inspect {
        /// A `.tar` shard or a `.parquet` DFNDR shard (a path or an s3://, gs://, az:// URL).
        file: String,
        /// Number of samples / rows to print.
        #[arg(long, default_value_t = 5)]
        rows: usize,
    },
}

#[derive(clap::Args)]
struct EncodeCli {
    #[command(flatten)]
    model: model_args::ModelArgs,
    /// Image files to embed (repeat for several).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Texts to embed (repeat for several).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Output file (.json or .npy); JSON on stdout when absent.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Return OpenCLIP's raw (unnormalised) embeddings.
    #[arg(long)]
    no_normalize: bool,
}

/// Weights file formats of `export`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormatArg {
    Safetensors,
    Pt,
}

#[derive(clap::Args)]
struct ExportCli {
    #[command(flatten)]
    model: model_args::ModelArgs,
    /// Folder to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Weights format: safetensors, or pt (torch.save zip with {"state_dict": ...}).
    #[arg(long, value_enum, default_value = "safetensors")]
    format: ExportFormatArg,
    /// Write the reparameterised (fused) inference form of a FastViT student (S0-S4): each
    /// MobileOne block, large-kernel convolution, RepMixer and positional encoding folded
    /// into one convolution, under timm's fused key names (`…reparam_conv.weight|bias`).
    /// The same outputs, faster; it cannot be trained. `dfndr encode` and `dfndr eval` load it
    /// directly; OpenCLIP loads it into a model whose trunk went through timm's
    /// `reparameterize_model` first.
    #[arg(long)]
    reparameterize: bool,
}

#[derive(clap::Args)]
struct EvalCli {
    #[command(flatten)]
    model: model_args::ModelArgs,
    /// A dataset to evaluate on (repeat for several): an image folder (one folder of images
    /// per class), a clip_benchmark webdataset (SPLIT/nshards.txt, SPLIT/N.tar, classnames.txt,
    /// zeroshot_classification_templates.txt, dataset_type.txt) or a dfndr output (retrieval of
    /// each original against its caption; local or s3://, gs://, az://).
    #[arg(long, required = true)]
    data: Vec<String>,
    /// auto (from the dataset), zeroshot_classification or zeroshot_retrieval.
    #[arg(long, default_value = "auto")]
    task: String,
    /// Class names, one per line in label order, overriding the dataset's; `imagenet` for the
    /// built-in 1,000 ImageNet names.
    #[arg(long)]
    classnames: Option<String>,
    /// Prompt templates with {c} for the class name, one per line, overriding the dataset's;
    /// `openai-imagenet` for OpenAI's 80 (the default when the dataset has none).
    #[arg(long)]
    templates: Option<String>,
    /// Split folder of a clip_benchmark webdataset.
    #[arg(long, default_value = "test")]
    split: String,
    /// DFNDR datasets: count every synthetic caption as a caption of its image too.
    #[arg(long)]
    synthetic_captions: bool,
    /// Images (and prompts) encoded at a time.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Retrieval's recall@k values.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 5, 10])]
    recall_k: Vec<usize>,
    /// Evaluate at most this many images of each dataset (a quick look at a subset).
    #[arg(long)]
    limit: Option<u64>,
    /// Append the result lines to this JSON-lines file (default: print them on stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Disable the progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

/// The job a command works on: its config, the overrides of its inputs and output, and
/// whether a different config may adopt an existing output.
#[derive(clap::Args)]
struct JobArgs {
    /// Job config (TOML); see configs/demo.toml for every field and its default.
    #[arg(long)]
    config: PathBuf,
    /// Input shards, overriding job.input: brace patterns (quote them), globs, list files
    /// (.txt/.list/.lst), paths, file:// URLs or object-store URLs (s3://, gs://, az://;
    /// credentials from the usual AWS_*, GOOGLE_*, AZURE_* variables). Repeat for several.
    #[arg(long)]
    input: Vec<String>,
    /// Output location, overriding job.output: a folder or an object-store prefix
    /// (s3://bucket/path, gs://..., az://...).
    #[arg(long)]
    output: Option<String>,
    /// Adopt this config even if the output was started with a different one.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct ReinforceArgs {
    #[command(flatten)]
    job: JobArgs,
    /// This worker's rank (default: from SLURM or Kubernetes, else 0).
    #[arg(long)]
    rank: Option<usize>,
    /// Number of workers (default: from SLURM or Kubernetes, else 1).
    #[arg(long)]
    world_size: Option<usize>,
    /// Retry shards that already failed job.max_attempts times.
    #[arg(long)]
    retry_failed: bool,
    /// Compute device of the teachers (cpu, cuda, cuda:N), overriding embed.device.
    #[arg(long)]
    device: Option<String>,
    /// Disable progress bars even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> ExitCode {
    // A write past the file-size limit (ulimit -f, some batch schedulers) then fails with an
    // error that names the file, instead of SIGXFSZ killing the process without a word.
    let _ = signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(AtomicBool::new(false)),
    );
    dfndr_teachers::memory::reuse_large_buffers();
    let cli = Cli::parse();
    if let Err(e) = force_simd_level() {
        eprintln!("error: {e}");
        return exit::code(exit::USAGE);
    }
    // Errors that do not tell whose they are: runtime for the commands that run workers,
    // the user's for those that read what the user names.
    let default_status = match &cli.command {
        Command::Reinforce(_)
        | Command::Embed { .. }
        | Command::Caption { .. }
        | Command::ImportWds { .. }
        | Command::Train { .. } => exit::RUNTIME,
        _ => exit::USAGE,
    };
    let progress = match &cli.command {
        Command::Reinforce(args) => Progress::new(!args.no_progress),
        Command::Embed { no_progress, .. }
        | Command::Caption { no_progress, .. }
        | Command::ExportWds { no_progress, .. } => Progress::new(!no_progress),
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
        Command::Embed {
            config,
            output,
            device,
            ..
        } => embed_command(&config, output, device.as_deref(), &progress),
        Command::Caption {
            config,
            output,
            device,
            ..
        } => caption_command(&config, output, device.as_deref(), &progress),
        Command::Encode(cli) => encode::run(&encode::EncodeArgs {
            model: cli.model,
            images: cli.images,
            texts: cli.texts,
            out: cli.out,
            no_normalize: cli.no_normalize,
        })
        .map(|_| ExitCode::SUCCESS),
        Command::Export(cli) => export_command(cli).map(|_| ExitCode::SUCCESS),
        Command::Eval(cli) => eval::run(&eval::EvalArgs {
            model: cli.model,
            data: cli.data,
            task: cli.task,
            classnames: cli.classnames,
            templates: cli.templates,
            split: cli.split,
            synthetic_captions: cli.synthetic_captions,
            batch_size: cli.batch_size,
            recall_k: cli.recall_k,
            limit: cli.limit,
            output: cli.output,
            progress: !cli.no_progress,
        })
        .map(|_| ExitCode::SUCCESS),
        Command::Train {
            config,
            output,
            data,
            init,
            no_progress,
        } => {
            let output = output.unwrap_or_else(|| train::default_output(&config));
            train::run(
                &config,
                data.as_deref(),
                init.as_deref(),
                &output,
                !no_progress,
            )
        }
        Command::Status { output, json } => status::run(&output, json).map(|_| ExitCode::SUCCESS),
        Command::Verify { output } => verify::run(&output),
        Command::Inspect { file, rows } => local_copy_of(&file)
            .with_context(|| format!("cannot open {file}"))
            .and_then(|copy| inspect::run(copy.path(), rows))
            .map(|_| ExitCode::SUCCESS),
        Command::ImportWds { job, .. } => import_command(&job, &progress),
        Command::ExportWds { output, dest, .. } => {
            export::run(&output, &dest, &progress).map(|samples| {
                eprintln!("exported {samples} samples to {dest}");
                ExitCode::SUCCESS
            })
        }
        Command::ShowAug {
            shard,
            key,
            out,
            size,
        } => local_copy_of(&shard)
            .with_context(|| format!("cannot open {shard}"))
            .and_then(|copy| show_aug::run(copy.path(), &key, &out, size))
            .map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            progress.finish();
            eprintln!("error: {err:#}");
            exit::code(exit::status_of(&err, default_status))
        }
    }
}

/// Loads the job's config with the `--input` / `--output` overrides applied, and resolves its
/// output location and input shards, refusing a job without either.
fn load_job(args: &JobArgs) -> Result<(JobConfig, String, Vec<ShardRef>)> {
    let mut config = load_config(&args.config)?;
    if !args.input.is_empty() {
        config.job.input = args.input.clone();
    }
    if args.output.is_some() {
        config.job.output = args.output.clone();
    }
    let Some(output) = config.job.output.clone() else {
        return Err(usage(
            "no output location: set job.output in the config or pass --output",
        ));
    };
    if config.job.input.is_empty() {
        return Err(usage(
            "no input shards: set job.input in the config or pass --input",
        ));
    }
    let shards = resolve_inputs(&config.job.input).context("cannot resolve the input shards")?;
    if shards.is_empty() {
        return Err(usage(format!(
            "the input patterns {:?} name no shards",
            config.job.input
        )));
    }
    Ok((config, output, shards))
}

/// Loads a job config (its errors are the user's to fix) and applies its `[storage]`
/// settings to the object-store clients opened from now on.
fn load_config(path: &std::path::Path) -> Result<JobConfig> {
    let config = JobConfig::load(path).usage()?;
    dfndr_shards::cloud::configure(config.storage.client());
    Ok(config)
}

fn import_command(args: &JobArgs, progress: &Progress) -> Result<ExitCode> {
    let (config, output, shards) = load_job(args)?;
    let spec = import::ImportSpec::new(config).usage()?;
    let placement = Placement::resolve(None, None, |k| std::env::var(k).ok())?;
    let job = Job::new(
        open_store(&output)?,
        WorkerIdentity::current(placement.rank),
        Duration::from_secs_f64(spec.config.job.lease_seconds),
    );
    let card = serde_json::json!({
        "format": "dfndr",
        "schema_version": SCHEMA_VERSION,
        "dfndr_version": env!("CARGO_PKG_VERSION"),
        "config_fingerprint": spec.fingerprint,
        "seed": spec.config.job.seed,
        "config": spec.config,
        "teachers": spec.teachers,
        "captioners": spec.captioners,
        "augmentation": reinforce::augmentation_meta(&spec.config),
        "imported_from": "webdataset tars in Apple's layout",
        "created_unix": now_unix(),
    });
    job.init_card(&card, &spec.fingerprint, args.force)?;
    let liveness = liveness_of(&spec.config);
    let settings = WorkerSettings {
        placement,
        max_attempts: spec.config.job.max_attempts,
        retry_failed: false,
        liveness: Arc::clone(&liveness),
    };
    let task = import::ImportTask {
        spool: spool_of(&spec.config, &liveness),
        spec,
        job,
    };
    run_task(
        &task, &task.job, &task.job, &shards, settings, &output, progress,
    )
}

fn reinforce(args: ReinforceArgs, progress: &Progress) -> Result<ExitCode> {
    let (config, output, shards) = load_job(&args.job)?;
    if config.job.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(config.job.threads)
            .build_global()
            .context("cannot start the decoding threads")?;
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
    let embed = if config.teachers.is_empty() {
        None
    } else {
        Some(embed::EmbedStage::load(
            &config.teachers,
            &config.embed,
            args.device.as_deref(),
        )?)
    };
    let teachers = embed
        .as_ref()
        .map(embed::EmbedStage::teacher_infos)
        .unwrap_or_default();
    let caption = if config.captioners.is_empty() {
        None
    } else {
        Some(caption::CaptionStage::load(
            &config.captioners,
            &config.caption,
            args.device.as_deref(),
            config.job.seed,
        )?)
    };
    let captioners = caption
        .as_ref()
        .map(caption::CaptionStage::infos)
        .unwrap_or_default();
    let card = serde_json::json!({
        "format": "dfndr",
        "schema_version": SCHEMA_VERSION,
        "dfndr_version": env!("CARGO_PKG_VERSION"),
        "config_fingerprint": fingerprint,
        "seed": config.job.seed,
        "config": config,
        "teachers": teachers,
        "captioners": captioners,
        "augmentation": reinforce::augmentation_meta(&config),
        "created_unix": now_unix(),
    });
    if job.init_card(&card, &fingerprint, args.job.force)? {
        tracing::info!(output = %output, "started a new job");
    }
    tracing::info!(
        shards = shards.len(),
        rank = placement.rank,
        world_size = placement.world_size,
        placement = placement.source,
        worker = %job.identity().worker,
        simd = %dfndr_simd::level(),
        "worker starting"
    );

    let liveness = liveness_of(&config);
    let spool = spool_of(&config, &liveness);
    let task = reinforce::Reinforce {
        job,
        config,
        fingerprint,
        embed,
        caption,
        spool,
    };
    run_task(
        &task,
        &task.job,
        &task.job,
        &shards,
        WorkerSettings {
            placement,
            max_attempts: task.config.job.max_attempts,
            retry_failed: args.retry_failed,
            liveness,
        },
        &output,
        progress,
    )
}

/// How a worker loop runs, besides its task.
struct WorkerSettings {
    placement: Placement,
    max_attempts: u32,
    retry_failed: bool,
    liveness: Arc<Liveness>,
}

/// The liveness of a worker with `config` (job.stall_seconds).
fn liveness_of(config: &JobConfig) -> Arc<Liveness> {
    Arc::new(Liveness::new(Duration::from_secs_f64(
        config.job.stall_seconds,
    )))
}

/// The input spool of a worker with `config` (`[storage]`); its downloads report progress.
fn spool_of(config: &JobConfig, liveness: &Arc<Liveness>) -> Spool {
    let liveness = Arc::clone(liveness);
    Spool::new(
        config.storage.spool_dir.as_ref().map(PathBuf::from),
        config.storage.prefetch_shards,
        Arc::new(move || liveness.beat()),
    )
}

/// Runs `task` over `shards` in the worker loop (claims and records on `task_job`), rebuilds
/// the manifest of `output_job`, prints what this worker did and returns the exit status of
/// the job: 0 all done, 1 some shards failed, 130 interrupted.
fn run_task(
    task: &dyn executor::ShardTask,
    task_job: &Job,
    output_job: &Job,
    shards: &[ShardRef],
    settings: WorkerSettings,
    output: &str,
    progress: &Progress,
) -> Result<ExitCode> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))
            .context("cannot install the signal handler")?;
    }
    progress.set_total(shards.len());
    let executor = executor::Executor {
        job: task_job.clone(),
        placement: settings.placement,
        max_attempts: settings.max_attempts,
        retry_failed: settings.retry_failed,
        interrupted: Arc::clone(&interrupted),
        liveness: settings.liveness,
    };
    let summary = executor.run(task, shards, progress)?;
    if let Err(e) = output_job.rebuild_manifest(SCHEMA_VERSION) {
        tracing::warn!(error = %e, "could not rebuild manifest.json");
    }
    let skipped: u64 = summary.skipped.values().sum();
    let verb = task.verb();
    eprintln!(
        "{} of {} shards {verb} ({} by this worker, {} already {verb}); this worker wrote {} rows and skipped {} samples",
        summary.done, summary.shards, summary.done_here, summary.already_done, summary.rows, skipped
    );
    for (reason, n) in &summary.skipped {
        eprintln!("  skipped {n:>8}  {reason}");
    }
    if let Some(kib) = peak_resident_kib() {
        eprintln!("peak resident memory {:.1} MiB", kib as f64 / 1024.0);
    }
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("interrupted: claims released; run the same command again to resume");
        return Ok(exit::code(exit::INTERRUPTED));
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
        return Ok(exit::code(exit::SHARDS_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a `DFNDR_SIMD` value that names no level and, when it asks for scalar kernels,
/// turns libjpeg-turbo's SIMD off too (`JSIMD_FORCENONE`, read when the first JPEG is
/// decoded), so that the whole process runs the baseline code paths. Runs before any thread
/// is started, so changing the environment is safe.
fn force_simd_level() -> Result<()> {
    let requested = dfndr_simd::requested()?;
    if requested == Some(dfndr_simd::Level::Scalar) && std::env::var_os("JSIMD_FORCENONE").is_none()
    {
        std::env::set_var("JSIMD_FORCENONE", "1");
    }
    Ok(())
}

/// The job config and output location of a command that updates an existing output.
fn existing_output(
    config: &std::path::Path,
    output: Option<String>,
) -> Result<(JobConfig, String)> {
    let config = load_config(config)?;
    let Some(output) = output.or_else(|| config.job.output.clone()) else {
        return Err(usage(
            "no output location: pass OUTPUT or set job.output in the config",
        ));
    };
    Ok((config, output))
}

fn embed_command(
    config: &std::path::Path,
    output: Option<String>,
    device: Option<&str>,
    progress: &Progress,
) -> Result<ExitCode> {
    let (config, output) = existing_output(config, output)?;
    if config.teachers.is_empty() {
        return Err(usage(
            "the config has no [[teachers]]: nothing to embed with",
        ));
    }
    let stage = embed::EmbedStage::load(&config.teachers, &config.embed, device)?;
    let update = embed_existing::EmbedUpdate::new(stage);
    rewrite_command(&config, &output, &update, progress)
}

fn caption_command(
    config: &std::path::Path,
    output: Option<String>,
    device: Option<&str>,
    progress: &Progress,
) -> Result<ExitCode> {
    let (config, output) = existing_output(config, output)?;
    if config.captioners.is_empty() {
        return Err(usage(
            "the config has no [[captioners]]: nothing to caption with",
        ));
    }
    let stage =
        caption::CaptionStage::load(&config.captioners, &config.caption, device, config.job.seed)?;
    let update = caption_existing::CaptionUpdate::new(stage);
    rewrite_command(&config, &output, &update, progress)
}

/// Runs a column update over the done shards of `output` in the worker loop.
fn rewrite_command(
    config: &JobConfig,
    output: &str,
    update: &dyn rewrite::ShardUpdate,
    progress: &Progress,
) -> Result<ExitCode> {
    let placement = Placement::resolve(None, None, |k| std::env::var(k).ok())?;
    let output_job = Job::new(
        open_store(output)?,
        WorkerIdentity::current(placement.rank),
        Duration::from_secs_f64(config.job.lease_seconds),
    );
    if output_job.read_card()?.is_none() {
        return Err(usage(format!(
            "{output} is not a dfndr output: it has no dfndr.json"
        )));
    }
    let liveness = liveness_of(config);
    let task = rewrite::Rewrite {
        update,
        job: output_job.task(update.task()),
        output: output_job,
        config,
        spool: spool_of(config, &liveness),
    };
    let shards = task.shards()?;
    if shards.is_empty() {
        return Err(usage(format!(
            "{output} has no done shards yet; run `dfndr reinforce` first"
        )));
    }
    let settings = WorkerSettings {
        placement,
        max_attempts: config.job.max_attempts,
        retry_failed: false,
        liveness,
    };
    run_task(
        &task,
        &task.job,
        &task.output,
        &shards,
        settings,
        output,
        progress,
    )
}

fn export_command(cli: ExportCli) -> Result<()> {
    use dfndr_trainer::export::{export_student, ExportFormat};
    let source = cli.model.source()?;
    let compute = dfndr_teachers::device::Compute::cpu();
    let mut loaded = dfndr_trainer::models::load(&source, &compute).usage()?;
    let Some(student) = loaded.student() else {
        return Err(exit::usage(format!(
            "{} is not a student: OpenCLIP models are exported by OpenCLIP itself",
            loaded.label
        )));
    };
    if cli.reparameterize {
        if !student.reparameterizable() {
            return Err(exit::usage(format!(
                "{}: --reparameterize: this student's image tower has no re-parameterisable \
                 layers (only FastViT towers do); export it without the flag",
                loaded.label
            )));
        }
        loaded = loaded.into_inference().usage()?;
    }
    let Some(student) = loaded.student() else {
        return Err(exit::usage(format!("{} is not a student", loaded.label)));
    };
    let format = match cli.format {
        ExportFormatArg::Safetensors => ExportFormat::Safetensors,
        ExportFormatArg::Pt => ExportFormat::Torch,
    };
    let written = export_student(student, &cli.out, format)
        .with_context(|| format!("cannot export into {}", cli.out.display()))?;
    eprintln!("wrote {}", written.weights.display());
    match &written.config {
        Some(path) if cli.reparameterize => eprintln!(
            "wrote {}\nload it with OpenCLIP into a model whose trunk is reparameterised: \
             model = open_clip.create_model('local-dir:{}', pretrained=None); \
             model.visual.trunk = timm.utils.reparameterize_model(model.visual.trunk); \
             model.load_state_dict(...)",
            path.display(),
            cli.out.display(),
        ),
        Some(path) => eprintln!(
            "wrote {}\nload it with open_clip.create_model_and_transforms('local-dir:{}')",
            path.display(),
            cli.out.display()
        ),
        None => eprintln!(
            "warning: no open_clip_config.json: this student's image tower has no timm \
             architecture name (vision.arch), which OpenCLIP needs to build it"
        ),
    }
    if cli.reparameterize {
        eprintln!(
            "the weights are the fused inference form (timm's reparameterize_model keys); \
             dfndr encode and dfndr eval load them directly"
        );
    }
    Ok(())
}

/// The process's peak resident set size (`VmHWM`), where the OS reports it (Linux).
fn peak_resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
