//! Apple's reinforced webdataset layout (DataCompDR, DFNDR as RayGen writes it), read by the
//! OpenCLIP training patch of apple/ml-mobileclip.
//!
//! One sample is a group of tar members sharing a key:
//!
//! | member | content |
//! |---|---|
//! | `KEY.jpg` / `.png` / `.webp` | the original encoded image |
//! | `KEY.txt` | the ground-truth caption |
//! | `KEY.json` | metadata (`url`, ...) |
//! | `KEY.syn.json` | `{"syn_text...": [captions]}`, one list per captioner |
//! | `KEY.paug.json` | `{"param_aug": [view, ...]}`, each view in Apple's compressed form |
//! | `KEY.npz` | `image_emb` [K, D], `text_emb` [1 + N, D] (ground truth, then the synthetic captions), or `text_emb` [1, D] plus `syn_text..._emb` [N, D] per captioner |
//!
//! This module knows the members and the `.npy` / `.npz` encodings; what goes into the JSON
//! values is decided by the caller (the augmentation parameters' compressed form belongs to
//! the augment crate).

use std::io::{Cursor, Read, Write};

/// Errors of reading or writing the layout.
#[derive(Debug, thiserror::Error)]
pub enum AppleError {
    /// A `.npy` array that is not a 2-D (or 1-D) little-endian float array.
    #[error("{name}: {detail}")]
    Npy {
        /// Array name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A `.npz` archive that cannot be read.
    #[error("npz archive: {0}")]
    Npz(String),
    /// A `KEY.syn.json` that is not an object of caption lists.
    #[error("syn.json: {field} {detail}")]
    Syn {
        /// The offending entry, e.g. `syn_text[2]`, or `document` for the whole file.
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Writing the tar failed.
    #[error("cannot write the tar: {0}")]
    Io(#[from] std::io::Error),
}

/// A row-major float matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Stacks equally long rows (an empty list gives `[0, cols]`).
    pub fn from_rows(rows: &[Vec<f32>], cols: usize) -> Matrix {
        Matrix {
            rows: rows.len(),
            cols,
            data: rows.iter().flatten().copied().collect(),
        }
    }

    /// The rows as vectors.
    pub fn to_rows(&self) -> Vec<Vec<f32>> {
        if self.cols == 0 {
            return vec![Vec::new(); self.rows];
        }
        self.data.chunks(self.cols).map(<[f32]>::to_vec).collect()
    }
}

/// One sample of the layout.
#[derive(Debug, Clone, PartialEq)]
pub struct AppleSample {
    /// Webdataset key.
    pub key: String,
    /// Image member extension (`jpg`, `png`, `webp`).
    pub image_ext: String,
    /// Encoded image.
    pub image: Vec<u8>,
    /// Ground-truth caption.
    pub caption: String,
    /// `KEY.json`.
    pub meta: serde_json::Value,
    /// `KEY.syn.json` (an object of caption lists).
    pub syn: serde_json::Value,
    /// `KEY.paug.json` (an object with `param_aug`).
    pub paug: serde_json::Value,
    /// `KEY.npz` arrays by name, in order (no member when empty: a job without teachers).
    pub arrays: Vec<(String, Matrix)>,
}

/// Encodes a `.npy` file (format 1.0, little-endian float32, C order).
pub fn npy_encode(m: &Matrix) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        m.rows, m.cols
    );
    // Magic (6) + version (2) + header length (2) + dict + padding + '\n', a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let header_len = total - 10;
    let mut out = Vec::with_capacity(total + m.data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    for v in &m.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes a `.npy` file holding a 1-D (one row) or 2-D little-endian float array of
/// float16, float32 or float64 in C order.
///
/// The header's shape is only believed once the data behind it is there: its size is computed
/// with checked arithmetic and compared with the bytes present before anything is allocated, so
/// a header claiming `(2**40, 2**40)` is an error, not an allocation. Rows of zero values (shape
/// `(n, 0)` with n > 0) are refused: they hold no data to bound n by, and no embedding is empty.
pub fn npy_decode(name: &str, bytes: &[u8]) -> Result<Matrix, AppleError> {
    let bad = |detail: String| AppleError::Npy {
        name: name.to_string(),
        detail,
    };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy array".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    // Saturating: a version 2 header length is a full u32 (past the end reads as truncated).
    let data_start = start.saturating_add(header_len);
    let header = bytes
        .get(start..data_start)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header".into()))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[at..].trim_start_matches([':', ' ']))
    };
    let descr = field("descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or_else(|| bad(format!("no dtype in header {header:?}")))?;
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(bad("Fortran-ordered arrays are not supported".into()));
    }
    let shape_text = field("shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad(format!("no shape in header {header:?}")))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| bad(format!("bad shape ({shape_text})")))
        })
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match shape[..] {
        [n] => (1, n),
        [r, c] => (r, c),
        _ => {
            return Err(bad(format!(
                "expected a 1-D or 2-D array, shape ({shape_text})"
            )))
        }
    };
    let width = match descr {
        "<f2" => 2,
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(bad(format!(
                "unsupported dtype {other:?} (float16/32/64 only)"
            )))
        }
    };
    if cols == 0 && rows > 0 {
        return Err(bad(format!("shape ({shape_text}) has rows of zero values")));
    }
    let too_large = || bad(format!("shape ({shape_text}) is too large"));
    let needed = rows
        .checked_mul(cols)
        .and_then(|count| count.checked_mul(width))
        .ok_or_else(too_large)?;
    let data = bytes.get(data_start..).unwrap_or_default();
    if data.len() != needed {
        return Err(bad(format!(
            "shape ({shape_text}) needs {needed} bytes of data, found {}",
            data.len()
        )));
    }
    let values = match width {
        2 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        4 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
    };
    Ok(Matrix {
        rows,
        cols,
        data: values,
    })
}

