//! TensorBoard event files written by hand, so that a run's scalars can be looked at with
//! `tensorboard --logdir` without a protobuf or TensorBoard crate.
//!
//! An event file is a sequence of TFRecord records, each
//! `u64 LE length, u32 LE masked_crc32c(length bytes), data, u32 LE masked_crc32c(data)`, where
//! the data is a serialized `tensorflow.Event`:
//!
//! ```text
//! message Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! message Summary { repeated Value value = 1; }
//! message Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! The first event carries `file_version = "brain.Event:2"`; each later one a summary of one or
//! more scalars of one step.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, TrainError};

/// The file version TensorBoard expects in the first event.
const FILE_VERSION: &str = "brain.Event:2";

/// An append-only TensorBoard event file
/// `events.out.tfevents.{unix_seconds}.{hostname}.{pid}.dfndr` in a folder.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates the folder if needed and a new event file in it; writes the file_version event
    /// ("brain.Event:2").
    ///
    /// A second writer created in the same folder by the same process within the same second
    /// gets a `-1`, `-2`, ... suffix rather than overwriting the first file.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let base = format!(
            "events.out.tfevents.{}.{}.{}.dfndr",
            now.as_secs(),
            hostname(),
            std::process::id()
        );
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(io(&path, e)),
            }
        };
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, now.as_secs_f64());
        put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
        writer.record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// Appends one scalar (`tag`, e.g. "loss/total", at `step`, with the event's wall time in
    /// seconds since the epoch).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64, wall_time: f64) -> Result<()> {
        self.scalars(step, wall_time, &[(tag, value)])
    }

    /// Appends several scalars of one step as ONE event (one Summary with several values).
    ///
    /// Values are stored as `float` (TensorBoard's scalar type); NaN and infinities are written
    /// as they are.
    pub fn scalars(&mut self, step: u64, wall_time: f64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        let mut value = Vec::new();
        for &(tag, v) in values {
            value.clear();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_float(&mut value, 2, v as f32);
            put_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::with_capacity(summary.len() + 24);
        put_double(&mut event, 1, wall_time);
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Flushes buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| io(&self.path, e))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one TFRecord record holding `data`.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&len);
        head[8..].copy_from_slice(&masked_crc32c(&len).to_le_bytes());
        self.out
            .write_all(&head)
            .and_then(|_| self.out.write_all(data))
            .and_then(|_| self.out.write_all(&masked_crc32c(data).to_le_bytes()))
            .map_err(|e| io(&self.path, e))
    }
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// The host's name for the file name (TensorBoard's own writers put it there too), restricted
/// to characters that are safe in a file name.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

// --- protobuf: the few encodings an Event needs -------------------------------------------

const WIRE_VARINT: u32 = 0;
const WIRE_FIXED64: u32 = 1;
const WIRE_LEN: u32 = 2;
const WIRE_FIXED32: u32 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from((field << 3) | wire));
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, WIRE_VARINT);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, WIRE_FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, WIRE_FIXED32);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

// --- CRC-32C (Castagnoli) as TFRecord masks it ----------------------------------------------

/// The byte-at-a-time table of the reflected CRC-32C polynomial.
const CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            k += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so that a CRC stored
/// inside data that is itself checksummed does not weaken the check.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_known_vectors() {
        // RFC 3720 (iSCSI) B.4 and the usual check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varint_encodes_like_protobuf() {
        let enc = |v| {
            let mut o = Vec::new();
            put_varint(&mut o, v);
            o
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(u64::MAX).len(), 10);
    }
}
