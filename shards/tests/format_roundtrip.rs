//! DFNDR v1 format: round trips, refusals and the exact physical schema of SPEC section 3.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use dfndr_shards::format::{
    magnitude_range, AugOp, CaptionerInfo, EmbDtype, EmbLayout, FileMeta, FormatError, Layout,
    Paug, Row, ShardReader, ShardWriter, SynCaptions, SynLayout, TeacherInfo, WriterOptions,
    MAX_AUG_SIZE, SCHEMA_VERSION,
};
use half::f16;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use proptest::prelude::*;
use serde_json::json;

// ---------------------------------------------------------------- helpers

fn write_file(layout: &Layout, meta: &FileMeta, rows: &[Row], row_group_rows: usize) -> File {
    let file = tempfile::tempfile().unwrap();
    let mut w =
        ShardWriter::new(file, layout.clone(), meta, WriterOptions { row_group_rows }).unwrap();
    for r in rows {
        w.write_row(r).unwrap();
    }
    let (n, file) = w.into_inner().unwrap();
    assert_eq!(n, rows.len() as u64);
    file
}

fn read_all(file: File) -> (FileMeta, Layout, Vec<Row>) {
    let reader = ShardReader::open(file).unwrap();
    let meta = reader.meta().clone();
    let layout = reader.layout().clone();
    let rows = reader
        .rows()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (meta, layout, rows)
}

/// What a reader recovers from a layout: `emb` only survives when some column uses it.
fn normalized(layout: &Layout) -> Layout {
    let mut l = layout.clone();
    if !l.has_emb_columns() {
        l.emb = None;
    }
    l
}

/// The row as it must read back: f16 columns rounded to f16.
fn stored(row: &Row, layout: &Layout) -> Row {
    let mut r = row.clone();
    if layout.emb.map(|e| e.dtype) == Some(EmbDtype::F16) {
        let round = |v: &mut Vec<Vec<f32>>| {
            for x in v.iter_mut().flatten() {
                *x = f16::from_f32(*x).to_f32();
            }
        };
        round(&mut r.image_emb);
        round(&mut r.text_emb);
        for s in &mut r.syn {
            round(&mut s.emb);
        }
    }
    r
}

fn full_layout(dtype: EmbDtype) -> Layout {
    Layout {
        embed_images: true,
        paug: true,
        emb: Some(EmbLayout { dim: 4, dtype }),
        image_emb: true,
        text_emb: true,
        syn: vec![
            SynLayout {
                tag: "coca".into(),
                with_emb: true,
            },
            SynLayout {
                tag: "blip_2".into(),
                with_emb: false,
            },
        ],
    }
}

fn full_meta() -> FileMeta {
    FileMeta {
        source: "file:///data/00000.tar".into(),
        config_fingerprint: "sha256:abc".into(),
        teachers: vec![
            TeacherInfo {
                name: "dfn2b".into(),
                architecture: "ViT-L-14-quickgelu".into(),
                dim: 2,
                logit_scale: 70.0,
                weights_sha256: "00".repeat(32),
            },
            TeacherInfo {
                name: "dfn2b_s39b".into(),
                architecture: "ViT-L-14".into(),
                dim: 2,
                logit_scale: 60.0,
                weights_sha256: "11".repeat(32),
            },
        ],
        captioners: vec![CaptionerInfo {
            tag: "coca".into(),
            model: "coca_ViT-L-14".into(),
            weights_sha256: "22".repeat(32),
            decoding: json!({"strategy": "top_p", "top_p": 0.9, "seq_len": 30}),
        }],
        augmentation: json!({"k": 2, "rand_augment": {"num_ops": 2, "magnitude": 9}}),
        ..FileMeta::default()
    }
}

fn full_row(i: usize) -> Row {
    let v = |s: f32| vec![0.5 * s, -0.25, 0.125, 0.0625];
    Row {
        key: format!("{i:09}"),
        source: "file:///data/00000.tar".into(),
        url: i
            .is_multiple_of(2)
            .then(|| format!("https://example.com/{i}.jpg")),
        caption: format!("a photo number {i} ✓"),
        width: 640,
        height: 480,
        image: Some(vec![0xff, 0xd8, i as u8]),
        paug: vec![
            Paug {
                crop: [1, 2, 300, 400],
                flip: false,
                ops: vec![
                    AugOp {
                        op: 5,
                        magnitude: -12.5,
                    },
                    AugOp {
                        op: 13,
                        magnitude: 0.0,
                    },
                ],
            },
            Paug {
                crop: [0, 0, 480, 640],
                flip: true,
                ops: vec![],
            },
        ],
        image_emb: vec![v(1.0), v(-1.0)],
        text_emb: vec![v(0.5)],
        syn: vec![
            SynCaptions {
                texts: vec!["a dog".into(), "a cat".into()],
                emb: vec![v(0.1), v(0.2)],
            },
            SynCaptions {
                texts: vec![],
                emb: vec![],
            },
        ],
    }
}

