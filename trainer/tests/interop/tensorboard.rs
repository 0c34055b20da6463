//! EventWriter's files read back by a reader written independently of it: its own bitwise
//! CRC-32C (no table) and its own protobuf decoder, so that a mistake shared by writer and
//! reader is unlikely.

use std::path::Path;

use dfndr_trainer::tensorboard::EventWriter;

/// CRC-32C bit by bit with the polynomial written in its normal (non-reflected) form and the
/// input bits reversed on the fly.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    const POLY_NORMAL: u32 = 0x1EDC_6F41;
    let mut crc: u32 = 0xFFFF_FFFF;
    for &byte in data {
        let b = byte.reverse_bits();
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ POLY_NORMAL
            } else {
                crc << 1
            };
        }
    }
    (crc ^ 0xFFFF_FFFF).reverse_bits()
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c_bitwise(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Splits a TFRecord file into its records' data, checking both CRCs of each.
fn read_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let take = |from: usize, n: usize| -> Result<&[u8], String> {
            bytes
                .get(from..from + n)
                .ok_or_else(|| format!("truncated record at byte {from}"))
        };
        let len_bytes = take(at, 8)?;
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(take(at + 8, 4)?.try_into().unwrap());
        if len_crc != masked(len_bytes) {
            return Err(format!("length CRC mismatch at byte {at}"));
        }
        let data = take(at + 12, len)?;
        let data_crc = u32::from_le_bytes(take(at + 12 + len, 4)?.try_into().unwrap());
        if data_crc != masked(data) {
            return Err(format!("data CRC mismatch at byte {at}"));
        }
        out.push(data.to_vec());
        at += 12 + len + 4;
    }
    Ok(out)
}

/// One decoded protobuf field.
#[derive(Debug, Clone)]
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn read_varint(buf: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
        assert!(shift < 64, "varint too long");
    }
}

/// Every (field number, value) of one message, in order.
fn decode(buf: &[u8]) -> Vec<(u64, Field)> {
    let mut at = 0;
    let mut fields = Vec::new();
    while at < buf.len() {
        let key = read_varint(buf, &mut at);
        let (number, wire) = (key >> 3, key & 7);
        let field = match wire {
            0 => Field::Varint(read_varint(buf, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(buf[at - 8..at].try_into().unwrap())
            }
            2 => {
                let n = read_varint(buf, &mut at) as usize;
                at += n;
                Field::Bytes(buf[at - n..at].to_vec())
            }
            5 => {
                at += 4;
                Field::Fixed32(buf[at - 4..at].try_into().unwrap())
            }
            w => panic!("unexpected wire type {w}"),
        };
        fields.push((number, field));
    }
    fields
}

#[derive(Debug, Default, PartialEq)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    /// (tag, simple_value) of the summary, in order.
    values: Vec<(String, f32)>,
}

fn decode_event(data: &[u8]) -> Event {
    let mut e = Event::default();
    for (number, field) in decode(data) {
        match (number, field) {
            (1, Field::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => e.step = v as i64,
            (3, Field::Bytes(b)) => e.file_version = Some(String::from_utf8(b).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, value) in decode(&summary) {
                    let Field::Bytes(value) = value else {
                        panic!("Summary.value not a message")
                    };
                    assert_eq!(n, 1, "Summary field {n}");
                    let (mut tag, mut simple) = (None, None);
                    for (vn, vf) in decode(&value) {
                        match (vn, vf) {
                            (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t).unwrap()),
                            (2, Field::Fixed32(f)) => simple = Some(f32::from_le_bytes(f)),
                            other => panic!("unexpected Value field {other:?}"),
                        }
                    }
                    e.values
                        .push((tag.expect("tag"), simple.expect("simple_value")));
                }
            }
            other => panic!("unexpected Event field {other:?}"),
        }
    }
    e
}

fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    read_records(&bytes)
        .unwrap()
        .iter()
        .map(|d| decode_event(d))
        .collect()
}

#[test]
fn reader_crc_is_crc32c() {
    // The reader's own CRC must be right for its check to mean anything.
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_bitwise(&[0u8; 32]), 0x8A91_36AA);
}