/// Encodes arrays as a `.npz` archive (uncompressed, as `numpy.savez` writes).
pub fn npz_encode(arrays: &[(String, Matrix)]) -> Result<Vec<u8>, AppleError> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        // A fixed time keeps exports byte-for-byte reproducible.
        .last_modified_time(zip::DateTime::default());
    for (name, m) in arrays {
        zip.start_file(format!("{name}.npy"), options)
            .map_err(|e| AppleError::Npz(e.to_string()))?;
        zip.write_all(&npy_encode(m))?;
    }
    let cursor = zip.finish().map_err(|e| AppleError::Npz(e.to_string()))?;
    Ok(cursor.into_inner())
}

/// Largest array [`npz_decode`] reads (uncompressed): 30 views and 6 captions of a 1536-wide
/// float32 embedding take 0.2 MiB, so this only stops decompression bombs.
pub const MAX_NPY_BYTES: u64 = 256 << 20;

/// Decodes a `.npz` archive (stored or deflated members) into its arrays, by name without
/// the `.npy` suffix, in archive order.
pub fn npz_decode(bytes: &[u8]) -> Result<Vec<(String, Matrix)>, AppleError> {
    npz_decode_limited(bytes, MAX_NPY_BYTES)
}

fn npz_decode_limited(bytes: &[u8], limit: u64) -> Result<Vec<(String, Matrix)>, AppleError> {
    let mut zip =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| AppleError::Npz(e.to_string()))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut file = zip
            .by_index(i)
            .map_err(|e| AppleError::Npz(e.to_string()))?;
        let name = file
            .name()
            .map_err(|e| AppleError::Npz(e.to_string()))?
            .trim_end_matches(".npy")
            .to_string();
        // The declared size is only a hint: a hostile archive may lie about it, and a
        // deflated member may expand a thousandfold; reading stops past the limit. A stored
        // member is no larger than the archive, so that bounds the first allocation.
        let hint = file.size().min(bytes.len() as u64).min(limit);
        let mut data = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
        (&mut file)
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(|e| AppleError::Npz(format!("{name}: {e}")))?;
        if data.len() as u64 > limit {
            return Err(AppleError::Npz(format!(
                "{name}: more than {limit} bytes once decompressed"
            )));
        }
        out.push((name.clone(), npy_decode(&name, &data)?));
    }
    Ok(out)
}

