//! `dfndr reinforce`, `status`, `verify` and `inspect` on real shards: the demo, and a shard
//! holding every kind of bad sample of SPEC section 2.

mod common;

use std::path::Path;

use common::*;

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header declares `w` x `h` pixels but carries almost no data: a
/// decompression bomb as far as the header is concerned.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

fn status_json(out: &Path) -> serde_json::Value {
    let res = run(dfndr().args(["status", "--json"]).arg(out));
    assert!(res.status.success());
    serde_json::from_slice(&res.stdout).unwrap()
}

#[test]
fn demo_job_writes_verifiable_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo-out");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
    let res = run(dfndr()
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["reinforce", "--no-progress", "--config"])
        .arg(&config)
        .arg("--output")
        .arg(&out));
    assert!(res.status.success(), "{}", text(&res));
    assert!(text(&res).contains("2 of 2 shards done"), "{}", text(&res));

    let status = status_json(&out);
    assert_eq!(status["shards_total"], 2);
    assert_eq!(status["shards_done"], 2);
    assert_eq!(status["rows"], 25);
    assert_eq!(status["shards_failed"], 0);
    assert_eq!(status["shards_pending"], 0);

    let text_status = text(&run(dfndr().arg("status").arg(&out)));
    assert!(
        text_status.contains("2 total: 2 done, 0 in progress, 0 failed, 0 pending"),
        "{text_status}"
    );
    assert!(text_status.contains("25 written"), "{text_status}");

    let verify = run(dfndr().arg("verify").arg(&out));
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("2 of 2 done shards verified, 0 failed"));

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["total_rows"], 25);
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 2);

    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dfndr.json")).unwrap()).unwrap();
    assert_eq!(card["schema_version"], 1);
    assert_eq!(card["config"]["job"]["seed"], 0);

    let inspect = run(dfndr()
        .arg("inspect")
        .arg(out.join("shards/demo-00000.parquet"))
        .args(["--rows", "2"]));
    let t = text(&inspect);
    assert!(inspect.status.success(), "{t}");
    assert!(
        t.contains("DFNDR v1") && t.contains("13 in 1 row group"),
        "{t}"
    );
    assert!(
        t.contains(
            "columns         key, source, url, caption, width, height, paug, image_emb, text_emb, syn_text_coca, syn_text_coca_emb\n"
        ),
        "{t}"
    );
    assert!(
        t.contains("syn_text_coca ["),
        "the demo captioner's captions: {t}"
    );
    assert!(t.contains("paug      2 view(s)"), "{t}");
    assert!(t.contains("[1] key"), "{t}");

    let inspect_tar = run(dfndr()
        .arg("inspect")
        .arg(demo_dir().join("demo-00001.tar")));
    let t = text(&inspect_tar);
    assert!(inspect_tar.status.success());
    assert!(t.contains("samples         12"), "{t}");

    // The file on disk holds exactly the demo captions, urls and sizes in input order.
    let members = tar_members(&demo_dir().join("demo-00000.tar"));
    let first_caption = String::from_utf8(
        members
            .iter()
            .find(|(n, _)| n.ends_with(".txt"))
            .unwrap()
            .1
            .clone(),
    )
    .unwrap();
    let t = text(&run(dfndr()
        .arg("inspect")
        .arg(out.join("shards/demo-00000.parquet"))
        .args(["--rows", "1"])));
    let shown: String = first_caption.trim().chars().take(60).collect();
    assert!(t.contains(&shown), "{t}");
}

#[test]
fn embed_images_stores_the_original_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = make_shards(&tmp.path().join("in"), 1, 3);
    let out = tmp.path().join("out");
    let config = write_config(
        tmp.path(),
        &shards[0].display().to_string(),
        &out,
        "[output]\nembed_images = true",
    );
    let res = run(&mut reinforce(&config));
    assert!(res.status.success());
    let t = text(&run(dfndr()
        .arg("inspect")
        .arg(out.join("shards/shard-00000.parquet"))
        .args(["--rows", "3"])));
    assert!(t.contains(", image"), "{t}");
    let members = tar_members(&shards[0]);
    let first_image = &members[0].1;
    assert!(
        t.contains(&format!("image     {} bytes", first_image.len())),
        "{t}"
    );
}

