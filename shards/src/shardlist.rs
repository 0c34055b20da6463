//! Input shard lists: brace patterns, globs, list files and URLs resolved to the shards of a job.
//!
//! [`expand_braces`] implements bash brace expansion (as bash 5 does it, including zero padding
//! and steps); [`resolve_inputs`] turns the job's input patterns into [`ShardRef`]s.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::{is_cloud_url, scheme_of, CloudStore, Store};

/// Most items one pattern (and one numeric range) may expand to. Bounds the allocation of a
/// mistyped pattern such as `{0..99999999999}`.
pub const MAX_EXPANSION: usize = 10_000_000;

/// File extensions that mark a list file (one pattern per line).
pub const LIST_EXTENSIONS: [&str; 3] = ["txt", "list", "lst"];

/// Why the input patterns could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ShardListError {
    /// A `{` without its `}` or a `}` without its `{`.
    #[error(
        "unmatched '{brace}' at character {position} of pattern {pattern:?} \
         (write \\{brace} for a literal brace)"
    )]
    UnmatchedBrace {
        /// The pattern as given.
        pattern: String,
        /// 1-based character position of the brace.
        position: usize,
        /// `{` or `}`.
        brace: char,
    },
    /// A numeric range that cannot be expanded (bound too large, too many items).
    #[error("range {{{range}}} in pattern {pattern:?}: {reason}")]
    InvalidRange {
        /// The pattern as given.
        pattern: String,
        /// The range text between the braces.
        range: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The whole pattern expands to more than [`MAX_EXPANSION`] items.
    #[error("pattern {pattern:?} expands to more than {limit} items")]
    TooManyItems {
        /// The pattern as given.
        pattern: String,
        /// [`MAX_EXPANSION`].
        limit: usize,
    },
    /// An empty pattern, or a pattern item that expanded to the empty string.
    #[error("empty input pattern{context}")]
    EmptyPattern {
        /// Where the empty item came from (empty when it was given directly).
        context: String,
    },
    /// A URL scheme dfndr cannot read.
    #[error(
        "{uri}: {scheme}:// URLs are not supported (inputs are local paths or file://, s3://, \
         gs:// or az:// URLs)"
    )]
    UnsupportedScheme {
        /// The URL as given.
        uri: String,
        /// Its scheme, lowercase.
        scheme: String,
    },
    /// A relative list-file entry that climbs above its object-store bucket.
    #[error("list entry {entry:?} of a list file in {dir} climbs above the bucket")]
    EntryAboveBucket {
        /// The entry as written.
        entry: String,
        /// The list file's folder.
        dir: String,
    },
    /// A `file://` URL that does not name a local absolute path.
    #[error("invalid file URL {url:?}: {reason}")]
    InvalidFileUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A list file could not be read.
    #[error("cannot read list file {path}: {error}")]
    ListFile {
        /// The list file.
        path: String,
        /// The I/O error.
        error: io::Error,
    },
    /// A list file names another list file.
    #[error(
        "list file {list}, line {line}: {entry:?} is a list file; list files cannot be nested"
    )]
    NestedListFile {
        /// The outer list file.
        list: String,
        /// 1-based line number.
        line: usize,
        /// The offending entry.
        entry: String,
    },
    /// An entry of a list file could not be resolved.
    #[error("list file {list}, line {line}: {error}")]
    InList {
        /// The list file.
        list: String,
        /// 1-based line number.
        line: usize,
        /// What went wrong with the entry.
        error: Box<ShardListError>,
    },
    /// A glob pattern that the glob syntax rejects.
    #[error("invalid glob {pattern:?}: {reason}")]
    InvalidGlob {
        /// The glob.
        pattern: String,
        /// The glob crate's message.
        reason: String,
    },
    /// A directory could not be read while expanding a glob.
    #[error("cannot read {path} while expanding glob {pattern:?}: {error}")]
    GlobRead {
        /// The glob.
        pattern: String,
        /// The path that failed.
        path: String,
        /// The I/O error.
        error: io::Error,
    },
    /// A glob that matches no file.
    #[error("glob {pattern:?} matches no files")]
    NoMatch {
        /// The glob (after resolving against a list file's directory).
        pattern: String,
    },
    /// A path that is not valid UTF-8 (URIs are strings).
    #[error("path {path} is not valid UTF-8")]
    NonUtf8Path {
        /// The path, lossily converted.
        path: String,
    },
    /// An object store could not be listed or read while resolving inputs.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// A glob in an object-store URL with wildcards outside its last path segment.
    #[error(
        "glob {pattern:?}: in object-store URLs, wildcards may only appear in the last path \
         segment (list a prefix, or name the shards with a brace pattern or a list file)"
    )]
    CloudGlobInPrefix {
        /// The glob.
        pattern: String,
    },
    /// The current directory is needed to make a relative path absolute but is unavailable.
    #[error("cannot make {path:?} absolute: {error}")]
    Absolute {
        /// The relative path.
        path: String,
        /// The I/O error.
        error: io::Error,
    },
    /// A path without a usable file name to name the shard's outputs after.
    #[error("{uri}: no file name to name the shard after")]
    NoName {
        /// The shard's URI.
        uri: String,
    },
    /// Two different shards with the same stem (outputs are named by stem).
    #[error(
        "two input shards have the name {name:?} (outputs are named by shard stem): {first} and {second}"
    )]
    DuplicateName {
        /// The shared stem.
        name: String,
        /// URI of the first shard.
        first: String,
        /// URI of the second shard.
        second: String,
    },
}

