//! Parity of `resize` and `ops` with torchvision + Pillow, on the goldens written by
//! `tests/fixtures/augment_goldens.py` (see its docstring for what each case is).
//!
//! Every case starts from a PIL-decoded PNG, so decoding is not under test. Each group must be
//! bit-exact; the looser bound the project accepts for pixel ops (99% of values within one
//! level, none beyond 8) is checked first so a regression reports how far off it is. Run with
//! `--nocapture` to see the per-group figures; set `PARITY_DEBUG=1` to also print the first
//! differing values of each inexact case.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dfndr_augment::ops::{apply_op, Op};
use dfndr_augment::resize::{center_crop, hflip, resize_shorter, resized_crop, Filter};
use dfndr_augment::RgbImage;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/augment")
}

fn load_png(name: &str) -> RgbImage {
    let path = fixtures().join(name);
    let img = image::open(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .to_rgb8();
    let (w, h) = img.dimensions();
    RgbImage::from_raw(w, h, img.into_raw()).expect("RGB buffer size")
}

fn filter(name: &str) -> Filter {
    match name {
        "bicubic" => Filter::Bicubic,
        "bilinear" => Filter::Bilinear,
        "nearest" => Filter::Nearest,
        other => panic!("unknown filter {other}"),
    }
}

fn int(p: &Value, key: &str) -> i64 {
    p[key]
        .as_i64()
        .unwrap_or_else(|| panic!("param {key} missing in {p}"))
}

fn op_of(v: &Value) -> (Op, f32) {
    let name = v["name"].as_str().expect("op name");
    let op = Op::from_name(name).unwrap_or_else(|| panic!("unknown op {name}"));
    assert_eq!(
        op.index() as i64,
        int(v, "index"),
        "index of {name} disagrees with torchvision's op order"
    );
    // The manifest holds the f32 magnitude widened to f64, so this is exact.
    let m = v["magnitude"].as_f64().expect("magnitude") as f32;
    (op, m)
}

fn run(case: &Value, input: &RgbImage) -> RgbImage {
    let p = &case["params"];
    match case["op"].as_str().expect("op") {
        "resized_crop" => resized_crop(
            input,
            int(p, "top") as i32,
            int(p, "left") as i32,
            int(p, "height") as u32,
            int(p, "width") as u32,
            int(p, "out_width") as u32,
            int(p, "out_height") as u32,
            filter(p["filter"].as_str().expect("filter")),
        ),
        "resize_shorter_center_crop" => center_crop(
            &resize_shorter(
                input,
                int(p, "size") as u32,
                filter(p["filter"].as_str().expect("filter")),
            ),
            int(p, "crop_height") as u32,
            int(p, "crop_width") as u32,
        ),
        "hflip" => hflip(input),
        "apply_op" => {
            let (op, m) = op_of(p);
            let fill: Vec<u8> = p["fill"]
                .as_array()
                .expect("fill")
                .iter()
                .map(|v| v.as_u64().expect("fill value") as u8)
                .collect();
            apply_op(input, op, m, [fill[0], fill[1], fill[2]])
        }
        "chain" => {
            let size = int(p, "size") as u32;
            let mut img = resized_crop(
                input,
                int(p, "top") as i32,
                int(p, "left") as i32,
                int(p, "height") as u32,
                int(p, "width") as u32,
                size,
                size,
                filter(p["filter"].as_str().expect("filter")),
            );
            for o in p["ops"].as_array().expect("ops") {
                let (op, m) = op_of(o);
                img = apply_op(&img, op, m, [0, 0, 0]);
            }
            img
        }
        other => panic!("unknown operation {other}"),
    }
}

#[derive(Default)]
struct Stats {
    cases: usize,
    values: u64,
    exact: u64,
    within1: u64,
    max_diff: u8,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.cases += other.cases;
        self.values += other.values;
        self.exact += other.exact;
        self.within1 += other.within1;
        self.max_diff = self.max_diff.max(other.max_diff);
    }

    fn share(&self, n: u64) -> f64 {
        if self.values == 0 {
            1.0
        } else {
            n as f64 / self.values as f64
        }
    }
}

fn compare(got: &RgbImage, want: &RgbImage) -> Stats {
    let mut s = Stats {
        cases: 1,
        ..Stats::default()
    };
    for (&a, &b) in got.data.iter().zip(&want.data) {
        let d = a.abs_diff(b);
        s.values += 1;
        s.exact += (d == 0) as u64;
        s.within1 += (d <= 1) as u64;
        s.max_diff = s.max_diff.max(d);
    }
    s
}

#[test]
fn goldens_match_torchvision() {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    let manifest: Value = serde_json::from_str(&text).expect("manifest JSON");
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() > 300, "expected the full golden set");

    let mut inputs: BTreeMap<String, RgbImage> = BTreeMap::new();
    let mut groups: BTreeMap<String, Stats> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in cases {
        let id = case["id"].as_str().expect("id");
        let input_name = case["input"].as_str().expect("input").to_string();
        let input = inputs
            .entry(input_name.clone())
            .or_insert_with(|| load_png(&input_name));
        let got = run(case, input);
        let want = load_png(case["output"].as_str().expect("output"));
        assert_eq!(
            (got.width, got.height),
            (want.width, want.height),
            "{id}: size"
        );
        let s = compare(&got, &want);
        if std::env::var("PARITY_DEBUG").is_ok() && s.exact != s.values {
            let diffs: Vec<String> = got
                .data
                .iter()
                .zip(&want.data)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .take(12)
                .map(|(i, (a, b))| {
                    let px = i / 3;
                    format!(
                        "({},{})c{} {a}/{b}",
                        px % got.width as usize,
                        px / got.width as usize,
                        i % 3
                    )
                })
                .collect();
            println!("{id}: {}", diffs.join(" "));
        }
        if s.share(s.within1) < 0.99 || s.max_diff > 8 {
            failures.push(format!(
                "{id}: {:.4} within 1, max diff {}",
                s.share(s.within1),
                s.max_diff
            ));
        } else if s.exact != s.values {
            failures.push(format!(
                "{id}: not bit-exact ({:.6} exact, max diff {})",
                s.share(s.exact),
                s.max_diff
            ));
        }
        groups
            .entry(case["group"].as_str().expect("group").to_string())
            .or_default()
            .add(&s);
    }

    println!(
        "goldens from {} ({})",
        manifest["generator"].as_str().unwrap_or("?"),
        manifest["versions"]
    );
    println!(
        "{:<28} {:>5} {:>10} {:>10} {:>10} {:>4}",
        "group", "cases", "values", "exact", "within 1", "max"
    );
    let mut total = Stats::default();
    for (name, s) in &groups {
        println!(
            "{:<28} {:>5} {:>10} {:>10.6} {:>10.6} {:>4}",
            name,
            s.cases,
            s.values,
            s.share(s.exact),
            s.share(s.within1),
            s.max_diff
        );
        total.add(s);
    }
    println!(
        "{:<28} {:>5} {:>10} {:>10.6} {:>10.6} {:>4}",
        "all",
        total.cases,
        total.values,
        total.share(total.exact),
        total.share(total.within1),
        total.max_diff
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
