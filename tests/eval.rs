//! `dfndr eval` end to end on clip_benchmark webdatasets (classification and retrieval) and an
//! image folder: the results file's layout, counted skips, and clear errors.

mod common;

use std::path::Path;

use common::{build_tar, demo_images, dfndr, run, text};

const TINY: &str = "../configs/students/tiny.toml";

fn tiny() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(TINY)
        .display()
        .to_string()
}

/// `dfndr eval` of the tiny student with random weights from `seed`.
fn eval_tiny(seed: u64) -> std::process::Command {
    let mut cmd = dfndr();
    cmd.args(["eval", "--no-progress", "--model", &tiny(), "--weights"])
        .arg(format!("random:{seed}"));
    cmd
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A clip_benchmark classification webdataset of 7 usable samples over 3 classes in two
/// shards, plus a sample without `cls`, one with an undecodable image and one without image.
fn wds_classification(root: &Path) {
    let images = demo_images();
    let test = root.join("test");
    std::fs::create_dir_all(&test).unwrap();
    let mut shards = [Vec::new(), Vec::new()];
    for i in 0..7 {
        let (ext, data) = &images[i % images.len()];
        let key = format!("s{i:04}");
        shards[i % 2].push((format!("{key}.{ext}"), data.clone()));
        shards[i % 2].push((format!("{key}.cls"), format!("{}", i % 3).into_bytes()));
    }
    shards[0].push(("nolabel.jpg".into(), images[0].1.clone()));
    shards[1].push(("broken.png".into(), b"not a png".to_vec()));
    shards[1].push(("broken.cls".into(), b"1".to_vec()));
    shards[1].push(("noimage.cls".into(), b"2".to_vec()));
    for (i, members) in shards.iter().enumerate() {
        std::fs::write(test.join(format!("{i}.tar")), build_tar(members)).unwrap();
    }
    std::fs::write(test.join("nshards.txt"), "2\n").unwrap();
    std::fs::write(root.join("classnames.txt"), "cat\ndog\nred car\n").unwrap();
    std::fs::write(
        root.join("zeroshot_classification_templates.txt"),
        "a photo of a {c}.\nitap of a {c}.\n",
    )
    .unwrap();
}

/// A clip_benchmark retrieval webdataset: 5 images with 2 captions each.
fn wds_retrieval(root: &Path) {
    let images = demo_images();
    let test = root.join("test");
    std::fs::create_dir_all(&test).unwrap();
    let mut members = Vec::new();
    for i in 0..5 {
        let (ext, data) = &images[i % images.len()];
        members.push((format!("r{i}.{ext}"), data.clone()));
        members.push((
            format!("r{i}.txt"),
            format!("caption {i} one\ncaption {i} two\n").into_bytes(),
        ));
    }
    std::fs::write(test.join("0.tar"), build_tar(&members)).unwrap();
    std::fs::write(test.join("nshards.txt"), "1").unwrap();
    std::fs::write(root.join("dataset_type.txt"), "retrieval\n").unwrap();
}

#[test]
fn eval_writes_clip_benchmark_result_lines_for_webdatasets_and_counts_skips() {
    let dir = tempfile::tempdir().unwrap();
    let cls = dir.path().join("wds_cls");
    let ret = dir.path().join("wds_flickr");
    wds_classification(&cls);
    wds_retrieval(&ret);
    let results = dir.path().join("out/results.jsonl");
    let o = run(eval_tiny(1)
        .arg("--data")
        .arg(&cls)
        .arg("--data")
        .arg(&ret)
        .args(["--batch-size", "3", "--output"])
        .arg(&results));
    assert!(o.status.success(), "{}", text(&o));
    let got = lines(&results);
    assert_eq!(got.len(), 2);
    let c = &got[0];
    assert_eq!(c["dataset"], "wds_cls");
    assert_eq!(c["task"], "zeroshot_classification");
    assert_eq!(c["model"], tiny());
    assert_eq!(c["pretrained"], "random:1");
    assert_eq!(c["language"], "en");
    assert_eq!(c["samples"], 7);
    // Three classes: no acc5 (clip_benchmark: NaN).
    assert!(c["metrics"]["acc5"].is_null());
    let acc1 = c["metrics"]["acc1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc1));
    assert!(c["metrics"]["mean_per_class_recall"].is_number());
    assert_eq!(c["skipped"]["missing_label"], 1);
    assert_eq!(c["skipped"]["undecodable_image"], 1);
    assert_eq!(c["skipped"]["missing_image"], 1);
    let r = &got[1];
    assert_eq!(r["task"], "zeroshot_retrieval");
    assert_eq!(r["samples"], 5);
    assert_eq!(r["captions"], 10);
    for k in [1, 5, 10] {
        for side in ["image", "text"] {
            let v = r["metrics"][format!("{side}_retrieval_recall@{k}")]
                .as_f64()
                .unwrap();
            assert!((0.0..=1.0).contains(&v));
        }
    }
    // k = 5 and 10 reach every image of five.
    assert_eq!(r["metrics"]["text_retrieval_recall@5"], 1.0);
    let mean = (r["metrics"]["image_retrieval_recall@1"].as_f64().unwrap()
        + r["metrics"]["text_retrieval_recall@1"].as_f64().unwrap())
        / 2.0;
    assert_eq!(r["metrics"]["mean_recall@1"].as_f64().unwrap(), mean);

    // The same model and data give the same numbers (appended, not overwritten).
    let o = run(eval_tiny(1)
        .arg("--data")
        .arg(&cls)
        .arg("--output")
        .arg(&results));
    assert!(o.status.success(), "{}", text(&o));
    let again = lines(&results);
    assert_eq!(again.len(), 3);
    assert_eq!(again[2]["metrics"], got[0]["metrics"]);
}

#[test]
fn eval_reads_image_folders_and_refuses_what_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("pets");
    let images = demo_images();
    for (i, class) in ["a_cat", "b_dog"].iter().enumerate() {
        std::fs::create_dir_all(folder.join(class)).unwrap();
        for j in 0..3 {
            let (ext, data) = &images[(i * 3 + j) % images.len()];
            std::fs::write(folder.join(class).join(format!("{j}.{ext}")), data).unwrap();
        }
    }
    std::fs::write(folder.join("a_cat/notes.txt"), "not an image").unwrap();
    let o = run(eval_tiny(2).arg("--data").arg(&folder));
    assert!(o.status.success(), "{}", text(&o));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(line["dataset"], "pets");
    assert_eq!(line["samples"], 6);
    assert!(text(&o).contains("zeroshot_classification"));

    // A student with a ViT image tower (MobileCLIP2-B's structure, reduced) evaluates too; it
    // has nothing to reparameterise, so `export --reparameterize` refuses it.
    let vit = dir.path().join("tiny-vit.toml");
    std::fs::write(
        &vit,
        "embed_dim = 16\n[vision]\nimage_size = 32\n[vision.vit]\nwidth = 32\ndepth = 1\n\
         heads = 2\nno_embed_class = true\n[vision.vit.conv_stem]\nchannels = [8, 8, 32]\n\
         kernel_sizes = [4, 2, 2]\nstrides = [4, 2, 2]\n[text]\nwidth = 32\nheads = 2\n\
         layers = 1\n",
    )
    .unwrap();
    let o = run(dfndr()
        .args(["eval", "--no-progress", "--model"])
        .arg(&vit)
        .args(["--weights", "random:1", "--data"])
        .arg(&folder));
    assert!(o.status.success(), "{}", text(&o));
    let o = run(dfndr()
        .args(["export", "--reparameterize", "--model"])
        .arg(&vit)
        .args(["--weights", "random:1", "--out"])
        .arg(dir.path().join("vit-export")));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no re-parameterisable layers"),
        "{}",
        text(&o)
    );

    // A folder that is none of the layouts, a missing one, a wrong task, no model.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--data".into(), empty.display().to_string()],
            "no class folders",
        ),
        (
            vec![
                "--data".into(),
                dir.path().join("nope").display().to_string(),
            ],
            "not a folder",
        ),
        (
            vec![
                "--data".into(),
                folder.display().to_string(),
                "--task".into(),
                "zeroshot_retrieval".into(),
            ],
            "not zeroshot_retrieval",
        ),
        (
            vec![
                "--data".into(),
                folder.display().to_string(),
                "--templates".into(),
                dir.path().join("missing.txt").display().to_string(),
            ],
            "missing.txt",
        ),
    ];
    for (args, expect) in cases {
        let o = run(eval_tiny(2).args(&args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(expect), "{args:?}: {}", text(&o));
    }
    let o = run(dfndr().args(["eval", "--data"]).arg(&folder));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--checkpoint"), "{}", text(&o));
    let o = run(dfndr()
        .args(["eval", "--checkpoint"])
        .arg(dir.path())
        .arg("--data")
        .arg(&folder));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not a training checkpoint"),
        "{}",
        text(&o)
    );
}