/// One input shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardRef {
    /// Canonical location: for local files the absolute, lexically normalised path.
    pub uri: String,
    /// Shard stem (file name without a trailing `.tar`); names the shard's outputs.
    pub name: String,
}

impl ShardRef {
    /// The shard for a local file; relative paths are made absolute against the current directory.
    pub fn local(path: &Path) -> Result<ShardRef, ShardListError> {
        let abs = absolute(path)?;
        let uri = abs
            .to_str()
            .ok_or_else(|| ShardListError::NonUtf8Path {
                path: abs.display().to_string(),
            })?
            .to_owned();
        let file_name = abs.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let name = file_name.strip_suffix(".tar").unwrap_or(file_name);
        if name.is_empty() {
            return Err(ShardListError::NoName { uri });
        }
        Ok(ShardRef {
            name: name.to_owned(),
            uri,
        })
    }

    /// The shard for an object-store URL (`s3://bucket/path/NAME.tar`, kept as given).
    pub fn cloud(url: &str) -> Result<ShardRef, ShardListError> {
        let file_name = url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        let name = file_name.strip_suffix(".tar").unwrap_or(file_name);
        if name.is_empty() || url.ends_with('/') {
            return Err(ShardListError::NoName {
                uri: url.to_owned(),
            });
        }
        Ok(ShardRef {
            name: name.to_owned(),
            uri: url.to_owned(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// brace expansion

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// A literal character; `true` when it was escaped with a backslash.
    Ch(char, bool),
    /// `{` at the given 1-based character position.
    Open(usize),
    /// `}` at the given 1-based character position.
    Close(usize),
    Comma,
}

fn tokenize(pattern: &str) -> Vec<Tok> {
    let mut toks = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars().enumerate();
    while let Some((i, c)) = chars.next() {
        toks.push(match c {
            '\\' => match chars.next() {
                Some((_, next)) => Tok::Ch(next, true),
                None => Tok::Ch('\\', true),
            },
            '{' => Tok::Open(i + 1),
            '}' => Tok::Close(i + 1),
            ',' => Tok::Comma,
            c => Tok::Ch(c, false),
        });
    }
    toks
}

/// A numeric or character sequence `{first..last..step}`, generated lazily.
#[derive(Debug, Clone)]
struct Seq {
    first: i64,
    last: i64,
    step: u64,
    /// Zero-padding width (including a minus sign), 0 for none.
    width: usize,
    chars: bool,
}

impl Seq {
    fn len(&self) -> u128 {
        u128::from(self.first.abs_diff(self.last) / self.step) + 1
    }

    fn items(&self) -> impl Iterator<Item = String> + '_ {
        let dir: i128 = if self.first <= self.last { 1 } else { -1 };
        let len = self.len();
        (0..len).map(move |k| {
            // |k * step| <= |last - first| < 2^64, so this stays inside i128.
            let v = i128::from(self.first) + dir * (k as i128) * i128::from(self.step);
            if self.chars {
                // Character ranges only span ASCII letters' codes (65..=122).
                char::from(u8::try_from(v).unwrap_or(b'?')).to_string()
            } else {
                format!("{v:0width$}", width = self.width)
            }
        })
    }
}

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Alt(Vec<Vec<Node>>),
    Range(Seq),
}

struct Parser<'a> {
    toks: &'a [Tok],
    i: usize,
    pattern: &'a str,
}

impl Parser<'_> {
    /// Parses until the end, or (when `nested`) until a top-level `,` or `}` of the group.
    fn seq(&mut self, nested: bool) -> Result<Vec<Node>, ShardListError> {
        let mut nodes = Vec::new();
        let mut text = String::new();
        while let Some(&tok) = self.toks.get(self.i) {
            match tok {
                Tok::Ch(c, _) => text.push(c),
                Tok::Comma if !nested => text.push(','),
                Tok::Comma => break,
                Tok::Close(position) if !nested => {
                    return Err(ShardListError::UnmatchedBrace {
                        pattern: self.pattern.to_owned(),
                        position,
                        brace: '}',
                    })
                }
                Tok::Close(_) => break,
                Tok::Open(position) => {
                    if !text.is_empty() {
                        nodes.push(Node::Text(std::mem::take(&mut text)));
                    }
                    let group = self.group(position)?;
                    nodes.extend(group);
                    continue;
                }
            }
            self.i += 1;
        }
        if !text.is_empty() {
            nodes.push(Node::Text(text));
        }
        Ok(nodes)
    }

