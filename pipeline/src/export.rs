//! `dfndr export-wds`: a DFNDR output as webdataset tars in Apple's layout (see
//! [`dfndr_shards::apple`]), which the OpenCLIP training patch of apple/ml-mobileclip reads
//! with `--dataset-reinforcement`.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use dfndr_augment::decode::{decode_rgb, probe, ImageFormat};
use dfndr_augment::params::{to_apple, AppleLayout, AugConfig, Interpolation};
use dfndr_shards::apple::{AppleSample, AppleTarWriter, Matrix};
use dfndr_shards::format::{FileMeta, Layout, Row, ShardReader};
use dfndr_shards::job::{Job, WorkerIdentity};
use dfndr_shards::originals::OriginalsCursor;
use dfndr_shards::spool::Spool;
use dfndr_shards::store::{is_cloud_url, local_copy, local_path_of, open_store};
use dfndr_shards::wds::ReaderLimits;
use serde_json::{json, Map, Value};

use crate::progress::Progress;
use dfndr_dataset::paug::from_stored;

/// What the export of one output needs to know besides the rows.
struct ShardContext {
    layout: Layout,
    apple: AppleLayout,
    dim: usize,
}

/// Exports every done shard of the output at `output` into `dest` as `NAME.tar`, plus
/// `config.json` (the augmentation config in the form the training patch's
/// `--dataset-reinforcement-config` reads). Returns the number of samples written.
pub fn run(output: &str, dest: &str, progress: &Progress) -> Result<u64> {
    let job = Job::new(
        open_store(output)?,
        WorkerIdentity::current(0),
        Duration::from_secs(300),
    );
    if job.read_card()?.is_none() {
        bail!("{output} is not a dfndr output: it has no dfndr.json");
    }
    let done = job.all_done()?;
    if done.is_empty() {
        bail!("{output} has no done shards yet; run `dfndr reinforce` first");
    }
    if !is_cloud_url(dest) {
        let dir = local_path_of(dest)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dest}"))?;
    }
    let dest_store = open_store(dest)?;
    progress.set_total(done.len());
    let mut samples = 0;
    let mut config: Option<Value> = None;
    for (name, record) in &done {
        progress.shard_started(name);
        let uri = job.store().uri_of(&record.output);
        let copy = local_copy(&**job.store(), &record.output)
            .with_context(|| format!("cannot read {uri}"))?;
        let reader =
            ShardReader::open_path(copy.path()).with_context(|| format!("cannot read {uri}"))?;
        let meta = reader.meta().clone();
        let shard_config = apple_config(&meta)?;
        match &config {
            None => config = Some(shard_config),
            Some(c) if *c != shard_config => bail!(
                "shard {name} was made with other teachers or augmentations than the shards \
                 before it; export the output in parts"
            ),
            Some(_) => {}
        }
        let context = ShardContext {
            layout: reader.layout().clone(),
            apple: AppleLayout::of(&aug_config(&meta)?),
            dim: meta.teachers.iter().map(|t| t.dim).sum(),
        };
        let tar_name = format!("{name}.tar");
        let staged = dest_store.create_staged(&tar_name)?;
        let mut tar = AppleTarWriter::new(staged);
        // Rows streamed, their originals read from the source shards in row order.
        let spool = Spool::on_demand();
        let mut originals = OriginalsCursor::new(&spool, ReaderLimits::default());
        let mut exported = 0u64;
        for row in reader.rows()? {
            let row: Row = row.with_context(|| format!("shard {uri}"))?;
            let image = originals
                .original(&row)
                .with_context(|| format!("shard {name}: cannot open the source {}", row.source))?
                .map_err(|missing| {
                    anyhow!(
                        "shard {name}, key {}: no original image ({missing:?}); Apple's layout needs one",
                        row.key
                    )
                })?;
            let sample = to_apple_sample(&row, &image, &context)
                .with_context(|| format!("shard {name}, key {}", row.key))?;
            tar.write_sample(&sample)?;
            progress.samples(1);
            exported += 1;
        }
        let mut staged = tar.finish()?;
        staged
            .flush()
            .with_context(|| format!("cannot write {}", dest_store.uri_of(&tar_name)))?;
        staged.commit()?;
        samples += exported;
        tracing::info!(shard = %name, rows = exported, "exported");
        progress.shard_finished(exported);
    }
    progress.finish();
    if let Some(config) = config {
        let text = serde_json::to_vec_pretty(&config)?;
        dest_store.put("config.json", &text)?;
    }
    Ok(samples)
}

/// The augmentation config recorded in a shard.
fn aug_config(meta: &FileMeta) -> Result<AugConfig> {
    dfndr_dataset::views::augmentation_of(meta).context("Apple's layout needs augmentation views")
}

/// A float32 config value as the shortest decimal that reads back to it (0.48145466, not
/// 0.48145467042922974), as Python's json writes the config's values.
fn short(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .map_or_else(|_| json!(v), |d| json!(d))
}

fn shorts(v: &[f32]) -> Value {
    Value::Array(v.iter().copied().map(short).collect())
}

