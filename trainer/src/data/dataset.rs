//! A DFNDR dataset: its shards (from `manifest.json`) and what training needs of them.

use std::sync::Arc;

use dfndr_augment::params::AugConfig;
use dfndr_dataset::views::augmentation_of;
use dfndr_shards::format::{FileMeta, Layout};
use dfndr_shards::job::{Manifest, MANIFEST_PATH};
use dfndr_shards::store::{open_store, Store};
use regex::Regex;

use crate::error::{Result, TrainError};
use crate::loss::TeacherLayout;

/// One shard of the dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetShard {
    /// Shard name.
    pub name: String,
    /// Path of the parquet file inside the dataset's store.
    pub path: String,
    /// Rows.
    pub rows: u64,
}

/// The dataset's shards and its store.
#[derive(Clone)]
pub struct Dataset {
    /// Where the dataset lives (as given).
    pub location: String,
    /// Its store.
    pub store: Arc<dyn Store>,
    /// Done shards, in the manifest's order.
    pub shards: Vec<DatasetShard>,
}

impl Dataset {
    /// Opens the dfndr output at `location` through its `manifest.json`.
    pub fn open(location: &str) -> Result<Self> {
        let store = open_store(location)
            .map_err(|e| TrainError::Data(format!("data.path {location}: {e}")))?;
        let bytes = store.get(MANIFEST_PATH).map_err(|e| {
            TrainError::Data(format!(
                "data.path {location}: no readable {MANIFEST_PATH} ({e}); point it at a dfndr \
                 output folder (the --output of `dfndr reinforce` or `dfndr import-wds`)"
            ))
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            TrainError::Data(format!(
                "{}: not a dfndr manifest: {e}",
                store.uri_of(MANIFEST_PATH)
            ))
        })?;
        let shards: Vec<DatasetShard> = manifest
            .shards
            .into_iter()
            .filter(|s| s.rows > 0)
            .map(|s| DatasetShard {
                name: s.name,
                path: s.output,
                rows: s.rows,
            })
            .collect();
        if shards.is_empty() {
            return Err(TrainError::Data(format!(
                "data.path {location}: the manifest lists no shard with rows"
            )));
        }
        Ok(Self {
            location: location.to_string(),
            store,
            shards,
        })
    }

    /// Rows over all shards.
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }
}

/// What a shard must provide, derived from the first shard and checked on every other.
#[derive(Clone, Debug, PartialEq)]
pub struct Requirements {
    /// Teachers' dimensions and logit scales.
    pub teachers: TeacherLayout,
    /// Synthetic-caption tags used (those matching the regex, with embeddings).
    pub syn_tags: Vec<String>,
    /// The augmentation config the views were sampled with.
    pub aug: AugConfig,
}

/// Checks a shard's layout and metadata for training and returns what it provides. `regex`
/// selects the synthetic-caption columns (matched against `syn_text_TAG`).
pub fn requirements(
    shard: &str,
    layout: &Layout,
    meta: &FileMeta,
    regex: &Regex,
) -> Result<Requirements> {
    let missing: Vec<&str> = [
        ("paug", layout.paug),
        ("image_emb", layout.image_emb),
        ("text_emb", layout.text_emb),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(TrainError::Data(format!(
            "shard {shard} has no {} column(s): training needs augmentation views and teacher \
             embeddings (run `dfndr reinforce` with augmentation and teachers, or `dfndr embed`)",
            missing.join(", ")
        )));
    }
    let syn_tags: Vec<String> = layout
        .syn
        .iter()
        .filter(|s| regex.is_match(&format!("syn_text_{}", s.tag)))
        .map(|s| s.tag.clone())
        .collect();
    if syn_tags.is_empty() {
        let have: Vec<String> = layout
            .syn
            .iter()
            .map(|s| format!("syn_text_{}", s.tag))
            .collect();
        return Err(TrainError::Data(format!(
            "shard {shard}: no synthetic-caption column matches data.syn_text_regex {:?} (it has {})",
            regex.as_str(),
            if have.is_empty() { "none".to_string() } else { have.join(", ") }
        )));
    }
    if let Some(s) = layout
        .syn
        .iter()
        .find(|s| syn_tags.contains(&s.tag) && !s.with_emb)
    {
        return Err(TrainError::Data(format!(
            "shard {shard}: syn_text_{} has no teacher embeddings (syn_text_{}_emb); run `dfndr \
             embed` on the dataset",
            s.tag, s.tag
        )));
    }
    let dims: Vec<usize> = meta.teachers.iter().map(|t| t.dim).collect();
    let width = layout.emb.as_ref().map_or(0, |e| e.dim);
    if dims.is_empty() || dims.iter().sum::<usize>() != width {
        return Err(TrainError::Data(format!(
            "shard {shard}: its teacher metadata ({} teachers, dims {dims:?}) does not describe its \
             {width}-wide embeddings",
            dims.len()
        )));
    }
    let aug = augmentation_of(meta).map_err(|e| TrainError::Data(format!("shard {shard}: {e}")))?;
    Ok(Requirements {
        aug,
        teachers: TeacherLayout {
            dims,
            scales: meta
                .teachers
                .iter()
                .map(|t| f64::from(t.logit_scale))
                .collect(),
        },
        syn_tags,
    })
}
