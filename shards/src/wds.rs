//! Streaming reader for webdataset tar shards in img2dataset layout.
//!
//! A shard is a tar archive whose members are named `KEY.EXT`; consecutive members that share a
//! key form one sample (`KEY.jpg` + `KEY.txt` + optional `KEY.json`). [`WdsReader`] walks the
//! archive over any [`Read`] without ever holding more than one sample in memory, and turns every
//! problem with a single sample into a counted [`Skip`] and every problem with the archive itself
//! into a [`ShardError`].
//!
//! Archive-level behaviour, chosen so that nothing is lost silently:
//! - a 0-byte input is an error ([`ShardError::Empty`]);
//! - an archive that stops exactly at a 512-byte block boundary without end-of-archive blocks is
//!   accepted (python `tarfile` does the same), and so is a cut inside the end-of-archive blocks;
//!   a cut anywhere else (inside a header, inside member data, inside the padding after member
//!   data) is an error, and the sample group that was being read is dropped, never emitted. A cut
//!   exactly between two members of one group cannot be told apart from a complete archive; the
//!   group then ends there (a missing caption becomes a `no_caption` skip, a missing json a
//!   sample without url);
//! - a bad header checksum, garbage, or a tar-level inconsistency is an error;
//! - non-zero bytes after the end-of-archive block are an error: they are either appended garbage
//!   or a zero block inside the archive that would otherwise hide all members after it.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Size of a tar block; headers, member data and end-of-archive markers are aligned to it.
const BLOCK: u64 = 512;

/// Bytes the tar layer may consume for the headers of one member (its own header, GNU long-name
/// and PAX extension members, sparse maps). The tar crate buffers extension members whole, so
/// without this fence a forged long-name member could make it allocate without bound.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// First allocation step when buffering a member; the buffer then grows only as fast as data
/// actually arrives, so a header that lies about its size cannot trigger a huge allocation.
const INITIAL_CHUNK: usize = 256 * 1024;

/// Image extensions recognised as the sample's image (lowercase).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "gif"];

/// Limits that bound what the reader may allocate for one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderLimits {
    /// Largest member (image, caption or json) that is read into memory. A larger image or
    /// caption makes the sample a [`SkipReason::MemberTooLarge`] skip; a larger json is ignored.
    pub max_member_bytes: u64,
}

impl ReaderLimits {
    /// Default for [`ReaderLimits::max_member_bytes`]: 64 MiB.
    pub const DEFAULT_MAX_MEMBER_BYTES: u64 = 64 << 20;
}

impl Default for ReaderLimits {
    fn default() -> Self {
        Self {
            max_member_bytes: Self::DEFAULT_MAX_MEMBER_BYTES,
        }
    }
}

/// Why a sample was skipped. Used by the whole pipeline for the `skipped {reason: count}` tallies;
/// serialises as its [`SkipReason::as_str`] name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The sample has no image member.
    NoImage,
    /// The image member is zero bytes long.
    EmptyImage,
    /// The image could not be decoded (reported by the decoder, not by the reader).
    UndecodableImage,
    /// The image has more pixels than allowed (reported by the decoder, not by the reader).
    ImageTooLarge,
    /// The sample has no caption member, or the caption is empty or whitespace only.
    NoCaption,
    /// The caption is not valid UTF-8.
    InvalidCaption,
    /// The key was already seen earlier in the shard, or the sample has two members of one kind.
    DuplicateKey,
    /// The image or caption member is above [`ReaderLimits::max_member_bytes`].
    MemberTooLarge,
}

impl SkipReason {
    /// Every reason, in declaration order.
    pub const ALL: [SkipReason; 8] = [
        SkipReason::NoImage,
        SkipReason::EmptyImage,
        SkipReason::UndecodableImage,
        SkipReason::ImageTooLarge,
        SkipReason::NoCaption,
        SkipReason::InvalidCaption,
        SkipReason::DuplicateKey,
        SkipReason::MemberTooLarge,
    ];

