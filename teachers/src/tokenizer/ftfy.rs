//! A port of `ftfy.fix_text` (ftfy 6.3.1, default `TextFixerConfig`), the
//! first step of OpenCLIP's `basic_clean`.
//!
//! Every step of the default configuration is reproduced, in ftfy's order:
//! line-by-line segments, `unescape_html` ("auto": off from the first line
//! that contains '<' on), the mojibake repair (`fix_encoding`: the ten
//! single-byte codecs, `restore_byte_a0`, `replace_lossy_sequences`,
//! `utf-8-variants`, `decode_inconsistent_utf8`, latin-1 to windows-1252,
//! C1 controls), ligatures, character width, quote uncurling, line breaks,
//! terminal escapes, control characters and NFC, repeated until nothing
//! changes. ftfy's regexes are translated to `regex` syntax by
//! `gen_tables.py` with Python's own `\s`, `\w`, `\d` classes, so the
//! mojibake heuristic ("badness") fires on exactly the same inputs.

use std::borrow::Cow;
use std::sync::OnceLock;

use regex::bytes::Regex as BytesRegex;
use regex::Regex;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use super::clean::{ftfy_entity, html_unescape, in_ranges};
use super::tables;

/// ftfy's `max_decode_length`: longer lines are fixed in pieces.
const MAX_SEGMENT_CHARS: usize = 1_000_000;

/// Index of latin-1 and sloppy-windows-1252 in `tables::CHARMAPS`.
const LATIN_1: usize = 0;
const SLOPPY_1252: usize = 1;
const MACROMAN: &str = "macroman";

struct Compiled {
    badness: Regex,
    utf8_detector: Regex,
    altered_utf8: BytesRegex,
    lossy_utf8: BytesRegex,
    /// Per codec: (char, byte) sorted by char, for the high half.
    encoders: Vec<Vec<(u32, u8)>>,
}

fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        // The patterns are compile-time constants (see the test that builds
        // them), so failing here is a build defect, not an input error.
        let big = |p: &str| {
            regex::RegexBuilder::new(p)
                .size_limit(64 << 20)
                .dfa_size_limit(64 << 20)
                .build()
                .expect("ftfy pattern from tables.rs must compile")
        };
        let bytes = |p: &str| BytesRegex::new(p).expect("ftfy byte pattern must compile");
        Compiled {
            badness: big(tables::BADNESS_RE),
            utf8_detector: big(tables::UTF8_DETECTOR_RE),
            // Mojibake whose 0xA0 bytes became spaces.
            altered_utf8: bytes(
                r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9][ ]|[\xe2\xe3][ ][\x80-\x84\x86-\x9f\xa1-\xbf]|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf][ ]|[\xf0][ ][\x80-\xbf][\x80-\xbf]|[\xf0][\x80-\xbf][ ][\x80-\xbf]|[\xf0][\x80-\xbf][\x80-\xbf][ ]",
            ),
            // UTF-8 whose continuation bytes were lost (0x1A stands for U+FFFD).
            lossy_utf8: bytes(
                r"(?-u)[\xc2-\xdf][\x1a]|[\xc2-\xc3][?]|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]|\x1a",
            ),
            encoders: tables::CHARMAPS
                .iter()
                .map(|(_, _, high)| {
                    let mut v: Vec<(u32, u8)> = high
                        .iter()
                        .enumerate()
                        .map(|(i, &c)| (c, 0x80 + i as u8))
                        .collect();
                    v.sort_unstable();
                    v
                })
                .collect(),
        }
    })
}

/// `ftfy.fix_text(text)` with the default configuration.
pub(crate) fn fix_text(text: &str) -> Cow<'_, str> {
    if is_trivially_fixed(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for line in text.split_inclusive('\n') {
        for segment in split_chars(line, MAX_SEGMENT_CHARS) {
            // "auto" turns HTML unescaping off for this and every later line
            // once one of them looks like HTML.
            if segment.contains('<') {
                unescape = false;
            }
            out.push_str(&fix_segment(segment, unescape));
        }
    }
    Cow::Owned(out)
}

/// ASCII text without '&', CR or removable control characters: every ftfy
/// step is the identity on it (the common case for web captions).
fn is_trivially_fixed(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, 0x09 | 0x0A | 0x0C | 0x20..=0x7E) && b != b'&')
}