    /// Parses a `{...}` group starting at the current `{` token.
    fn group(&mut self, open: usize) -> Result<Vec<Node>, ShardListError> {
        self.i += 1;
        let body_start = self.i;
        let mut alts = Vec::new();
        loop {
            alts.push(self.seq(true)?);
            match self.toks.get(self.i) {
                Some(Tok::Comma) => self.i += 1,
                Some(Tok::Close(_)) => {
                    self.i += 1;
                    break;
                }
                _ => {
                    return Err(ShardListError::UnmatchedBrace {
                        pattern: self.pattern.to_owned(),
                        position: open,
                        brace: '{',
                    })
                }
            }
        }
        if alts.len() > 1 {
            return Ok(vec![Node::Alt(alts)]);
        }
        let body = &self.toks[body_start..self.i - 1];
        if let Some(text) = plain_text(body) {
            if let Some(seq) = parse_range(&text, self.pattern)? {
                return Ok(vec![Node::Range(seq)]);
            }
        }
        // Like bash, a group that is neither a list nor a range stays literal (`{x}`, `{}`),
        // with any groups inside it still expanded.
        let mut nodes = vec![Node::Text("{".to_owned())];
        nodes.extend(alts.into_iter().flatten());
        nodes.push(Node::Text("}".to_owned()));
        Ok(nodes)
    }
}

/// The body as text when it is only unescaped characters (a range candidate).
fn plain_text(body: &[Tok]) -> Option<String> {
    body.iter()
        .map(|t| match t {
            Tok::Ch(c, false) => Some(*c),
            _ => None,
        })
        .collect()
}

