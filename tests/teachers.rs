//! The teacher stage end to end: `dfndr reinforce` with [[teachers]], `dfndr embed` on an
//! existing output and `dfndr encode`, checked against the towers run directly in the test.

mod common;

use dfndr_teachers::device::Compute;
use std::path::Path;

use common::*;
use dfndr_augment::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
use dfndr_augment::ops::Op;
use dfndr_augment::params::{normalize_chw, AugConfig, AugParams, CropBox};
use dfndr_augment::resize::{resize, Filter};
use dfndr_shards::format::{Row, ShardReader};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::weights::WeightSource;
use dfndr_teachers::{l2_normalize, ClipConfig, ClipModel, Device, Tensor};

/// Views at 64 px keep the test fast; f32 storage makes the comparison exact up to the
/// matmul's summation order.
const AUG_AND_EMBED: &str = "[augment]\nsize = 64\n[embed]\ndtype = \"f32\"\nbatch_size = 5\n";

fn arch(name: &str) -> ClipConfig {
    let full: toml::Value = toml::from_str(TINY_TEACHERS).unwrap();
    let t = full["teachers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str() == Some(name))
        .unwrap();
    t["arch"].clone().try_into().unwrap()
}

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

fn params(p: &dfndr_shards::format::Paug) -> AugParams {
    AugParams {
        crop: CropBox {
            top: p.crop[0],
            left: p.crop[1],
            height: p.crop[2],
            width: p.crop[3],
        },
        flip: p.flip,
        ops: p
            .ops
            .iter()
            .map(|o| (Op::from_index(o.op).unwrap(), o.magnitude))
            .collect(),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// What the teachers say about one row, computed here from scratch.
/// The two teachers of [`TINY_TEACHERS`], built directly.
fn teacher_models() -> Vec<(ClipConfig, ClipModel)> {
    [("a", 11), ("b", 12)]
        .into_iter()
        .map(|(name, seed)| {
            let cfg = arch(name);
            let model = ClipModel::load(
                &cfg,
                &WeightSource::Random(seed),
                &Compute::cpu(),
                Kernels::Fused,
                name,
            )
            .unwrap();
            (cfg, model)
        })
        .collect()
}

fn expected_embeddings(
    teachers: &[(ClipConfig, ClipModel)],
    row: &Row,
    aug: &AugConfig,
    image: &[u8],
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let img = decode_rgb(image, DEFAULT_MAX_PIXELS).unwrap();
    let mut views = vec![Vec::new(); row.paug.len()];
    let mut text = Vec::new();
    for (cfg, model) in teachers {
        let size = cfg.vision.image_size as u32;
        for (k, p) in row.paug.iter().enumerate() {
            let mut view = aug.replay(&img, &params(p), aug.size);
            if view.width != size {
                view = resize(&view, size, size, Filter::Bicubic);
            }
            let x = normalize_chw(
                &view,
                dfndr_teachers::ensemble::CLIP_MEAN,
                dfndr_teachers::ensemble::CLIP_STD,
            );
            let x =
                Tensor::from_vec(x, (1, 3, size as usize, size as usize), &Device::Cpu).unwrap();
            let e = l2_normalize(&model.encode_image(&x).unwrap()).unwrap();
            views[k].extend(e.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let ids = Tokenizer::global().tokenize_batch(&[row.caption.as_str()], 77);
        let e = l2_normalize(&model.encode_text(&ids).unwrap()).unwrap();
        text.extend(e.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    (views, text)
}

#[test]
fn reinforce_stores_the_teachers_embeddings_of_every_view_and_caption() {
    let DemoRun {
        dir: _dir,
        out,
        shard,
        output: o,
    } = reinforce_demo_shard(&format!("{AUG_AND_EMBED}{TINY_TEACHERS}"));
    assert!(o.status.success());
    assert!(
        text(&o).contains("RANDOM teacher weights"),
        "random weights must be announced"
    );

    let (reader, rows) = rows_of(&out.join("shards/demo-00000.parquet"));
    let meta = reader.meta();
    let names: Vec<(&str, usize, f32, &str)> = meta
        .teachers
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dim,
                t.logit_scale,
                t.weights_sha256.as_str(),
            )
        })
        .collect();
    // Teacher b has no logit_scale: exp of the (random) checkpoint's ln(1/0.07).
    assert_eq!(names[0], ("a", 24, 70.0, "random:11"));
    assert_eq!((names[1].0, names[1].1, names[1].3), ("b", 16, "random:12"));
    assert!((names[1].2 - 1.0 / 0.07).abs() < 1e-3, "{}", names[1].2);
    let layout = reader.layout();
    assert!(layout.image_emb && layout.text_emb);
    assert_eq!(layout.emb.unwrap().dim, 40);

    let aug: AugConfig = serde_json::from_value(meta.augmentation.clone()).unwrap();
    let images = images_by_key(&shard);
    assert!(rows.len() >= 10);
    let teachers = teacher_models();
    for row in rows.iter().take(4) {
        let (views, caption) = expected_embeddings(&teachers, row, &aug, &images[&row.key]);
        assert_eq!(row.image_emb.len(), 2);
        for (k, (got, want)) in row.image_emb.iter().zip(&views).enumerate() {
            let d = max_diff(got, want);
            assert!(d <= 2e-5, "{} view {k}: max |diff| {d:e}", row.key);
        }
        let d = max_diff(&row.text_emb[0], &caption);
        assert!(d <= 2e-5, "{} caption: max |diff| {d:e}", row.key);
    }
    let o = run(dfndr().args(["verify"]).arg(&out));
    assert!(o.status.success());
}

#[test]
fn reinforce_in_bf16_stores_embeddings_within_bf16_rounding_of_float32() {
    // The GPU default precision, forced on the CPU: same layout, embeddings close to the
    // float32 ones (and not equal to them, so bf16 really ran).
    let DemoRun {
        dir: _dir,
        out,
        shard,
        output: o,
    } = reinforce_demo_shard(&format!(
        "{AUG_AND_EMBED}precision = \"bf16\"\n{TINY_TEACHERS}"
    ));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cpu bf16"), "the log names the precision");
    let (reader, rows) = rows_of(&out.join("shards/demo-00000.parquet"));
    let aug: AugConfig = serde_json::from_value(reader.meta().augmentation.clone()).unwrap();
    let images = images_by_key(&shard);
    let teachers = teacher_models();
    let cosine = |a: &[f32], b: &[f32]| -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    let (mut worst, mut largest_diff) = (1f64, 0f32);
    for row in rows.iter().take(4) {
        let (views, caption) = expected_embeddings(&teachers, row, &aug, &images[&row.key]);
        let pairs = row
            .image_emb
            .iter()
            .zip(&views)
            .chain([(&row.text_emb[0], &caption)]);
        for (got, want) in pairs {
            // Per teacher: the row is teacher a's 24 values, then teacher b's 16.
            for (g, w) in [(&got[..24], &want[..24]), (&got[24..], &want[24..])] {
                worst = worst.min(cosine(g, w));
                largest_diff = largest_diff.max(max_diff(g, w));
            }
        }
    }
    println!("bf16 vs float32 embeddings: min cosine {worst:.6}, max |diff| {largest_diff:e}");
    assert!(worst > 0.999, "{worst}");
    assert!(
        largest_diff > 1e-5,
        "bf16 gave float32's embeddings exactly"
    );
}

#[test]
fn embed_adds_the_same_embeddings_to_an_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = format!("{}/demo-{{00000..00001}}.tar", demo_dir().display());
    // An output written without teachers...
    let plain_out = dir.path().join("plain");
    let plain_dir = dir.path().join("p");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = write_config(&plain_dir, &input, &plain_out, AUG_AND_EMBED);
    assert!(run(&mut reinforce(&plain)).status.success());
    let (_, before) = rows_of(&plain_out.join("shards/demo-00001.parquet"));
    assert!(before.iter().all(|r| r.image_emb.is_empty()));
    // ... and one written with them, for reference.
    let full_out = dir.path().join("full");
    let full_dir = dir.path().join("f");
    std::fs::create_dir_all(&full_dir).unwrap();
    let full = write_config(
        &full_dir,
        &input,
        &full_out,
        &format!("{AUG_AND_EMBED}{TINY_TEACHERS}"),
    );
    assert!(run(&mut reinforce(&full)).status.success());

    let o = run(dfndr()
        .args(["embed", "--no-progress", "--config"])
        .arg(&full)
        .arg(&plain_out));
    assert!(o.status.success());
    assert!(
        text(&o).contains("2 of 2 shards embedded (2 by this worker, 0 already embedded)"),
        "{}",
        text(&o)
    );
    for shard in ["demo-00000", "demo-00001"] {
        let (reader, added) = rows_of(&plain_out.join(format!("shards/{shard}.parquet")));
        let (reference_reader, reference) =
            rows_of(&full_out.join(format!("shards/{shard}.parquet")));
        assert_eq!(reader.meta().teachers, reference_reader.meta().teachers);
        assert_eq!(added.len(), reference.len());
        for (a, b) in added.iter().zip(&reference) {
            assert_eq!((&a.key, &a.paug), (&b.key, &b.paug));
            for (x, y) in a
                .image_emb
                .iter()
                .chain(&a.text_emb)
                .zip(b.image_emb.iter().chain(&b.text_emb))
            {
                assert!(max_diff(x, y) <= 2e-5, "{shard} {}", a.key);
            }
        }
    }
    // Done records describe the rewritten files, and a rerun has nothing to do.
    assert!(run(dfndr().args(["verify"]).arg(&plain_out))
        .status
        .success());
    let o = run(dfndr()
        .args(["embed", "--no-progress", "--config"])
        .arg(&full)
        .arg(&plain_out));
    assert!(o.status.success());
    assert!(
        text(&o).contains("2 of 2 shards embedded (0 by this worker, 2 already embedded)"),
        "{}",
        text(&o)
    );
}

#[test]
fn encode_prints_json_or_npy_and_explains_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let arch_file = dir.path().join("a.toml");
    let full: toml::Value = toml::from_str(TINY_TEACHERS).unwrap();
    std::fs::write(
        &arch_file,
        toml::to_string(&full["teachers"][0]["arch"]).unwrap(),
    )
    .unwrap();
    let image = dir.path().join("x.jpg");
    std::fs::write(
        &image,
        &tar_members(&demo_dir().join("demo-00000.tar"))[0].1,
    )
    .unwrap();

    let o = run(dfndr()
        .args(["encode", "--model"])
        .arg(&arch_file)
        .args([
            "--weights",
            "random:11",
            "--text",
            "a photo of a cat",
            "--text",
            "a dog",
            "--image",
        ])
        .arg(&image));
    assert!(o.status.success());
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["dim"], 24);
    assert_eq!(json["texts"].as_array().unwrap().len(), 2);
    let emb: Vec<f32> = serde_json::from_value(json["images"][0]["embedding"].clone()).unwrap();
    assert!((emb.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
    // The same model in the reinforce stage gives the same text embedding.
    let cfg = arch("a");
    let model = ClipModel::load(
        &cfg,
        &WeightSource::Random(11),
        &Compute::cpu(),
        Kernels::Fused,
        "a",
    )
    .unwrap();
    let ids = Tokenizer::global().tokenize_batch(&["a photo of a cat"], 77);
    let want = l2_normalize(&model.encode_text(&ids).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got: Vec<f32> = serde_json::from_value(json["texts"][0]["embedding"].clone()).unwrap();
    assert!(max_diff(&got, &want) <= 1e-6);

    let npy = dir.path().join("e.npy");
    let o = run(dfndr()
        .args(["encode", "--model"])
        .arg(&arch_file)
        .args([
            "--weights",
            "random:11",
            "--no-normalize",
            "--text",
            "a photo of a cat",
            "--out",
        ])
        .arg(&npy));
    assert!(o.status.success());
    let bytes = std::fs::read(&npy).unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY\x01\x00"));
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    assert!(String::from_utf8_lossy(&bytes[10..10 + header_len]).contains("'shape': (1, 24)"));
    let raw: Vec<f32> = bytes[10 + header_len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "--no-normalize must keep the raw norm"
    );
    assert!(max_diff(&raw.iter().map(|v| v / norm).collect::<Vec<_>>(), &want) <= 1e-5);

    for (args, want) in [
        (
            vec!["--model", "ViT-B-32", "--weights", "random:1"],
            "nothing to encode",
        ),
        (
            vec!["--model", "ViT-Q-9", "--weights", "random:1", "--text", "x"],
            "unknown architecture",
        ),
        (
            vec![
                "--model",
                "ViT-B-32",
                "--weights",
                "/nonexistent/w.safetensors",
                "--text",
                "x",
            ],
            "/nonexistent/w.safetensors",
        ),
        (
            vec![
                "--model",
                "ViT-B-32",
                "--weights",
                "hf-hub:nobody/nothing",
                "--text",
                "x",
            ],
            "huggingface-cli download nobody/nothing",
        ),
        (
            vec![
                "--model",
                "ViT-B-32",
                "--weights",
                "s3://bucket/w.bin",
                "--text",
                "x",
            ],
            "only local paths",
        ),
        (
            vec![
                "--model",
                "ViT-B-32",
                "--weights",
                "random:1",
                "--mean",
                "0,0",
                "--text",
                "x",
            ],
            "mean",
        ),
    ] {
        let o = run(dfndr()
            .arg("encode")
            .args(&args)
            .env("HF_HUB_CACHE", dir.path()));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
    // A real checkpoint of another architecture: every mismatch is listed.
    let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/teachers/clip_quickgelu.safetensors");
    let o = run(dfndr()
        .args(["encode", "--model", "ViT-B-32", "--text", "x", "--weights"])
        .arg(&weights));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("with the wrong shape") && text(&o).contains("visual.conv1.weight"),
        "{}",
        text(&o)
    );
}