    /// The snake_case name used in logs, done records and the manifest.
    pub const fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoImage => "no_image",
            SkipReason::EmptyImage => "empty_image",
            SkipReason::UndecodableImage => "undecodable_image",
            SkipReason::ImageTooLarge => "image_too_large",
            SkipReason::NoCaption => "no_caption",
            SkipReason::InvalidCaption => "invalid_caption",
            SkipReason::DuplicateKey => "duplicate_key",
            SkipReason::MemberTooLarge => "member_too_large",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`SkipReason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown skip reason {0:?}")]
pub struct UnknownSkipReason(pub String);

impl FromStr for SkipReason {
    type Err = UnknownSkipReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SkipReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownSkipReason(s.to_owned()))
    }
}

/// One complete sample as stored in the shard, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// Webdataset key (directory prefix plus member name up to its first dot).
    pub key: String,
    /// Encoded image bytes, never empty.
    pub image: Vec<u8>,
    /// Lowercase extension of the image member (`jpg`, `jpeg`, `png`, `webp` or `gif`).
    pub image_ext: String,
    /// Caption with surrounding whitespace trimmed, never empty.
    pub caption: String,
    /// `url` string field of the json member, when the json parses and has one.
    pub url: Option<String>,
    /// Raw bytes of the json member, when present and within the size limit (even if invalid).
    pub meta: Option<Vec<u8>>,
    /// Members with the extensions asked for by [`WdsReader::with_extra_members`] (e.g.
    /// `syn.json`, `npz`), as (extension, bytes) in archive order; oversized ones are left out.
    pub extras: Vec<(String, Vec<u8>)>,
}

/// A sample group that was not turned into a [`RawSample`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// Key of the skipped group.
    pub key: String,
    /// Counted reason.
    pub reason: SkipReason,
    /// Human-readable detail (which member, which size), for logs.
    pub detail: String,
}

/// What the reader yields for each sample group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WdsEvent {
    /// A usable sample.
    Sample(RawSample),
    /// A group that was skipped, with its reason.
    Skip(Skip),
}

/// The shard cannot be read (further). Samples delivered before the error stay valid; the group
/// that was being read when it happened is dropped.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The input has no bytes at all.
    #[error("empty file, not a tar archive")]
    Empty,
    /// The first header is not a tar header.
    #[error("not a tar archive: {detail}")]
    NotTar {
        /// What was wrong with the first block.
        detail: String,
    },
    /// A header after the first is corrupt (bad checksum, bad number, garbage).
    #[error("corrupt tar header at byte {offset}: {detail}")]
    CorruptHeader {
        /// Byte offset of the bad header block.
        offset: u64,
        /// What the tar layer reported.
        detail: String,
    },
    /// The input ends before the archive does.
    #[error("truncated tar at byte {offset}: {detail}")]
    Truncated {
        /// Byte offset at which the input ended.
        offset: u64,
        /// Which header or member was cut.
        detail: String,
    },
    /// The headers of one member (long names, PAX records) exceed [`MAX_HEADER_BYTES`].
    #[error(
        "tar member headers starting at byte {offset} exceed {limit} bytes \
         (oversized GNU long name or PAX extension)"
    )]
    HeaderTooLarge {
        /// Byte offset of the first header block of the member.
        offset: u64,
        /// The limit that was hit.
        limit: u64,
    },
    /// Non-zero bytes follow the end-of-archive block.
    #[error(
        "non-zero data at byte {offset} after the end-of-archive block at byte {end_block}: \
         garbage appended to the archive, or a zero block inside it that hides the members after it"
    )]
    TrailingData {
        /// Byte offset of the end-of-archive block.
        end_block: u64,
        /// Byte offset of the first non-zero byte after it.
        offset: u64,
    },
    /// The underlying reader failed.
    // The io error is in the message rather than `source()`, so `{:#}` chains print it once.
    #[error("read error at byte {offset}: {error}")]
    Io {
        /// Byte offset reached when the error happened.
        offset: u64,
        /// The reader's error.
        error: io::Error,
    },
}

/// Splits a member path into webdataset key and lowercase extension, as python webdataset does:
/// within the basename everything up to the first dot is the stem, the rest is the extension, and
/// the key keeps the directory prefix (`abc/000001.syn.json` -> (`abc/000001`, `syn.json`)).
/// Returns `None` for names with an empty stem (`.hidden`, `._junk`) or no extension.
pub fn member_key_ext(path: &str) -> Option<(String, String)> {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    let base = &path[base_start..];
    let dot = base.find('.')?;
    let (stem, ext) = (&base[..dot], &base[dot + 1..]);
    if stem.is_empty() || ext.is_empty() {
        return None;
    }
    let key = format!("{}{}", &path[..base_start], stem);
    Some((key, ext.to_ascii_lowercase()))
}

/// Kind of member inside a sample group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Image,
    Caption,
    Meta,
    /// A member kept because the reader was asked for its extension.
    Extra,
}

