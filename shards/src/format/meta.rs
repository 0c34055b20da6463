//! [`FileMeta`]: what makes a single shard self-describing, stored as parquet key-value metadata.
//!
//! Scalars are stored as plain strings and structured values as JSON, so pyarrow
//! (`schema.metadata`), DuckDB (`parquet_kv_metadata`) and polars read them without dfndr.

use parquet::file::metadata::KeyValue;
use serde::{Deserialize, Serialize};

use super::schema::Layout;
use super::{FormatError, SCHEMA_VERSION};

/// Key-value metadata keys of DFNDR v1.
pub mod keys {
    /// Schema version, decimal (`"1"`). Checked before anything else on open.
    pub const SCHEMA_VERSION: &str = "dfndr.schema_version";
    /// Version of the dfndr that wrote the file.
    pub const VERSION: &str = "dfndr.version";
    /// URI of the input shard.
    pub const SOURCE: &str = "dfndr.source";
    /// Fingerprint of the job config.
    pub const CONFIG_FINGERPRINT: &str = "dfndr.config_fingerprint";
    /// JSON array of teachers.
    pub const TEACHERS: &str = "dfndr.teachers";
    /// JSON array of captioners.
    pub const CAPTIONERS: &str = "dfndr.captioners";
    /// JSON augmentation config.
    pub const AUGMENTATION: &str = "dfndr.augmentation";
    /// JSON copy of the layout; informational, the schema is authoritative.
    pub const LAYOUT: &str = "dfndr.layout";
}

/// One teacher of the ensemble whose embeddings are concatenated, in concatenation order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// Teacher name as configured (e.g. `dfn2b`).
    pub name: String,
    /// OpenCLIP architecture (e.g. `ViT-L-14-quickgelu`).
    pub architecture: String,
    /// Embedding dimension contributed to D.
    pub dim: usize,
    /// The teacher's logit scale (exp of the learned temperature), used by the distillation loss.
    pub logit_scale: f32,
    /// Hex sha256 of the weights file, or `random:SEED` for deterministic random weights.
    pub weights_sha256: String,
}

/// One captioner, producing the `syn_text_TAG` column of its tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionerInfo {
    /// Column tag (`syn_text_TAG`).
    pub tag: String,
    /// Model name or architecture.
    pub model: String,
    /// Hex sha256 of the weights file.
    pub weights_sha256: String,
    /// Decoding settings (strategy, top_p, seq_len, ...), free-form.
    pub decoding: serde_json::Value,
}

/// The DFNDR key-value metadata of one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    /// DFNDR schema version; the writer only accepts [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Version of the dfndr that wrote the file.
    pub dfndr_version: String,
    /// URI of the input shard.
    pub source: String,
    /// Fingerprint of the job config.
    pub config_fingerprint: String,
    /// Teachers in concatenation order (empty when no teacher stage ran).
    pub teachers: Vec<TeacherInfo>,
    /// Captioners (empty when no captioner stage ran).
    pub captioners: Vec<CaptionerInfo>,
    /// Augmentation config, free-form (null when no augmentation stage ran).
    pub augmentation: serde_json::Value,
}

impl Default for FileMeta {
    /// Current schema version and this crate's version; everything else empty.
    fn default() -> Self {
        FileMeta {
            schema_version: SCHEMA_VERSION,
            dfndr_version: env!("CARGO_PKG_VERSION").to_string(),
            source: String::new(),
            config_fingerprint: String::new(),
            teachers: Vec::new(),
            captioners: Vec::new(),
            augmentation: serde_json::Value::Null,
        }
    }
}

