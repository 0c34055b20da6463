//! Writing state dicts as PyTorch `torch.save` files (the zip format of torch >= 1.6), so that
//! `torch.load(path)` with `weights_only=True` and OpenCLIP's `pretrained=PATH` read them.
//!
//! The archive holds, all stored (no compression) and each entry's data starting on a 64-byte
//! boundary (what torch's own writer does, for `torch.load(path, mmap=True)`):
//!
//! - `archive/data.pkl`: a protocol-2 pickle of `{wrap: OrderedDict(...)}` (or the bare
//!   `OrderedDict`) whose values are `torch._utils._rebuild_tensor_v2(storage, 0, size, stride,
//!   False, OrderedDict())`, each storage the persistent id
//!   `('storage', torch.FloatStorage, 'KEY', 'cpu', numel)`;
//! - `archive/byteorder`: `little`;
//! - `archive/data/KEY`: the raw little-endian elements of storage `KEY` (`0`, `1`, ...: one
//!   storage per tensor, in the order given);
//! - `archive/version`: `3`.
//!
//! `.format_version` is left out on purpose: with it, torch computes the storage offsets from
//! the layout of its own zip writer instead of reading them from the local headers.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

use crate::error::{Result, TeacherError};

/// The folder every entry lives in (torch uses the file stem; any name is read back).
const ARCHIVE: &str = "archive";
/// Data alignment of every entry, as torch writes it.
const ALIGNMENT: u16 = 64;
/// Elements converted to bytes per write.
const CHUNK: usize = 1 << 14;

/// Writes `tensors` (in the given order) as `torch.save({wrap: OrderedDict(tensors)})`, or as
/// a bare `OrderedDict` when `wrap` is None, atomically (temporary file + rename).
///
/// Supported dtypes: f32, f16, bf16, f64, i64 and u8. Non-contiguous tensors are written as
/// their contiguous copy; a 0-dim tensor stays 0-dim. Tensors on another device are copied to
/// the CPU one at a time.
pub fn save_torch(path: &Path, tensors: &[(String, Tensor)], wrap: Option<&str>) -> Result<()> {
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        storage_class(name, tensor.dtype())?;
        if !seen.insert(name.as_str()) {
            return Err(TeacherError::Input(format!(
                "tensor name {name:?} appears twice in a state dict to save"
            )));
        }
    }
    // A pickled string carries its length in 4 bytes.
    let mut names = tensors.iter().map(|(name, _)| name.as_str()).chain(wrap);
    if let Some(long) = names.find(|s| u32::try_from(s.len()).is_err()) {
        return Err(TeacherError::Input(format!(
            "a name of {} bytes cannot be pickled",
            long.len()
        )));
    }
    let pickle = state_dict_pickle(tensors, wrap)?;

    let tmp = temporary_path(path)?;
    let written = write_archive(&tmp, &pickle, tensors).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| TeacherError::Write {
            path: path.to_path_buf(),
            source,
        })
    });
    if written.is_err() {
        // Best effort: the error that matters is the one already in hand.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `DIR/.NAME.PID.tmp`, next to the destination so that the rename stays on one file system.
fn temporary_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| TeacherError::Input(format!("{} is not a file path", path.display())))?;
    let pid = std::process::id();
    Ok(path.with_file_name(format!(".{}.{pid}.tmp", name.to_string_lossy())))
}