fn is_int(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// bash: a bound is zero-padded when it has a leading zero (`05`, `-05`, not `0`).
fn zero_padded(s: &str) -> bool {
    (s.len() > 1 && s.starts_with('0')) || (s.len() > 2 && s.starts_with("-0"))
}

fn single_letter(s: &str) -> Option<u8> {
    match s.as_bytes() {
        [b] if b.is_ascii_alphabetic() => Some(*b),
        _ => None,
    }
}

/// Parses `a..b` or `a..b..step`; `Ok(None)` when the text is not a range (then it stays literal).
fn parse_range(text: &str, pattern: &str) -> Result<Option<Seq>, ShardListError> {
    let parts: Vec<&str> = text.split("..").collect();
    let (a, b, step) = match parts.as_slice() {
        [a, b] => (*a, *b, None),
        [a, b, s] => (*a, *b, Some(*s)),
        _ => return Ok(None),
    };
    let invalid = |reason: String| ShardListError::InvalidRange {
        pattern: pattern.to_owned(),
        range: text.to_owned(),
        reason,
    };
    let step = match step {
        None => 1,
        Some(s) if is_int(s) => {
            let n: i64 = s
                .parse()
                .map_err(|_| invalid(format!("step {s} is out of range")))?;
            // bash ignores the step's sign (direction comes from the bounds) and treats 0 as 1.
            n.unsigned_abs().max(1)
        }
        Some(_) => return Ok(None),
    };
    let seq = if is_int(a) && is_int(b) {
        let bound = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| invalid(format!("bound {s} is out of range")))
        };
        let width = if zero_padded(a) || zero_padded(b) {
            a.len().max(b.len())
        } else {
            0
        };
        Seq {
            first: bound(a)?,
            last: bound(b)?,
            step,
            width,
            chars: false,
        }
    } else if let (Some(x), Some(y)) = (single_letter(a), single_letter(b)) {
        Seq {
            first: i64::from(x),
            last: i64::from(y),
            step,
            width: 0,
            chars: true,
        }
    } else {
        return Ok(None);
    };
    let len = seq.len();
    if len > MAX_EXPANSION as u128 {
        return Err(invalid(format!(
            "{len} items, more than the limit of {MAX_EXPANSION}"
        )));
    }
    Ok(Some(seq))
}

fn count(nodes: &[Node]) -> u128 {
    nodes
        .iter()
        .map(|n| match n {
            Node::Text(_) => 1,
            Node::Range(seq) => seq.len(),
            Node::Alt(alts) => alts
                .iter()
                .map(|a| count(a))
                .fold(0u128, u128::saturating_add),
        })
        .fold(1u128, u128::saturating_mul)
}

fn expand_nodes(nodes: &[Node]) -> Vec<String> {
    let mut out = vec![String::new()];
    for node in nodes {
        let options: Vec<String> = match node {
            Node::Text(t) => {
                for s in &mut out {
                    s.push_str(t);
                }
                continue;
            }
            Node::Range(seq) => seq.items().collect(),
            Node::Alt(alts) => alts.iter().flat_map(|a| expand_nodes(a)).collect(),
        };
        out = out
            .iter()
            .flat_map(|prefix| options.iter().map(move |o| format!("{prefix}{o}")))
            .collect();
    }
    out
}

/// Expands bash-style brace patterns: comma lists `{a,b}`, numeric ranges `{0..10}` with zero
/// padding (`{00000..01023}`; when either bound has a leading zero, every item is padded to the
/// longer bound), steps `{0..10..2}`, descending ranges, letter ranges `{a..e}`, nesting
/// `{a,b{1..3}}` and several groups (cartesian product, in order). `\` escapes the next character.
/// Groups that are neither a list nor a range stay literal, as in bash (`{x}`). Unlike bash, an
/// unmatched brace is an error, and so is an expansion beyond [`MAX_EXPANSION`] items.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, ShardListError> {
    let toks = tokenize(pattern);
    let mut parser = Parser {
        toks: &toks,
        i: 0,
        pattern,
    };
    let nodes = parser.seq(false)?;
    if count(&nodes) > MAX_EXPANSION as u128 {
        return Err(ShardListError::TooManyItems {
            pattern: pattern.to_owned(),
            limit: MAX_EXPANSION,
        });
    }
    Ok(expand_nodes(&nodes))
}

// ---------------------------------------------------------------------------------------------
// resolution

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The local path of a `file://` URL (`file:///abs` or `file://localhost/abs`).
fn file_url_path(url: &str) -> Result<PathBuf, ShardListError> {
    let invalid = |reason: &str| ShardListError::InvalidFileUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = &url["file://".len()..];
    let path = if rest.starts_with('/') {
        rest
    } else if let Some(p) = rest.strip_prefix("localhost") {
        if !p.starts_with('/') {
            return Err(invalid("expected file:///absolute/path"));
        }
        p
    } else {
        return Err(invalid(
            "only local absolute paths are supported (file:///absolute/path); \
             a host name or a relative path is not",
        ));
    };
    let decoded = percent_decode(path)
        .ok_or_else(|| invalid("bad percent-encoding or not UTF-8 after decoding"))?;
    Ok(PathBuf::from(decoded))
}