/// Writes a parquet file with arrow directly, with arbitrary key-value metadata.
fn plain_parquet(kv: Vec<KeyValue>) -> File {
    let schema = Arc::new(Schema::new(vec![Field::new("key", DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(StringArray::from(vec!["a", "b"]))],
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let file = tempfile::tempfile().unwrap();
    let mut w = ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.into_inner().unwrap()
}

fn open_err(file: File) -> FormatError {
    match ShardReader::open(file) {
        Ok(_) => panic!("file was accepted"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- property tests

fn arb_layout() -> impl Strategy<Value = Layout> {
    let syn = prop::collection::vec(any::<bool>(), 0..3).prop_map(|flags| {
        flags
            .into_iter()
            .enumerate()
            .map(|(i, with_emb)| SynLayout {
                tag: format!("cap_{i}"),
                with_emb,
            })
            .collect::<Vec<_>>()
    });
    (
        any::<bool>(),
        any::<bool>(),
        prop::option::of((1usize..=16, any::<bool>())),
        any::<bool>(),
        any::<bool>(),
        syn,
    )
        .prop_map(|(embed_images, paug, emb, image_emb, text_emb, mut syn)| {
            let emb = emb.map(|(dim, f32)| EmbLayout {
                dim,
                dtype: if f32 { EmbDtype::F32 } else { EmbDtype::F16 },
            });
            let has_emb = emb.is_some();
            for s in &mut syn {
                s.with_emb &= has_emb;
            }
            Layout {
                embed_images,
                paug,
                emb,
                image_emb: image_emb && has_emb,
                text_emb: text_emb && has_emb,
                syn,
            }
        })
}

fn arb_vecs(n: std::ops::Range<usize>, dim: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
    prop::collection::vec(prop::collection::vec(-1.0f32..=1.0, dim..=dim), n)
}

/// Any valid side `[start, start + len)` of a `size`-pixel image side, as i32 (sides of up to
/// u32::MAX pixels still store their crop boxes as int32).
fn arb_span(size: u32) -> impl Strategy<Value = (i32, i32)> {
    let size = size.min(i32::MAX as u32) as i32;
    (0..size).prop_flat_map(move |start| (Just(start), 1..=size - start))
}

/// A valid view of a `width` x `height` image: the crop inside it, magnitudes in their range.
fn arb_paug(width: u32, height: u32) -> impl Strategy<Value = Paug> {
    (
        arb_span(height),
        arb_span(width),
        any::<bool>(),
        prop::collection::vec(
            (0u8..14, 0.0f64..=1.0).prop_map(|(op, t)| {
                let (min, max) = magnitude_range(op, MAX_AUG_SIZE).unwrap();
                let magnitude = (f64::from(min) + t * (f64::from(max) - f64::from(min))) as f32;
                AugOp {
                    op,
                    magnitude: magnitude.clamp(min, max),
                }
            }),
            0..3,
        ),
    )
        .prop_map(|((top, h), (left, w), flip, ops)| Paug {
            crop: [top, left, h, w],
            flip,
            ops,
        })
}

fn arb_row(layout: Layout) -> impl Strategy<Value = Row> {
    let dim = layout.emb.map_or(1, |e| e.dim);
    let paug_on = layout.paug;
    let syn: Vec<BoxedStrategy<SynCaptions>> = layout
        .syn
        .iter()
        .map(|s| {
            let with_emb = s.with_emb;
            prop::collection::vec(".*", 0..3)
                .prop_flat_map(move |texts| {
                    let n = texts.len();
                    let emb = if with_emb {
                        arb_vecs(n..n + 1, dim).boxed()
                    } else {
                        Just(vec![]).boxed()
                    };
                    (Just(texts), emb)
                })
                .prop_map(|(texts, emb)| SynCaptions { texts, emb })
                .boxed()
        })
        .collect();
    let image = if layout.embed_images {
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(Some)
            .boxed()
    } else {
        Just(None).boxed()
    };
    let text_emb = if layout.text_emb {
        arb_vecs(1..2, dim).boxed()
    } else {
        Just(vec![]).boxed()
    };
    let (with_image_emb, tie_to_paug) = (layout.image_emb, layout.paug && layout.image_emb);
    (
        (
            ".*",
            ".*",
            prop::option::of(".*"),
            ".*",
            1..=u32::MAX,
            1..=u32::MAX,
        )
            .prop_flat_map(move |base| {
                // Views need the image size; any number of them (no num_augmentations here).
                let paug = if paug_on {
                    prop::collection::vec(arb_paug(base.4, base.5), 0..4).boxed()
                } else {
                    Just(vec![]).boxed()
                };
                (Just(base), paug)
            }),
        image,
        text_emb,
        syn,
    )
        .prop_flat_map(move |((base, paug), image, text_emb, syn)| {
            // image_emb has one entry per view when both columns exist.
            let image_emb = match (with_image_emb, tie_to_paug) {
                (false, _) => Just(vec![]).boxed(),
                (true, true) => arb_vecs(paug.len()..paug.len() + 1, dim).boxed(),
                (true, false) => arb_vecs(0..4, dim).boxed(),
            };
            (Just((base, image, paug, text_emb, syn)), image_emb)
        })
        .prop_map(
            |(
                ((key, source, url, caption, width, height), image, paug, text_emb, syn),
                image_emb,
            )| Row {
                key,
                source,
                url,
                caption,
                width,
                height,
                image,
                paug,
                image_emb,
                text_emb,
                syn,
            },
        )
}

fn arb_meta() -> impl Strategy<Value = FileMeta> {
    let teacher = (".*", ".*", 1usize..2048, -1e6f32..1e6, "[0-9a-f]{64}").prop_map(
        |(name, architecture, dim, logit_scale, weights_sha256)| TeacherInfo {
            name,
            architecture,
            dim,
            logit_scale,
            weights_sha256,
        },
    );
    let captioner = ("[a-z0-9_]{1,8}", ".*", "[0-9a-f]{64}", ".*", 0u32..100).prop_map(
        |(tag, model, weights_sha256, strategy, n)| CaptionerInfo {
            tag,
            model,
            weights_sha256,
            decoding: json!({"strategy": strategy, "n": n, "top_p": 0.9}),
        },
    );
    (
        ".*",
        ".*",
        ".*",
        prop::collection::vec(teacher, 0..3),
        prop::collection::vec(captioner, 0..3),
        prop::option::of((0u32..64, ".*")),
    )
        .prop_map(
            |(dfndr_version, source, config_fingerprint, teachers, captioners, aug)| FileMeta {
                schema_version: SCHEMA_VERSION,
                dfndr_version,
                source,
                config_fingerprint,
                teachers,
                captioners,
                augmentation: aug
                    .map_or(serde_json::Value::Null, |(k, s)| json!({"k": k, "note": s})),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn rows_and_metadata_round_trip(
        (layout, rows) in arb_layout().prop_flat_map(|l| {
            let rows = prop::collection::vec(arb_row(l.clone()), 0..10);
            (Just(l), rows)
        }),
        mut meta in arb_meta(),
    ) {
        // The writer checks that teacher dims add up to D; keep arbitrary teachers consistent.
        if layout.has_emb_columns() {
            if let (Some(emb), Some(first)) = (layout.emb, meta.teachers.first_mut()) {
                first.dim = emb.dim;
                meta.teachers.truncate(1);
            }
        }
        let file = write_file(&layout, &meta, &rows, 3);
        let (meta_back, layout_back, rows_back) = read_all(file);
        prop_assert_eq!(&meta_back, &meta);
        prop_assert_eq!(&layout_back, &normalized(&layout));
        let expected: Vec<Row> = rows.iter().map(|r| stored(r, &layout)).collect();
        prop_assert_eq!(rows_back, expected);
    }

    #[test]
    fn small_read_batches_see_the_same_rows(n in 0usize..25, batch in 1usize..7, group in 1usize..9) {
        let layout = full_layout(EmbDtype::F16);
        let rows: Vec<Row> = (0..n).map(full_row).collect();
        let file = write_file(&layout, &full_meta(), &rows, group);
        let reader = ShardReader::open(file).unwrap().with_batch_rows(batch);
        prop_assert_eq!(reader.num_rows(), n as u64);
        prop_assert_eq!(reader.num_row_groups(), n.div_ceil(group));
        let back = reader.rows().unwrap().collect::<Result<Vec<_>, _>>().unwrap();
        let expected: Vec<Row> = rows.iter().map(|r| stored(r, &layout)).collect();
        prop_assert_eq!(back, expected);
    }
}

// ---------------------------------------------------------------- examples

#[test]
fn f32_embeddings_are_exact_and_f16_are_rounded_to_nearest() {
    let tricky = vec![0.1f32, 1.0 / 3.0, -0.999_99, 1e-5];
    for dtype in [EmbDtype::F16, EmbDtype::F32] {
        let layout = Layout {
            emb: Some(EmbLayout { dim: 4, dtype }),
            text_emb: true,
            ..Layout::default()
        };
        let row = Row {
            key: "k".into(),
            width: 1,
            height: 1,
            text_emb: vec![tricky.clone()],
            ..Row::default()
        };
        let (_, _, back) = read_all(write_file(&layout, &FileMeta::default(), &[row], 1000));
        let want: Vec<f32> = match dtype {
            EmbDtype::F32 => tricky.clone(),
            EmbDtype::F16 => tricky.iter().map(|x| f16::from_f32(*x).to_f32()).collect(),
        };
        assert_eq!(back[0].text_emb, vec![want]);
    }
}

#[test]
fn empty_file_round_trips() {
    let layout = full_layout(EmbDtype::F32);
    let (meta, back_layout, rows) = read_all(write_file(&layout, &full_meta(), &[], 1000));
    assert_eq!(meta, full_meta());
    assert_eq!(back_layout, layout);
    assert!(rows.is_empty());
}

#[test]
fn metadata_is_plain_key_value_strings() {
    let file = write_file(
        &full_layout(EmbDtype::F16),
        &full_meta(),
        &[full_row(0)],
        1000,
    );
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap();
    let get = |k: &str| {
        kv.iter()
            .find(|e| e.key == k)
            .and_then(|e| e.value.clone())
            .unwrap()
    };
    assert_eq!(get("dfndr.schema_version"), "1");
    assert_eq!(get("dfndr.source"), "file:///data/00000.tar");
    assert_eq!(get("dfndr.version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(get("dfndr.config_fingerprint"), "sha256:abc");
    let teachers: serde_json::Value = serde_json::from_str(&get("dfndr.teachers")).unwrap();
    assert_eq!(teachers[1]["logit_scale"], json!(60.0));
    assert_eq!(teachers[0]["architecture"], json!("ViT-L-14-quickgelu"));
    let captioners: serde_json::Value = serde_json::from_str(&get("dfndr.captioners")).unwrap();
    assert_eq!(captioners[0]["decoding"]["top_p"], json!(0.9));
    let aug: serde_json::Value = serde_json::from_str(&get("dfndr.augmentation")).unwrap();
    assert_eq!(aug["k"], json!(2));
    let layout: Layout = serde_json::from_str(&get("dfndr.layout")).unwrap();
    assert_eq!(layout, full_layout(EmbDtype::F16));
    // Arrow readers (pyarrow, arrow-rs) surface the same entries as schema metadata.
    assert_eq!(
        builder
            .schema()
            .metadata()
            .get("dfndr.schema_version")
            .map(String::as_str),
        Some("1")
    );
}

#[test]
fn physical_types_are_those_of_spec_section_3() {
    let file = write_file(
        &full_layout(EmbDtype::F16),
        &full_meta(),
        &[full_row(0)],
        1000,
    );
    // Read with plain arrow-rs, not through the DFNDR reader, so this checks the file itself.
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema();
    let item = |dt: DataType| Arc::new(Field::new("item", dt, false));
    let emb = DataType::List(item(DataType::FixedSizeList(item(DataType::Float16), 4)));
    let op = DataType::Struct(Fields::from(vec![
        Field::new("op", DataType::UInt8, false),
        Field::new("magnitude", DataType::Float32, false),
    ]));
    let paug = DataType::List(item(DataType::Struct(Fields::from(vec![
        Field::new(
            "crop",
            DataType::FixedSizeList(item(DataType::Int32), 4),
            false,
        ),
        Field::new("flip", DataType::Boolean, false),
        Field::new("ops", DataType::List(item(op)), false),
    ]))));
    let expected: Vec<(&str, DataType, bool)> = vec![
        ("key", DataType::Utf8, false),
        (
            "source",
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            false,
        ),
        ("url", DataType::Utf8, true),
        ("caption", DataType::Utf8, false),
        ("width", DataType::UInt32, false),
        ("height", DataType::UInt32, false),
        ("image", DataType::Binary, true),
        ("paug", paug, false),
        ("image_emb", emb.clone(), false),
        ("text_emb", emb.clone(), false),
        ("syn_text_coca", DataType::List(item(DataType::Utf8)), false),
        ("syn_text_coca_emb", emb, false),
        (
            "syn_text_blip_2",
            DataType::List(item(DataType::Utf8)),
            false,
        ),
    ];
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        expected.iter().map(|e| e.0).collect::<Vec<_>>(),
        "column order"
    );
    for (name, dt, nullable) in expected {
        let field = schema.field_with_name(name).unwrap();
        assert_eq!(field.data_type(), &dt, "type of {name}");
        assert_eq!(field.is_nullable(), nullable, "nullability of {name}");
    }
    // F32 layouts store float32 vectors.
    let file = write_file(
        &full_layout(EmbDtype::F32),
        &full_meta(),
        &[full_row(0)],
        1000,
    );
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let f32_emb = DataType::List(item(DataType::FixedSizeList(item(DataType::Float32), 4)));
    assert_eq!(
        builder
            .schema()
            .field_with_name("image_emb")
            .unwrap()
            .data_type(),
        &f32_emb
    );
    // And the schema the writer declares is the one the reader recovers the layout from.
    assert_eq!(
        Layout::from_arrow_schema(builder.schema()).unwrap(),
        full_layout(EmbDtype::F32)
    );
}

#[test]
fn same_rows_give_byte_identical_files() {
    // Re-running a shard must reproduce it (SPEC section 3), down to the sha256 of the file.
    let write = || {
        let rows: Vec<Row> = (0..10).map(full_row).collect();
        let mut w = ShardWriter::new(
            Vec::new(),
            full_layout(EmbDtype::F16),
            &full_meta(),
            WriterOptions { row_group_rows: 4 },
        )
        .unwrap();
        for r in &rows {
            w.write_row(r).unwrap();
        }
        w.into_inner().unwrap().1
    };
    assert_eq!(write(), write());
}

#[test]
fn absent_stages_have_no_columns() {
    let layout = Layout::default();
    let names: Vec<String> = layout
        .arrow_schema()
        .unwrap()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        ["key", "source", "url", "caption", "width", "height"]
    );
    let row = Row {
        key: "a".into(),
        caption: "c".into(),
        width: 1,
        height: 1,
        ..Row::default()
    };
    let (_, back_layout, rows) = read_all(write_file(
        &layout,
        &FileMeta::default(),
        std::slice::from_ref(&row),
        10,
    ));
    assert_eq!(back_layout, layout);
    assert_eq!(rows, vec![row]);
}

#[test]
fn row_groups_hold_row_group_rows() {
    let rows: Vec<Row> = (0..10).map(full_row).collect();
    let file = write_file(&full_layout(EmbDtype::F16), &full_meta(), &rows, 3);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let sizes: Vec<i64> = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    assert_eq!(sizes, [3, 3, 3, 1]);
}

#[test]
fn select_reads_a_subset_of_columns() {
    let layout = full_layout(EmbDtype::F16);
    let rows: Vec<Row> = (0..5).map(full_row).collect();
    let file = write_file(&layout, &full_meta(), &rows, 2);
    let reader = ShardReader::open(file)
        .unwrap()
        .select(&["image_emb", "syn_text_coca_emb"])
        .unwrap();
    let read = reader.read_layout().clone();
    assert_eq!(reader.layout(), &layout);
    assert!(!read.embed_images && !read.paug && read.image_emb && !read.text_emb);
    assert_eq!(
        read.syn,
        vec![SynLayout {
            tag: "coca".into(),
            with_emb: true
        }]
    );
    let back = reader
        .rows()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    for (b, r) in back.iter().zip(&rows) {
        let r = stored(r, &layout);
        assert_eq!(b.key, r.key);
        assert_eq!(b.image, None);
        assert!(b.paug.is_empty() && b.text_emb.is_empty());
        assert_eq!(b.image_emb, r.image_emb);
        assert_eq!(b.syn, vec![r.syn[0].clone()]);
    }

    let file = write_file(&layout, &full_meta(), &rows, 2);
    let err = ShardReader::open(file)
        .unwrap()
        .select(&["syn_text_nope"])
        .err()
        .unwrap();
    assert!(err.to_string().contains("syn_text_nope"), "{err}");
}

// ---------------------------------------------------------------- refusals

#[test]
fn other_schema_version_is_refused_with_advice() {
    let file = plain_parquet(vec![KeyValue::new(
        "dfndr.schema_version".into(),
        "2".to_string(),
    )]);
    let err = open_err(file);
    assert!(
        matches!(
            err,
            FormatError::UnsupportedSchemaVersion {
                found: 2,
                supported: 1
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("version 2") && msg.contains("version 1"),
        "{msg}"
    );
    assert!(
        msg.contains("upgrade dfndr") && msg.contains("re-export"),
        "{msg}"
    );
}

#[test]
fn version_is_checked_before_anything_else() {
    // A "future" file whose other metadata and columns are all unknown is still refused by
    // version, not by whatever happens to differ first.
    let file = plain_parquet(vec![
        KeyValue::new("dfndr.schema_version".into(), "7".to_string()),
        KeyValue::new("dfndr.teachers".into(), "not json".to_string()),
    ]);
    assert!(matches!(
        open_err(file),
        FormatError::UnsupportedSchemaVersion { found: 7, .. }
    ));
}

#[test]
fn missing_schema_version_is_not_dfndr() {
    let err = open_err(plain_parquet(vec![KeyValue::new(
        "other".into(),
        "x".to_string(),
    )]));
    assert!(matches!(err, FormatError::NotDfndr), "{err:?}");
    assert!(
        err.to_string().contains("is not a DFNDR file")
            || err
                .to_string()
                .contains("not a DFNDR file: key-value metadata has no dfndr.schema_version"),
        "{err}"
    );
    let err = open_err(plain_parquet(vec![KeyValue::new(
        "dfndr.schema_version".into(),
        "one".to_string(),
    )]));
    assert!(err.to_string().contains("dfndr.schema_version"), "{err}");
}

#[test]
fn non_parquet_and_truncated_files_are_errors_not_panics() {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(b"this is a tar file, honest").unwrap();
    let err = open_err(f);
    assert!(matches!(err, FormatError::NotParquet(_)), "{err:?}");
    assert!(err.to_string().starts_with("not a DFNDR file"), "{err}");

    assert!(matches!(
        open_err(tempfile::tempfile().unwrap()),
        FormatError::NotParquet(_)
    ));

    // Every truncation of a real file fails cleanly (parquet keeps its footer at the end).
    let rows: Vec<Row> = (0..20).map(full_row).collect();
    let mut full = write_file(&full_layout(EmbDtype::F16), &full_meta(), &rows, 4);
    let mut bytes = Vec::new();
    full.seek(SeekFrom::Start(0)).unwrap();
    std::io::Read::read_to_end(&mut full, &mut bytes).unwrap();
    for cut in (0..bytes.len()).step_by(97) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes[..cut]).unwrap();
        assert!(
            ShardReader::open(f).is_err(),
            "truncated at {cut} was accepted"
        );
    }
}

#[test]
fn corrupted_files_give_errors_not_panics() {
    let rows: Vec<Row> = (0..30).map(full_row).collect();
    let mut file = write_file(&full_layout(EmbDtype::F16), &full_meta(), &rows, 7);
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
    // Flip single bytes: sparsely in the data pages, densely in the footer (thrift metadata).
    let footer =
        u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
    let data_end = bytes.len() - 8 - footer;
    // DFNDR_CORRUPT_STEP=1 DFNDR_CORRUPT_DATA_STEP=1 tries every byte (slow).
    let step = |var: &str, default: usize| {
        std::env::var(var).map_or(default, |s| s.parse::<usize>().unwrap())
    };
    let positions = (4..data_end)
        .step_by(step("DFNDR_CORRUPT_DATA_STEP", 211))
        .chain((data_end..bytes.len() - 4).step_by(step("DFNDR_CORRUPT_STEP", 13)));
    let mut refused = 0;
    for pos in positions {
        let mut damaged = bytes.clone();
        damaged[pos] ^= 0x5a;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&damaged).unwrap();
        // Either refused at open, or rows decode to something or to an error: never a panic.
        match ShardReader::open(f) {
            Err(_) => refused += 1,
            Ok(reader) => {
                if let Ok(rows) = reader.rows() {
                    refused += rows.filter(Result::is_err).count();
                }
            }
        }
    }
    assert!(refused > 0, "no corruption was noticed at all");
}

/// pyarrow 26 output of a one-column table with `dfndr.schema_version = 1`, snappy-compressed
/// (pyarrow's default codec, which this build does not decode).
const SNAPPY_PARQUET_HEX: &str = "\
    504152311504150a150e4c15021500120000051001000000611500151215162c15021510150615061c00000009200200\
    000002010102001504192c35001806736368656d61150200150c250218036b657925004c1c0000001602191c191c2600\
    1c150c19350006101918036b657915021602165e166626322608292c15041500150200150015101502003c1602190619\
    260002000000165e16022608166600192c181464666e64722e736368656d615f76657273696f6e18013100180c415252\
    4f573a736368656d611880022f2f2f2f2f37674141414151414141414141414b41413441426741464141674143674141\
    4141414242414151414141414141414b4141774141414145414167414367414141456741414141454141414141514141\
    414177414141414941417741424141494141674141414151414141414241414141414541414141784141414146414141\
    4147526d626d52794c6e4e6a61475674595639325a584a7a615739754141414141414541414141554141414145414155\
    414167414267414841417741414141514142414141414141414145464541414141426741414141454141414141414141\
    41414d41414142725a586b4142414145414151414141414141414141001820706172717565742d6370702d6172726f77\
    2076657273696f6e2032362e302e31191c1c000000be01000050415231";

#[test]
fn foreign_codecs_are_refused_clearly() {
    let hex = SNAPPY_PARQUET_HEX.replace(char::is_whitespace, "");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&bytes).unwrap();
    let err = open_err(f);
    assert!(
        matches!(&err, FormatError::UnsupportedCompression { column, codec } if column == "key" && codec == "SNAPPY"),
        "{err:?}"
    );
    assert!(err.to_string().contains("compression=\"zstd\""), "{err}");
}

#[test]
fn foreign_schemas_name_the_offending_column() {
    let base = full_layout(EmbDtype::F16).arrow_schema().unwrap();
    let replace = |name: &str, dt: DataType| {
        let fields: Vec<Field> = base
            .fields()
            .iter()
            .map(|f| {
                if f.name() == name {
                    Field::new(name, dt.clone(), f.is_nullable())
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        Schema::new(fields)
    };
    for (name, dt) in [
        ("width", DataType::Int64),
        (
            "image_emb",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
        ),
        ("paug", DataType::Utf8),
        ("syn_text_coca", DataType::Utf8),
    ] {
        let err = Layout::from_arrow_schema(&replace(name, dt)).unwrap_err();
        assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
    }
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("extra", DataType::Utf8, true));
    let err = Layout::from_arrow_schema(&Schema::new(fields)).unwrap_err();
    assert!(err.to_string().contains("`extra`"), "{err}");

    let fields: Vec<Field> = base
        .fields()
        .iter()
        .filter(|f| f.name() != "caption")
        .map(|f| f.as_ref().clone())
        .collect();
    let err = Layout::from_arrow_schema(&Schema::new(fields)).unwrap_err();
    assert!(err.to_string().contains("`caption`"), "{err}");

    // Embedding columns must share one dim and dtype.
    let other = DataType::List(Arc::new(Field::new(
        "item",
        DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float16, false)), 8),
        false,
    )));
    let err = Layout::from_arrow_schema(&replace("text_emb", other)).unwrap_err();
    assert!(err.to_string().contains("`text_emb`"), "{err}");
}

#[test]
fn dfndr_metadata_over_a_foreign_schema_is_refused() {
    let layout = full_layout(EmbDtype::F16);
    let kv: Vec<KeyValue> = [
        ("dfndr.schema_version", "1".to_string()),
        ("dfndr.version", "0".into()),
        ("dfndr.source", "s".into()),
        ("dfndr.config_fingerprint", "f".into()),
        ("dfndr.teachers", "[]".into()),
        ("dfndr.captioners", "[]".into()),
        ("dfndr.augmentation", "null".into()),
        ("dfndr.layout", serde_json::to_string(&layout).unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| KeyValue::new(k.into(), v))
    .collect();
    let err = open_err(plain_parquet(kv.clone()));
    assert!(matches!(err, FormatError::Schema { .. }), "{err:?}");
    assert!(err.to_string().contains("`source`"), "{err}");

    let mut broken = kv.clone();
    broken[4] = KeyValue::new("dfndr.teachers".into(), "{not json".to_string());
    let err = open_err(plain_parquet(broken));
    assert!(
        matches!(
            err,
            FormatError::BadMetadata {
                key: "dfndr.teachers",
                ..
            }
        ),
        "{err:?}"
    );

    let missing: Vec<KeyValue> = kv
        .into_iter()
        .filter(|e| e.key != "dfndr.captioners")
        .collect();
    let err = open_err(plain_parquet(missing));
    assert!(
        matches!(
            err,
            FormatError::MissingMetadata {
                key: "dfndr.captioners"
            }
        ),
        "{err:?}"
    );
}

#[test]
fn writer_refuses_rows_that_do_not_match_the_layout() {
    let layout = full_layout(EmbDtype::F16);
    let file = tempfile::tempfile().unwrap();
    let mut w =
        ShardWriter::new(file, layout.clone(), &full_meta(), WriterOptions::default()).unwrap();
    type Breaker = fn(&mut Row);
    let cases: Vec<(&str, Breaker)> = vec![
        ("image", |r| r.image = None),
        ("image_emb[1] has 3 values", |r| {
            r.image_emb[1].pop();
        }),
        ("augmentations", |r| {
            r.image_emb.pop();
        }),
        ("text_emb has 2", |r| r.text_emb.push(vec![0.0; 4])),
        ("text_emb has 0", |r| r.text_emb.clear()),
        ("1 synthetic-caption groups", |r| {
            r.syn.pop();
        }),
        ("syn_text_coca_emb has 1 embeddings for 2", |r| {
            r.syn[0].emb.pop();
        }),
        ("syn_text_blip_2_emb is set", |r| {
            r.syn[1].emb.push(vec![0.0; 4])
        }),
    ];
    for (want, breaker) in cases {
        let mut row = full_row(1);
        breaker(&mut row);
        let err = w.write_row(&row).unwrap_err();
        assert!(matches!(err, FormatError::RowMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(want) && msg.contains("000000001"),
            "{want}: {msg}"
        );
    }
    // Values out of range are refused too, naming the field.
    let values: Vec<(&str, Breaker)> = vec![
        ("paug[0].ops[0].op 14 is not a RandAugment op index", |r| {
            r.paug[0].ops[0].op = 14
        }),
        (
            "paug[1].crop (0, 0, 481, 640) lies outside the 640x480 image",
            |r| r.paug[1].crop[2] = 481,
        ),
        ("paug[0].ops[0].magnitude of Rotate is NaN", |r| {
            r.paug[0].ops[0].magnitude = f32::NAN
        }),
        ("width x height is 0x480", |r| r.width = 0),
    ];
    for (want, breaker) in values {
        let mut row = full_row(1);
        breaker(&mut row);
        let err = w.write_row(&row).unwrap_err();
        assert!(matches!(err, FormatError::InvalidValue { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(want) && msg.contains("key 000000001"),
            "{want}: {msg}"
        );
    }
    // Refused rows leave the writer usable.
    w.write_row(&full_row(2)).unwrap();
    assert_eq!(w.finish().unwrap(), 1);

    // Columns of stages that did not run must stay empty.
    let bare = Layout::default();
    let mut w = ShardWriter::new(
        Vec::new(),
        bare,
        &FileMeta::default(),
        WriterOptions::default(),
    )
    .unwrap();
    for (want, row) in [
        (
            "image is set",
            Row {
                image: Some(vec![1]),
                ..Row::default()
            },
        ),
        (
            "paug is set",
            Row {
                paug: full_row(0).paug,
                ..Row::default()
            },
        ),
        (
            "image_emb is set",
            Row {
                image_emb: vec![vec![0.0]],
                ..Row::default()
            },
        ),
        (
            "text_emb is set",
            Row {
                text_emb: vec![vec![0.0]],
                ..Row::default()
            },
        ),
        (
            "synthetic-caption groups",
            Row {
                syn: vec![SynCaptions::default()],
                ..Row::default()
            },
        ),
    ] {
        let err = w.write_row(&row).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    assert_eq!(w.finish().unwrap(), 0);
}

#[test]
fn invalid_layouts_and_options_are_refused() {
    let with_tag = |tag: &str| Layout {
        syn: vec![SynLayout {
            tag: tag.into(),
            with_emb: false,
        }],
        ..Layout::default()
    };
    for tag in ["", "CoCa", "co-ca", "dup", "x_emb", "café"] {
        let mut layout = with_tag(tag);
        if tag == "dup" {
            layout.syn.push(layout.syn[0].clone());
        }
        let err = layout.validate().unwrap_err();
        assert!(
            matches!(err, FormatError::InvalidLayout(_)),
            "{tag}: {err:?}"
        );
        assert!(ShardWriter::new(
            Vec::new(),
            layout,
            &FileMeta::default(),
            WriterOptions::default()
        )
        .is_err());
    }
    with_tag("coca_l14_2").validate().unwrap();

    for layout in [
        Layout {
            image_emb: true,
            ..Layout::default()
        },
        Layout {
            text_emb: true,
            ..Layout::default()
        },
        Layout {
            syn: vec![SynLayout {
                tag: "a".into(),
                with_emb: true,
            }],
            ..Layout::default()
        },
        Layout {
            text_emb: true,
            emb: Some(EmbLayout {
                dim: 0,
                dtype: EmbDtype::F16,
            }),
            ..Layout::default()
        },
    ] {
        let err = layout.validate().unwrap_err();
        assert!(err.to_string().contains("emb"), "{err}");
    }

    let err = ShardWriter::new(
        Vec::new(),
        Layout::default(),
        &FileMeta::default(),
        WriterOptions { row_group_rows: 0 },
    )
    .err()
    .unwrap();
    assert!(matches!(err, FormatError::InvalidOptions(_)));

    let layout = full_layout(EmbDtype::F16);
    let mut meta = full_meta();
    meta.teachers[0].dim = 3;
    let err = ShardWriter::new(Vec::new(), layout.clone(), &meta, WriterOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("add up to 5"), "{err}");
    let mut meta = full_meta();
    meta.teachers[0].logit_scale = f32::NAN;
    assert!(ShardWriter::new(Vec::new(), layout.clone(), &meta, WriterOptions::default()).is_err());
    let meta = FileMeta {
        schema_version: 2,
        ..full_meta()
    };
    let err = ShardWriter::new(Vec::new(), layout, &meta, WriterOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("version 1"), "{err}");
}

/// Interop hook for checking the format with external tools (pyarrow, DuckDB, polars):
/// `DFNDR_FORMAT_SAMPLE=PATH` writes a sample shard there; `DFNDR_FORMAT_READBACK=PATH` reads a
/// file that another tool rewrote from that sample and checks that it decodes to the same rows.
#[test]
fn sample_file_for_external_tools() {
    let layout = full_layout(EmbDtype::F16);
    let rows: Vec<Row> = (0..7).map(full_row).collect();
    let mut file = write_file(&layout, &full_meta(), &rows, 3);
    if let Ok(path) = std::env::var("DFNDR_FORMAT_SAMPLE") {
        file.seek(SeekFrom::Start(0)).unwrap();
        std::io::copy(&mut file, &mut File::create(path).unwrap()).unwrap();
    }
    if let Ok(path) = std::env::var("DFNDR_FORMAT_READBACK") {
        let reader = ShardReader::open_path(path).unwrap();
        assert_eq!(reader.meta(), &full_meta());
        assert_eq!(reader.layout(), &layout);
        let back = reader
            .rows()
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let expected: Vec<Row> = rows.iter().map(|r| stored(r, &layout)).collect();
        assert_eq!(back, expected);
    }
}