/// A shard holding every kind of bad sample of SPEC section 2 (with `max_member_bytes =
/// 120000`), between two good samples ("a good sample", "another good sample").
fn bad_samples_tar() -> Vec<u8> {
    let images = demo_images();
    let small = images
        .iter()
        .find(|(e, d)| e == "jpg" && d.len() < 20_000)
        .unwrap()
        .1
        .clone();
    let big = images.iter().find(|(_, d)| d.len() > 120_000).unwrap();
    let m = |name: &str, data: &[u8]| (name.to_string(), data.to_vec());
    let members = vec![
        m("000.jpg", &small),
        m("000.txt", b"a good sample"),
        m("001.jpg", &small), // no caption
        m("002.txt", b"no image"),
        m("003.jpg", b""),
        m("003.txt", b"zero-length image"),
        m("004.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg"),
        m("004.txt", b"undecodable image"),
        m("005.png", &png_declaring(100_000, 100_000)),
        m("005.txt", b"decompression bomb"),
        m("006.jpg", &small),
        m("006.txt", b"caption \xff\xfe not utf-8"),
        m("000.jpg", &small),
        m("000.txt", b"the same key again"),
        (format!("007.{}", big.0), big.1.clone()),
        m("007.txt", b"member above the size limit"),
        m("008.jpg", &small),
        m("008.txt", b"another good sample"),
    ];
    build_tar(&members)
}

/// The skip reasons of [`bad_samples_tar`], one sample each.
const BAD_SAMPLE_REASONS: [&str; 8] = [
    "no_caption",
    "no_image",
    "empty_image",
    "undecodable_image",
    "image_too_large",
    "invalid_caption",
    "duplicate_key",
    "member_too_large",
];

#[test]
fn every_bad_sample_is_a_counted_skip_and_good_ones_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let input_dir = tmp.path().join("in");
    std::fs::create_dir_all(&input_dir).unwrap();
    std::fs::write(input_dir.join("bad.tar"), bad_samples_tar()).unwrap();
    let out = tmp.path().join("out");
    let config = write_config(
        tmp.path(),
        &input_dir.join("bad.tar").display().to_string(),
        &out,
        "[reader]\nmax_member_bytes = 120000",
    );
    let res = run(&mut reinforce(&config));
    assert!(res.status.success(), "{}", text(&res));
    let done = done_records(&out);
    let record = &done["bad"];
    assert_eq!(record["rows"], 2);
    let skipped: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(record["skipped"].clone()).unwrap();
    let expected: std::collections::BTreeMap<String, u64> = BAD_SAMPLE_REASONS
        .iter()
        .map(|r| (r.to_string(), 1))
        .collect();
    assert_eq!(skipped, expected);
    let status = status_json(&out);
    assert_eq!(status["skipped"]["image_too_large"], 1);
    let t = text(&run(dfndr()
        .arg("inspect")
        .arg(out.join("shards/bad.parquet"))
        .args(["--rows", "5"])));
    assert!(
        t.contains("a good sample") && t.contains("another good sample"),
        "{t}"
    );
}

#[test]
fn a_job_over_good_and_bad_shards_completes_and_status_reports_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let input_dir = tmp.path().join("in");
    make_shards(&input_dir, 2, 5); // shard-00000, shard-00001: good
    std::fs::write(input_dir.join("shard-00002.tar"), bad_samples_tar()).unwrap();
    let good = std::fs::read(input_dir.join("shard-00000.tar")).unwrap();
    // A tar cut inside a member's data, one cut inside a header, and a file that is no tar.
    std::fs::write(
        input_dir.join("shard-00003.tar"),
        &good[..good.len() / 2 + 700],
    )
    .unwrap();
    std::fs::write(input_dir.join("shard-00004.tar"), &good[..1100]).unwrap();
    std::fs::write(
        input_dir.join("shard-00005.tar"),
        b"<html>404 not found</html>",
    )
    .unwrap();
    // shard-00006.tar is missing.
    let input = format!("{}/shard-{{00000..00006}}.tar", input_dir.display());
    let out = tmp.path().join("out");
    let config = write_config(
        tmp.path(),
        &input,
        &out,
        "[reader]\nmax_member_bytes = 120000",
    );
    let res = run(&mut reinforce(&config));
    let log = text(&res);
    assert_eq!(res.status.code(), Some(1), "{log}");
    assert!(log.contains("4 shards failed"), "{log}");

    let status = status_json(&out);
    assert_eq!(status["shards_total"], 7);
    assert_eq!(status["shards_done"], 3);
    assert_eq!(status["shards_failed"], 4);
    assert_eq!(status["rows"], 5 + 5 + 2);
    for reason in BAD_SAMPLE_REASONS {
        assert_eq!(status["skipped"][reason], 1, "{reason}: {status}");
    }
    let failed: std::collections::BTreeMap<String, String> = status["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        failed.keys().map(String::as_str).collect::<Vec<_>>(),
        ["shard-00003", "shard-00004", "shard-00005", "shard-00006"]
    );
    for (name, error) in &failed {
        assert!(error.contains(&format!("{name}.tar")), "{name}: {error}");
    }
    let human = text(&run(dfndr().arg("status").arg(&out)));
    assert!(
        human.contains("4 failed") && human.contains("duplicate_key"),
        "{human}"
    );
}

