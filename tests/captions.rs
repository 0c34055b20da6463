//! The caption stage end to end: `dfndr reinforce` with [[captioners]] and `dfndr caption` on an
//! existing output, checked against the captioner library run directly in the test.

mod common;

use dfndr_teachers::device::Compute;
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
    let captioner = Captioner::load(&cfg, &Compute::cpu()).unwrap();
    let img = decode_rgb(bytes, DEFAULT_MAX_PIXELS).unwrap();
    let resized = resize_shorter(&img, 64, Filter::Bicubic);
    let chw = normalize_chw(&center_crop(&resized, 64, 64), CLIP_MEAN, CLIP_STD);
    let images = Tensor::from_vec(chw, (1, 3, 64, 64), &Device::Cpu).unwrap();
    captioner.caption(&images, &[key], 9).unwrap().remove(0)
}

#[test]
fn reinforce_writes_seeded_captions_and_their_embeddings() {
    let DemoRun {
        dir: _dir,
        out,
        shard,
        output: o,
    } = reinforce_demo_shard(&format!("{BASE}{CAPTIONER}{GREEDY}{TEACHER}"));
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
    let images = images_by_key(&shard);
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
    assert!(
        text(&o).contains("2 of 2 shards captioned (2 by this worker, 0 already captioned)"),
        "{}",
        text(&o)
    );
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
            // The ground-truth caption was embedded in other text batches (with synthetic
            // captions in `full`): equal within dfndr's cross-batch promise.
            assert_eq!(a.text_emb.len(), b.text_emb.len());
            for (x, y) in a.text_emb.iter().zip(&b.text_emb) {
                assert!(
                    within_one_f16_step(x, y),
                    "{shard} {}: {x:?} vs {y:?}",
                    a.key
                );
            }
        }
    }
    assert!(run(dfndr().args(["verify"]).arg(&plain_out))
        .status
        .success());
    let o = caption(&full);
    assert!(
        text(&o).contains("2 of 2 shards captioned (0 by this worker, 2 already captioned)"),
        "{}",
        text(&o)
    );
    // `dfndr embed` now embeds the new captions (the ensemble is unchanged otherwise).
    let o = run(dfndr()
        .args(["embed", "--no-progress", "--config"])
        .arg(&full)
        .arg(&plain_out));
    assert!(
        text(&o).contains("2 of 2 shards embedded (2 by this worker, 0 already embedded)"),
        "{}",
        text(&o)
    );
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

/// A key and its members as (extension, bytes), in archive order.
type KeyGroup = (String, Vec<(String, Vec<u8>)>);

/// Members of a tar grouped by key.
fn tar_groups(path: &Path) -> Vec<KeyGroup> {
    let mut groups: Vec<KeyGroup> = Vec::new();
    for (name, data) in tar_members(path) {
        let (key, ext) = name.split_once('.').unwrap();
        if groups.last().is_none_or(|(k, _)| k != key) {
            groups.push((key.to_string(), Vec::new()));
        }
        groups.last_mut().unwrap().1.push((ext.to_string(), data));
    }
    groups
}

