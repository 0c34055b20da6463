//! Checks of a file's physical layout before anything is decoded: codecs, row-group row counts,
//! column-chunk byte ranges, and every page header, so that no stored count, offset or size
//! makes the parquet decoder overflow, assert or allocate memory the file cannot back.
//!
//! The page pre-scan: the parquet crate reserves a page's claimed `uncompressed_page_size` (up
//! to 2 GiB) before it decompresses the page. That claim is a number read from the file: a few
//! flipped bits in a 12 KB shard asked the allocator for 2 GiB at once (found by
//! `tests/fuzz_stored.rs`). Before any row is decoded, [`check_pages`] walks the page headers of
//! every column chunk (thrift compact protocol, parsed here because the crate keeps its parser
//! private) and refuses a page
//!
//! - whose header or data reaches past its column chunk,
//! - with a negative size, or
//! - whose claimed size cannot come out of its zstd data. The zstd block headers (3 bytes each,
//!   read without decompressing anything) say what each block decompresses to: exactly its
//!   size for raw and RLE blocks, at most the frame's block maximum (128 KiB or less) for a
//!   compressed block. The claim must not exceed their sum, and must equal the frame's content
//!   size where the frame header records one (every writer that compresses a page at once).
//!
//! Valid files always pass: the bounds are those of the zstd format itself, not guesses about
//! how compressible the data is. What a page can then make the decoder allocate is what its
//! zstd data really decompresses to, or at most 128 KiB per compressed block.

use parquet::basic::Compression;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::ChunkReader;

use super::FormatError;

/// The largest zstd block, decompressed (`Block_Maximum_Size` is at most this).
const ZSTD_MAX_BLOCK: u64 = 128 << 10;

/// First bytes read for a page header; grown (up to the chunk's end) when a header with large
/// statistics does not fit.
const HEADER_READ: usize = 4 << 10;

/// Nesting of thrift structs and containers beyond which a header is refused (page headers
/// nest 3 deep).
const MAX_DEPTH: u32 = 16;

