//! Job configs (`JOB.toml`): what `dfndr reinforce` reads, with a default for every field.
//!
//! Unknown fields are errors, so a typo never silently falls back to a default. The config
//! fingerprint covers exactly the fields that change what a shard contains; where the data
//! comes from and goes to, and how the workers behave, are left out so that a job can be
//! extended with new inputs, moved, or run with other worker settings.

use std::path::Path;

use anyhow::{bail, Context, Result};
use dfndr_augment::params::AugConfig;
use dfndr_captioner::CaptionerConfig;
use dfndr_shards::format::EmbDtype;
use dfndr_teachers::TeacherConfig;

use crate::caption::CaptionSection;
use crate::embed::EmbedSection;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A whole job config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// Inputs, output, seed and worker behaviour.
    pub job: JobSection,
    /// Limits applied while reading input shards.
    pub reader: ReaderSection,
    /// What the parquet shards contain and how they are laid out.
    pub output: OutputSection,
    /// The augmentation views sampled per sample (stored as `paug`).
    pub augment: AugConfig,
    /// The teacher ensemble (`[[teachers]]`, concatenated in this order); none turns the
    /// embedding stage off.
    pub teachers: Vec<TeacherConfig>,
    /// How the embedding stage runs.
    pub embed: EmbedSection,
    /// The CoCa captioners (`[[captioners]]`, one `syn_text_TAG` column each); none turns the
    /// caption stage off.
    pub captioners: Vec<CaptionerConfig>,
    /// How the caption stage runs.
    pub caption: CaptionSection,
    /// How object stores are read and written (timeouts, retries, the input spool).
    pub storage: StorageSection,
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Every object-store request (one download chunk, one upload part, a claim) must finish
    /// within this many seconds, from connecting until its body is complete.
    pub request_timeout_seconds: f64,
    /// Seconds to establish a connection.
    pub connect_timeout_seconds: f64,
    /// Retries of a failed request or download chunk (exponential backoff).
    pub max_retries: usize,
    /// A request is not retried once this many seconds have passed since its first try.
    pub retry_timeout_seconds: f64,
    /// Input shards on object stores are downloaded in ranged requests of this many MiB,
    /// each retried on its own (a cut connection costs one chunk).
    pub download_chunk_mib: u64,
    /// Folder for the local copies of object-store input shards (default: the system's
    /// temporary folder, `TMPDIR`). A copy lives while its shard is processed.
    pub spool_dir: Option<String>,
    /// Input shards downloaded in advance while the current one is processed.
    pub prefetch_shards: usize,
}

impl Default for StorageSection {
    fn default() -> Self {
        let client = dfndr_shards::cloud::ClientSettings::default();
        StorageSection {
            request_timeout_seconds: client.request_timeout.as_secs_f64(),
            connect_timeout_seconds: client.connect_timeout.as_secs_f64(),
            max_retries: client.max_retries,
            retry_timeout_seconds: client.retry_timeout.as_secs_f64(),
            download_chunk_mib: client.download_chunk_bytes >> 20,
            spool_dir: None,
            prefetch_shards: 1,
        }
    }
}

impl StorageSection {
    /// The object-store client settings of this section.
    pub fn client(&self) -> dfndr_shards::cloud::ClientSettings {
        use std::time::Duration;
        dfndr_shards::cloud::ClientSettings {
            request_timeout: Duration::from_secs_f64(self.request_timeout_seconds),
            connect_timeout: Duration::from_secs_f64(self.connect_timeout_seconds),
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs_f64(self.retry_timeout_seconds),
            download_chunk_bytes: self.download_chunk_mib << 20,
        }
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("request_timeout_seconds", self.request_timeout_seconds),
            ("connect_timeout_seconds", self.connect_timeout_seconds),
            ("retry_timeout_seconds", self.retry_timeout_seconds),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 1e9) {
                bail!("storage.{name} must be a positive number of seconds");
            }
        }
        if self.download_chunk_mib == 0 || self.download_chunk_mib > 4096 {
            bail!("storage.download_chunk_mib must be between 1 and 4096");
        }
        Ok(())
    }
}