#[test]
fn scalars_read_back_with_their_steps_values_and_times() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("runs/a");
    let mut w = EventWriter::create(&sub).unwrap();
    let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("events.out.tfevents.") && name.ends_with(".dfndr"),
        "{name}"
    );
    assert_eq!(w.path().parent().unwrap(), sub);

    w.scalar("loss/total", 1, 2.5, 1_700_000_000.25).unwrap();
    w.scalars(
        2,
        1_700_000_001.5,
        &[
            ("loss/total", 2.25),
            ("lr", 1e-4),
            ("grad_norm", 123_456.789),
        ],
    )
    .unwrap();
    w.scalar("loss/total", 0, -0.125, 1_700_000_002.0).unwrap();
    w.scalar(
        "big_step",
        u64::from(u32::MAX) + 7,
        1.0 / 3.0,
        1_700_000_003.0,
    )
    .unwrap();
    w.scalars(
        5,
        1_700_000_004.0,
        &[
            ("nan", f64::NAN),
            ("inf", f64::INFINITY),
            ("ninf", f64::NEG_INFINITY),
        ],
    )
    .unwrap();
    w.flush().unwrap();

    let events = read_events(w.path());
    assert_eq!(events.len(), 6);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].values.is_empty());
    assert!(
        events[0].wall_time > 1.6e9,
        "file_version event has the current time"
    );

    let e = &events[1];
    assert_eq!(
        (e.step, e.wall_time, e.file_version.clone()),
        (1, 1_700_000_000.25, None)
    );
    assert_eq!(e.values, [("loss/total".to_string(), 2.5f32)]);

    let e = &events[2];
    assert_eq!((e.step, e.wall_time), (2, 1_700_000_001.5));
    assert_eq!(
        e.values,
        [
            ("loss/total".to_string(), 2.25f32),
            ("lr".to_string(), 1e-4f32),
            ("grad_norm".to_string(), 123_456.789f64 as f32),
        ]
    );

    assert_eq!((events[3].step, events[3].wall_time), (0, 1_700_000_002.0));
    assert_eq!(events[3].values, [("loss/total".to_string(), -0.125f32)]);

    assert_eq!(events[4].step, i64::from(u32::MAX) + 7);
    assert_eq!(
        events[4].values,
        [("big_step".to_string(), (1.0f64 / 3.0) as f32)]
    );

    let v = &events[5].values;
    assert_eq!(
        v.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["nan", "inf", "ninf"]
    );
    assert!(v[0].1.is_nan());
    assert_eq!((v[1].1, v[2].1), (f32::INFINITY, f32::NEG_INFINITY));
}

#[test]
fn records_are_on_disk_after_flush_and_a_second_writer_gets_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = EventWriter::create(dir.path()).unwrap();
    // The file_version event is flushed by create.
    assert_eq!(read_events(a.path()).len(), 1);
    a.scalar("x", 3, 1.0, 10.0).unwrap();
    a.flush().unwrap();
    assert_eq!(read_events(a.path()).len(), 2);

    let b = EventWriter::create(dir.path()).unwrap();
    assert_ne!(a.path(), b.path());
    assert_eq!(read_events(b.path()).len(), 1);
    assert_eq!(read_events(a.path()).len(), 2);
}

#[test]
fn a_corrupted_byte_fails_the_crc_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    w.scalars(7, 1_700_000_000.0, &[("loss/total", 1.5), ("lr", 0.001)])
        .unwrap();
    w.flush().unwrap();
    let good = std::fs::read(w.path()).unwrap();
    assert!(read_records(&good).is_ok());
    let first_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let second = 12 + first_len + 4;

    // A byte of the second record's data (its step varint region) ...
    let mut bad = good.clone();
    bad[second + 12 + 10] ^= 0x01;
    let err = read_records(&bad).unwrap_err();
    assert!(err.contains("data CRC"), "{err}");

    // ... a byte of a length ...
    let mut bad = good.clone();
    bad[second] ^= 0x40;
    let err = read_records(&bad).unwrap_err();
    assert!(err.contains("length CRC"), "{err}");

    // ... and a byte of a stored CRC are each caught.
    let mut bad = good;
    let last = bad.len() - 1;
    bad[last] ^= 0x80;
    let err = read_records(&bad).unwrap_err();
    assert!(err.contains("data CRC"), "{err}");
}
