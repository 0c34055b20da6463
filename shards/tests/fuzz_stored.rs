//! Bounded fuzzing of the DFNDR parquet row reader (the readers of Apple's `.npz` and
//! `syn.json` are in `fuzz_apple.rs`).
//!
//! Each test feeds arbitrary or mutated input to the reader for a fixed number of cases (about
//! 10 s for the whole binary in a debug build on 2 cores; `PROPTEST_CASES=N` runs N cases per
//! test instead) and requires: no panic, an `Ok` that satisfies the reader's own invariants or
//! an error, and no single allocation above `fuzz_support::MAX_ALLOCATION` (inputs are a few
//! KB). Each prints its case count, time and largest allocation.

#[path = "../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, BooleanArray, DictionaryArray, FixedSizeListArray, Float32Array, Int32Array,
    ListArray, RecordBatch, StringArray, StructArray, UInt32Array, UInt8Array,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, SchemaRef};
use bytes::Bytes;
use dfndr_shards::format::meta::keys;
use dfndr_shards::format::{
    magnitude_range, AugOp, EmbDtype, EmbLayout, FileMeta, FormatError, Layout, Paug, Row,
    ShardReader, ShardWriter, SynCaptions, SynLayout, TeacherInfo, ValueError, ValueLimits,
    WriterOptions,
};
use fuzz_support::mutate::{mutate, mutations};
use fuzz_support::{fuzz, CountingAlloc};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------- parquet rows

fn emb_layout() -> Layout {
    Layout {
        embed_images: true,
        paug: true,
        emb: Some(EmbLayout {
            dim: 4,
            dtype: EmbDtype::F16,
        }),
        image_emb: true,
        text_emb: true,
        syn: vec![SynLayout {
            tag: "coca".into(),
            with_emb: true,
        }],
    }
}

fn meta_with(augmentation: Value, teachers: bool) -> FileMeta {
    FileMeta {
        source: "file:///in/00000.tar".into(),
        config_fingerprint: "f".into(),
        teachers: if teachers {
            vec![TeacherInfo {
                name: "t".into(),
                architecture: "ViT-L-14".into(),
                dim: 4,
                logit_scale: 70.0,
                weights_sha256: "00".into(),
            }]
        } else {
            Vec::new()
        },
        augmentation,
        ..FileMeta::default()
    }
}

fn valid_row(i: usize) -> Row {
    let v = |s: f32| vec![0.5 * s, -0.5, 0.5, 0.5];
    Row {
        key: format!("{i:06}"),
        source: "file:///in/00000.tar".into(),
        url: i.is_multiple_of(2).then(|| format!("https://e.com/{i}")),
        caption: format!("caption {i}"),
        width: 512,
        height: 384,
        image: Some(vec![0xff, 0xd8, i as u8]),
        paug: vec![
            Paug {
                crop: [10, 20, 300, 400],
                flip: false,
                ops: vec![
                    AugOp {
                        op: 5,
                        magnitude: -9.0,
                    },
                    AugOp {
                        op: 11,
                        magnitude: 178.5,
                    },
                ],
            },
            Paug {
                crop: [0, 0, 384, 512],
                flip: true,
                ops: vec![AugOp {
                    op: 3,
                    magnitude: 30.453_173,
                }],
            },
        ],
        image_emb: vec![v(1.0), v(-1.0)],
        text_emb: vec![v(0.5)],
        syn: vec![SynCaptions {
            texts: vec!["a dog".into(), "a cat".into()],
            emb: vec![v(0.1), v(0.2)],
        }],
    }
}

/// A small valid shard written by [`ShardWriter`]: 5 rows in row groups of 2.
fn valid_shard() -> &'static [u8] {
    static SHARD: OnceLock<Vec<u8>> = OnceLock::new();
    SHARD.get_or_init(|| {
        let meta = meta_with(json!({"num_augmentations": 2, "size": 224}), true);
        let options = WriterOptions { row_group_rows: 2 };
        let mut w = ShardWriter::new(Vec::new(), emb_layout(), &meta, options).unwrap();
        for i in 0..5 {
            w.write_row(&valid_row(i)).unwrap();
        }
        w.into_inner().unwrap().1
    })
}

/// How far mutated shards got: refused on open, opened, rows read, rows refused.
static OUTCOMES: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