#[test]
fn export_wds_writes_apples_layout_for_the_training_patch() {
    let tmp = tempfile::tempdir().unwrap();
    // Samples with a JPEG, a PNG, a WebP and a GIF image.
    let images = demo_images();
    let pick = |ext: &str| images.iter().find(|(e, _)| e == ext).unwrap().1.clone();
    let gif = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/decode/synthetic/gif_p.gif"),
    )
    .unwrap();
    let sources = [
        ("jpg", pick("jpg")),
        ("png", pick("png")),
        ("webp", pick("webp")),
        ("gif", gif),
    ];
    let mut members = Vec::new();
    for (i, (ext, data)) in sources.iter().enumerate() {
        members.push((format!("s{i}.{ext}"), data.clone()));
        members.push((format!("s{i}.txt"), format!("caption {i}").into_bytes()));
        members.push((
            format!("s{i}.json"),
            format!("{{\"url\": \"https://example.com/{i}\"}}").into_bytes(),
        ));
    }
    let input = tmp.path().join("mixed.tar");
    std::fs::write(&input, build_tar(&members)).unwrap();
    let out = tmp.path().join("out");
    for captioners in [1, 2] {
        let out = out.with_extension(captioners.to_string());
        let extra = if captioners == 1 {
            format!("{BASE}{TEACHER}{CAPTIONER}")
        } else {
            format!("{BASE}{TEACHER}{CAPTIONER}{GREEDY}")
        };
        let config = write_config(tmp.path(), &input.display().to_string(), &out, &extra);
        let res = run(&mut reinforce(&config));
        assert!(res.status.success(), "{}", text(&res));
        let dest = tmp.path().join(format!("apple-{captioners}"));
        let res = run(dfndr()
            .args(["export-wds", "--no-progress"])
            .arg(&out)
            .arg(&dest));
        assert!(res.status.success(), "{}", text(&res));
        assert!(text(&res).contains("exported 4 samples"), "{}", text(&res));

        let (reader, rows) = rows_of(&out.join("shards/mixed.parquet"));
        let dim: usize = reader.meta().teachers.iter().map(|t| t.dim).sum();
        let groups = tar_groups(&dest.join("mixed.tar"));
        assert_eq!(groups.len(), rows.len());
        for ((key, group), (row, (ext, original))) in groups.iter().zip(rows.iter().zip(&sources)) {
            assert_eq!(key, &row.key);
            let exts: Vec<&str> = group.iter().map(|(e, _)| e.as_str()).collect();
            let image_ext = if *ext == "gif" { "png" } else { ext };
            assert_eq!(
                exts,
                [image_ext, "txt", "syn.json", "paug.json", "npz", "json"]
            );
            let member = |e: &str| &group.iter().find(|(x, _)| x == e).unwrap().1;
            if *ext == "gif" {
                // The first frame as PNG: the same pixels.
                let a = dfndr_augment::decode::decode_rgb(member("png"), u64::MAX).unwrap();
                let b = dfndr_augment::decode::decode_rgb(original, u64::MAX).unwrap();
                assert_eq!(a, b);
            } else {
                assert_eq!(member(image_ext), original, "{key}: image bytes");
            }
            assert_eq!(member("txt"), row.caption.as_bytes());
            let syn: serde_json::Value = serde_json::from_slice(member("syn.json")).unwrap();
            assert_eq!(syn.as_object().unwrap().len(), captioners);
            for (layout, s) in reader.layout().syn.iter().zip(&row.syn) {
                assert_eq!(
                    syn[format!("syn_text_{}", layout.tag)],
                    serde_json::json!(s.texts)
                );
            }
            let paug: serde_json::Value = serde_json::from_slice(member("paug.json")).unwrap();
            let views = paug["param_aug"].as_array().unwrap();
            assert_eq!(views.len(), row.paug.len());
            for (view, p) in views.iter().zip(&row.paug) {
                assert_eq!(view[0], serde_json::json!(p.crop));
                let ops: Vec<(u64, f64)> = view[1]
                    .as_array()
                    .map(|ops| {
                        ops.iter()
                            .map(|o| (o[0].as_u64().unwrap(), o[1].as_f64().unwrap()))
                            .collect()
                    })
                    .unwrap_or_default();
                let want: Vec<(u64, f64)> = p
                    .ops
                    .iter()
                    .map(|o| (u64::from(o.op), f64::from(o.magnitude)))
                    .collect();
                assert_eq!(ops, want);
            }
            let arrays = dfndr_shards::apple::npz_decode(member("npz")).unwrap();
            let array = |name: &str| {
                let (_, m) = arrays.iter().find(|(n, _)| n == name).unwrap();
                assert_eq!(m.cols, dim);
                m.to_rows()
            };
            assert_eq!(array("image_emb"), row.image_emb);
            if captioners == 1 {
                let want: Vec<Vec<f32>> = row
                    .text_emb
                    .iter()
                    .chain(&row.syn[0].emb)
                    .cloned()
                    .collect();
                assert_eq!(array("text_emb"), want);
                assert_eq!(arrays.len(), 2);
            } else {
                assert_eq!(array("text_emb"), row.text_emb);
                assert_eq!(array("syn_text_coca_emb"), row.syn[0].emb);
                assert_eq!(array("syn_text_greedy_emb"), row.syn[1].emb);
            }
            let meta: serde_json::Value = serde_json::from_slice(member("json")).unwrap();
            assert_eq!(meta["url"], serde_json::json!(row.url));
            assert_eq!(meta["width"], row.width);
        }

        // And back: import-wds with the job's config reads the same rows (the source now
        // names the Apple tar; embeddings survive float16 -> float32 -> float16 exactly).
        let imported = tmp.path().join(format!("imported-{captioners}"));
        let import_config = tmp.path().join(format!("import-{captioners}.toml"));
        let with_scale = extra.replace(
            "weights = \"random:11\"",
            "weights = \"random:11\"\nlogit_scale = 50.0",
        );
        std::fs::write(
            &import_config,
            format!(
                "[job]\ninput = [\"{}/*.tar\"]\n{with_scale}",
                dest.display()
            ),
        )
        .unwrap();
        for attempt in 0..2 {
            let res = run(dfndr()
                .args(["import-wds", "--no-progress", "--config"])
                .arg(&import_config)
                .arg("--output")
                .arg(&imported));
            let log = text(&res);
            assert!(res.status.success(), "{log}");
            let want = if attempt == 0 {
                "1 of 1 shards imported (1 by this worker, 0 already imported)"
            } else {
                "1 of 1 shards imported (0 by this worker, 1 already imported)"
            };
            assert!(log.contains(want), "{log}");
        }
        let (_, back) = rows_of(&imported.join("shards/mixed.parquet"));
        assert_eq!(back.len(), rows.len());
        for (b, r) in back.iter().zip(&rows) {
            assert_eq!(b.source, dest.join("mixed.tar").display().to_string());
            let b = Row {
                source: r.source.clone(),
                ..b.clone()
            };
            assert_eq!(&b, r);
        }
        let verify = run(dfndr().arg("verify").arg(&imported));
        assert!(verify.status.success(), "{}", text(&verify));
        assert!(
            text(&verify).contains("1 of 1 done shards verified, 0 failed"),
            "{}",
            text(&verify)
        );

        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dest.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["num_samples"], 1);
        assert_eq!(
            config["reinforce"]["image_augmentation"]["random_resized_crop"]["size"],
            64
        );
        assert_eq!(
            config["reinforce"]["image_augmentation"]["rand_augment"]["p"],
            1.0
        );
    }
}

