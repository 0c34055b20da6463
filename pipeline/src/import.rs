//! `dfndr import-wds`: webdataset tars in Apple's reinforced layout (DataCompDR, RayGen's
//! DFNDR, `dfndr export-wds`) into a DFNDR output, through the same worker loop as `dfndr
//! reinforce` (claims, takeover, retries, any number of workers). A sample whose
//! reinforcement members are missing or do not match the config is skipped and counted
//! (`invalid_reinforcement`), never fatal to its shard.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use dfndr_augment::decode::probe;
use dfndr_augment::params::{from_apple_json, AppleLayout};
use dfndr_shards::apple::{npz_decode, syn_decode, Matrix};
use dfndr_shards::format::{
    CaptionerInfo, EmbLayout, FileMeta, Layout, Paug, Row, SynCaptions, SynLayout, TeacherInfo,
};
use dfndr_shards::job::{self, Job};
use dfndr_shards::shardlist::ShardRef;
use dfndr_shards::spool::Spool;
use dfndr_shards::wds::{RawSample, ReaderLimits, WdsEvent, WdsReader};

use crate::config::JobConfig;
use crate::executor::{ShardContext, ShardResult, ShardTask};
use crate::output;
use dfndr_dataset::paug::to_stored;

/// The members of Apple's layout besides image, caption and json.
const APPLE_MEMBERS: [&str; 3] = ["syn.json", "paug.json", "npz"];

/// How the imported shards are described: from the job config, since Apple's shards carry no
/// metadata of their own.
pub struct ImportSpec {
    /// The config (augment, teachers, captioners, output options).
    pub config: JobConfig,
    /// Its fingerprint.
    pub fingerprint: String,
    /// Teachers as recorded in the shard metadata.
    pub teachers: Vec<TeacherInfo>,
    /// Captioners as recorded in the shard metadata.
    pub captioners: Vec<CaptionerInfo>,
}