/// Reads every row; every row that reads must pass the checks the reader promises.
fn read_all(bytes: Vec<u8>, batch: usize, select: bool) -> Result<(), TestCaseError> {
    let count = |i: usize| OUTCOMES[i].fetch_add(1, Ordering::Relaxed);
    let reader = match ShardReader::open(Bytes::from(bytes)) {
        Ok(r) => r.with_batch_rows(batch),
        Err(_) => {
            count(0);
            return Ok(());
        }
    };
    count(1);
    let reader = if select {
        match reader.select(&["paug", "syn_text_coca"]) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        }
    } else {
        reader
    };
    let layout = reader.read_layout().clone();
    let mut limits = ValueLimits::from_augmentation(&reader.meta().augmentation);
    if !layout.paug {
        limits.views = None;
    }
    let Ok(rows) = reader.rows() else {
        return Ok(());
    };
    for row in rows {
        let Ok(row) = row else {
            count(3);
            continue;
        };
        count(2);
        prop_assert_eq!(row.check(&layout), Ok(()));
        prop_assert_eq!(row.validate_values(&limits), Ok(()));
    }
    Ok(())
}

#[test]
fn fuzz_parquet_bytes() {
    let shard = valid_shard();
    // Sanity: the unmutated shard reads completely.
    let rows = ShardReader::open(Bytes::from(shard.to_vec()))
        .unwrap()
        .rows()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(rows.len(), 5);
    // The parquet decoder and the arrow buffers it fills.
    let caught = fuzz_support::count_dependency_panics(&["/parquet-", "/arrow-"]);
    // Also an uncompressed file (written through arrow), where edits hit the stored values,
    // list offsets and levels themselves instead of zstd data.
    let good = ([5, 6, 100, 200], false, vec![(5u8, 9.0f32), (10, 7.0)]);
    let plain_rows: Vec<RawRow> = (0..5)
        .map(|i| RawRow {
            width: 512,
            height: 384,
            views: vec![good.clone(); 1 + i % 2],
        })
        .collect();
    let plain = raw_shard(&plain_rows, &json!({"size": 224}));
    assert_eq!(
        ShardReader::open(Bytes::from(plain.clone()))
            .unwrap()
            .rows()
            .unwrap()
            .filter(Result::is_ok)
            .count(),
        5
    );
    let tail_of =
        |b: &[u8]| u32::from_le_bytes(b[b.len() - 8..b.len() - 4].try_into().unwrap()) as usize + 8;
    let bases = [(shard, tail_of(shard)), (&plain[..], tail_of(&plain))];
    fuzz(
        "parquet_bytes",
        30_000,
        (0..bases.len(), mutations(), 1usize..4, any::<bool>()),
        |(base, (edits, region), batch, select)| {
            let (bytes, tail) = bases[base];
            read_all(mutate(bytes, &edits, region, tail), batch, select)
        },
    );
    let [refused, opened, rows, bad_rows] = OUTCOMES.each_ref().map(|a| a.load(Ordering::Relaxed));
    eprintln!(
        "fuzz parquet_bytes: {refused} shards refused on open, {opened} opened; {rows} rows read, {bad_rows} refused; {} panics of the parquet and arrow crates caught by the reader {:?}",
        caught.load(Ordering::Relaxed),
        fuzz_support::dependency_panic_sites()
    );
}

/// One stored view: crop box, flip, (op, magnitude) pairs.
type RawView = ([i32; 4], bool, Vec<(u8, f32)>);

/// Stored values for rows written with arrow directly, past the writer's checks.
#[derive(Debug, Clone)]
struct RawRow {
    width: u32,
    height: u32,
    views: Vec<RawView>,
}

fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        1u32..2048,
        Just(u32::MAX),
        Just(i32::MAX as u32 + 1),
        any::<u32>(),
    ]
}

fn edge_i32() -> impl Strategy<Value = i32> {
    prop_oneof![
        -2i32..600,
        Just(i32::MAX),
        Just(i32::MIN),
        Just(i32::MAX - 1),
        any::<i32>(),
    ]
}

fn edge_magnitude(op: u8) -> BoxedStrategy<f32> {
    let (min, max) = magnitude_range(op, 4096).unwrap_or((0.0, 0.0));
    prop_oneof![
        Just(min),
        Just(max),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(-0.0f32),
        Just(max.next_up()),
        Just(min.next_down()),
        (0.0f32..=1.0).prop_map(move |t| min + t * (max - min)),
        any::<f32>(),
    ]
    .boxed()
}