impl Role {
    fn of(ext: &str) -> Option<Role> {
        if IMAGE_EXTENSIONS.contains(&ext) {
            Some(Role::Image)
        } else if ext == "txt" {
            Some(Role::Caption)
        } else if ext == "json" {
            Some(Role::Meta)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Image => "image",
            Role::Caption => "caption",
            Role::Meta => "json",
            Role::Extra => "extra",
        }
    }
}

/// The underlying reader plus the bookkeeping the tar crate does not expose. Shared by reference
/// (interior mutability) so positions stay readable while a `tar::Archive` borrows it.
struct Source<R> {
    inner: RefCell<R>,
    /// Bytes consumed from `inner` so far: the absolute archive offset.
    pos: Cell<u64>,
    /// Reads may not go past this offset; see [`MAX_HEADER_BYTES`].
    fence: Cell<u64>,
    hit_fence: Cell<bool>,
    hit_eof: Cell<bool>,
    io_failed: Cell<bool>,
    /// Whether a non-zero byte was read since the last `reset_flags`, tracked only while the
    /// fence is up (header phase) so member data is not scanned.
    saw_nonzero: Cell<bool>,
}

impl<R: Read> Source<R> {
    fn new(inner: R) -> Self {
        Self {
            inner: RefCell::new(inner),
            pos: Cell::new(0),
            fence: Cell::new(u64::MAX),
            hit_fence: Cell::new(false),
            hit_eof: Cell::new(false),
            io_failed: Cell::new(false),
            saw_nonzero: Cell::new(false),
        }
    }

    fn reset_flags(&self) {
        self.hit_fence.set(false);
        self.hit_eof.set(false);
        self.io_failed.set(false);
        self.saw_nonzero.set(false);
    }
}

impl<R: Read> Read for &Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pos = self.pos.get();
        let room = self.fence.get().saturating_sub(pos);
        if room == 0 {
            self.hit_fence.set(true);
            return Err(io::Error::other("tar member headers exceed the size limit"));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let mut inner = self
            .inner
            .try_borrow_mut()
            .map_err(|_| io::Error::other("shard reader used re-entrantly"))?;
        loop {
            match inner.read(&mut buf[..want]) {
                Ok(0) => {
                    self.hit_eof.set(true);
                    return Ok(0);
                }
                Ok(n) if n > want => {
                    self.io_failed.set(true);
                    return Err(io::Error::other(
                        "underlying reader returned more bytes than requested",
                    ));
                }
                Ok(n) => {
                    self.pos.set(pos + n as u64);
                    if self.fence.get() != u64::MAX && buf[..n].iter().any(|&b| b != 0) {
                        self.saw_nonzero.set(true);
                    }
                    return Ok(n);
                }
                // The tar crate does not retry interrupted reads; absorb them here.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.io_failed.set(true);
                    return Err(e);
                }
            }
        }
    }
}