fn split_chars(s: &str, n: usize) -> Vec<&str> {
    if s.len() <= n {
        return vec![s];
    }
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let cut = rest.char_indices().nth(n).map_or(rest.len(), |(i, _)| i);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

/// `fix_and_explain` on one segment: apply every fixer until a fixed point.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_owned();
    loop {
        let orig = text.clone();
        if unescape {
            text = unescape_html(&text).into_owned();
        }
        text = fix_encoding(&text);
        text = fix_c1_controls(&text).into_owned();
        text = translate(&text, |c| lookup_char(tables::LIGATURES, c)).into_owned();
        text = translate(&text, |c| lookup_char(tables::WIDTH_MAP, c)).into_owned();
        text = uncurl_quotes(&text).into_owned();
        text = fix_line_breaks(&text).into_owned();
        // fix_surrogates: a Rust string cannot hold surrogates.
        text = remove_terminal_escapes(&text).into_owned();
        text = remove_control_chars(&text).into_owned();
        text = nfc(&text).into_owned();
        if text == orig {
            return text;
        }
    }
}

/// `unicodedata.normalize("NFC", text)` as CPython 3.11 (Unicode 14) does
/// it, using the newer `unicode-normalization` tables.
///
/// Normalisation is stable for assigned characters, so the two versions can
/// only disagree on characters CPython does not know yet. CPython treats
/// those as starters that neither decompose, compose nor reorder, so each
/// stretch between them is normalised on its own and they are kept as-is.
fn nfc(text: &str) -> Cow<'_, str> {
    if is_nfc_quick(text.chars()) == IsNormalized::Yes {
        return Cow::Borrowed(text);
    }
    let known = |c: char| in_ranges(tables::ASSIGNED, c as u32);
    if text.chars().all(known) {
        return Cow::Owned(text.nfc().collect());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let cut = rest
            .char_indices()
            .find(|&(_, c)| !known(c))
            .map_or(rest.len(), |(i, _)| i);
        out.extend(rest[..cut].nfc());
        let Some(new) = rest[cut..].chars().next() else {
            break;
        };
        out.push(new);
        rest = &rest[cut + new.len_utf8()..];
    }
    Cow::Owned(out)
}

fn lookup_char(table: &'static [(u32, &'static str)], c: char) -> Option<&'static str> {
    table
        .binary_search_by_key(&(c as u32), |&(k, _)| k)
        .ok()
        .map(|i| table[i].1)
}

/// `str.translate` with a char -> string map.
fn translate(text: &str, map: impl Fn(char) -> Option<&'static str>) -> Cow<'_, str> {
    let Some(first) = text.char_indices().find(|&(_, c)| map(c).is_some()) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first.0]);
    for c in text[first.0..].chars() {
        match map(c) {
            Some(s) => out.push_str(s),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// ftfy's `unescape_html`: only `&name;` / `&#num;` forms (ftfy's own table,
/// with all-caps variants), never the ';'-less names `html.unescape` takes.
fn unescape_html(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        // &#?[0-9A-Za-z]{1,24};
        let b = after.as_bytes();
        let hash = usize::from(b.first() == Some(&b'#'));
        let run = b[hash..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        if (1..=24).contains(&run) && b.get(hash + run) == Some(&b';') {
            let end = hash + run + 1;
            let entity = &rest[amp..amp + 1 + end];
            if let Some(v) = ftfy_entity(&after[..end]) {
                out.push_str(v);
            } else if hash == 1 {
                let decoded = html_unescape(entity);
                // Only whole, ';'-terminated numeric references count.
                out.push_str(if decoded.contains(';') {
                    entity
                } else {
                    &decoded
                });
            } else {
                out.push_str(entity);
            }
            rest = &after[end..];
        } else {
            out.push('&');
            rest = after;
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

fn uncurl_quotes(text: &str) -> Cow<'_, str> {
    let single = |c: char| c == '\u{2BC}' || ('\u{2018}'..='\u{201B}').contains(&c);
    let double = |c: char| ('\u{201C}'..='\u{201F}').contains(&c);
    if !text.chars().any(|c| single(c) || double(c)) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if double(c) {
                    '"'
                } else if single(c) {
                    '\''
                } else {
                    c
                }
            })
            .collect(),
    )
}

fn fix_line_breaks(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| matches!(c, '\r' | '\u{2028}' | '\u{2029}' | '\u{85}'))
    {
        return Cow::Borrowed(text);
    }
    let s = text
        .replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
    Cow::Owned(s)
}

/// `\x1b\[((?:\d|;)*)([a-zA-Z])` with Python's Unicode `\d`.
fn remove_terminal_escapes(text: &str) -> Cow<'_, str> {
    if !text.contains("\x1b[") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(esc) = rest.find("\x1b[") {
        out.push_str(&rest[..esc]);
        let after = &rest[esc + 2..];
        let params = after
            .char_indices()
            .find(|&(_, c)| !(c == ';' || in_ranges(tables::PY_DECIMAL, c as u32)))
            .map_or(after.len(), |(i, _)| i);
        match after[params..].chars().next() {
            Some(c) if c.is_ascii_alphabetic() => rest = &after[params + 1..],
            _ => {
                out.push('\x1b');
                rest = &rest[esc + 1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

fn remove_control_chars(text: &str) -> Cow<'_, str> {
    let control = |c: char| in_ranges(tables::CONTROL_CHARS, c as u32);
    if !text.chars().any(control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.chars().filter(|&c| !control(c)).collect())
}

fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9F}').contains(&c)
}

/// C1 controls read as their windows-1252 characters, as browsers do.
fn fix_c1_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_c1) {
        return Cow::Borrowed(text);
    }
    let high = &tables::CHARMAPS[SLOPPY_1252].2;
    Cow::Owned(
        text.chars()
            .map(|c| {
                if is_c1(c) {
                    char::from_u32(high[c as usize - 0x80]).unwrap_or(c)
                } else {
                    c
                }
            })
            .collect(),
    )
}