/// `path` made absolute against the current directory and lexically normalised (`.` and `..`
/// removed, like python's `os.path.abspath`) so that one file has one URI.
fn absolute(path: &Path) -> Result<PathBuf, ShardListError> {
    let abs = std::path::absolute(path).map_err(|error| ShardListError::Absolute {
        path: path.display().to_string(),
        error,
    })?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                // `..` at the root stays at the root.
                out.pop();
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn is_list_file(path: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => {
            LIST_EXTENSIONS.iter().any(|l| l.eq_ignore_ascii_case(ext))
        }
        _ => false,
    }
}

fn path_str(p: &Path) -> Result<&str, ShardListError> {
    p.to_str().ok_or_else(|| ShardListError::NonUtf8Path {
        path: p.display().to_string(),
    })
}

/// Where an item came from: given directly, or on a line of a list file.
#[derive(Clone, Copy)]
struct ListCtx<'a> {
    list: &'a str,
    dir: ListDir<'a>,
}

/// The directory relative entries of a list file are resolved against.
#[derive(Clone, Copy)]
enum ListDir<'a> {
    Local(&'a Path),
    /// An object-store "directory" URL, without the trailing `/`.
    Cloud(&'a str),
}

fn glob_paths(pattern: &str) -> Result<Vec<PathBuf>, ShardListError> {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        // Like the shell: `*` does not match hidden files (e.g. `._x.tar` AppleDouble files).
        require_literal_leading_dot: true,
    };
    let paths = glob::glob_with(pattern, opts).map_err(|e| ShardListError::InvalidGlob {
        pattern: pattern.to_owned(),
        reason: e.to_string(),
    })?;
    let mut found = Vec::new();
    for p in paths {
        let p = p.map_err(|e| {
            let path = e.path().display().to_string();
            ShardListError::GlobRead {
                pattern: pattern.to_owned(),
                path,
                error: e.into(),
            }
        })?;
        if !p.is_dir() {
            found.push(p);
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(ShardListError::NoMatch {
            pattern: pattern.to_owned(),
        });
    }
    Ok(found)
}

/// Resolves one brace-expanded item into shards appended to `out`.
fn resolve_item(
    item: &str,
    ctx: Option<ListCtx<'_>>,
    out: &mut Vec<ShardRef>,
) -> Result<(), ShardListError> {
    if item.is_empty() {
        return Err(ShardListError::EmptyPattern {
            context: " (an item expanded to the empty string)".to_owned(),
        });
    }
    if is_cloud_url(item) {
        return resolve_cloud_item(item, ctx, out);
    }
    let local = match scheme_of(item) {
        Some(s) if s == "file" => file_url_path(item)?,
        None if !item.starts_with('/')
            && matches!(ctx, Some(c) if matches!(c.dir, ListDir::Cloud(_))) =>
        {
            let Some(ListCtx {
                dir: ListDir::Cloud(dir),
                ..
            }) = ctx
            else {
                unreachable!("checked by the guard")
            };
            let joined = join_cloud(dir, item).ok_or_else(|| ShardListError::EntryAboveBucket {
                entry: item.to_owned(),
                dir: dir.to_owned(),
            })?;
            return resolve_cloud_item(&joined, ctx, out);
        }
        Some(scheme) => {
            return Err(ShardListError::UnsupportedScheme {
                uri: item.to_owned(),
                scheme,
            })
        }
        None => PathBuf::from(item),
    };
    let local_str = path_str(&local)?;
    let glob = has_glob_meta(local_str);
    let list = is_list_file(local_str);
    if list {
        if let Some(ctx) = ctx {
            return Err(ShardListError::NestedListFile {
                list: ctx.list.to_owned(),
                line: 0,
                entry: item.to_owned(),
            });
        }
    }

    let base = match ctx {
        Some(ListCtx {
            dir: ListDir::Local(dir),
            ..
        }) if local.is_relative() => Some(dir),
        _ => None,
    };
    let paths = if glob {
        let pattern = match base {
            Some(dir) => format!("{}/{local_str}", glob::Pattern::escape(path_str(dir)?)),
            None => local_str.to_owned(),
        };
        glob_paths(&pattern)?
    } else {
        match base {
            Some(dir) => vec![dir.join(&local)],
            None => vec![local],
        }
    };

    for path in paths {
        if list {
            read_list(&path, out)?;
        } else {
            out.push(ShardRef::local(&path)?);
        }
    }
    Ok(())
}

fn read_list(path: &Path, out: &mut Vec<ShardRef>) -> Result<(), ShardListError> {
    let abs = absolute(path)?;
    let list = path_str(&abs)?.to_owned();
    let text = std::fs::read_to_string(&abs).map_err(|error| ShardListError::ListFile {
        path: list.clone(),
        error,
    })?;
    let dir = ListDir::Local(abs.parent().unwrap_or(Path::new("/")));
    parse_list(&list, dir, &text, out)
}

/// `entry` (relative, `/`-separated) resolved against the object-store folder `dir`
/// (`scheme://bucket/path`, no trailing `/`): `.` segments dropped, `..` climbing one folder;
/// `None` when it would climb above the bucket.
fn join_cloud(dir: &str, entry: &str) -> Option<String> {
    let (scheme, rest) = dir.split_once("://")?;
    let mut parts = rest.split('/');
    let bucket = parts.next()?;
    let mut path: Vec<&str> = parts.filter(|p| !p.is_empty()).collect();
    for seg in entry.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                path.pop()?;
            }
            seg => path.push(seg),
        }
    }
    Some(format!("{scheme}://{bucket}/{}", path.join("/")))
}