/// Data of one recognised member.
#[derive(Debug)]
enum Payload {
    Data(Vec<u8>),
    /// Above the member limit; its data was skipped.
    Oversized,
}

#[derive(Debug)]
struct Part {
    member: String,
    ext: String,
    payload: Payload,
}

/// Members of the sample group being read.
#[derive(Debug)]
struct Group {
    key: String,
    image: Option<Part>,
    caption: Option<Part>,
    meta: Option<Part>,
    /// Extra members; the last one is the slot being filled.
    extras: Vec<Option<Part>>,
    /// Set once the group is known to be skipped; later members are then not read.
    problem: Option<(SkipReason, String)>,
}

impl Group {
    fn new(key: String, seen_before: bool) -> Self {
        let problem = seen_before.then(|| {
            (
                SkipReason::DuplicateKey,
                format!("key {key:?} already appeared earlier in the shard; first occurrence kept"),
            )
        });
        Self {
            key,
            image: None,
            caption: None,
            meta: None,
            extras: Vec::new(),
            problem,
        }
    }

    fn slot(&mut self, role: Role) -> &mut Option<Part> {
        match role {
            Role::Image => &mut self.image,
            Role::Caption => &mut self.caption,
            Role::Meta => &mut self.meta,
            Role::Extra => {
                if self.extras.is_empty() {
                    self.extras.push(None);
                }
                let last = self.extras.len() - 1;
                &mut self.extras[last]
            }
        }
    }

    fn finish(self) -> WdsEvent {
        let key = self.key;
        let skip = |reason, detail: String| {
            WdsEvent::Skip(Skip {
                key: key.clone(),
                reason,
                detail,
            })
        };
        if let Some((reason, detail)) = self.problem {
            return skip(reason, detail);
        }
        let Some(image) = self.image else {
            return skip(
                SkipReason::NoImage,
                format!("no image member ({})", IMAGE_EXTENSIONS.join(", ")),
            );
        };
        let image_bytes = match image.payload {
            Payload::Data(d) if d.is_empty() => {
                return skip(
                    SkipReason::EmptyImage,
                    format!("image member {} is empty", image.member),
                )
            }
            Payload::Data(d) => d,
            Payload::Oversized => {
                return skip(
                    SkipReason::MemberTooLarge,
                    format!("image member {} is above the size limit", image.member),
                )
            }
        };
        let Some(caption) = self.caption else {
            return skip(SkipReason::NoCaption, "no txt member".to_owned());
        };
        let caption_bytes = match caption.payload {
            Payload::Data(d) => d,
            Payload::Oversized => {
                return skip(
                    SkipReason::MemberTooLarge,
                    format!("caption member {} is above the size limit", caption.member),
                )
            }
        };
        let text = match String::from_utf8(caption_bytes) {
            Ok(t) => t,
            Err(e) => {
                return skip(
                    SkipReason::InvalidCaption,
                    format!(
                        "caption member {} is not valid UTF-8 (bad byte at offset {})",
                        caption.member,
                        e.utf8_error().valid_up_to()
                    ),
                )
            }
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return skip(
                SkipReason::NoCaption,
                format!(
                    "caption member {} is empty or whitespace only",
                    caption.member
                ),
            );
        }
        let caption = if trimmed.len() == text.len() {
            text
        } else {
            trimmed.to_owned()
        };
        let meta = match self.meta {
            Some(Part {
                payload: Payload::Data(d),
                ..
            }) => Some(d),
            _ => None,
        };
        let url = meta.as_deref().and_then(json_url);
        let extras = self
            .extras
            .into_iter()
            .flatten()
            .filter_map(|p| match p.payload {
                Payload::Data(d) => Some((p.ext, d)),
                Payload::Oversized => None,
            })
            .collect();
        WdsEvent::Sample(RawSample {
            key,
            image: image_bytes,
            image_ext: image.ext,
            caption,
            url,
            meta,
            extras,
        })
    }
}

