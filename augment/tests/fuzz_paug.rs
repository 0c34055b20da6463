//! Bounded fuzzing of the readers of stored augmentation parameters: Apple's `paug.json`
//! ([`from_apple`], [`from_apple_json`]) and [`AugParams::validate`], followed by a replay of
//! whatever passes.
//!
//! Each test runs a fixed number of cases (about 10 s for the binary in a debug build on 2
//! cores; `PROPTEST_CASES=N` runs N per test instead) and requires: no panic, results that
//! keep the readers' promises, and no single allocation above `fuzz_support::MAX_ALLOCATION`
//! for inputs of a few KB. Each prints its case count, time and largest allocation.

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use dfndr_augment::ops::Op;
use dfndr_augment::params::{
    from_apple, from_apple_json, to_apple, AppleLayout, AugConfig, AugParams, CropBox,
    RandAugmentConfig, MAX_NUM_OPS, MAX_SIZE,
};
use dfndr_augment::validate::ParamsError;
use dfndr_augment::RgbImage;
use fuzz_support::{fuzz, CountingAlloc};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn layouts() -> impl Strategy<Value = AppleLayout> {
    (any::<bool>(), any::<bool>())
        .prop_map(|(flip, rand_augment)| AppleLayout { flip, rand_augment })
}

/// Numbers as paug.json may hold them: small, at the edges of i32/i64/u64, fractional, huge.
fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-5i64..600).prop_map(Value::from),
        Just(Value::from(i32::MAX)),
        Just(Value::from(i64::from(i32::MAX) + 1)),
        Just(Value::from(1i64 << 31)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(u64::MAX)),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(json!(1e300)),
        Just(json!(-0.0)),
    ]
}

/// Any JSON value, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        json_number(),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Views shaped like Apple's (`[[i, j, h, w], flip?, [[op, m], ...] | null]`) with edge values
/// in every slot, or now and then any JSON at all.
fn apple_view() -> impl Strategy<Value = Value> {
    let crop = prop_oneof![
        9 => prop::collection::vec(json_number(), 4).prop_map(Value::from),
        1 => json_value(),
    ];
    let op = prop_oneof![
        8 => (prop_oneof![0u64..14, 14u64..300, Just(u64::MAX)], json_number())
            .prop_map(|(op, m)| json!([op, m])),
        1 => json_value(),
    ];
    let ops = prop_oneof![
        1 => Just(Value::Null),
        8 => prop::collection::vec(op, 0..20).prop_map(Value::from),
        1 => json_value(),
    ];
    let flip = prop_oneof![any::<bool>().prop_map(Value::from), json_value()];
    prop_oneof![
        9 => (crop, prop::option::of(flip), prop::option::of(ops)).prop_map(|(c, f, o)| {
            let mut parts = vec![c];
            parts.extend(f);
            parts.extend(o);
            Value::from(parts)
        }),
        1 => json_value(),
    ]
}

/// The promises of `from_apple`: i32 crop values (by type), at most MAX_NUM_OPS ops, every
/// magnitude finite and inside its op's range at the largest size.
fn check_parsed(p: &AugParams) -> Result<(), TestCaseError> {
    prop_assert!(p.ops.len() <= MAX_NUM_OPS);
    for (op, m) in &p.ops {
        let (min, max) = op.magnitude_range(MAX_SIZE);
        prop_assert!(m.is_finite() && (min..=max).contains(m), "{:?} {}", op, m);
    }
    Ok(())
}

/// Parameters that passed validation and were replayed, over the whole binary.
static REPLAYED: AtomicUsize = AtomicUsize::new(0);

/// Prints how many inputs were valid and replayed (tests run in parallel, so this is the
/// binary's total so far).
fn report_replays(name: &str) {
    eprintln!(
        "fuzz {name}: {} valid parameter sets replayed so far in this binary",
        REPLAYED.load(Ordering::Relaxed)
    );
}