/// `dfndr caption` and `dfndr embed` run in the worker loop: two workers at once rewrite each
/// shard exactly once, a worker killed at its first claim is taken over, and a row whose
/// original image no longer decodes is dropped and counted instead of failing its shard.
#[test]
fn caption_and_embed_workers_rewrite_each_shard_once_and_count_an_unreadable_original() {
    let dir = tempfile::tempdir().unwrap();
    let input_dir = dir.path().join("in");
    let sources = make_shards(&input_dir, 2, 6);
    let input = format!("{}/shard-*.tar", input_dir.display());
    let out = dir.path().join("out");
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = write_config(&plain_dir, &input, &out, BASE);
    assert!(run(&mut reinforce(&plain)).status.success());
    let full_dir = dir.path().join("full");
    std::fs::create_dir_all(&full_dir).unwrap();
    let full = write_config(
        &full_dir,
        &input,
        &out,
        &format!("{BASE}{CAPTIONER}{TEACHER}"),
    );

    // One image of shard-00001's source no longer decodes.
    let broken_key = "000010002";
    let members: Vec<(String, Vec<u8>)> = tar_members(&sources[1])
        .into_iter()
        .map(|(name, data)| {
            let is_image =
                name.starts_with(broken_key) && !name.ends_with(".txt") && !name.ends_with(".json");
            (
                name,
                if is_image {
                    b"not an image at all".to_vec()
                } else {
                    data
                },
            )
        })
        .collect();
    std::fs::write(&sources[1], build_tar(&members)).unwrap();

    let worker = |command: &str| {
        let mut cmd = dfndr();
        cmd.args([command, "--no-progress", "--config"])
            .arg(&full)
            .arg(&out)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    for (command, verb) in [("caption", "captioned"), ("embed", "embedded")] {
        // A worker killed right after its first claim leaves that claim behind.
        let killed = run(worker(command).env("DFNDR_CRASH_AT", "claimed"));
        assert!(!killed.status.success());
        let children: Vec<_> = (0..2).map(|_| worker(command).spawn().unwrap()).collect();
        let logs: Vec<String> = children
            .into_iter()
            .map(|c| {
                let o = c.wait_with_output().unwrap();
                let log = text(&o);
                eprintln!("--- {command} worker\n{log}");
                assert!(o.status.success(), "{log}");
                log
            })
            .collect();
        let rewrites = logs
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| l.contains(&format!("shard {verb}")))
            .count();
        assert_eq!(rewrites, 2, "each shard {verb} exactly once");
    }
    let records = done_records(&out);
    let broken = &records["shard-00001"];
    assert_eq!(broken["rows"], 5, "{broken}");
    assert_eq!(broken["skipped"]["undecodable_image"], 1, "{broken}");
    assert_eq!(records["shard-00000"]["rows"], 6);
    let (reader, rows) = rows_of(&out.join("shards/shard-00001.parquet"));
    assert!(reader.layout().syn[0].with_emb && reader.layout().text_emb);
    assert_eq!(rows.len(), 5);
    assert!(rows
        .iter()
        .all(|r| r.key != broken_key && r.syn[0].texts.len() == 3));
    assert!(run(dfndr().arg("verify").arg(&out)).status.success());
}