/// `config.json` as RayGen writes it: the teachers and the augmentation config in the form of
/// Apple's `compose_from_config` (torchvision keyword arguments per transform).
fn apple_config(meta: &FileMeta) -> Result<Value> {
    let aug = aug_config(meta)?;
    let interpolation = match aug.interpolation {
        Interpolation::Nearest => "nearest",
        Interpolation::Bilinear => "bilinear",
        Interpolation::Bicubic => "bicubic",
    };
    let mut crop = json!({"interpolation": interpolation, "size": aug.size});
    if aug.scale != [0.08, 1.0] || aug.ratio != [0.75, 4.0 / 3.0] {
        crop["scale"] = shorts(&aug.scale);
        crop["ratio"] = shorts(&aug.ratio);
    }
    let ra = &aug.rand_augment;
    let mut rand_augment = json!({"enable": ra.enable, "p": short(ra.p)});
    if (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) != (2, 9, 31) {
        rand_augment["num_ops"] = json!(ra.num_ops);
        rand_augment["magnitude"] = json!(ra.magnitude);
        rand_augment["num_magnitude_bins"] = json!(ra.num_magnitude_bins);
    }
    if ra.fill != [0, 0, 0] {
        rand_augment["fill"] = json!(ra.fill);
    }
    let mut image_augmentation = json!({
        "normalize": {"mean": shorts(&aug.mean), "std": shorts(&aug.std)},
        "rand_augment": rand_augment,
        "random_resized_crop": crop,
        "to_rgb": {"enable": true},
        "to_tensor": {"enable": true},
    });
    if aug.hflip_p > 0.0 {
        image_augmentation["random_horizontal_flip"] =
            json!({"enable": true, "p": short(aug.hflip_p)});
    }
    let names: Vec<&str> = meta
        .teachers
        .iter()
        .map(|t| t.architecture.as_str())
        .collect();
    Ok(json!({
        "model_name": names.join(","),
        "pretrained": meta.teachers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(","),
        "num_samples": aug.num_augmentations,
        "logit_scales": meta.teachers.iter().map(|t| short(t.logit_scale)).collect::<Vec<_>>(),
        "teacher_dimensions": meta.teachers.iter().map(|t| t.dim).collect::<Vec<_>>(),
        "reinforce": {"image_augmentation": image_augmentation},
    }))
}

/// The image as the training patch decodes it (`jpg;png;jpeg;webp`): JPEG, PNG and WebP as
/// they are; a GIF becomes a PNG of the first frame (the same pixels dfndr's views were
/// taken from).
fn image_member(bytes: &[u8]) -> Result<(String, Vec<u8>)> {
    let (format, _, _) = probe(bytes)?;
    let ext = match format {
        ImageFormat::Jpeg => "jpg",
        ImageFormat::Png => "png",
        ImageFormat::WebP => "webp",
        _ => {
            let img = decode_rgb(bytes, u64::MAX)?;
            return Ok(("png".into(), img.encode_png()?));
        }
    };
    Ok((ext.into(), bytes.to_vec()))
}

/// One row in Apple's layout.
fn to_apple_sample(row: &Row, image: &[u8], ctx: &ShardContext) -> Result<AppleSample> {
    let (image_ext, image) = image_member(image)?;
    let mut syn = Map::new();
    for (layout, captions) in ctx.layout.syn.iter().zip(&row.syn) {
        syn.insert(format!("syn_text_{}", layout.tag), json!(captions.texts));
    }
    let views = row
        .paug
        .iter()
        .map(|p| from_stored(p).map(|params| to_apple(&params, ctx.apple)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut arrays = Vec::new();
    if ctx.layout.image_emb && ctx.layout.text_emb {
        arrays.push((
            "image_emb".into(),
            Matrix::from_rows(&row.image_emb, ctx.dim),
        ));
        let with_emb: Vec<_> = ctx
            .layout
            .syn
            .iter()
            .zip(&row.syn)
            .filter(|(l, _)| l.with_emb)
            .collect();
        if let [(_, only)] = with_emb[..] {
            // DataCompDR's layout: the ground truth first, then the synthetic captions.
            let all: Vec<Vec<f32>> = row.text_emb.iter().chain(&only.emb).cloned().collect();
            arrays.push(("text_emb".into(), Matrix::from_rows(&all, ctx.dim)));
        } else {
            // Several captioners: RayGen's layout, one array per captioner.
            arrays.push(("text_emb".into(), Matrix::from_rows(&row.text_emb, ctx.dim)));
            for (layout, captions) in with_emb {
                arrays.push((
                    format!("syn_text_{}_emb", layout.tag),
                    Matrix::from_rows(&captions.emb, ctx.dim),
                ));
            }
        }
    }
    let mut meta = json!({
        "key": row.key,
        "source": row.source,
        "width": row.width,
        "height": row.height,
    });
    if let Some(url) = &row.url {
        meta["url"] = json!(url);
    }
    Ok(AppleSample {
        key: row.key.clone(),
        image_ext,
        image,
        caption: row.caption.clone(),
        meta,
        syn: Value::Object(syn),
        paug: json!({ "param_aug": views }),
        arrays,
    })
}