/// Validates `p` against a `w` x `h` image and, when valid, replays it there.
fn validate_and_replay(p: &AugParams, w: u32, h: u32, size: u32) -> Result<(), TestCaseError> {
    match p.validate(w, h, size) {
        Ok(()) => {
            REPLAYED.fetch_add(1, Ordering::Relaxed);
            let c = p.crop;
            prop_assert!(c.top >= 0 && c.left >= 0 && c.height > 0 && c.width > 0);
            prop_assert!(i64::from(c.top) + i64::from(c.height) <= i64::from(h));
            prop_assert!(i64::from(c.left) + i64::from(c.width) <= i64::from(w));
            let img = RgbImage::filled(w, h, [10, 120, 230]);
            let out = AugConfig::default().replay(&img, p, 16);
            prop_assert_eq!((out.width, out.height), (16, 16));
        }
        Err(e) => {
            // Messages name the field.
            let m = e.to_string();
            prop_assert!(
                m.starts_with("crop (") || m.starts_with("ops") || m.starts_with("the image is"),
                "{}",
                m
            );
        }
    }
    Ok(())
}

/// One edit of a valid view in Apple's form.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace crop value `k`.
    Crop(usize, Value),
    /// Replace the op index of op `i` (modulo the op count).
    Op(prop::sample::Index, Value),
    /// Replace the magnitude of op `i`.
    Magnitude(prop::sample::Index, Value),
    /// Set the magnitude of op `i` just past its range (the next f32 above the maximum).
    PastRange(prop::sample::Index),
    /// Append ops until there are `n`.
    Grow(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let magnitude = prop_oneof![
        json_number(),
        (-1.0f64..1.0).prop_map(Value::from),
        Just(json!(255.0)),
        Just(json!(8.0)),
        Just(json!(3.0)),
    ];
    prop_oneof![
        (0usize..4, json_number()).prop_map(|(k, v)| Edit::Crop(k, v)),
        (any::<prop::sample::Index>(), json_number()).prop_map(|(i, v)| Edit::Op(i, v)),
        (any::<prop::sample::Index>(), magnitude).prop_map(|(i, v)| Edit::Magnitude(i, v)),
        any::<prop::sample::Index>().prop_map(Edit::PastRange),
        (0usize..MAX_NUM_OPS + 4).prop_map(Edit::Grow),
    ]
}

/// A view sampled for a `w` x `h` image by the default config with RandAugment's `p` and flip
/// as `layout` says, in Apple's form, then edited.
fn edited_view(seed: u64, w: u32, h: u32, layout: AppleLayout, edits: &[Edit]) -> Value {
    let cfg = AugConfig {
        hflip_p: if layout.flip { 0.5 } else { 0.0 },
        rand_augment: RandAugmentConfig {
            enable: layout.rand_augment,
            p: 0.8,
            ..RandAugmentConfig::default()
        },
        ..AugConfig::default()
    };
    let mut view = to_apple(&cfg.sample(seed, "k", 0, w, h), layout);
    let ops_slot = view.as_array().map_or(0, Vec::len).saturating_sub(1);
    for e in edits {
        match e {
            Edit::Crop(k, v) => view[0][*k] = v.clone(),
            Edit::Grow(n) if layout.rand_augment => {
                if !view[ops_slot].is_array() {
                    view[ops_slot] = json!([]);
                }
                if let Some(ops) = view[ops_slot].as_array_mut() {
                    while ops.len() < *n {
                        ops.push(json!([0, 0.0]));
                    }
                }
            }
            Edit::Op(i, v) | Edit::Magnitude(i, v) if layout.rand_augment => {
                if let Some(ops) = view[ops_slot].as_array_mut().filter(|o| !o.is_empty()) {
                    let slot = usize::from(matches!(e, Edit::Magnitude(..)));
                    let n = ops.len();
                    ops[i.index(n)][slot] = v.clone();
                }
            }
            Edit::PastRange(i) if layout.rand_augment => {
                if let Some(ops) = view[ops_slot].as_array_mut().filter(|o| !o.is_empty()) {
                    let n = ops.len();
                    let op = &mut ops[i.index(n)];
                    let index = op[0].as_u64().unwrap_or(0) as u8;
                    if let Some(o) = Op::from_index(index) {
                        let (_, max) = o.magnitude_range(224);
                        op[1] = json!(f64::from(max.next_up()));
                    }
                }
            }
            _ => {}
        }
    }
    view
}

