//! Byte-level mutations of valid inputs (parquet files, zip archives, JSON), for the fuzz tests
//! that start from a valid file and damage it: bytes set or flipped, interesting integers and
//! huge varints written over lengths and offsets, cuts and insertions, aimed at the whole
//! input, its tail (footer, central directory) or its body.

use proptest::prelude::*;
use proptest::sample::Index;

/// Integers that tend to break length and offset arithmetic, as 4 little-endian bytes.
const INTERESTING: [u32; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x0001_0000,
];

/// One edit of an input file.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Replace one byte.
    Set(Index, u8),
    /// Flip some bits of one byte.
    Xor(Index, u8),
    /// Overwrite 4 bytes with an [`INTERESTING`] integer.
    Int(Index, usize),
    /// Overwrite bytes with a thrift varint of a huge number (list and string lengths of the
    /// parquet footer are varints).
    Varint(Index, u64),
    /// Cut the file.
    Truncate(Index),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
}

/// Where [`mutate`] places edits.
#[derive(Debug, Clone, Copy)]
pub enum Region {
    /// Anywhere in the input.
    Anywhere,
    /// In its last `tail` bytes (the parquet footer or the zip central directory, where the
    /// lengths and offsets live).
    Tail,
    /// Before those (the data pages or members, where the values live).
    Body,
}

/// One to four edits, and the region they all fall in.
pub fn mutations() -> impl Strategy<Value = (Vec<Mutation>, Region)> {
    let one = prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        3 => (any::<Index>(), 1u8..).prop_map(|(i, b)| Mutation::Xor(i, b)),
        2 => (any::<Index>(), 0..INTERESTING.len()).prop_map(|(i, v)| Mutation::Int(i, v)),
        2 => (any::<Index>(), prop_oneof![Just(u64::MAX), Just(1u64 << 40), Just(1u64 << 31), any::<u64>()])
            .prop_map(|(i, v)| Mutation::Varint(i, v)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
    ];
    let region = prop_oneof![
        Just(Region::Anywhere),
        Just(Region::Tail),
        Just(Region::Body)
    ];
    (prop::collection::vec(one, 1..5), region)
}

/// `v` as an unsigned LEB128 varint (thrift compact protocol, protobuf).
pub fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Applies `edits` to `bytes`, in `region` (whose tail is the last `tail` bytes).
pub fn mutate(bytes: &[u8], edits: &[Mutation], region: Region, tail: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for edit in edits {
        if b.is_empty() {
            break;
        }
        let pos = |i: &Index, len: usize| {
            let t = tail.min(len - 1);
            match region {
                Region::Anywhere => i.index(len),
                Region::Tail => len - 1 - t + i.index(t + 1),
                Region::Body => i.index(len - t),
            }
        };
        match edit {
            Mutation::Set(i, v) => {
                let p = pos(i, b.len());
                b[p] = *v;
            }
            Mutation::Xor(i, v) => {
                let p = pos(i, b.len());
                b[p] ^= *v;
            }
            Mutation::Int(i, v) => {
                let p = pos(i, b.len());
                for (k, byte) in INTERESTING[*v].to_le_bytes().iter().enumerate() {
                    if let Some(slot) = b.get_mut(p + k) {
                        *slot = *byte;
                    }
                }
            }
            Mutation::Varint(i, v) => {
                let p = pos(i, b.len());
                for (k, byte) in varint(*v).iter().enumerate() {
                    if let Some(slot) = b.get_mut(p + k) {
                        *slot = *byte;
                    }
                }
            }
            Mutation::Truncate(i) => {
                let p = pos(i, b.len());
                b.truncate(p);
            }
            Mutation::Insert(i, v) => {
                let p = pos(i, b.len());
                b.splice(p..p, v.iter().copied());
            }
        }
    }
    b
}