fn write_archive(tmp: &Path, pickle: &[u8], tensors: &[(String, Tensor)]) -> Result<()> {
    let write_err = |source| TeacherError::Write {
        path: tmp.to_path_buf(),
        source,
    };
    let zip_err = |e: zip::result::ZipError| write_err(std::io::Error::from(e));
    let file = std::fs::File::create(tmp).map_err(write_err)?;
    let mut zip = ZipWriter::new(BufWriter::new(file));
    let options = |len: usize| {
        SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .last_modified_time(DateTime::default())
            .with_alignment(ALIGNMENT)
            .large_file(len as u64 >= u64::from(u32::MAX))
    };

    zip.start_file(format!("{ARCHIVE}/data.pkl"), options(pickle.len()))
        .map_err(zip_err)?;
    zip.write_all(pickle).map_err(write_err)?;
    zip.start_file(format!("{ARCHIVE}/byteorder"), options(6))
        .map_err(zip_err)?;
    zip.write_all(b"little").map_err(write_err)?;
    for (key, (_, tensor)) in tensors.iter().enumerate() {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        zip.start_file(format!("{ARCHIVE}/data/{key}"), options(bytes))
            .map_err(zip_err)?;
        write_elements(&mut zip, tensor, write_err)?;
    }
    zip.start_file(format!("{ARCHIVE}/version"), options(2))
        .map_err(zip_err)?;
    zip.write_all(b"3\n").map_err(write_err)?;

    let file = zip
        .finish()
        .map_err(zip_err)?
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)
}

/// Writes the tensor's elements in row-major order, little-endian.
fn write_elements(
    out: &mut impl Write,
    tensor: &Tensor,
    write_err: impl Fn(std::io::Error) -> TeacherError,
) -> Result<()> {
    let flat = tensor.flatten_all()?;
    let written = match tensor.dtype() {
        DType::F32 => write_le(out, &flat.to_vec1::<f32>()?, |v| v.to_le_bytes()),
        DType::F64 => write_le(out, &flat.to_vec1::<f64>()?, |v| v.to_le_bytes()),
        DType::F16 => write_le(out, &flat.to_vec1::<half::f16>()?, |v| v.to_le_bytes()),
        DType::BF16 => write_le(out, &flat.to_vec1::<half::bf16>()?, |v| v.to_le_bytes()),
        DType::I64 => write_le(out, &flat.to_vec1::<i64>()?, |v| v.to_le_bytes()),
        DType::U8 => out.write_all(&flat.to_vec1::<u8>()?),
        // Refused by `storage_class` before anything is written.
        other => Err(std::io::Error::other(format!(
            "unsupported dtype {other:?}"
        ))),
    };
    written.map_err(write_err)
}

fn write_le<T, const N: usize>(
    out: &mut impl Write,
    values: &[T],
    le: impl Fn(&T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(CHUNK.min(values.len()) * N);
    for chunk in values.chunks(CHUNK) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&le(v));
        }
        out.write_all(&buf)?;
    }
    Ok(())
}

/// The torch storage class of a dtype (`torch.FloatStorage` for f32, ...).
fn storage_class(name: &str, dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        other => {
            return Err(TeacherError::Input(format!(
                "tensor {name:?} has dtype {other:?}; a torch.save file can be written for \
                 f32, f16, bf16, f64, i64 and u8"
            )))
        }
    })
}

/// The pickle of `{wrap: OrderedDict(name -> tensor)}` or of the bare `OrderedDict`, storage
/// `i` holding tensor `i`.
fn state_dict_pickle(tensors: &[(String, Tensor)], wrap: Option<&str>) -> Result<Vec<u8>> {
    let mut p = Pickle::default();
    p.op(op::PROTO);
    p.op(2);
    if let Some(wrap) = wrap {
        p.op(op::EMPTY_DICT);
        p.unicode(wrap);
    }
    p.ordered_dict();
    if !tensors.is_empty() {
        p.op(op::MARK);
        for (key, (name, tensor)) in tensors.iter().enumerate() {
            p.unicode(name);
            let class = storage_class(name, tensor.dtype())?;
            p.rebuild_tensor(class, &key.to_string(), tensor.dims());
        }
        p.op(op::SETITEMS);
    }
    if wrap.is_some() {
        p.op(op::SETITEM);
    }
    p.op(op::STOP);
    Ok(p.0)
}

/// Pickle opcodes (names as in Python's `pickletools`).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const STOP: u8 = b'.';
}