/// Refuses column chunks compressed with a codec this build cannot decode. Keep in sync with
/// the parquet features of the workspace Cargo.toml (`zstd` only).
pub(super) fn check_codecs(metadata: &ParquetMetaData) -> Result<(), FormatError> {
    for group in metadata.row_groups() {
        for chunk in group.columns() {
            match chunk.compression() {
                Compression::UNCOMPRESSED | Compression::ZSTD(_) => {}
                other => {
                    return Err(FormatError::UnsupportedCompression {
                        column: chunk.column_path().string(),
                        codec: other.to_string(),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Refuses row groups whose row counts do not add up to the file's (the parquet crate sums
/// them unchecked, and a negative count wraps to a huge one) and column chunks whose byte range
/// is negative or reaches past the end of the file (the crate asserts on negative ranges; past
/// the end can only be corruption). Checked arithmetic: all of these are stored numbers.
pub(super) fn check_row_groups(
    metadata: &ParquetMetaData,
    file_len: u64,
) -> Result<(), FormatError> {
    let corrupt = |m: String| FormatError::NotParquet(parquet::errors::ParquetError::General(m));
    let mut total = Some(0i64);
    for group in metadata.row_groups() {
        let rows = group.num_rows();
        total = total
            .and_then(|t| t.checked_add(rows))
            .filter(|_| rows >= 0);
    }
    if total != Some(metadata.file_metadata().num_rows()) {
        return Err(corrupt(format!(
            "the row groups' row counts do not add up to the file's {}",
            metadata.file_metadata().num_rows()
        )));
    }
    for group in metadata.row_groups() {
        for chunk in group.columns() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or_else(|| chunk.data_page_offset());
            let len = chunk.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|end| end > file_len) {
                return Err(corrupt(format!(
                    "column chunk `{}` claims bytes {start}..{start}+{len}, outside the {file_len}-byte file",
                    chunk.column_path().string()
                )));
            }
        }
    }
    Ok(())
}

/// Checks the page headers of every column chunk of `metadata` in `reader`; the chunk ranges
/// must already be known to lie inside the file. Errors name the column and the page.
pub(super) fn check_pages<R: ChunkReader>(
    metadata: &ParquetMetaData,
    reader: &R,
) -> Result<(), String> {
    for group in metadata.row_groups() {
        for chunk in group.columns() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or_else(|| chunk.data_page_offset());
            // Non-negative and inside the file: checked by the caller.
            let (start, len) = (start.max(0) as u64, chunk.compressed_size().max(0) as u64);
            let zstd = matches!(chunk.compression(), Compression::ZSTD(_));
            check_chunk(reader, start, start + len, zstd)
                .map_err(|e| format!("column `{}`: {e}", chunk.column_path().string()))?;
        }
    }
    Ok(())
}

/// Walks the pages of one column chunk occupying bytes `start..end`.
fn check_chunk<R: ChunkReader>(reader: &R, start: u64, end: u64, zstd: bool) -> Result<(), String> {
    let mut pos = start;
    let mut page = 0usize;
    while pos < end {
        let left = end - pos;
        let mut want = (HEADER_READ as u64).min(left);
        let (header, header_len) = loop {
            let bytes = reader
                .get_bytes(pos, want as usize)
                .map_err(|e| format!("page {page}: {e}"))?;
            match PageSizes::parse(&bytes) {
                Ok((h, used)) => break (h, used as u64),
                Err(Parse::Truncated) if want < left => want = (want * 16).min(left),
                Err(Parse::Truncated) => {
                    return Err(format!("page {page}: header runs past the column chunk"))
                }
                Err(Parse::Invalid(e)) => return Err(format!("page {page}: header {e}")),
            }
        };
        let (uncompressed, compressed) = match (
            u64::try_from(header.uncompressed),
            u64::try_from(header.compressed),
        ) {
            (Ok(u), Ok(c)) => (u, c),
            _ => {
                return Err(format!(
                    "page {page}: negative size (uncompressed {}, compressed {})",
                    header.uncompressed, header.compressed
                ))
            }
        };
        let data_end = pos
            .checked_add(header_len)
            .and_then(|p| p.checked_add(compressed))
            .filter(|e| *e <= end)
            .ok_or_else(|| {
                format!("page {page}: its {compressed} bytes run past the column chunk")
            })?;
        if zstd && header.compressed_data {
            // v2 pages keep their levels uncompressed in front of the zstd data.
            let levels = header.levels;
            if levels > compressed || levels > uncompressed {
                return Err(format!(
                    "page {page}: {levels} bytes of levels in a page of {compressed} compressed, {uncompressed} uncompressed bytes"
                ));
            }
            let claim = uncompressed - levels;
            // The decoder skips decompression of a page that claims nothing.
            if claim > 0 {
                let zstd_start = pos + header_len + levels;
                let (most, exact) = zstd_bounds(reader, zstd_start, compressed - levels)
                    .map_err(|e| format!("page {page}: its zstd data {e}"))?;
                if claim > most || exact.is_some_and(|e| e != claim) {
                    return Err(format!(
                        "page {page} claims {claim} bytes once decompressed, but its zstd data holds {}",
                        match exact {
                            Some(e) => format!("{e}"),
                            None => format!("at most {most}"),
                        }
                    ));
                }
            }
        }
        pos = data_end;
        page += 1;
    }
    Ok(())
}

/// What the zstd data at `start..start + len` of `reader` decompresses to: at most the first
/// value, and exactly the second when every frame records its content size. Reads only frame
/// and block headers. Errors say what is wrong with the data.
fn zstd_bounds<R: ChunkReader>(
    reader: &R,
    start: u64,
    len: u64,
) -> Result<(u64, Option<u64>), String> {
    let end = start.checked_add(len).ok_or("is out of range")?;
    let read = |at: u64, n: usize| -> Result<bytes::Bytes, String> {
        if at.checked_add(n as u64).is_none_or(|e| e > end) {
            return Err("is truncated".into());
        }
        reader.get_bytes(at, n).map_err(|e| e.to_string())
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |v, x| (v << 8) | u64::from(*x));
    let (mut most, mut exact) = (0u64, Some(0u64));
    let mut pos = start;
    while pos < end {
        let magic = le(&read(pos, 4)?);
        if magic & 0xffff_fff0 == 0x184d_2a50 {
            // A skippable frame: its size, then that many bytes of nothing to decompress.
            let size = le(&read(pos + 4, 4)?);
            pos = pos + 8 + size;
            if pos > end {
                return Err("is truncated".into());
            }
            continue;
        }
        if magic != 0xfd2f_b528 {
            return Err("is not a zstd frame".into());
        }
        let descriptor = read(pos + 4, 1)?[0];
        if descriptor & 0x08 != 0 {
            return Err("has a reserved frame header bit set".into());
        }
        let single_segment = descriptor & 0x20 != 0;
        let mut at = pos + 5;
        let window = if single_segment {
            None
        } else {
            let w = read(at, 1)?[0];
            at += 1;
            let base = 1u64 << (10 + (w >> 3));
            Some(base + base / 8 * u64::from(w & 7))
        };
        at += [0, 1, 2, 4][usize::from(descriptor & 0x03)];
        let fcs_len = match (descriptor >> 6, single_segment) {
            (0, false) => 0,
            (0, true) => 1,
            (1, _) => 2,
            (2, _) => 4,
            _ => 8,
        };
        let content = if fcs_len == 0 {
            None
        } else {
            let v = le(&read(at, fcs_len)?);
            // The 2-byte form is stored minus 256.
            Some(if fcs_len == 2 { v + 256 } else { v })
        };
        at += fcs_len as u64;
        // A single-segment frame's window is its content size.
        let block_max = window.or(content).unwrap_or(0).min(ZSTD_MAX_BLOCK);
        let mut frame_most = 0u64;
        loop {
            let header = le(&read(at, 3)?);
            at += 3;
            let (last, kind, size) = (header & 1 == 1, (header >> 1) & 3, header >> 3);
            if size > block_max {
                return Err(format!(
                    "has a block of {size} bytes, above its {block_max}-byte maximum"
                ));
            }
            let (out, stored) = match kind {
                0 => (size, size),
                1 => (size, 1),
                2 => (block_max, size),
                _ => return Err("has a block of the reserved type".into()),
            };
            frame_most += out;
            at += stored;
            if at > end {
                return Err("is truncated".into());
            }
            if last {
                break;
            }
        }
        if descriptor & 0x04 != 0 {
            // The content checksum.
            at += 4;
        }
        if at > end {
            return Err("is truncated".into());
        }
        if content.is_some_and(|c| c > frame_most) {
            return Err("records a content size its blocks cannot hold".into());
        }
        most = most.saturating_add(frame_most);
        exact = exact.zip(content).map(|(a, b)| a.saturating_add(b));
        pos = at;
    }
    Ok((most, exact))
}

/// What [`check_chunk`] needs from a page header.
#[derive(Debug, Default, PartialEq)]
struct PageSizes {
    uncompressed: i32,
    compressed: i32,
    /// Uncompressed level bytes in front of a v2 page's data.
    levels: u64,
    /// Whether the page data is compressed (v2 pages may say not).
    compressed_data: bool,
}

/// Why a header did not parse.
#[derive(Debug, PartialEq)]
enum Parse {
    /// The buffer ended first; a longer read may succeed.
    Truncated,
    /// Not a valid page header.
    Invalid(String),
}

/// Compact-protocol field types.
const T_BOOL_TRUE: u8 = 1;
const T_BOOL_FALSE: u8 = 2;
const T_BYTE: u8 = 3;
const T_I16: u8 = 4;
const T_I32: u8 = 5;
const T_I64: u8 = 6;
const T_DOUBLE: u8 = 7;
const T_BINARY: u8 = 8;
const T_LIST: u8 = 9;
const T_SET: u8 = 10;
const T_MAP: u8 = 11;
const T_STRUCT: u8 = 12;

/// A thrift compact-protocol reader over a byte slice.
struct Thrift<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Thrift<'_> {
    fn byte(&mut self) -> Result<u8, Parse> {
        let b = *self.bytes.get(self.pos).ok_or(Parse::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, Parse> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Parse::Invalid("has an over-long varint".into()))
    }

    fn zigzag(&mut self) -> Result<i64, Parse> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn i32(&mut self) -> Result<i32, Parse> {
        let v = self.zigzag()?;
        i32::try_from(v).map_err(|_| Parse::Invalid(format!("has an i32 field of {v}")))
    }

    fn skip_bytes(&mut self, n: u64) -> Result<(), Parse> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .ok_or(Parse::Truncated)?;
        if end > self.bytes.len() {
            return Err(Parse::Truncated);
        }
        self.pos = end;
        Ok(())
    }

    /// Reads a field header: `None` at the struct's end, else (id, type).
    fn field(&mut self, last: &mut i16) -> Result<Option<(i16, u8)>, Parse> {
        let b = self.byte()?;
        let kind = b & 0x0f;
        if kind == 0 {
            return Ok(None);
        }
        let delta = i16::from(b >> 4);
        let id = if delta == 0 {
            let v = self.zigzag()?;
            i16::try_from(v).map_err(|_| Parse::Invalid(format!("has field id {v}")))?
        } else {
            last.checked_add(delta)
                .ok_or_else(|| Parse::Invalid("has a field id past i16".into()))?
        };
        *last = id;
        Ok(Some((id, kind)))
    }

    /// Skips a container element: booleans take one byte there (in fields, none).
    fn skip_element(&mut self, kind: u8, depth: u32) -> Result<(), Parse> {
        if kind == T_BOOL_TRUE || kind == T_BOOL_FALSE {
            self.byte().map(drop)
        } else {
            self.skip(kind, depth)
        }
    }

    /// Skips a value of compact type `kind`.
    fn skip(&mut self, kind: u8, depth: u32) -> Result<(), Parse> {
        if depth > MAX_DEPTH {
            return Err(Parse::Invalid("nests too deep".into()));
        }
        match kind {
            T_BOOL_TRUE | T_BOOL_FALSE => Ok(()),
            T_BYTE => self.byte().map(drop),
            T_I16 | T_I32 | T_I64 => self.varint().map(drop),
            T_DOUBLE => self.skip_bytes(8),
            T_BINARY => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            T_LIST | T_SET => {
                let b = self.byte()?;
                let n = match b >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                // Every element takes at least one byte, so a huge count ends at the buffer's end.
                for _ in 0..n {
                    self.skip_element(b & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            T_MAP => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kinds = self.byte()?;
                for _ in 0..n {
                    self.skip_element(kinds >> 4, depth + 1)?;
                    self.skip_element(kinds & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            T_STRUCT => {
                let mut last = 0;
                while let Some((_, k)) = self.field(&mut last)? {
                    self.skip(k, depth + 1)?;
                }
                Ok(())
            }
            other => Err(Parse::Invalid(format!("has unknown thrift type {other}"))),
        }
    }
}

impl PageSizes {
    /// Parses the page header at the start of `bytes`; returns it and its length.
    fn parse(bytes: &[u8]) -> Result<(PageSizes, usize), Parse> {
        let mut t = Thrift { bytes, pos: 0 };
        let mut sizes = PageSizes {
            compressed_data: true,
            ..PageSizes::default()
        };
        let (mut got_uncompressed, mut got_compressed) = (false, false);
        let mut last = 0;
        while let Some((id, kind)) = t.field(&mut last)? {
            match (id, kind) {
                (2, T_I32) => {
                    sizes.uncompressed = t.i32()?;
                    got_uncompressed = true;
                }
                (3, T_I32) => {
                    sizes.compressed = t.i32()?;
                    got_compressed = true;
                }
                (8, T_STRUCT) => sizes.read_v2(&mut t)?,
                (_, k) => t.skip(k, 1)?,
            }
        }
        if !(got_uncompressed && got_compressed) {
            return Err(Parse::Invalid("lacks its page sizes".into()));
        }
        Ok((sizes, t.pos))
    }

    /// Reads the level lengths and compression flag of a `DataPageHeaderV2`.
    fn read_v2(&mut self, t: &mut Thrift) -> Result<(), Parse> {
        let (mut def, mut rep) = (0i32, 0i32);
        let mut last = 0;
        while let Some((id, kind)) = t.field(&mut last)? {
            match (id, kind) {
                (5, T_I32) => def = t.i32()?,
                (6, T_I32) => rep = t.i32()?,
                (7, T_BOOL_TRUE) => self.compressed_data = true,
                (7, T_BOOL_FALSE) => self.compressed_data = false,
                (_, k) => t.skip(k, 2)?,
            }
        }
        let levels = i64::from(def) + i64::from(rep);
        self.levels = u64::try_from(levels)
            .ok()
            .filter(|_| def >= 0 && rep >= 0)
            .ok_or_else(|| Parse::Invalid(format!("has level lengths {def} and {rep}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(v: i64) -> Vec<u8> {
        let mut u = ((v << 1) ^ (v >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            let b = (u & 0x7f) as u8;
            u >>= 7;
            if u == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    /// A v1 data page header: type 0, sizes, and an (empty-ish) data page header struct.
    fn header(uncompressed: i64, compressed: i64) -> Vec<u8> {
        let mut h = vec![0x15];
        h.extend(zigzag(0));
        h.push(0x15);
        h.extend(zigzag(uncompressed));
        h.push(0x15);
        h.extend(zigzag(compressed));
        // Field 5 (delta 2), struct: num_values = 3, then stop; then stop.
        h.push(0x2c);
        h.push(0x15);
        h.extend(zigzag(3));
        h.push(0);
        h.push(0);
        h
    }

    #[test]
    fn page_sizes_parse_and_truncation_is_told_apart() {
        let h = header(1000, 20);
        let (sizes, len) = PageSizes::parse(&h).unwrap();
        assert_eq!(
            (sizes.uncompressed, sizes.compressed, len),
            (1000, 20, h.len())
        );
        assert!(sizes.compressed_data);
        for cut in 0..h.len() {
            assert_eq!(PageSizes::parse(&h[..cut]), Err(Parse::Truncated), "{cut}");
        }
        assert!(matches!(
            PageSizes::parse(&[0x1d, 0]),
            Err(Parse::Invalid(_))
        ));
        // A list claiming 2^40 elements ends at the buffer's end, not in a loop of that size
        // that allocates.
        let mut huge = vec![0x19, 0xf5];
        huge.extend(zigzag(1 << 40));
        assert_eq!(PageSizes::parse(&huge), Err(Parse::Truncated));
    }

    #[test]
    fn containers_of_booleans_consume_bytes() {
        // A map of 2^40 bool -> bool entries: one byte per key and value, so it is truncated
        // at once instead of looping without reading.
        let mut h = vec![0x1b];
        h.extend(zigzag(1 << 39));
        h.push(0x11);
        assert_eq!(PageSizes::parse(&h), Err(Parse::Truncated));
    }

    /// A zstd frame: single segment with a 1-byte content size, or with a 128 KiB window and no
    /// content size; then `blocks` as (type, size, stored bytes).
    fn frame(content: Option<u8>, blocks: &[(u32, u32, usize)]) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
        match content {
            Some(c) => f.extend([0x20, c]),
            None => f.extend([0x00, 7 << 3]),
        }
        for (i, &(kind, size, stored)) in blocks.iter().enumerate() {
            let last = u32::from(i + 1 == blocks.len());
            let h = last | (kind << 1) | (size << 3);
            f.extend(&h.to_le_bytes()[..3]);
            f.extend(std::iter::repeat_n(7u8, stored));
        }
        f
    }

    #[test]
    fn zstd_bounds_come_from_block_headers() {
        let bounds = |f: &[u8]| zstd_bounds(&bytes::Bytes::from(f.to_vec()), 0, f.len() as u64);
        // Raw 10 bytes + RLE 50: exactly 60 when recorded, at most 60 when not.
        let raw_rle = [(0, 10, 10), (1, 50, 1)];
        assert_eq!(bounds(&frame(Some(60), &raw_rle)), Ok((60, Some(60))));
        assert_eq!(bounds(&frame(None, &raw_rle)), Ok((60, None)));
        // A compressed block of 5 bytes may hold up to the block maximum.
        assert_eq!(bounds(&frame(None, &[(2, 5, 5)])), Ok((128 << 10, None)));
        assert_eq!(
            bounds(&frame(Some(200), &[(2, 5, 5)])),
            Ok((200, Some(200)))
        );
        // Recorded sizes the blocks cannot hold, blocks past the maximum, damage.
        assert!(bounds(&frame(Some(100), &[(0, 10, 10)])).is_err());
        let big = bounds(&frame(Some(20), &[(1, 50, 1)])).unwrap_err();
        assert!(big.contains("maximum"), "{big}");
        let reserved = bounds(&frame(None, &[(3, 1, 1)])).unwrap_err();
        assert!(reserved.contains("reserved"), "{reserved}");
        let f = frame(None, &[(0, 10, 10)]);
        assert!(bounds(&f[..f.len() - 1]).unwrap_err().contains("truncated"));
        assert!(bounds(b"PAR1PAR1")
            .unwrap_err()
            .contains("not a zstd frame"));
    }

    #[test]
    fn claims_the_data_cannot_back_are_refused() {
        let file = |h: Vec<u8>, data: &[u8]| -> bytes::Bytes {
            let mut b = h;
            b.extend_from_slice(data);
            b.into()
        };
        // 11 zstd bytes (one 5-byte compressed block) claiming 2 GiB.
        let z = frame(None, &[(2, 5, 5)]);
        let f = file(header(i32::MAX as i64, z.len() as i64), &z);
        let err = check_chunk(&f, 0, f.len() as u64, true).unwrap_err();
        assert!(
            err.contains("but its zstd data holds at most 131072"),
            "{err}"
        );
        // The same page uncompressed is not a decompression and passes.
        assert_eq!(check_chunk(&f, 0, f.len() as u64, false), Ok(()));
        // A frame that records another size than the page header claims.
        let z = frame(Some(100), &[(1, 100, 1)]);
        let f = file(header(200, z.len() as i64), &z);
        let err = check_chunk(&f, 0, f.len() as u64, true).unwrap_err();
        assert!(err.contains("its zstd data holds 100"), "{err}");
        let f = file(header(100, z.len() as i64), &z);
        assert_eq!(check_chunk(&f, 0, f.len() as u64, true), Ok(()));
        // Not zstd at all.
        let f = file(header(100, 10), &[0; 10]);
        let err = check_chunk(&f, 0, f.len() as u64, true).unwrap_err();
        assert!(err.contains("is not a zstd frame"), "{err}");
        // Data past the chunk, negative sizes.
        let f = file(header(10, 50), &[0; 10]);
        assert!(check_chunk(&f, 0, f.len() as u64, true)
            .unwrap_err()
            .contains("run past the column chunk"));
        let f = file(header(-1, 0), &[]);
        assert!(check_chunk(&f, 0, f.len() as u64, true)
            .unwrap_err()
            .contains("negative size"));
    }
}