fn is_bad(text: &str) -> bool {
    compiled().badness.is_match(text)
}

/// `ftfy.fix_encoding`: undo mojibake one layer at a time.
pub(crate) fn fix_encoding(text: &str) -> String {
    let mut text = text.to_owned();
    loop {
        match fix_encoding_step(&text) {
            Some(fixed) if fixed != text => text = fixed,
            _ => return text,
        }
    }
}

/// Encode `text` with single-byte codec `enc`, or `None` if some char has
/// no byte there (ftfy's `possible_encoding`).
fn charmap_encode(text: &str, enc: usize) -> Option<Vec<u8>> {
    let sloppy = tables::CHARMAPS[enc].1;
    let encoder = &compiled().encoders[enc];
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let cp = c as u32;
        let byte = if cp < 0x80 && cp != 0x1A {
            cp as u8
        } else if (cp == 0x1A && !sloppy) || (cp == 0xFFFD && sloppy) {
            0x1A
        } else {
            let i = encoder.binary_search_by_key(&cp, |&(k, _)| k).ok()?;
            encoder[i].1
        };
        out.push(byte);
    }
    Some(out)
}

/// `_fix_encoding_one_step_and_explain`; `None` means "no change".
fn fix_encoding_step(text: &str) -> Option<String> {
    if text.is_empty() || text.is_ascii() || !is_bad(text) {
        return None;
    }
    let re = compiled();
    let mut latin1_possible = false;
    for (enc, (name, sloppy, _)) in tables::CHARMAPS.iter().enumerate() {
        let Some(mut bytes) = charmap_encode(text, enc) else {
            continue;
        };
        if enc == LATIN_1 {
            latin1_possible = true;
        }
        if *name != MACROMAN && re.altered_utf8.is_match(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if *sloppy {
            bytes = re
                .lossy_utf8
                .replace_all(&bytes, "\u{FFFD}".as_bytes())
                .into_owned();
        }
        let decoded = if bytes.contains(&0xED) || bytes.contains(&0xC0) {
            decode_utf8_variants(&bytes)
        } else {
            String::from_utf8(bytes).ok()
        };
        if let Some(fixed) = decoded {
            return Some(fixed);
        }
    }
    if find_utf8_mojibake(text, 0).is_some() {
        let fixed = decode_inconsistent_utf8(text);
        if fixed != text {
            return Some(fixed);
        }
    }
    if latin1_possible {
        // ftfy tests for "windows-1252" in its list of possible codecs,
        // which only ever holds "sloppy-windows-1252", so this always runs.
        if let Some(fixed) = latin1_to_windows1252(text) {
            if fixed != text {
                return Some(fixed);
            }
        }
    }
    if text.chars().any(is_c1) {
        return Some(fix_c1_controls(text).into_owned());
    }
    None
}

/// `text.encode("latin-1").decode("windows-1252")` (strict).
fn latin1_to_windows1252(text: &str) -> Option<String> {
    let high = &tables::CHARMAPS[SLOPPY_1252].2;
    text.chars()
        .map(|c| {
            let cp = c as u32;
            if (0x80..0xA0).contains(&cp) {
                if tables::WINDOWS_1252_UNDEFINED.contains(&(cp as u8)) {
                    None
                } else {
                    char::from_u32(high[cp as usize - 0x80])
                }
            } else {
                Some(c)
            }
        })
        .collect()
}

/// ftfy's `restore_byte_a0`: put back the 0xA0 bytes that became spaces.
fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    // "Ã " as a word is "à" (b"\xc3 (?! |quele|quela|quilo|s )"): keep the
    // space and insert the lost 0xA0.
    let mut fixed = Vec::with_capacity(bytes.len() + 4);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0xC3 && bytes.get(i + 1) == Some(&b' ') {
            let next = &bytes[i + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
                .iter()
                .any(|p| next.starts_with(p));
            if !excluded {
                fixed.extend_from_slice(b"\xc3\xa0 ");
                i += 2;
                continue;
            }
        }
        fixed.push(bytes[i]);
        i += 1;
    }
    compiled()
        .altered_utf8
        .replace_all(&fixed, |m: &regex::bytes::Captures<'_>| {
            m[0].iter()
                .map(|&b| if b == b' ' { 0xA0 } else { b })
                .collect::<Vec<u8>>()
        })
        .into_owned()
}