/// A minimal pickle emitter: just what a state dict of tensors needs, no memo.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.op(op::GLOBAL);
        for part in [module, name] {
            self.0.extend_from_slice(part.as_bytes());
            self.0.push(b'\n');
        }
    }

    fn unicode(&mut self, s: &str) {
        self.op(op::BINUNICODE);
        // Lengths are checked to fit in 4 bytes by `save_torch`.
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A non-negative int: BININT up to 2^31 - 1, LONG1 above (two's complement, little-endian,
    /// with a zero byte added when the top bit would read as a sign).
    fn int(&mut self, v: usize) {
        match i32::try_from(v) {
            Ok(small) => {
                self.op(op::BININT);
                self.0.extend_from_slice(&small.to_le_bytes());
            }
            Err(_) => {
                let bytes = (v as u64).to_le_bytes();
                let mut len = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                let mut long = bytes[..len].to_vec();
                if long.last().is_some_and(|&b| b & 0x80 != 0) {
                    long.push(0);
                    len += 1;
                }
                self.op(op::LONG1);
                self.0.push(len as u8);
                self.0.extend_from_slice(&long);
            }
        }
    }

    fn int_tuple(&mut self, values: &[usize]) {
        if values.is_empty() {
            self.op(op::EMPTY_TUPLE);
            return;
        }
        self.op(op::MARK);
        for &v in values {
            self.int(v);
        }
        self.op(op::TUPLE);
    }

    /// `collections.OrderedDict()`.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(op::EMPTY_TUPLE);
        self.op(op::REDUCE);
    }

    /// `torch._utils._rebuild_tensor_v2(storage, 0, dims, contiguous strides, False,
    /// OrderedDict())` over the persistent storage `('storage', torch.CLASS, key, 'cpu', numel)`.
    fn rebuild_tensor(&mut self, class: &str, key: &str, dims: &[usize]) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(op::MARK);
        self.op(op::MARK);
        self.unicode("storage");
        self.global("torch", class);
        self.unicode(key);
        self.unicode("cpu");
        self.int(dims.iter().product());
        self.op(op::TUPLE);
        self.op(op::BINPERSID);
        self.int(0);
        self.int_tuple(dims);
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        self.int_tuple(&strides);
        self.op(op::NEWFALSE);
        self.ordered_dict();
        self.op(op::TUPLE);
        self.op(op::REDUCE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against Python's `pickle.dumps(v, 2)`, without the PROTO and STOP around it.
    #[test]
    fn ints_are_encoded_as_python_pickles_them() {
        for (v, python) in [
            (0usize, "4a00000000"),
            (2_147_483_647, "4affffff7f"),
            (2_147_483_648, "8a050000008000"),
            ((1 << 40) + 7, "8a06070000000001"),
            (usize::MAX, "8a09ffffffffffffffff00"),
        ] {
            let mut p = Pickle::default();
            p.int(v);
            let hex: String = p.0.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, python, "{v}");
        }
    }

    #[test]
    fn strides_are_row_major_and_empty_for_scalars() {
        let mut p = Pickle::default();
        p.rebuild_tensor("FloatStorage", "0", &[2, 1, 3]);
        let mut want = Pickle::default();
        want.int_tuple(&[3, 3, 1]);
        let found = p.0.windows(want.0.len()).any(|w| w == want.0.as_slice());
        assert!(found, "stride (3, 3, 1) of shape (2, 1, 3)");

        let mut scalar = Pickle::default();
        scalar.rebuild_tensor("FloatStorage", "0", &[]);
        // numel 1, offset 0, then size () and stride (), then False.
        let tail = [
            op::BININT,
            0,
            0,
            0,
            0,
            op::EMPTY_TUPLE,
            op::EMPTY_TUPLE,
            op::NEWFALSE,
        ];
        assert!(scalar.0.windows(tail.len()).any(|w| w == tail));
    }
}