/// The `url` string field of a json object; `None` when the json does not parse, is not an
/// object, or has no string `url`. Other fields are skipped without being materialised.
fn json_url(bytes: &[u8]) -> Option<String> {
    struct UrlOnly(Option<String>);

    impl<'de> Deserialize<'de> for UrlOnly {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = UrlOnly;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a json object")
                }

                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<UrlOnly, A::Error> {
                    let mut url = None;
                    while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        if k == "url" {
                            // Last one wins, as with python's json.loads.
                            url = match map.next_value::<serde_json::Value>()? {
                                serde_json::Value::String(s) => Some(s),
                                _ => None,
                            };
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(UrlOnly(url))
                }
            }
            d.deserialize_map(V)
        }
    }

    serde_json::from_slice::<UrlOnly>(bytes)
        .ok()
        .and_then(|u| u.0)
}

/// Fills `buf` from `r` until it is full or the reader ends; returns the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads up to `size` bytes. Returns fewer when the input ends early. Capacity never exceeds
/// `size`, and grows only as data arrives (see [`INITIAL_CHUNK`]).
fn read_member(r: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let have = buf.len();
        let remaining = size.saturating_sub(have as u64);
        if remaining == 0 {
            return Ok(buf);
        }
        let step_cap = have.max(INITIAL_CHUNK);
        // `step <= step_cap`, which is a usize, so the conversion cannot fail.
        let step = usize::try_from(remaining.min(step_cap as u64)).unwrap_or(step_cap);
        buf.try_reserve_exact(step)
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
        buf.resize(have + step, 0);
        let got = fill(r, &mut buf[have..])?;
        buf.truncate(have + got);
        if got < step {
            return Ok(buf);
        }
    }
}

/// A 128-bit digest of a key for duplicate detection; collisions are not a practical concern.
fn key_digest(key: &str) -> [u8; 16] {
    let full = Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// Rounds `n` up to a whole number of tar blocks.
fn round_to_block(n: u64) -> Option<u64> {
    Some(n.checked_add(BLOCK - 1)? & !(BLOCK - 1))
}

/// Bytes of member data stored in the archive after the entry's headers.
fn stored_size<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<u64> {
    if !entry.header().entry_type().is_gnu_sparse() {
        // `size()` already prefers a PAX `size` record over the header field.
        return Ok(entry.size());
    }
    // For sparse members `size()` is the expanded size; the archive only holds the header's
    // (or PAX's) declared bytes.
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax.flatten() {
            if ext.key() == Ok("size") {
                if let Some(n) = ext.value().ok().and_then(|v| v.parse::<u64>().ok()) {
                    return Ok(n);
                }
            }
        }
    }
    entry.header().entry_size()
}

/// Streaming iterator over the samples of one webdataset tar shard.
///
/// Yields `Ok(WdsEvent)` per sample group in archive order; after the first `Err` it returns
/// `None`. Memory use is bounded by one sample group (at most three members of
/// [`ReaderLimits::max_member_bytes`] each) plus [`MAX_HEADER_BYTES`]. Reads go straight to the
/// given reader in 512-byte header reads, so wrap files in a `BufReader`.
pub struct WdsReader<R: Read> {
    src: Source<R>,
    limits: ReaderLimits,
    group: Option<Group>,
    /// Digests of every key seen so far. Digests rather than keys: keys can be up to
    /// [`MAX_HEADER_BYTES`] long, and a shard of long names must not grow this set without bound.
    seen: HashSet<[u8; 16]>,
    /// A finished group waiting to be returned before anything else.
    ready: Option<WdsEvent>,
    failed: Option<ShardError>,
    finished: bool,
    /// Extensions of members kept in [`RawSample::extras`].
    extra_members: Vec<String>,
}

impl<R: Read> WdsReader<R> {
    /// Also keeps the members with these (lowercase, full) extensions, e.g. `syn.json`, in
    /// [`RawSample::extras`]: for reading layouts with more per-sample members than
    /// img2dataset's (Apple's reinforced shards).
    pub fn with_extra_members(mut self, extensions: &[&str]) -> Self {
        self.extra_members = extensions.iter().map(|e| e.to_string()).collect();
        self
    }