#[test]
fn fuzz_from_apple() {
    let view = prop_oneof![
        // Mostly valid views with a few values broken, so that many reach validation and
        // replay.
        3 => (any::<u64>(), 1u32..640, 1u32..640, layouts(), prop::collection::vec(edit(), 0..3))
            .prop_map(|(seed, w, h, layout, edits)| (edited_view(seed, w, h, layout, &edits), layout, w, h)),
        1 => (apple_view(), layouts(), 1u32..640, 1u32..640),
    ];
    fuzz("from_apple", 50_000, view, |(view, layout, w, h)| {
        if let Ok(p) = from_apple(&view, layout) {
            check_parsed(&p)?;
            // What was read writes back to an equivalent view.
            let again = from_apple(&to_apple(&p, layout), layout).unwrap();
            prop_assert_eq!(&again.crop, &p.crop);
            prop_assert_eq!(again.ops.len(), p.ops.len());
            // Sampled at the default size, 224.
            validate_and_replay(&p, w, h, 224)?;
        }
        Ok(())
    });
    report_replays("from_apple");
}

#[test]
fn fuzz_paug_json_bytes() {
    let valid = br#"{"param_aug": [[[10, 20, 300, 400], [[5, -9.0], [10, 7.0]]], [[0, 0, 384, 512], null]]}"#;
    let layout = AppleLayout {
        flip: false,
        rand_augment: true,
    };
    assert_eq!(from_apple_json(valid, layout).unwrap().len(), 2);
    let edit = (any::<prop::sample::Index>(), any::<u8>(), 0u8..3);
    fuzz(
        "paug_json_bytes",
        100_000,
        (
            prop_oneof![
                3 => prop::collection::vec(edit, 1..4).prop_map(move |edits| {
                    let mut b = valid.to_vec();
                    for (i, v, kind) in edits {
                        let p = i.index(b.len());
                        match kind {
                            0 => b[p] = v,
                            1 => b.insert(p, v),
                            _ => {
                                b.remove(p);
                            }
                        }
                    }
                    b
                }),
                1 => prop::collection::vec(any::<u8>(), 0..64),
                1 => prop::collection::vec(apple_view(), 0..4)
                    .prop_map(|views| serde_json::to_vec(&json!({"param_aug": views})).unwrap()),
            ],
            layouts(),
        ),
        |(bytes, layout)| {
            match from_apple_json(&bytes, layout) {
                Ok(views) => {
                    for p in &views {
                        check_parsed(p)?;
                        validate_and_replay(p, 512, 384, 224)?;
                    }
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(m.contains("param_aug") || m.contains("paug.json"), "{}", m);
                }
            }
            Ok(())
        },
    );
    report_replays("paug_json_bytes");
}