/// ftfy's "utf-8-variants" codec (strict): UTF-8 plus CESU-8 surrogate
/// pairs and Java's two-byte NUL.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        // Python's `$` also matches before a final '\n', so the codec's
        // patterns accept a trailing newline in place of the last byte:
        // b"\xc0\n" at the very end is a NUL, and so on.
        if rest.starts_with(b"\xc0\x80") || rest == b"\xc0\n" {
            out.push('\0');
            i += 2;
            continue;
        }
        if rest.len() >= 6
            && rest[0] == 0xED
            && (0xA0..=0xAF).contains(&rest[1])
            && (0x80..=0xBF).contains(&rest[2])
            && rest[3] == 0xED
            && (0xB0..=0xBF).contains(&rest[4])
            && ((0x80..=0xBF).contains(&rest[5]) || rest.len() == 6 && rest[5] == b'\n')
        {
            let cp = ((u32::from(rest[1]) & 0x0F) << 16)
                + ((u32::from(rest[2]) & 0x3F) << 10)
                + ((u32::from(rest[4]) & 0x0F) << 6)
                + (u32::from(rest[5]) & 0x3F)
                + 0x10000;
            out.push(char::from_u32(cp)?);
            i += 6;
            continue;
        }
        // One ordinary UTF-8 character (strict).
        let len = match rest[0] {
            0x00..=0x7F => 1,
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return None,
        };
        let ch = std::str::from_utf8(rest.get(..len)?).ok()?;
        out.push_str(ch);
        i += len;
    }
    Some(out)
}

/// The next match of ftfy's `UTF8_DETECTOR_RE` at or after byte `from`,
/// honouring its negative lookbehind on the strict continuation class.
fn find_utf8_mojibake(text: &str, from: usize) -> Option<(usize, usize)> {
    let re = &compiled().utf8_detector;
    let mut pos = from;
    while pos <= text.len() {
        let m = re.find_at(text, pos)?;
        let blocked = text[..m.start()]
            .chars()
            .next_back()
            .is_some_and(|c| in_ranges(tables::UTF8_CONTINUATION_STRICT, c as u32));
        if !blocked {
            return Some((m.start(), m.end()));
        }
        // Python retries one character later.
        pos = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// ftfy's `decode_inconsistent_utf8`: fix each UTF-8-looking run that is
/// bad on its own (and shorter than the whole text).
fn decode_inconsistent_utf8(text: &str) -> String {
    let total = text.chars().count();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut pos = 0;
    while let Some((s, e)) = find_utf8_mojibake(text, pos) {
        out.push_str(&text[last..s]);
        let sub = &text[s..e];
        if sub.chars().count() < total && is_bad(sub) {
            out.push_str(&fix_encoding(sub));
        } else {
            out.push_str(sub);
        }
        last = e;
        pos = e;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_compile() {
        let c = compiled();
        assert!(c.badness.is_match("cafÃ©"));
        assert!(!c.badness.is_match("café"));
        assert_eq!(c.encoders.len(), tables::CHARMAPS.len());
    }

    #[test]
    fn nfc_keeps_characters_newer_than_unicode_14() {
        assert_eq!(nfc("e\u{301}"), "\u{e9}");
        // U+1E08F (Unicode 15, combining, ccc 230) is unknown to CPython
        // 3.11, so it neither reorders before U+0323 (ccc 220) nor composes.
        assert_eq!(nfc("a\u{1E08F}\u{323}"), "a\u{1E08F}\u{323}");
        assert_eq!(nfc("e\u{301}\u{1E08F}e\u{301}"), "\u{e9}\u{1E08F}\u{e9}");
    }

    #[test]
    fn ftfy_doc_examples() {
        let cases = [
            ("âœ” No problems", "✔ No problems"),
            ("&macr;\\_(ã\u{83}\u{84})_/&macr;", "¯\\_(ツ)_/¯"),
            (
                "Broken text&hellip; it&#x2019;s ﬂubberiﬁc!",
                "Broken text… it's flubberific!",
            ),
            ("ＬＯＵＤ　ＮＯＩＳＥＳ", "LOUD NOISES"),
            ("sÃ³", "só"),
            ("voilÃ le travail", "voilà le travail"),
            ("Ã©À\n", "é"),
            ("P&EACUTE;REZ", "PÉREZ"),
            ("\u{1b}[36;44mblue\u{1b}[0m", "blue"),
            ("a\r\nb\rc", "a\nb\nc"),
        ];
        for (input, want) in cases {
            assert_eq!(fix_text(input), want, "{input:?}");
        }
    }
}
