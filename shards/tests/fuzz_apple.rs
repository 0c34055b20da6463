//! Bounded fuzzing of the readers of Apple's layout in this crate: `.npy` / `.npz` arrays and
//! `syn.json` caption lists (the parquet row reader is in `fuzz_stored.rs`).
//!
//! Each test feeds arbitrary or mutated input to a reader for a fixed number of cases (about
//! 10 s for the whole binary in a debug build on 2 cores; `PROPTEST_CASES=N` runs N cases per
//! test instead) and requires: no panic, an `Ok` that satisfies the reader's own invariants or
//! an error, and no single allocation above `fuzz_support::MAX_ALLOCATION` (inputs are a few
//! KB). Each prints its case count, time and largest allocation.

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::io::{Cursor, Write};
use std::sync::OnceLock;

use dfndr_shards::apple::{npy_decode, npy_encode, npz_decode, npz_encode, syn_decode, Matrix};
use fuzz_support::mutate::{mutate, mutations};
use fuzz_support::{fuzz, CountingAlloc};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------- npy / npz

fn npy_bytes(version: u8, header: &str, declared_len: Option<u32>, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY".to_vec();
    b.push(version);
    b.push(0);
    let len = declared_len.unwrap_or(header.len() as u32);
    if version == 1 {
        b.extend_from_slice(&(len as u16).to_le_bytes());
    } else {
        b.extend_from_slice(&len.to_le_bytes());
    }
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn shape_dim() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..8).prop_map(|v| v.to_string()),
        Just("1099511627776".to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just((1u64 << 62).to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        "[ -x0-9L]{0,6}",
    ]
}

#[test]
fn fuzz_npy() {
    let header = (
        prop_oneof![
            Just("<f2"),
            Just("<f4"),
            Just("<f8"),
            Just("<i4"),
            Just(">f4"),
            Just("")
        ],
        any::<bool>(),
        prop::collection::vec(shape_dim(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(descr, fortran, shape, trailing_comma)| {
            let mut s = shape.join(", ");
            if trailing_comma {
                s.push(',');
            }
            let fortran = if fortran { "True" } else { "False" };
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({s}), }}\n")
        });
    let input = (
        prop_oneof![Just(1u8), Just(2), Just(3), any::<u8>()],
        header,
        prop_oneof![
            4 => Just(None),
            1 => any::<u32>().prop_map(Some),
            1 => (0u32..200).prop_map(Some),
        ],
        prop::collection::vec(any::<u8>(), 0..200),
        any::<Option<(Index, u8)>>(),
    );
    fuzz(
        "npy",
        80_000,
        input,
        |(version, header, declared, data, edit)| {
            let mut bytes = npy_bytes(version, &header, declared, &data);
            if let Some((i, v)) = edit {
                let p = i.index(bytes.len());
                bytes[p] = v;
            }
            if let Ok(m) = npy_decode("a", &bytes) {
                prop_assert_eq!(m.data.len(), m.rows * m.cols);
                prop_assert!(m.data.len() <= bytes.len());
                prop_assert_eq!(m.to_rows().len(), m.rows);
            }
            Ok(())
        },
    );
}

fn valid_npz() -> &'static [u8] {
    static NPZ: OnceLock<Vec<u8>> = OnceLock::new();
    NPZ.get_or_init(|| {
        let m = |rows: usize, cols: usize| Matrix {
            rows,
            cols,
            data: (0..rows * cols).map(|i| i as f32).collect(),
        };
        let stored =
            npz_encode(&[("image_emb".into(), m(2, 8)), ("text_emb".into(), m(3, 8))]).unwrap();
        // Append a deflated member, as numpy.savez_compressed writes them.
        let mut zip = zip::ZipWriter::new_append(Cursor::new(stored)).unwrap();
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("syn_text_a_emb.npy", options).unwrap();
        zip.write_all(&npy_encode(&m(4, 8))).unwrap();
        zip.finish().unwrap().into_inner()
    })
}

#[test]
fn fuzz_npz() {
    let npz = valid_npz();
    assert_eq!(npz_decode(npz).unwrap().len(), 3);
    // The central directory and end record: the last ~200 bytes.
    let tail = 200;
    fuzz("npz", 50_000, mutations(), |(edits, region)| {
        let bytes = mutate(npz, &edits, region, tail);
        if let Ok(arrays) = npz_decode(&bytes) {
            for (_, m) in arrays {
                prop_assert_eq!(m.data.len(), m.rows * m.cols);
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- syn.json

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(Value::from("a caption")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("syn_text".to_string()),
            Just("syn_text_a".to_string()),
            Just("syn_text_b".to_string()),
            ".{0,10}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key, inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn fuzz_syn_json() {
    let tags = prop_oneof![Just(vec!["a"]), Just(vec!["a", "b"]), Just(vec!["coca"])];
    let edits = prop::option::of(mutations());
    fuzz(
        "syn_json",
        50_000,
        (json_value(), tags, edits),
        |(doc, tags, edits)| {
            let mut bytes = serde_json::to_vec(&doc).unwrap();
            if let Some((edits, region)) = edits {
                bytes = mutate(&bytes, &edits, region, 64);
            }
            match syn_decode(&bytes, &tags) {
                Ok(lists) => {
                    prop_assert_eq!(lists.len(), tags.len());
                    let parsed: Value = serde_json::from_slice(&bytes).unwrap();
                    for (name, texts) in &lists {
                        let want: Vec<String> = parsed[name]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string())
                            .collect();
                        prop_assert_eq!(texts, &want);
                    }
                }
                Err(e) => prop_assert!(e.to_string().starts_with("syn.json: ")),
            }
            Ok(())
        },
    );
}