impl ImportSpec {
    /// Builds the spec; teachers need an explicit `logit_scale` (no weights are loaded).
    pub fn new(config: JobConfig) -> Result<ImportSpec> {
        if config.augment.num_augmentations == 0 {
            bail!("augment.num_augmentations must be the number of views in the shards (Apple's layout always has them)");
        }
        let teachers = config
            .teachers
            .iter()
            .map(|t| -> Result<TeacherInfo> {
                let arch = t
                    .arch
                    .resolve()
                    .with_context(|| format!("teacher {}", t.name))?;
                let logit_scale = t.logit_scale.ok_or_else(|| {
                    anyhow!(
                        "teacher {}: set logit_scale (import loads no weights to read it from)",
                        t.name
                    )
                })?;
                Ok(TeacherInfo {
                    name: t.name.clone(),
                    architecture: t.arch.label(),
                    dim: arch.embed_dim,
                    logit_scale,
                    weights_sha256: t.weights.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let captioners = config
            .captioners
            .iter()
            .map(|c| crate::caption::config_info(c, &c.weights))
            .collect();
        let fingerprint = config.fingerprint();
        Ok(ImportSpec {
            config,
            fingerprint,
            teachers,
            captioners,
        })
    }

    fn dim(&self) -> usize {
        self.teachers.iter().map(|t| t.dim).sum()
    }

    fn layout(&self) -> Layout {
        let with_emb = !self.teachers.is_empty();
        Layout {
            embed_images: self.config.output.embed_images,
            paug: true,
            emb: with_emb.then_some(EmbLayout {
                dim: self.dim(),
                dtype: self.config.embed.dtype,
            }),
            image_emb: with_emb,
            text_emb: with_emb,
            syn: self
                .config
                .captioners
                .iter()
                .map(|c| SynLayout {
                    tag: c.tag.clone(),
                    with_emb,
                })
                .collect(),
        }
    }
}

/// The import of Apple-layout tars, as a task of the [`crate::executor::Executor`].
pub struct ImportTask {
    /// What the tars hold.
    pub spec: ImportSpec,
    /// Job control over the output.
    pub job: Job,
    /// Local copies of the input tars.
    pub spool: Spool,
}

/// Samples between two checks for a lost claim or a signal.
const CHECK_EVERY: u64 = 64;

impl ShardTask for ImportTask {
    fn verb(&self) -> &'static str {
        "imported"
    }

    fn is_done(&self, shard: &ShardRef) -> Result<bool> {
        Ok(self.job.is_done(&shard.name, &self.spec.fingerprint)?)
    }

    fn prefetch(&self, shard: &ShardRef) {
        self.spool.prefetch(&shard.uri);
    }

    fn process(&self, shard: &ShardRef, ctx: &ShardContext<'_>) -> Result<ShardResult> {
        let spec = &self.spec;
        let started = Instant::now();
        let store = self.job.store();
        let output = job::output_path(&shard.name);
        let output_uri = store.uri_of(&output);
        store.discard_abandoned_staged(&output)?;
        let input = self
            .spool
            .take(&shard.uri)
            .and_then(|s| s.open())
            .with_context(|| format!("cannot open {}", shard.uri))?;
        let limits = ReaderLimits {
            max_member_bytes: spec.config.reader.max_member_bytes,
        };
        let events = WdsReader::new(input, limits).with_extra_members(&APPLE_MEMBERS);
        let meta = FileMeta {
            source: shard.uri.clone(),
            config_fingerprint: spec.fingerprint.clone(),
            augmentation: crate::reinforce::augmentation_meta(&spec.config),
            teachers: spec.teachers.clone(),
            captioners: spec.captioners.clone(),
            ..FileMeta::default()
        };
        let mut writer = output::open(
            store.as_ref(),
            &output,
            spec.layout(),
            &meta,
            spec.config.output.row_group_rows,
        )?;
        ctx.progress.shard_started(&shard.name);
        let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
        let mut seen = 0u64;
        for event in events {
            seen += 1;
            if seen.is_multiple_of(CHECK_EVERY) {
                ctx.liveness.beat();
                if let Some(stop) = ctx.stopped() {
                    return Ok(stop);
                }
            }
            match event.with_context(|| format!("cannot read {}", shard.uri))? {
                WdsEvent::Sample(sample) => {
                    let key = sample.key.clone();
                    match to_row(spec, &shard.uri, sample) {
                        Ok(row) => {
                            writer
                                .write_row(&row)
                                .with_context(|| format!("cannot write {output_uri}"))?;
                            ctx.progress.samples(1);
                        }
                        // One bad sample never fails the shard: it is counted.
                        Err(e) => {
                            tracing::warn!(shard = %shard.uri, %key, error = %format!("{e:#}"), "sample skipped: its reinforcement members are invalid");
                            *skipped
                                .entry(INVALID_REINFORCEMENT.to_string())
                                .or_default() += 1;
                        }
                    }
                }
                WdsEvent::Skip(skip) => {
                    *skipped.entry(skip.reason.as_str().to_string()).or_default() += 1;
                }
            }
        }
        ctx.liveness.beat();
        let finished = output::finish(writer, &output_uri)?;
        ctx.publish(
            &shard.name,
            finished,
            output::Producer {
                input: &shard.uri,
                output: &output,
                skipped,
                started,
                worker: &self.job.identity().worker,
                fingerprint: &spec.fingerprint,
                stage_seconds: BTreeMap::new(),
            },
        )
    }
}

/// Skip reason of a sample whose reinforcement members (paug.json, syn.json, npz) are
/// missing or do not match the config.
pub const INVALID_REINFORCEMENT: &str = "invalid_reinforcement";

/// One sample of Apple's layout as a DFNDR row. Every stored value is checked before it is
/// used: the views' crop boxes against the image's size, op indices and magnitudes, caption
/// types, array shapes; errors name the member and field (the caller adds shard and key).
fn to_row(spec: &ImportSpec, uri: &str, sample: RawSample) -> Result<Row> {
    let member = |ext: &str| {
        sample
            .extras
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| anyhow!("no {ext} member"))
    };
    let (_, width, height) = probe(&sample.image).context("unreadable image")?;
    let aug = &spec.config.augment;
    let views = from_apple_json(member("paug.json")?, AppleLayout::of(aug))?;
    let k = aug.num_augmentations as usize;
    if views.len() != k {
        bail!(
            "paug.json: {} augmentations stored, the config says num_augmentations = {k}",
            views.len()
        );
    }
    for (i, view) in views.iter().enumerate() {
        view.validate(width, height, aug.size)
            .with_context(|| format!("paug.json: param_aug[{i}]"))?;
    }
    let paug: Vec<Paug> = views.iter().map(to_stored).collect();

    let tags: Vec<&str> = spec
        .config
        .captioners
        .iter()
        .map(|c| c.tag.as_str())
        .collect();
    // DataCompDR names its single list `syn_text`; dfndr's export `syn_text_TAG`.
    let syn = if tags.is_empty() {
        Vec::new()
    } else {
        syn_decode(member("syn.json")?, &tags)?
    };

    let (mut image_emb, mut text_emb) = (Vec::new(), Vec::new());
    let mut syn_emb: Vec<Vec<Vec<f32>>> = vec![Vec::new(); syn.len()];
    if !spec.teachers.is_empty() {
        let npz = member("npz").context("embeddings")?;
        let arrays = npz_decode(npz).context("npz")?;
        let dim = spec.dim();
        let array = |name: &str| -> Option<Result<&Matrix>> {
            let (_, m) = arrays.iter().find(|(n, _)| n == name)?;
            Some(if m.cols == dim {
                Ok(m)
            } else {
                Err(anyhow!(
                    "npz: {name} has {} columns, the teachers give {dim}",
                    m.cols
                ))
            })
        };
        let need = |name: &str| array(name).unwrap_or_else(|| Err(anyhow!("npz has no {name}")));
        let images = need("image_emb")?;
        if images.rows != k {
            bail!(
                "npz: image_emb has {} rows for {k} augmentations",
                images.rows
            );
        }
        image_emb = images.to_rows();
        let texts = need("text_emb")?.to_rows();
        if texts.is_empty() {
            bail!("npz: text_emb is empty");
        }
        let mut rest = texts.into_iter();
        text_emb = rest.by_ref().take(1).collect();
        let rest: Vec<Vec<f32>> = rest.collect();
        if syn.len() == 1 && !rest.is_empty() {
            // DataCompDR's layout: the synthetic captions follow the ground truth.
            syn_emb[0] = rest;
        } else {
            for ((name, _), emb) in syn.iter().zip(&mut syn_emb) {
                *emb = need(&format!("{name}_emb"))?.to_rows();
            }
        }
        for ((name, texts), emb) in syn.iter().zip(&syn_emb) {
            if emb.len() != texts.len() {
                bail!(
                    "npz: {} embeddings for {} {name} captions",
                    emb.len(),
                    texts.len()
                );
            }
        }
    }
    Ok(Row {
        key: sample.key,
        source: uri.to_string(),
        url: sample.url,
        caption: sample.caption,
        width,
        height,
        image: spec.config.output.embed_images.then_some(sample.image),
        paug,
        image_emb,
        text_emb,
        syn: syn
            .into_iter()
            .zip(syn_emb)
            .map(|((_, texts), emb)| SynCaptions { texts, emb })
            .collect(),
    })
}