/// Resolves an object-store item: a plain object, a glob in its last segment (listed), or a
/// list file (read from the store).
fn resolve_cloud_item(
    url: &str,
    ctx: Option<ListCtx<'_>>,
    out: &mut Vec<ShardRef>,
) -> Result<(), ShardListError> {
    let list = is_list_file(url);
    if let (true, Some(ctx)) = (list, ctx) {
        return Err(ShardListError::NestedListFile {
            list: ctx.list.to_owned(),
            line: 0,
            entry: url.to_owned(),
        });
    }
    let urls = if has_glob_meta(url) {
        let (dir, pattern) = url.rsplit_once('/').unwrap_or((url, ""));
        if has_glob_meta(dir) {
            return Err(ShardListError::CloudGlobInPrefix {
                pattern: url.to_owned(),
            });
        }
        let matcher = glob::Pattern::new(pattern).map_err(|e| ShardListError::InvalidGlob {
            pattern: url.to_owned(),
            reason: e.to_string(),
        })?;
        let found: Vec<String> = CloudStore::open(dir)?
            .list("")?
            .into_iter()
            .filter(|name| !name.starts_with('.') && matcher.matches(name))
            .map(|name| format!("{dir}/{name}"))
            .collect();
        if found.is_empty() {
            return Err(ShardListError::NoMatch {
                pattern: url.to_owned(),
            });
        }
        found
    } else {
        vec![url.to_owned()]
    };
    for url in urls {
        if list {
            let (store, key) = CloudStore::open_object(&url)?;
            let bytes = store.get(&key)?;
            let text = String::from_utf8_lossy(&bytes);
            let dir = url.rsplit_once('/').map_or(url.as_str(), |(d, _)| d);
            parse_list(&url, ListDir::Cloud(dir), &text, out)?;
        } else {
            out.push(ShardRef::cloud(&url)?);
        }
    }
    Ok(())
}

/// Resolves the lines of list file `list` (blank lines and `#` comments skipped).
fn parse_list(
    list: &str,
    dir: ListDir<'_>,
    text: &str,
    out: &mut Vec<ShardRef>,
) -> Result<(), ShardListError> {
    let ctx = ListCtx { list, dir };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, line) in text.lines().enumerate() {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let line_no = i + 1;
        let in_list = |error: ShardListError| match error {
            ShardListError::NestedListFile { list, entry, .. } => ShardListError::NestedListFile {
                list,
                line: line_no,
                entry,
            },
            error => ShardListError::InList {
                list: list.to_owned(),
                line: line_no,
                error: Box::new(error),
            },
        };
        for item in expand_braces(entry).map_err(in_list)? {
            resolve_item(&item, Some(ctx), out).map_err(in_list)?;
        }
    }
    Ok(())
}

