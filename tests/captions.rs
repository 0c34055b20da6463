//! The caption stage end to end: `dfndr reinforce` with [[captioners]] and `dfndr caption` on an
//! existing output, checked against the captioner library run directly in the test.

mod common;

use std::path::Path;

use common::*;
use dfndr_augment::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
use dfndr_augment::params::normalize_chw;
use dfndr_augment::resize::{center_crop, resize_shorter, Filter};
use dfndr_captioner::{Captioner, CaptionerConfig};
use dfndr_shards::format::{Row, ShardReader};
use dfndr_teachers::ensemble::{CLIP_MEAN, CLIP_STD};
use dfndr_teachers::{Device, Tensor};

/// A tiny random CoCa at 64 px with three captions per image.
const CAPTIONER: &str = r#"
[[captioners]]
tag = "coca"
weights = "random:5"
num_captions = 3
[captioners.arch]
embed_dim = 32
[captioners.arch.vision]
image_size = 64
patch_size = 16
width = 32
layers = 1
head_width = 16
attentional_pool = true
attn_pooler_heads = 2
attn_pooler_queries = 8
[captioners.arch.text]
width = 32
heads = 2
layers = 1
embed_cls = true
context_length = 76
[captioners.arch.multimodal]
width = 32
heads = 2
layers = 1
[captioners.generation]
seq_len = 12
[caption]
batch_size = 4
"#;

/// A second captioner in the same job: greedy decoding, its own column.
const GREEDY: &str = r#"
[[captioners]]
tag = "greedy"
weights = "random:6"
num_captions = 2
[captioners.arch]
embed_dim = 32
[captioners.arch.vision]
image_size = 32
patch_size = 16
width = 32
layers = 1
head_width = 16
attentional_pool = true
attn_pooler_heads = 2
attn_pooler_queries = 4
[captioners.arch.text]
width = 32
heads = 2
layers = 1
embed_cls = true
context_length = 76
[captioners.arch.multimodal]
width = 32
heads = 2
layers = 1
[captioners.generation]
strategy = "greedy"
seq_len = 8
"#;

const TEACHER: &str = r#"
[[teachers]]
name = "a"
weights = "random:11"
[teachers.arch]
embed_dim = 24
[teachers.arch.vision]
image_size = 64
patch_size = 16
width = 32
layers = 1
head_width = 16
[teachers.arch.text]
width = 32
heads = 2
layers = 1
"#;

const BASE: &str = "seed = 9\nbatch_size = 5\n[augment]\nsize = 64\nnum_augmentations = 1\n";

fn rows_of(path: &Path) -> (ShardReader<std::fs::File>, Vec<Row>) {
    let reader = ShardReader::open_path(path).unwrap();
    let rows = ShardReader::open_path(path)
        .unwrap()
        .rows()
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    (reader, rows)
}

/// What the captioner library writes for one image, preprocessed as OpenCLIP's eval transform.
fn expected_captions(bytes: &[u8], key: &str) -> Vec<String> {
    let full: toml::Value = toml::from_str(CAPTIONER).unwrap();
    let cfg: CaptionerConfig = full["captioners"][0].clone().try_into().unwrap();
    let captioner = Captioner::load(&cfg, &Device::Cpu).unwrap();
    let img = decode_rgb(bytes, DEFAULT_MAX_PIXELS).unwrap();
    let resized = resize_shorter(&img, 64, Filter::Bicubic);
    let chw = normalize_chw(&center_crop(&resized, 64, 64), CLIP_MEAN, CLIP_STD);
    let images = Tensor::from_vec(chw, (1, 3, 64, 64), &Device::Cpu).unwrap();
    captioner.caption(&images, &[key], 9).unwrap().remove(0)
}