/// `[job]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobSection {
    /// Input shard patterns: brace patterns, globs, list files (`.txt`, `.list`, `.lst`),
    /// local paths or `file://` URLs. Relative paths are relative to the working directory.
    /// A single string is accepted too.
    #[serde(deserialize_with = "one_or_many")]
    pub input: Vec<String>,
    /// Output location (local directory or `file://` URL).
    pub output: Option<String>,
    /// Seed of every random choice (augmentations, caption sampling).
    pub seed: u64,
    /// Seconds after its last heartbeat at which another worker may take over a claim.
    pub lease_seconds: f64,
    /// Failed attempts after which a shard is no longer retried (over all runs).
    pub max_attempts: u32,
    /// Samples decoded together in parallel.
    pub batch_size: usize,
    /// Decoding threads (0: one per core).
    pub threads: usize,
    /// A worker whose shard has made no progress (no batch through any stage, no download
    /// chunk) for this many seconds is taken to be hung (a blocked read, a stuck device): it
    /// stops renewing its claim, logs why and exits with status 3, so that another worker
    /// takes the shard over once the lease expires. Keep it well above the slowest batch.
    pub stall_seconds: f64,
}

impl Default for JobSection {
    fn default() -> Self {
        JobSection {
            input: Vec::new(),
            output: None,
            seed: 0,
            lease_seconds: 300.0,
            max_attempts: 3,
            batch_size: 64,
            threads: 0,
            stall_seconds: 1800.0,
        }
    }
}

/// Accepts `input = "a"` as well as `input = ["a", "b"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `[reader]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReaderSection {
    /// Tar members above this size are skipped without being read (`member_too_large`).
    pub max_member_bytes: u64,
    /// Images declaring more pixels are refused before decoding (`image_too_large`).
    pub max_pixels: u64,
}

impl Default for ReaderSection {
    fn default() -> Self {
        ReaderSection {
            max_member_bytes: 64 << 20,
            max_pixels: dfndr_augment::decode::DEFAULT_MAX_PIXELS,
        }
    }
}

/// `[output]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Store the original encoded image bytes in the `image` column.
    pub embed_images: bool,
    /// Rows per parquet row group.
    pub row_group_rows: usize,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            embed_images: false,
            row_group_rows: 1000,
        }
    }
}

/// The fields that decide the content of a shard (see the module documentation).
#[derive(Serialize)]
struct Fingerprinted<'a> {
    seed: u64,
    reader: &'a ReaderSection,
    output: &'a OutputSection,
    augment: &'a AugConfig,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    teachers: &'a [TeacherConfig],
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding_dtype: Option<EmbDtype>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    captioners: &'a [CaptionerConfig],
}

impl JobConfig {
    /// Reads and validates a TOML config file.
    pub fn load(path: &Path) -> Result<JobConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let config: JobConfig =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<()> {
        if !(self.job.lease_seconds.is_finite() && self.job.lease_seconds > 0.0) {
            bail!("job.lease_seconds must be a positive number of seconds");
        }
        if !(self.job.stall_seconds.is_finite() && self.job.stall_seconds > 0.0) {
            bail!("job.stall_seconds must be a positive number of seconds");
        }
        if self.job.max_attempts == 0 {
            bail!("job.max_attempts must be at least 1");
        }
        if self.job.batch_size == 0 {
            bail!("job.batch_size must be at least 1");
        }
        if self.output.row_group_rows == 0 {
            bail!("output.row_group_rows must be at least 1");
        }
        if self.reader.max_pixels == 0 || self.reader.max_member_bytes == 0 {
            bail!("reader.max_pixels and reader.max_member_bytes must be positive");
        }
        self.augment.validate()?;
        if self.embed.batch_size == 0 {
            bail!("embed.batch_size must be at least 1");
        }
        crate::embed::validate_teachers(&self.teachers)?;
        if self.caption.batch_size == 0 {
            bail!("caption.batch_size must be at least 1");
        }
        crate::caption::validate_captioners(&self.captioners)?;
        self.storage.validate()?;
        Ok(())
    }