#[test]
fn fuzz_validate() {
    let edge = prop_oneof![
        4 => -3i32..70,
        1 => Just(i32::MAX),
        1 => Just(i32::MIN),
        1 => any::<i32>(),
    ];
    let edge_crop = [edge.clone(), edge.clone(), edge.clone(), edge];
    // Half the crops inside the image, half anything.
    let image_and_crop = (0u32..100, 0u32..100).prop_flat_map(move |(w, h)| {
        let inside = (0..h.max(1) as i32, 0..w.max(1) as i32).prop_flat_map(move |(t, l)| {
            (
                Just(t),
                Just(l),
                1..=(h as i32 - t).max(1),
                1..=(w as i32 - l).max(1),
            )
                .prop_map(|(t, l, ch, cw)| [t, l, ch, cw])
        });
        (Just(w), Just(h), prop_oneof![inside, edge_crop.clone()])
    });
    let op = (0usize..14, 0.0f32..=1.0, 0usize..8).prop_map(|(i, t, edge)| {
        let op = Op::ALL[i];
        let (min, max) = op.magnitude_range(224);
        let m = match edge {
            0 => f32::NAN,
            1 => max.next_up(),
            2 => min.next_down(),
            3 => f32::INFINITY,
            4 => t * 1e6 - 5e5,
            _ => min + t * (max - min),
        };
        (op, m)
    });
    let ops = prop_oneof![
        4 => prop::collection::vec(op.clone(), 0..4),
        1 => prop::collection::vec(op, 0..MAX_NUM_OPS + 3),
    ];
    fuzz(
        "validate",
        100_000,
        (
            image_and_crop,
            ops,
            prop_oneof![Just(224u32), 1u32..=MAX_SIZE],
        ),
        |((w, h, [top, left, height, width]), ops, size)| {
            let p = AugParams {
                crop: CropBox {
                    top,
                    left,
                    height,
                    width,
                },
                flip: false,
                ops,
            };
            if let Ok(()) = p.validate(w, h, size) {
                prop_assert!(p.ops.len() <= MAX_NUM_OPS);
                for (op, m) in &p.ops {
                    let (min, max) = op.magnitude_range(size);
                    prop_assert!((min..=max).contains(m));
                }
            }
            validate_and_replay(&p, w, h, size)
        },
    );
    report_replays("validate");
}

/// The regression cases of the issue, in Apple's form.
#[test]
fn bad_paug_json_values_are_named() {
    let layout = AppleLayout {
        flip: false,
        rand_augment: true,
    };
    let read = |doc: &str| from_apple_json(doc.as_bytes(), layout);
    // 2^31 does not fit a pixel coordinate at all.
    let err =
        read(r#"{"param_aug": [[[0, 0, 1, 1], null], [[0, 0, 2147483648, 2147483648], null]]}"#)
            .unwrap_err()
            .to_string();
    assert!(
        err.ends_with("param_aug[1]: crop (0, 0, 2147483648, 2147483648) does not fit 32-bit pixel coordinates"),
        "{err}"
    );
    // Inside i32 but outside the image: refused once the image size is known.
    let views = read(r#"{"param_aug": [[[0, 0, 2147483647, 2147483647], null]]}"#).unwrap();
    assert_eq!(
        views[0].validate(512, 384, 224).unwrap_err().to_string(),
        "crop (0, 0, 2147483647, 2147483647) lies outside the 512x384 image"
    );
    let err = read(r#"{"param_aug": [[[0, 0, 1, 1], [[5, 9.0], [14, 0.0]]]]}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("param_aug[0]: ops[1].op 14 is not a RandAugment op index (valid: 0..14)"),
        "{err}"
    );
    // JSON has no NaN; a magnitude past f32's range is the way to an infinite one.
    let err = read(r#"{"param_aug": [[[0, 0, 1, 1], [[5, 1e300]]]]}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("param_aug[0]: ops[0].magnitude of Rotate is inf, not a finite number"),
        "{err}"
    );
    let nan = AugParams {
        crop: CropBox {
            top: 0,
            left: 0,
            height: 1,
            width: 1,
        },
        flip: false,
        ops: vec![(Op::Rotate, f32::NAN)],
    };
    assert!(matches!(
        nan.validate(1, 1, 224),
        Err(ParamsError::NonFiniteMagnitude { index: 0, .. })
    ));
    let err = read(r#"{"param_aug": [[[0, 0, 1, 1], [[3, 101.6]]]]}"#).unwrap()[0]
        .validate(1, 1, 224)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "ops[0].magnitude of TranslateX is 101.6, outside its range [-101.510574, 101.510574]"
    );
}