/// Resolves the job's input patterns to shards, in order.
///
/// Each pattern is brace-expanded ([`expand_braces`]); each item is then
/// - a list file if it ends with `.txt`, `.list` or `.lst`: one pattern per line, blank lines and
///   `#` comment lines ignored, relative entries resolved against the list file's directory;
///   entries may be brace patterns, globs or `file://` URLs but not list files;
/// - a glob if it contains `*`, `?` or `[`: local files in sorted order, directories and hidden
///   files excluded; a glob matching nothing is an error (a glob that ends in a list extension
///   selects list files);
/// - otherwise a local path or `file://` URL, made absolute. Existence is not checked: a missing
///   shard is the job's failed shard, not a resolution error.
///
/// Other URL schemes (`s3://`, `gs://`, `http://`, ...) are [`ShardListError::UnsupportedScheme`].
/// Repeated URIs are kept once (first position); two different URIs with the same name are
/// [`ShardListError::DuplicateName`] because outputs are named by shard stem.
pub fn resolve_inputs(patterns: &[String]) -> Result<Vec<ShardRef>, ShardListError> {
    let mut found = Vec::new();
    for pattern in patterns {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err(ShardListError::EmptyPattern {
                context: String::new(),
            });
        }
        for item in expand_braces(pattern)? {
            resolve_item(&item, None, &mut found)?;
        }
    }
    let mut uris = HashSet::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut shards = Vec::with_capacity(found.len());
    for shard in found {
        if !uris.insert(shard.uri.clone()) {
            continue;
        }
        if let Some(first) = names.get(&shard.name) {
            return Err(ShardListError::DuplicateName {
                name: shard.name,
                first: first.clone(),
                second: shard.uri,
            });
        }
        names.insert(shard.name.clone(), shard.uri.clone());
        shards.push(shard);
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    #[test]
    fn relative_list_entries_on_object_stores_are_normalised() {
        use super::join_cloud;
        assert_eq!(
            join_cloud("s3://b/lists", "../in/x.tar").as_deref(),
            Some("s3://b/in/x.tar")
        );
        assert_eq!(
            join_cloud("gs://b/a/b", "./c/../d.tar").as_deref(),
            Some("gs://b/a/b/d.tar")
        );
        assert_eq!(join_cloud("s3://b/lists", "../../x.tar"), None);
    }

    use super::*;

    #[test]
    fn scheme_detection() {
        assert_eq!(scheme_of("s3://b/k").as_deref(), Some("s3"));
        assert_eq!(scheme_of("GS://b/k").as_deref(), Some("gs"));
        assert_eq!(scheme_of("az+blob://x").as_deref(), Some("az+blob"));
        assert_eq!(scheme_of("/data/x.tar"), None);
        assert_eq!(scheme_of("dir/1://x"), None);
        assert_eq!(scheme_of("://x"), None);
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            file_url_path("file:///data/a%20b.tar").unwrap(),
            PathBuf::from("/data/a b.tar")
        );
        assert_eq!(
            file_url_path("file://localhost/x.tar").unwrap(),
            PathBuf::from("/x.tar")
        );
        assert!(file_url_path("file://host/x.tar").is_err());
        assert!(file_url_path("file://rel/x.tar").is_err());
        assert!(file_url_path("file:///bad%zz").is_err());
        assert!(file_url_path("file:///bad%ff").is_err());
    }

    #[test]
    fn list_file_detection() {
        assert!(is_list_file("a/shards.txt"));
        assert!(is_list_file("x.LIST"));
        assert!(is_list_file("x.lst"));
        assert!(!is_list_file("x.tar"));
        assert!(!is_list_file("dir.txt/x.tar"));
        assert!(!is_list_file(".txt"));
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c.tar")).unwrap(),
            PathBuf::from("/a/c.tar")
        );
        assert_eq!(absolute(Path::new("/../x")).unwrap(), PathBuf::from("/x"));
    }
}