#[test]
fn reinforce_writes_seeded_captions_and_their_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let shard = demo_dir().join("demo-00000.tar");
    let config = write_config(
        dir.path(),
        &shard.display().to_string(),
        &out,
        &format!("{BASE}{CAPTIONER}{GREEDY}{TEACHER}"),
    );
    let o = run(&mut reinforce(&config));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("RANDOM captioner weights"));
    let (reader, rows) = rows_of(&out.join("shards/demo-00000.parquet"));
    let layout = reader.layout();
    let tags: Vec<&str> = layout.syn.iter().map(|s| s.tag.as_str()).collect();
    assert_eq!(tags, ["coca", "greedy"]);
    assert!(layout.syn.iter().all(|s| s.with_emb));
    let meta = reader.meta();
    assert_eq!(meta.captioners.len(), 2);
    assert_eq!(
        meta.captioners[1].decoding["generation"]["strategy"],
        "greedy"
    );
    assert_eq!(meta.captioners[0].weights_sha256, "random:5");
    assert_eq!(meta.captioners[0].decoding["generation"]["seq_len"], 12);
    let images: std::collections::BTreeMap<String, Vec<u8>> = tar_members(&shard)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".jpg") || n.ends_with(".png") || n.ends_with(".webp"))
        .map(|(n, b)| (n.split('.').next().unwrap().to_string(), b))
        .collect();
    assert!(rows.len() >= 10);
    for row in &rows {
        let syn = &row.syn[0];
        assert_eq!(syn.texts.len(), 3);
        assert_eq!(syn.emb.len(), 3);
        assert!(syn.texts.iter().all(|t| !t.contains("<start_of_text>")));
        // Greedy decoding: both captions of an image are the same.
        let greedy = &row.syn[1];
        assert_eq!((greedy.texts.len(), greedy.emb.len()), (2, 2));
        assert_eq!(greedy.texts[0], greedy.texts[1]);
    }
    // Batched with other samples in the job, alone here: the same captions.
    for row in rows.iter().take(3) {
        assert_eq!(
            row.syn[0].texts,
            expected_captions(&images[&row.key], &row.key),
            "{}",
            row.key
        );
    }
    assert!(run(dfndr().args(["verify"]).arg(&out)).status.success());
}

#[test]
fn caption_adds_the_same_captions_to_an_existing_output_and_embed_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-{{00000..00001}}.tar", demo_dir().display());
    let plain_out = dir.path().join("plain");
    let plain_dir = dir.path().join("p");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = write_config(&plain_dir, &input, &plain_out, &format!("{BASE}{TEACHER}"));
    assert!(run(&mut reinforce(&plain)).status.success());
    let full_out = dir.path().join("full");
    let full_dir = dir.path().join("f");
    std::fs::create_dir_all(&full_dir).unwrap();
    let full = write_config(
        &full_dir,
        &input,
        &full_out,
        &format!("{BASE}{CAPTIONER}{TEACHER}"),
    );
    assert!(run(&mut reinforce(&full)).status.success());

    let caption = |config: &Path| {
        run(dfndr()
            .args(["caption", "--no-progress", "--config"])
            .arg(config)
            .arg(&plain_out))
    };
    let o = caption(&full);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 shards captioned"), "{}", text(&o));
    for shard in ["demo-00000", "demo-00001"] {
        let (reader, added) = rows_of(&plain_out.join(format!("shards/{shard}.parquet")));
        let (_, reference) = rows_of(&full_out.join(format!("shards/{shard}.parquet")));
        assert_eq!(reader.layout().syn[0].tag, "coca");
        // New captions have no embeddings yet; the other columns are untouched.
        assert!(!reader.layout().syn[0].with_emb);
        assert!(reader.layout().text_emb);
        for (a, b) in added.iter().zip(&reference) {
            assert_eq!(a.key, b.key);
            assert_eq!(a.syn[0].texts, b.syn[0].texts, "{shard} {}", a.key);
            assert_eq!(a.paug, b.paug);
            assert_eq!(a.text_emb, b.text_emb);
        }
    }
    assert!(run(dfndr().args(["verify"]).arg(&plain_out))
        .status
        .success());
    let o = caption(&full);
    assert!(
        text(&o).contains("0 shards captioned, 2 were already up to date"),
        "{}",
        text(&o)
    );
    // `dfndr embed` now embeds the new captions (the ensemble is unchanged otherwise).
    let o = run(dfndr()
        .args(["embed", "--no-progress", "--config"])
        .arg(&full)
        .arg(&plain_out));
    assert!(text(&o).contains("2 shards embedded"), "{}", text(&o));
    let (reader, added) = rows_of(&plain_out.join("shards/demo-00000.parquet"));
    let (_, reference) = rows_of(&full_out.join("shards/demo-00000.parquet"));
    assert!(reader.layout().syn[0].with_emb);
    for (a, b) in added.iter().zip(&reference) {
        for (x, y) in a.syn[0].emb.iter().zip(&b.syn[0].emb) {
            let d = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d <= 2e-3, "{}: {d}", a.key);
        }
    }
}