impl FileMeta {
    /// Checks what the writer can check: the version, finite logit scales (JSON has no NaN), and
    /// that the teachers' dims add up to the embedding dim when both are known. The reader runs
    /// the same check on open.
    pub fn validate(&self, layout: &Layout) -> Result<(), FormatError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(FormatError::InvalidMeta(format!(
                "schema_version is {}, but this dfndr writes version {SCHEMA_VERSION} only",
                self.schema_version
            )));
        }
        if let Some(t) = self.teachers.iter().find(|t| !t.logit_scale.is_finite()) {
            return Err(FormatError::InvalidMeta(format!(
                "teacher {:?} has non-finite logit scale {}",
                t.name, t.logit_scale
            )));
        }
        if let (Some(emb), false) = (layout.emb, self.teachers.is_empty()) {
            // Checked: on read the dims come from the file and may be anything.
            let total = self
                .teachers
                .iter()
                .try_fold(0usize, |sum, t| sum.checked_add(t.dim));
            if layout.has_emb_columns() && total != Some(emb.dim) {
                return Err(FormatError::InvalidMeta(format!(
                    "the teachers' dims add up to {}, but the embedding columns have dim {}",
                    total.map_or_else(|| "more than fits in memory".into(), |t| t.to_string()),
                    emb.dim
                )));
            }
        }
        Ok(())
    }

    /// Encodes as parquet key-value entries (including the informational layout copy).
    pub(crate) fn to_key_values(&self, layout: &Layout) -> Result<Vec<KeyValue>, FormatError> {
        fn json<T: Serialize>(key: &'static str, v: &T) -> Result<KeyValue, FormatError> {
            let s = serde_json::to_string(v).map_err(|e| FormatError::BadMetadata {
                key,
                reason: e.to_string(),
            })?;
            Ok(KeyValue::new(key.to_string(), s))
        }
        Ok(vec![
            KeyValue::new(
                keys::SCHEMA_VERSION.to_string(),
                self.schema_version.to_string(),
            ),
            KeyValue::new(keys::VERSION.to_string(), self.dfndr_version.clone()),
            KeyValue::new(keys::SOURCE.to_string(), self.source.clone()),
            KeyValue::new(
                keys::CONFIG_FINGERPRINT.to_string(),
                self.config_fingerprint.clone(),
            ),
            json(keys::TEACHERS, &self.teachers)?,
            json(keys::CAPTIONERS, &self.captioners)?,
            json(keys::AUGMENTATION, &self.augmentation)?,
            json(keys::LAYOUT, layout)?,
        ])
    }

    /// Reads the schema version alone, so that an old or foreign file is refused before any other
    /// part of it is interpreted.
    pub(crate) fn schema_version_of(kv: Option<&Vec<KeyValue>>) -> Result<u32, FormatError> {
        let raw = lookup(kv, keys::SCHEMA_VERSION).ok_or(FormatError::NotDfndr)?;
        raw.trim()
            .parse::<u32>()
            .map_err(|_| FormatError::BadMetadata {
                key: keys::SCHEMA_VERSION,
                reason: format!("{raw:?} is not a version number"),
            })
    }

    /// Decodes the metadata of a file whose version was already checked.
    pub(crate) fn from_key_values(kv: Option<&Vec<KeyValue>>) -> Result<FileMeta, FormatError> {
        let schema_version = Self::schema_version_of(kv)?;
        let text = |key: &'static str| -> Result<String, FormatError> {
            lookup(kv, key)
                .map(str::to_string)
                .ok_or(FormatError::MissingMetadata { key })
        };
        fn json<T: serde::de::DeserializeOwned>(
            kv: Option<&Vec<KeyValue>>,
            key: &'static str,
        ) -> Result<T, FormatError> {
            let raw = lookup(kv, key).ok_or(FormatError::MissingMetadata { key })?;
            serde_json::from_str(raw).map_err(|e| FormatError::BadMetadata {
                key,
                reason: e.to_string(),
            })
        }
        Ok(FileMeta {
            schema_version,
            dfndr_version: text(keys::VERSION)?,
            source: text(keys::SOURCE)?,
            config_fingerprint: text(keys::CONFIG_FINGERPRINT)?,
            teachers: json(kv, keys::TEACHERS)?,
            captioners: json(kv, keys::CAPTIONERS)?,
            augmentation: json(kv, keys::AUGMENTATION)?,
        })
    }
}

/// First value of `key`; an entry without a value counts as absent.
fn lookup<'a>(kv: Option<&'a Vec<KeyValue>>, key: &str) -> Option<&'a str> {
    kv?.iter()
        .find(|e| e.key == key)
        .and_then(|e| e.value.as_deref())
}
