//! Augmentation parameters against goldens from torchvision and Apple's RayGen transforms
//! (`tests/fixtures/augment_params_goldens.py`): the crop sampler has torchvision's
//! distribution, RandAugment draws ops and signs uniformly with torchvision's magnitudes, and
//! Apple's `paug.json` form round-trips exactly.

use std::path::PathBuf;

use dfndr_augment::ops::Op;
use dfndr_augment::params::{from_apple, sample_crop, to_apple, AppleLayout, AugConfig};
use dfndr_augment::rng::AugRng;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/augment_params")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Checks that `ours` has the distribution whose quantiles torchvision recorded: at each
/// reference quantile q_p, the share of our draws below q_p must be at most p + tol and the
/// share at or below it at least p - tol (ties make the distributions partly discrete).
/// With 10,000 draws on each side, tol = 0.03 is above the two-sample KS critical value at
/// the 0.1% level (0.028).
fn assert_same_distribution(name: &str, ours: &mut [f64], quantiles: &[f64], reference: &[f64]) {
    ours.sort_by(f64::total_cmp);
    let n = ours.len() as f64;
    let tol = 0.03;
    let mut worst: f64 = 0.0;
    for (&p, &q) in quantiles.iter().zip(reference) {
        if !(0.02..=0.98).contains(&p) {
            continue;
        }
        let below = ours.partition_point(|&x| x < q - 1e-12) as f64 / n;
        let at_or_below = ours.partition_point(|&x| x <= q + 1e-12) as f64 / n;
        let miss = (below - p).max(p - at_or_below).max(0.0);
        worst = worst.max(miss);
        assert!(
            below <= p + tol && at_or_below >= p - tol,
            "{name}: at torchvision's {p:.2} quantile {q:.5} ours has {below:.4}..{at_or_below:.4}"
        );
    }
    eprintln!("{name}: largest CDF gap to torchvision {worst:.4}");
}

#[test]
fn crop_sampler_has_torchvisions_distribution() {
    let stats = fixture("rrc_stats.json");
    let scale = floats(&stats["scale"]);
    let ratio = floats(&stats["ratio"]);
    let scale = [scale[0] as f32, scale[1] as f32];
    let ratio = [ratio[0] as f32, ratio[1] as f32];
    for case in stats["cases"].as_array().unwrap() {
        let w = case["width"].as_u64().unwrap() as u32;
        let h = case["height"].as_u64().unwrap() as u32;
        let draws = case["draws"].as_u64().unwrap() as u32;
        let quantiles = floats(&case["quantiles"]);
        let (mut area, mut aspect, mut top, mut left) = (vec![], vec![], vec![], vec![]);
        let mut fallback = 0u32;
        for d in 0..draws {
            let mut rng = AugRng::for_view(0, &format!("rrc-{w}x{h}"), d);
            let c = sample_crop(&mut rng, w, h, scale, ratio);
            assert!(
                c.top >= 0
                    && c.left >= 0
                    && c.top + c.height <= h as i32
                    && c.left + c.width <= w as i32
            );
            let (ch, cw) = (f64::from(c.height), f64::from(c.width));
            area.push(ch * cw / (f64::from(w) * f64::from(h)));
            aspect.push((cw / ch).ln());
            top.push(if h as i32 > c.height {
                f64::from(c.top) / f64::from(h as i32 - c.height)
            } else {
                0.5
            });
            left.push(if w as i32 > c.width {
                f64::from(c.left) / f64::from(w as i32 - c.width)
            } else {
                0.5
            });
            // torchvision's fallback box is the centred crop at the nearest allowed ratio
            let mut fb_rng = AugRng::for_view(0, "unused", 0);
            let fb = sample_crop(&mut fb_rng, w, h, [2.0, 2.0], ratio);
            if c == fb {
                fallback += 1;
            }
        }
        let label = format!("{w}x{h}");
        assert_same_distribution(
            &format!("{label} area"),
            &mut area,
            &quantiles,
            &floats(&case["area"]),
        );
        assert_same_distribution(
            &format!("{label} log aspect"),
            &mut aspect,
            &quantiles,
            &floats(&case["log_aspect"]),
        );
        assert_same_distribution(
            &format!("{label} top"),
            &mut top,
            &quantiles,
            &floats(&case["rel_top"]),
        );
        assert_same_distribution(
            &format!("{label} left"),
            &mut left,
            &quantiles,
            &floats(&case["rel_left"]),
        );
        let ours = f64::from(fallback) / f64::from(draws);
        let theirs = case["fallback_rate"].as_f64().unwrap();
        // binomial standard error of the difference of two rates, 5 sigma
        let se = ((theirs * (1.0 - theirs) * 2.0) / f64::from(draws))
            .sqrt()
            .max(1e-4);
        assert!(
            (ours - theirs).abs() <= 5.0 * se + 1e-3,
            "{label}: fallback rate {ours:.4} vs torchvision {theirs:.4}"
        );
        eprintln!("{label}: fallback rate {ours:.4} (torchvision {theirs:.4})");
    }
}