fn raw_row() -> impl Strategy<Value = RawRow> {
    let op = prop_oneof![4 => 0u8..14, 1 => any::<u8>()]
        .prop_flat_map(|op| (Just(op), edge_magnitude(op)));
    let view = (
        [edge_i32(), edge_i32(), edge_i32(), edge_i32()],
        any::<bool>(),
        prop::collection::vec(op, 0..4),
    );
    (edge_u32(), edge_u32(), prop::collection::vec(view, 0..4)).prop_map(
        |(width, height, views)| RawRow {
            width,
            height,
            views,
        },
    )
}

/// The in-memory row the reader should give for `raw`.
fn expected_row(i: usize, raw: &RawRow) -> Row {
    Row {
        key: format!("{i:06}"),
        source: "s".into(),
        caption: "c".into(),
        width: raw.width,
        height: raw.height,
        paug: raw
            .views
            .iter()
            .map(|(crop, flip, ops)| Paug {
                crop: *crop,
                flip: *flip,
                ops: ops
                    .iter()
                    .map(|&(op, magnitude)| AugOp { op, magnitude })
                    .collect(),
            })
            .collect(),
        ..Row::default()
    }
}

/// A file with the `paug` layout whose rows are exactly `rows`, written through arrow.
fn raw_shard(rows: &[RawRow], augmentation: &Value) -> Vec<u8> {
    let layout = Layout {
        paug: true,
        ..Layout::default()
    };
    let schema: SchemaRef = Arc::new(layout.arrow_schema().unwrap());
    let n = rows.len();
    let paug_type = schema.field_with_name("paug").unwrap().data_type().clone();
    let DataType::List(view_item) = &paug_type else {
        unreachable!()
    };
    let DataType::Struct(view_fields) = view_item.data_type() else {
        unreachable!()
    };
    let DataType::FixedSizeList(crop_item, _) = view_fields[0].data_type() else {
        unreachable!()
    };
    let DataType::List(op_item) = view_fields[2].data_type() else {
        unreachable!()
    };
    let DataType::Struct(op_fields) = op_item.data_type() else {
        unreachable!()
    };
    let views: Vec<&RawView> = rows.iter().flat_map(|r| r.views.iter()).collect();
    let ops: Vec<(u8, f32)> = views.iter().flat_map(|v| v.2.iter().copied()).collect();
    let op_struct = StructArray::new(
        op_fields.clone(),
        vec![
            Arc::new(UInt8Array::from_iter_values(ops.iter().map(|o| o.0))) as ArrayRef,
            Arc::new(Float32Array::from_iter_values(ops.iter().map(|o| o.1))),
        ],
        None,
    );
    let ops_list = ListArray::new(
        op_item.clone(),
        OffsetBuffer::from_lengths(views.iter().map(|v| v.2.len())),
        Arc::new(op_struct),
        None,
    );
    let crops = FixedSizeListArray::new(
        crop_item.clone(),
        4,
        Arc::new(Int32Array::from_iter_values(
            views.iter().flat_map(|v| v.0.iter().copied()),
        )),
        None,
    );
    let view_struct = StructArray::new(
        view_fields.clone(),
        vec![
            Arc::new(crops) as ArrayRef,
            Arc::new(BooleanArray::from_iter(views.iter().map(|v| Some(v.1)))),
            Arc::new(ops_list),
        ],
        None,
    );
    let paug = ListArray::new(
        view_item.clone(),
        OffsetBuffer::from_lengths(rows.iter().map(|r| r.views.len())),
        Arc::new(view_struct),
        None,
    );
    let source: DictionaryArray<Int32Type> = std::iter::repeat_n("s", n).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("{i:06}")),
        )),
        Arc::new(source),
        Arc::new(StringArray::from(vec![None::<&str>; n])),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n("c", n))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.width))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.height))),
        Arc::new(paug),
    ];
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns).unwrap();
    let kv = |k: &str, v: String| KeyValue::new(k.to_string(), v);
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(vec![
            kv(keys::SCHEMA_VERSION, "1".into()),
            kv(keys::VERSION, "0".into()),
            kv(keys::SOURCE, "s".into()),
            kv(keys::CONFIG_FINGERPRINT, "f".into()),
            kv(keys::TEACHERS, "[]".into()),
            kv(keys::CAPTIONERS, "[]".into()),
            kv(keys::AUGMENTATION, augmentation.to_string()),
        ]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

#[test]
fn fuzz_parquet_values() {
    let augmentation = prop_oneof![
        Just(Value::Null),
        (0u64..5, prop_oneof![Just(224u64), 0u64..5000])
            .prop_map(|(k, s)| json!({"num_augmentations": k, "size": s})),
    ];
    fuzz(
        "parquet_values",
        6_000,
        (prop::collection::vec(raw_row(), 1..6), augmentation),
        |(rows, augmentation)| {
            let bytes = raw_shard(&rows, &augmentation);
            let limits = ValueLimits::from_augmentation(&augmentation);
            let reader = ShardReader::open(Bytes::from(bytes)).unwrap();
            // Row by row: exactly the valid rows read, and the first invalid one is refused
            // with its index, key and the problem the library's own check names.
            for (i, got) in reader.rows().unwrap().enumerate() {
                let want = expected_row(i, &rows[i]);
                match (want.validate_values(&limits), got) {
                    (Ok(()), Ok(row)) => prop_assert_eq!(row, want),
                    (
                        Err(problem),
                        Err(FormatError::InvalidValue {
                            index,
                            key,
                            problem: p,
                        }),
                    ) => {
                        prop_assert_eq!(index, i as u64);
                        prop_assert_eq!(&key, &want.key);
                        // By text: NaN magnitudes make the values themselves unequal.
                        prop_assert_eq!(p.to_string(), problem.to_string());
                        let message = FormatError::InvalidValue {
                            index,
                            key,
                            problem: p,
                        }
                        .to_string();
                        prop_assert!(
                            message.starts_with(&format!("row {i}, key {:06}: ", i)),
                            "{}",
                            message
                        );
                        break;
                    }
                    (want, got) => {
                        return Err(TestCaseError::fail(format!(
                            "row {i}: expected {want:?}, the reader gave {got:?}"
                        )))
                    }
                }
            }
            Ok(())
        },
    );
}

/// The regression cases of the issue, as stored in a parquet file.
#[test]
fn bad_stored_values_are_refused_with_shard_key_and_field() {
    let good = ([0, 0, 10, 10], false, vec![(5u8, 9.0f32)]);
    let cases: Vec<(RawView, &str)> = vec![
        (
            ([0, 0, i32::MAX, i32::MAX], false, vec![]),
            "row 1, key 000001: paug[1].crop (0, 0, 2147483647, 2147483647) lies outside the 512x384 image",
        ),
        (
            ([i32::MIN, 0, 10, 10], false, vec![]),
            "row 1, key 000001: paug[1].crop (-2147483648, 0, 10, 10) lies outside the 512x384 image",
        ),
        (
            ([0, 0, 10, 10], false, vec![(0, 0.0), (14, 0.0)]),
            "row 1, key 000001: paug[1].ops[1].op 14 is not a RandAugment op index (valid: 0..14)",
        ),
        (
            ([0, 0, 10, 10], false, vec![(5, f32::NAN)]),
            "row 1, key 000001: paug[1].ops[0].magnitude of Rotate is NaN, not a finite number",
        ),
        (
            ([0, 0, 10, 10], false, vec![(3, 200.0)]),
            "row 1, key 000001: paug[1].ops[0].magnitude of TranslateX is 200, outside its range [-101.510574, 101.510574]",
        ),
    ];
    for (bad, want) in cases {
        let row = |views| RawRow {
            width: 512,
            height: 384,
            views,
        };
        let rows = [
            row(vec![good.clone(), good.clone()]),
            row(vec![good.clone(), bad]),
        ];
        let bytes = raw_shard(&rows, &json!({"num_augmentations": 2, "size": 224}));
        let results: Vec<_> = ShardReader::open(Bytes::from(bytes))
            .unwrap()
            .rows()
            .unwrap()
            .collect();
        assert_eq!(results.len(), 2, "the reader stops after the bad row");
        assert!(results[0].is_ok());
        let err = results[1].as_ref().unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::InvalidValue {
                    problem: ValueError::Paug { view: 1, .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), want);
    }
    // A view count other than the metadata's.
    let rows = [RawRow {
        width: 8,
        height: 8,
        views: vec![good.clone()],
    }];
    let bytes = raw_shard(&rows, &json!({"num_augmentations": 2}));
    let err = ShardReader::open(Bytes::from(bytes))
        .unwrap()
        .rows()
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "row 0, key 000000: paug holds 1 views, but the shard's dfndr.augmentation has num_augmentations = 2"
    );
}