    /// Starts reading a shard from `reader` (positioned at the start of the archive).
    pub fn new(reader: R, limits: ReaderLimits) -> Self {
        Self {
            src: Source::new(reader),
            limits,
            group: None,
            seen: HashSet::new(),
            ready: None,
            failed: None,
            finished: false,
            extra_members: Vec::new(),
        }
    }

    /// Bytes consumed from the underlying reader so far.
    pub fn bytes_read(&self) -> u64 {
        self.src.pos.get()
    }

    /// Turns an error from the tar layer or the reader into a [`ShardError`]. `start` is the
    /// offset of the header block being processed; `what` names it for truncation messages.
    fn classify(&self, start: u64, what: &str, err: io::Error) -> ShardError {
        let src = &self.src;
        let pos = src.pos.get();
        if src.hit_fence.get() {
            ShardError::HeaderTooLarge {
                offset: start,
                limit: MAX_HEADER_BYTES,
            }
        } else if src.io_failed.get() {
            ShardError::Io {
                offset: pos,
                error: err,
            }
        } else if start == 0 && pos < BLOCK {
            ShardError::NotTar {
                detail: format!(
                    "input ends after {pos} bytes, before the first 512-byte header is complete"
                ),
            }
        } else if start == 0 && pos == BLOCK {
            ShardError::NotTar {
                detail: format!("first 512-byte block is not a tar header: {err}"),
            }
        } else if src.hit_eof.get() {
            ShardError::Truncated {
                offset: pos,
                detail: format!("input ends inside {what}: {err}"),
            }
        } else {
            ShardError::CorruptHeader {
                offset: start,
                detail: err.to_string(),
            }
        }
    }

    /// Processes one archive member (or the end of the archive).
    fn step(&mut self) -> Result<(), ShardError> {
        let start = self.src.pos.get();
        match self.member(start)? {
            None => self.end_of_archive(start),
            Some((region_end, where_)) => self.skip_to(region_end, &where_),
        }
    }

    /// Reads the member whose first header block is at `start` and files it into the current
    /// group. Returns where its data region (with padding) ends and a description for messages,
    /// or `None` at the end of the archive.
    fn member(&mut self, start: u64) -> Result<Option<(u64, String)>, ShardError> {
        self.src.reset_flags();
        self.src.fence.set(start.saturating_add(MAX_HEADER_BYTES));

        // A fresh `Archive` per member lets the reader own `R` without self-borrowing; the
        // position bookkeeping that `Entries` would keep is done here instead.
        let src = &self.src;
        let mut archive = tar::Archive::new(src);
        let mut entries = archive
            .entries()
            .map_err(|e| self.classify(start, "the archive", e))?;
        let mut entry = match entries.next() {
            None => return Ok(None),
            Some(Err(e)) => {
                if start > 0 && src.hit_eof.get() && !src.saw_nonzero.get() && !src.io_failed.get()
                {
                    // A cut inside the end-of-archive blocks: every member is complete.
                    return Ok(None);
                }
                return Err(self.classify(start, &format!("the header at byte {start}"), e));
            }
            Some(Ok(entry)) => entry,
        };
        src.fence.set(u64::MAX);

        let header_pos = start + entry.raw_header_position();
        let data_start = src.pos.get();
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let where_ = format!("member {path:?} (header at byte {header_pos})");
        let stored = stored_size(&mut entry).map_err(|e| self.classify(start, &where_, e))?;
        let region_end = round_to_block(stored)
            .and_then(|r| data_start.checked_add(r))
            .ok_or_else(|| ShardError::CorruptHeader {
                offset: header_pos,
                detail: format!("{where_} declares an impossible size of {stored} bytes"),
            })?;

        let etype = entry.header().entry_type();
        // Same set as python tarfile's `isreg()`, which webdataset uses.
        let regular = etype.is_file() || etype.is_contiguous() || etype.is_gnu_sparse();
        let named = if regular { member_key_ext(&path) } else { None };
        if let Some((key, ext)) = named {
            if self.group.as_ref().is_none_or(|g| g.key != key) {
                let seen_before = !self.seen.insert(key_digest(&key));
                if let Some(done) = self.group.replace(Group::new(key, seen_before)) {
                    self.ready = Some(done.finish());
                }
            }
            let role =
                Role::of(&ext).or_else(|| self.extra_members.contains(&ext).then_some(Role::Extra));
            if let (Some(role), Some(group)) = (role, self.group.as_mut()) {
                let declared = entry.size();
                if let Some(data) = add_member(group, role, &path, ext, declared, self.limits) {
                    let bytes = read_member(&mut entry, declared)
                        .map_err(|e| self.classify(start, &where_, e))?;
                    if (bytes.len() as u64) < declared {
                        return Err(ShardError::Truncated {
                            offset: self.src.pos.get(),
                            detail: format!(
                                "input ends inside the data of {where_}: {} of {declared} bytes present",
                                bytes.len()
                            ),
                        });
                    }
                    if let Some(slot) = self.group.as_mut().and_then(|g| g.slot(role).as_mut()) {
                        slot.payload = data(bytes);
                    }
                }
            }
        }
        Ok(Some((region_end, where_)))
    }