/// Reads `KEY.syn.json`: for each captioner tag, the name and captions of its list.
///
/// The list of tag `TAG` is `syn_text_TAG` (dfndr's export, RayGen with several captioners);
/// with a single tag, DataCompDR's `syn_text` is accepted too. Every caption must be a string:
/// an error names the list and position of the first one that is not.
pub fn syn_decode(bytes: &[u8], tags: &[&str]) -> Result<Vec<(String, Vec<String>)>, AppleError> {
    let err = |field: &str, detail: String| AppleError::Syn {
        field: field.to_string(),
        detail,
    };
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| err("document", format!("is not JSON: {e}")))?;
    let object = doc
        .as_object()
        .ok_or_else(|| err("document", format!("is {}, not an object", kind(&doc))))?;
    let mut out = Vec::with_capacity(tags.len());
    for tag in tags {
        let tagged = format!("syn_text_{tag}");
        let name = if object.contains_key(&tagged) {
            tagged
        } else if tags.len() == 1 && object.contains_key("syn_text") {
            "syn_text".to_string()
        } else {
            return Err(err(&tagged, "is missing".into()));
        };
        let Some(value) = object.get(&name) else {
            return Err(err(&name, "is missing".into()));
        };
        let list = value
            .as_array()
            .ok_or_else(|| err(&name, format!("is {}, not a list of captions", kind(value))))?;
        let texts = list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    err(
                        &format!("{name}[{i}]"),
                        format!("is {}, not a string", kind(v)),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push((name, texts));
    }
    Ok(out)
}

/// A JSON value's kind, for messages (the value itself may be huge).
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Appends one file to a tar with fixed metadata (reproducible archives).
fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, data)
}

/// Writes samples as a tar in Apple's layout.
pub struct AppleTarWriter<W: Write> {
    tar: tar::Builder<W>,
}