#[test]
fn usage_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = run(dfndr().args(["reinforce", "--config", "/nonexistent/job.toml"]));
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("cannot read config /nonexistent/job.toml"));

    let typo = tmp.path().join("typo.toml");
    std::fs::write(&typo, "[job]\nimput = [\"x.tar\"]\n").unwrap();
    let res = run(dfndr().args(["reinforce", "--config"]).arg(&typo));
    assert_eq!(res.status.code(), Some(2));
    assert!(text(&res).contains("imput"), "{}", text(&res));

    let no_output = tmp.path().join("no-output.toml");
    std::fs::write(&no_output, "[job]\ninput = [\"x.tar\"]\n").unwrap();
    let res = run(dfndr().args(["reinforce", "--config"]).arg(&no_output));
    assert_eq!(res.status.code(), Some(2));
    assert!(text(&res).contains("--output"), "{}", text(&res));

    let res = run(dfndr().arg("status").arg(tmp.path()));
    assert_eq!(res.status.code(), Some(2));
    assert!(text(&res).contains("not a dfndr output"), "{}", text(&res));

    let res = run(dfndr().arg("inspect").arg(&typo));
    assert!(!res.status.success());
    assert!(text(&res).contains("not a tar"), "{}", text(&res));

    let help = run(dfndr().args(["reinforce", "--help"]));
    assert!(text(&help).contains("resumes"), "{}", text(&help));
}

#[test]
fn show_aug_renders_the_stored_views_from_source_or_embedded_image() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = make_shards(&tmp.path().join("in"), 1, 3);
    for embed in [false, true] {
        let out = tmp.path().join(format!("out-{embed}"));
        let config = write_config(
            tmp.path(),
            &shards[0].display().to_string(),
            &out,
            &format!(
                "[output]\nembed_images = {embed}\n[augment]\nnum_augmentations = 3\nsize = 96"
            ),
        );
        let res = run(&mut reinforce(&config));
        assert!(res.status.success(), "{}", text(&res));
        let pngs = tmp.path().join(format!("png-{embed}"));
        let res = run(dfndr()
            .arg("show-aug")
            .arg(out.join("shards/shard-00000.parquet"))
            .args(["--key", "000000001", "--out"])
            .arg(&pngs));
        let t = text(&res);
        assert!(res.status.success(), "{t}");
        assert!(t.contains("view 2: crop ") && t.contains(" at top="), "{t}");
        for k in 0..3 {
            let view = image_size(&pngs.join(format!("view-{k}.png")));
            assert_eq!(view, (96, 96));
        }
        let (w, h) = image_size(&pngs.join("contact.png"));
        assert!(w > 3 * 96 && h > 96, "{w}x{h}");
        assert!(pngs.join("original.png").exists());
    }
    // A key that is not there, and a shard without paug, are clear errors.
    let res = run(dfndr()
        .arg("show-aug")
        .arg(tmp.path().join("out-false/shards/shard-00000.parquet"))
        .args(["--key", "nope"]));
    assert_eq!(res.status.code(), Some(2));
    assert!(text(&res).contains("no row with key"), "{}", text(&res));
    let out = tmp.path().join("out-noaug");
    let config = write_config(
        tmp.path(),
        &shards[0].display().to_string(),
        &out,
        "[augment]\nnum_augmentations = 0",
    );
    assert!(run(&mut reinforce(&config)).status.success());
    let t = text(&run(dfndr()
        .arg("inspect")
        .arg(out.join("shards/shard-00000.parquet"))));
    assert!(
        t.contains("columns         key, source, url, caption, width, height\n"),
        "{t}"
    );
    let res = run(dfndr()
        .arg("show-aug")
        .arg(out.join("shards/shard-00000.parquet"))
        .args(["--key", "000000001"]));
    assert_eq!(res.status.code(), Some(2));
    assert!(text(&res).contains("no paug column"), "{}", text(&res));
}

/// Width and height from a PNG header.
fn image_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}