    /// Consumes the rest of a member's data and padding, up to `end`.
    fn skip_to(&mut self, end: u64, where_: &str) -> Result<(), ShardError> {
        let mut scratch = [0u8; 16 * 1024];
        let mut src = &self.src;
        loop {
            let pos = src.pos.get();
            let left = end.saturating_sub(pos);
            if left == 0 {
                return Ok(());
            }
            let n = scratch
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            match src.read(&mut scratch[..n]) {
                Ok(0) => {
                    return Err(ShardError::Truncated {
                        offset: pos,
                        detail: format!("{where_}: data and padding should extend to byte {end}"),
                    })
                }
                Ok(_) => {}
                Err(e) => return Err(self.classify(pos, where_, e)),
            }
        }
    }

    /// The tar layer saw no further member at `start`: either the input ended exactly there or
    /// an all-zero block was read.
    fn end_of_archive(&mut self, start: u64) -> Result<(), ShardError> {
        self.finished = true;
        let consumed = self.src.pos.get().saturating_sub(start);
        if consumed == 0 {
            if start == 0 {
                return Err(ShardError::Empty);
            }
            tracing::warn!(
                offset = start,
                "tar ends at a block boundary without end-of-archive blocks; accepted as complete"
            );
        } else {
            self.check_trailing_zeros(start)?;
        }
        if let Some(done) = self.group.take() {
            self.ready = Some(done.finish());
        }
        Ok(())
    }

    /// Reads what follows the end-of-archive block at `end_block` and fails on any non-zero byte,
    /// so that a zero block in the middle of an archive cannot silently hide the members after it.
    fn check_trailing_zeros(&mut self, end_block: u64) -> Result<(), ShardError> {
        let mut scratch = [0u8; 16 * 1024];
        let mut src = &self.src;
        loop {
            let pos = src.pos.get();
            let n = match src.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => {
                    return Err(ShardError::Io {
                        offset: pos,
                        error: e,
                    })
                }
            };
            if let Some(i) = scratch[..n].iter().position(|&b| b != 0) {
                return Err(ShardError::TrailingData {
                    end_block,
                    offset: pos + i as u64,
                });
            }
        }
    }
}