impl<W: Write> AppleTarWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            tar: tar::Builder::new(inner),
        }
    }

    /// Appends the members of `sample`, in the order RayGen writes them.
    pub fn write_sample(&mut self, sample: &AppleSample) -> Result<(), AppleError> {
        let key = &sample.key;
        let json = |v: &serde_json::Value| serde_json::to_vec(v).unwrap_or_default();
        let tar = &mut self.tar;
        append(tar, &format!("{key}.{}", sample.image_ext), &sample.image)?;
        append(tar, &format!("{key}.txt"), sample.caption.as_bytes())?;
        append(tar, &format!("{key}.syn.json"), &json(&sample.syn))?;
        append(tar, &format!("{key}.paug.json"), &json(&sample.paug))?;
        if !sample.arrays.is_empty() {
            append(tar, &format!("{key}.npz"), &npz_encode(&sample.arrays)?)?;
        }
        append(tar, &format!("{key}.json"), &json(&sample.meta))?;
        Ok(())
    }

    /// Writes the end-of-archive blocks and returns the inner writer.
    pub fn finish(self) -> Result<W, AppleError> {
        Ok(self.tar.into_inner()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            data: (0..rows * cols).map(|i| i as f32 * 0.25 - 1.0).collect(),
        }
    }

    #[test]
    fn npy_round_trips_and_has_numpys_header() {
        for (r, c) in [(0, 4), (1, 1), (3, 768), (7, 33)] {
            let a = m(r, c);
            let bytes = npy_encode(&a);
            assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0);
            assert_eq!(bytes[9 + header_len], b'\n');
            assert_eq!(npy_decode("a", &bytes).unwrap(), a);
        }
    }

    #[test]
    fn npy_reads_float16_and_float64_and_rejects_the_rest() {
        // As numpy writes them: np.save of np.array([[1, -2]], dtype=np.float16) etc.
        let with = |descr: &str, shape: &str, data: &[u8]| {
            let dict =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(dict.len() as u16 + 1).to_le_bytes());
            b.extend_from_slice(dict.as_bytes());
            b.push(b'\n');
            b.extend_from_slice(data);
            b
        };
        let f16: Vec<u8> = [1.0f32, -2.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let got = npy_decode("x", &with("<f2", "(1, 2)", &f16)).unwrap();
        assert_eq!(got.data, vec![1.0, -2.0]);
        let f64s: Vec<u8> = [0.5f64, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let got = npy_decode("x", &with("<f8", "(3,)", &f64s)).unwrap();
        assert_eq!((got.rows, got.cols, got.data), (1, 3, vec![0.5, 3.0, 4.0]));
        for (descr, shape, data, want) in [
            ("<i4", "(1,)", vec![0u8; 4], "unsupported dtype"),
            ("<f4", "(2, 2)", vec![0u8; 12], "needs 16 bytes"),
            ("<f4", "(1, 1, 1)", vec![0u8; 4], "1-D or 2-D"),
        ] {
            let err = npy_decode("x", &with(descr, shape, &data))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
        assert!(npy_decode("x", b"not numpy").is_err());
    }

    /// A `.npy` file with `shape` in its header and `data` after it.
    fn npy_with_shape(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(dict.len() as u16 + 1).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        b.push(b'\n');
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_shapes_are_believed_only_with_their_data() {
        // Regression cases: the product overflows, or the bytes are missing; both must be
        // errors before any allocation of the claimed size.
        for (descr, shape, want) in [
            ("<f4", "(1099511627776, 1099511627776)", "too large"),
            ("<f8", "(2305843009213693952, 1)", "too large"),
            (
                "<f4",
                "(1099511627776, 1)",
                "needs 4398046511104 bytes of data, found 8",
            ),
            ("<f4", "(1099511627776, 0)", "rows of zero values"),
            ("<f4", "(0,)", "rows of zero values"),
            ("<f4", "(18446744073709551616, 1)", "bad shape"),
            ("<f4", "(-1, 2)", "bad shape"),
        ] {
            let err = npy_decode("image_emb", &npy_with_shape(descr, shape, &[0; 8]))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("image_emb: ") && err.contains(want),
                "{shape}: {err}"
            );
        }
        // An empty list of rows is fine.
        let empty = npy_decode("x", &npy_with_shape("<f4", "(0, 768)", &[])).unwrap();
        assert_eq!((empty.rows, empty.cols, empty.data.len()), (0, 768, 0));
        // Truncated and oversized headers.
        assert!(npy_decode("x", b"\x93NUMPY\x01\x00\xff\xff{").is_err());
        assert!(npy_decode("x", b"\x93NUMPY\x02\x00\xff\xff\xff\xff{").is_err());
        assert!(npy_decode("x", b"\x93NUMPY\x02\x00").is_err());
    }

    #[test]
    fn syn_json_lists_must_hold_strings() {
        let ok = syn_decode(br#"{"syn_text": ["a dog", "a cat"]}"#, &["coca"]).unwrap();
        assert_eq!(
            ok,
            vec![("syn_text".to_string(), vec!["a dog".into(), "a cat".into()])]
        );
        let two = syn_decode(
            br#"{"syn_text_a": ["x"], "syn_text_b": [], "syn_text": ["ignored"]}"#,
            &["a", "b"],
        )
        .unwrap();
        assert_eq!(two[0], ("syn_text_a".to_string(), vec!["x".to_string()]));
        assert_eq!(two[1], ("syn_text_b".to_string(), vec![]));
        for (doc, tags, want) in [
            (
                &br#"{"syn_text": ["a dog", 5]}"#[..],
                &["coca"][..],
                "syn.json: syn_text[1] is a number, not a string",
            ),
            (
                br#"{"syn_text_coca": "a dog"}"#,
                &["coca"],
                "syn.json: syn_text_coca is a string, not a list of captions",
            ),
            (
                br#"{"syn_text": []}"#,
                &["a", "b"],
                "syn.json: syn_text_a is missing",
            ),
            (
                br#"[1, 2]"#,
                &["a"],
                "syn.json: document is a list, not an object",
            ),
            (b"{", &["a"], "syn.json: document is not JSON"),
            (b"", &["a"], "syn.json: document is not JSON"),
        ] {
            let err = syn_decode(doc, tags).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
    }

    #[test]
    fn npz_round_trips_in_order() {
        let arrays = vec![
            ("image_emb".to_string(), m(2, 5)),
            ("text_emb".to_string(), m(6, 5)),
        ];
        let bytes = npz_encode(&arrays).unwrap();
        assert_eq!(npz_decode(&bytes).unwrap(), arrays);
        assert_eq!(npz_encode(&arrays).unwrap(), bytes, "reproducible");
        assert!(npz_decode(b"PK\x03\x04 truncated").is_err());
    }

    #[test]
    fn npz_refuses_arrays_that_decompress_past_the_limit() {
        // A deflated member of zeros: small on disk, past the limit once inflated.
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("image_emb.npy", options).unwrap();
        zip.write_all(&vec![0u8; 4 << 20]).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());
        let err = npz_decode_limited(&bytes, 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("more than 1048576 bytes once decompressed"),
            "{err}"
        );
        // Within the limit the same archive is read (and then refused as no .npy).
        let err = npz_decode_limited(&bytes, 8 << 20).unwrap_err().to_string();
        assert!(err.contains("not a .npy array"), "{err}");
    }
}