#[test]
fn magnitude_bins_are_torchvisions() {
    let ra = fixture("randaugment.json");
    for size in ra["magnitude_bins"].as_array().unwrap() {
        let w = size["width"].as_u64().unwrap() as u32;
        let h = size["height"].as_u64().unwrap() as u32;
        let ops = size["ops"].as_array().unwrap();
        assert_eq!(ops.len(), Op::ALL.len());
        for (i, entry) in ops.iter().enumerate() {
            let op = Op::ALL[i];
            assert_eq!(op.name(), entry["name"].as_str().unwrap(), "op order");
            let (bins, signed) = op.magnitude_bins(31, w, h);
            assert_eq!(
                signed,
                entry["signed"].as_bool().unwrap(),
                "{} signed",
                op.name()
            );
            let expected: Vec<f32> = floats(&entry["bins"])
                .into_iter()
                .map(|v| v as f32)
                .collect();
            if expected.is_empty() {
                assert!(bins.iter().all(|&b| b == 0.0), "{}: {bins:?}", op.name());
            } else {
                assert_eq!(bins, expected, "{} at {w}x{h}", op.name());
            }
        }
    }
}

#[test]
fn rand_augment_draws_ops_and_signs_uniformly() {
    let ra = fixture("randaugment.json");
    let torch_counts: Vec<f64> = floats(&ra["op_counts"]);
    let drawn: f64 = torch_counts.iter().sum();
    let config = AugConfig::default();
    let mut counts = [0f64; 14];
    let mut negative = [0f64; 14];
    let views = (drawn / 2.0) as u32;
    for v in 0..views {
        for (op, m) in config.sample(5, "ops", v, 300, 200).ops {
            counts[op.index() as usize] += 1.0;
            if m < 0.0 {
                negative[op.index() as usize] += 1.0;
            }
        }
    }
    let expected = drawn / 14.0;
    let sigma = (drawn * (1.0 / 14.0) * (13.0 / 14.0)).sqrt();
    for i in 0..14 {
        // both ours and torchvision's counts are within 5 sigma of uniform
        assert!(
            (counts[i] - expected).abs() < 5.0 * sigma,
            "op {i}: {} vs {expected}",
            counts[i]
        );
        assert!(
            (torch_counts[i] - expected).abs() < 5.0 * sigma,
            "torch op {i}"
        );
        let (_, signed) = Op::ALL[i].magnitude_bins(31, 224, 224);
        if signed {
            let share = negative[i] / counts[i];
            assert!((share - 0.5).abs() < 0.07, "op {i}: negative share {share}");
        } else {
            assert_eq!(negative[i], 0.0, "op {i} is unsigned");
        }
    }
}

#[test]
fn apple_paug_json_round_trips_exactly() {
    let examples = fixture("apple_paug.json");
    let mut views = 0;
    let mut skipped = 0;
    for ex in examples["examples"].as_array().unwrap() {
        let layout = AppleLayout {
            flip: ex["layout"]["flip"].as_bool().unwrap(),
            rand_augment: ex["layout"]["rand_augment"].as_bool().unwrap(),
        };
        let (w, h) = (
            ex["width"].as_i64().unwrap() as i32,
            ex["height"].as_i64().unwrap() as i32,
        );
        let doc: Value = serde_json::from_str(ex["paug_json"].as_str().unwrap()).unwrap();
        for view in doc["param_aug"].as_array().unwrap() {
            let params = from_apple(view, layout).unwrap();
            let c = params.crop;
            assert!(
                c.top >= 0 && c.left >= 0 && c.top + c.height <= h && c.left + c.width <= w,
                "{view}"
            );
            // What Apple's transforms store passes the checks made on import (224 px views).
            assert_eq!(params.validate(w as u32, h as u32, 224), Ok(()), "{view}");
            if params.ops.is_empty() {
                skipped += 1;
            }
            assert_eq!(&to_apple(&params, layout), view, "{}", ex["key"]);
            views += 1;
        }
    }
    assert_eq!(views, 3 * 25 * 2);
    assert!(
        skipped > 0,
        "the p=0.5 examples must contain skipped RandAugments"
    );
}