    /// sha256 (hex) of the canonical JSON of the content-deciding fields.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(&Fingerprinted {
            seed: self.job.seed,
            reader: &self.reader,
            output: &self.output,
            augment: &self.augment,
            teachers: &self.teachers,
            embedding_dtype: (!self.teachers.is_empty()).then_some(self.embed.dtype),
            captioners: &self.captioners,
        })
        .unwrap_or_default();
        dfndr_shards::job::hex(&Sha256::digest(&canonical))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields() {
        let c: JobConfig = toml::from_str("[job]\ninput = [\"a.tar\"]\n").unwrap();
        assert_eq!(c.job.max_attempts, 3);
        assert_eq!(c.output.row_group_rows, 1000);
        c.validate().unwrap();
    }

    #[test]
    fn input_may_be_one_string() {
        let c: JobConfig = toml::from_str("[job]\ninput = \"a.tar\"\n").unwrap();
        assert_eq!(c.job.input, vec!["a.tar".to_string()]);
    }

    #[test]
    fn unknown_fields_are_errors() {
        let err = toml::from_str::<JobConfig>("[job]\nimput = []\n").unwrap_err();
        assert!(err.to_string().contains("imput"), "{err}");
    }

    #[test]
    fn fingerprint_ignores_location_and_worker_settings() {
        let a: JobConfig = toml::from_str("[job]\ninput=[\"a\"]\noutput=\"x\"\n").unwrap();
        let mut b = a.clone();
        b.job.input = vec!["b".into()];
        b.job.output = Some("y".into());
        b.job.lease_seconds = 5.0;
        b.job.threads = 7;
        b.job.stall_seconds = 9.0;
        b.storage.request_timeout_seconds = 1.0;
        b.storage.spool_dir = Some("/spool".into());
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.output.embed_images = true;
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.job.seed = 1;
        assert_ne!(a.fingerprint(), c.fingerprint());
        let mut d = a.clone();
        d.augment.rand_augment.magnitude = 10;
        assert_ne!(a.fingerprint(), d.fingerprint());
    }

    const TEACHER: &str =
        "[[teachers]]\nname = \"t\"\narch = \"ViT-B-32\"\nweights = \"random:1\"\n";

    #[test]
    fn teachers_and_embedding_dtype_are_fingerprinted_device_and_batch_are_not() {
        let a: JobConfig = toml::from_str(TEACHER).unwrap();
        a.validate().unwrap();
        let plain = JobConfig::default();
        assert_ne!(a.fingerprint(), plain.fingerprint());
        let mut b = a.clone();
        b.embed.batch_size = 3;
        b.embed.device = "cuda:1".into();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.embed.dtype = EmbDtype::F32;
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.teachers[0].logit_scale = Some(70.0);
        assert_ne!(a.fingerprint(), c.fingerprint());
        // Without teachers the dtype changes nothing (no embedding columns).
        let mut d = plain.clone();
        d.embed.dtype = EmbDtype::F32;
        assert_eq!(plain.fingerprint(), d.fingerprint());
    }

    #[test]
    fn shipped_configs_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                JobConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3);
        // MobileCLIP2's recipes: the DFN2B teacher pair at 70 / 60, 5 top-p captions of the
        // MSCOCO-38k CoCa, 2 (DFNDR-2B) or 30 (DFNDR-2B12M) augmentations.
        for (file, views) in [("dfndr2b.toml", 2), ("dfndr12m.toml", 30)] {
            let prod = JobConfig::load(&dir.join(file)).unwrap();
            assert_eq!(prod.augment.num_augmentations, views, "{file}");
            let names: Vec<_> = prod
                .teachers
                .iter()
                .map(|t| (t.name.as_str(), t.logit_scale, t.weights.as_str()))
                .collect();
            assert_eq!(
                names,
                [
                    ("dfn2b", Some(70.0), "hf-hub:apple/DFN2B-CLIP-ViT-L-14"),
                    (
                        "dfn2b_s39b",
                        Some(60.0),
                        "hf-hub:apple/DFN2B-CLIP-ViT-L-14-39B"
                    )
                ],
                "{file}"
            );
            let archs: Vec<_> = prod
                .teachers
                .iter()
                .map(|t| t.arch.resolve().unwrap().quick_gelu)
                .collect();
            assert_eq!(archs, [true, false]);
            let captioners: Vec<_> = prod
                .captioners
                .iter()
                .map(|c| (c.tag.as_str(), c.num_captions, c.weights.as_str()))
                .collect();
            assert_eq!(
                captioners,
                [(
                    "dfn_mscoco38k",
                    5,
                    "hf-hub:apple/mobileclip2_coca_dfn2b_s13b_mscoco38k_s12m_context77"
                )],
                "{file}"
            );
        }
    }

    #[test]
    fn bad_teachers_are_config_errors() {
        for (toml, want) in [
            (format!("{TEACHER}{TEACHER}"), "unique"),
            (
                TEACHER.replace("ViT-B-32", "ViT-Z-1"),
                "unknown architecture",
            ),
            (TEACHER.replace("random:1", "random:x"), "random:"),
            (format!("{TEACHER}logit_scale = -1.0\n"), "logit_scale"),
        ] {
            let c: JobConfig = toml::from_str(&toml).unwrap();
            let err = format!("{:#}", c.validate().unwrap_err());
            assert!(err.contains(want), "{toml}: {err}");
        }
        let explicit = "[[teachers]]\nname = \"t\"\nweights = \"random:1\"\n[teachers.arch]\nembed_dim = 8\n[teachers.arch.vision]\nimage_size = 32\npatch_size = 8\nwidth = 16\nlayers = 1\nhead_width = 8\n[teachers.arch.text]\nwidth = 16\nheads = 2\nlayers = 1\n";
        let c: JobConfig = toml::from_str(explicit).unwrap();
        c.validate().unwrap();
    }
}