/// Registers a recognised member in `group`. Returns how to wrap the member's data when it must
/// be read, or `None` when its data is not needed (group already skipped, duplicate, oversized).
fn add_member(
    group: &mut Group,
    role: Role,
    path: &str,
    ext: String,
    declared: u64,
    limits: ReaderLimits,
) -> Option<fn(Vec<u8>) -> Payload> {
    if group.problem.is_some() {
        return None;
    }
    if role == Role::Extra {
        if let Some(first) = group.extras.iter().flatten().find(|p| p.ext == ext) {
            let detail = format!("two {ext} members for one key: {} and {path}", first.member);
            group.problem = Some((SkipReason::DuplicateKey, detail));
            return None;
        }
        group.extras.push(None);
    } else if let Some(first) = group.slot(role) {
        let detail = format!(
            "two {} members for one key: {} and {path}",
            role.name(),
            first.member
        );
        group.problem = Some((SkipReason::DuplicateKey, detail));
        return None;
    }
    let oversized = declared > limits.max_member_bytes;
    *group.slot(role) = Some(Part {
        member: path.to_owned(),
        ext,
        payload: Payload::Oversized,
    });
    if !oversized {
        return Some(Payload::Data);
    }
    if matches!(role, Role::Meta | Role::Extra) {
        tracing::debug!(
            member = path,
            declared,
            limit = limits.max_member_bytes,
            "json member above the size limit ignored"
        );
    } else {
        let detail = format!(
            "{} member {path} declares {declared} bytes, above the limit of {} bytes",
            role.name(),
            limits.max_member_bytes
        );
        group.problem = Some((SkipReason::MemberTooLarge, detail));
    }
    None
}

impl<R: Read> Iterator for WdsReader<R> {
    type Item = Result<WdsEvent, ShardError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(event) = self.ready.take() {
                return Some(Ok(event));
            }
            if let Some(err) = self.failed.take() {
                return Some(Err(err));
            }
            if self.finished {
                return None;
            }
            if let Err(err) = self.step() {
                // The group being read was cut; it must not be emitted.
                self.group = None;
                self.finished = true;
                self.failed = Some(err);
            }
        }
    }
}

impl<R: Read> std::iter::FusedIterator for WdsReader<R> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ext_follows_webdataset() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("000001.jpg", Some(("000001", "jpg"))),
            ("abc/000001.syn.json", Some(("abc/000001", "syn.json"))),
            ("a.b/c.JPG", Some(("a.b/c", "jpg"))),
            ("./x.txt", Some(("./x", "txt"))),
            ("._junk", None),
            (".hidden", None),
            ("dir/.hidden.jpg", None),
            ("noext", None),
            ("trailing.", None),
            ("dir/", None),
            ("", None),
        ];
        for (path, want) in cases {
            let got = member_key_ext(path);
            let want = want.map(|(k, e)| (k.to_owned(), e.to_owned()));
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn skip_reason_names_round_trip() {
        for r in SkipReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<SkipReason>(&json).unwrap(), r);
            assert_eq!(r.as_str().parse::<SkipReason>().unwrap(), r);
            assert_eq!(r.to_string(), r.as_str());
        }
        assert!("nope".parse::<SkipReason>().is_err());
        let counts: std::collections::BTreeMap<SkipReason, u64> =
            [(SkipReason::NoCaption, 2), (SkipReason::NoImage, 1)].into();
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"no_image":1,"no_caption":2}"#
        );
    }

    #[test]
    fn json_url_is_lenient() {
        assert_eq!(json_url(br#"{"url":"http://a"}"#), Some("http://a".into()));
        assert_eq!(
            json_url(br#"{"x":[1,{"y":2}],"url":"u1","url":"u2"}"#),
            Some("u2".into())
        );
        assert_eq!(json_url(br#"{"url":3}"#), None);
        assert_eq!(json_url(br#"["http://a"]"#), None);
        assert_eq!(json_url(b"{not json"), None);
        assert_eq!(json_url(b""), None);
    }

    #[test]
    fn read_member_never_over_allocates() {
        let data = vec![7u8; 1000];
        let got = read_member(&mut &data[..], 1 << 40).unwrap();
        assert_eq!(got.len(), 1000);
        assert!(got.capacity() <= INITIAL_CHUNK);
        let got = read_member(&mut &data[..], 10).unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(got.capacity(), 10);
    }
}
