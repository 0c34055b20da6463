//! The Python string primitives OpenCLIP's cleaning is built from:
//! `html.unescape`, `str.isspace`/`split`/`strip` and `str.lower`, each with
//! CPython 3.11's exact semantics (tables measured by `gen_tables.py`).

use std::borrow::Cow;
use std::cmp::Ordering;

use super::tables;

/// Whether `c` lies in one of the sorted, disjoint inclusive `ranges`.
pub(crate) fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                Ordering::Less
            } else if lo > c {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

/// Value of `key` in a table sorted by key.
fn lookup<'a, K: Ord + ?Sized, T: std::borrow::Borrow<K>>(
    table: &'a [(T, &'static str)],
    key: &K,
) -> Option<&'a str> {
    table
        .binary_search_by(|(k, _)| k.borrow().cmp(key))
        .ok()
        .map(|i| table[i].1)
}

/// `str.isspace()` for one character.
pub(crate) fn py_isspace(c: char) -> bool {
    if c.is_ascii() {
        // \t \n \v \f \r, the four "information separators" 0x1C-0x1F, space
        matches!(c as u8, 0x09..=0x0D | 0x1C..=0x20)
    } else {
        in_ranges(tables::PY_SPACE, c as u32)
    }
}

/// `" ".join(text.split())`: OpenCLIP's `whitespace_clean` (the `.strip()`
/// after it is then a no-op).
pub(crate) fn whitespace_clean(text: &str) -> Cow<'_, str> {
    // Already clean: no leading/trailing whitespace, and every whitespace
    // char is a single ' ' between two non-space chars.
    let mut prev_space = true;
    let mut clean = true;
    for c in text.chars() {
        let sp = py_isspace(c);
        if sp && (prev_space || c != ' ') {
            clean = false;
            break;
        }
        prev_space = sp;
    }
    if clean && !prev_space || text.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for word in text.split(py_isspace).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    Cow::Owned(out)
}

/// `str.strip()` (Python whitespace, which differs from Rust's `trim`).
pub(crate) fn py_strip(text: &str) -> &str {
    text.trim_matches(py_isspace)
}

/// `str.lower()`: full lower-case mappings plus the final-sigma rule, as
/// CPython 3.11 (Unicode 14) implements them.
pub(crate) fn py_lower(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        if !text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Cow::Borrowed(text);
        }
        return Cow::Owned(text.to_ascii_lowercase());
    }
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.char_indices() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if c == '\u{3A3}' {
            out.push(if final_sigma(text, i) {
                '\u{3C2}'
            } else {
                '\u{3C3}'
            });
        } else {
            match lookup(tables::LOWER, &(c as u32)) {
                Some(lower) => out.push_str(lower),
                None => out.push(c),
            }
        }
    }
    Cow::Owned(out)
}

fn case_ignorable(c: char) -> bool {
    in_ranges(tables::CASE_IGNORABLE, c as u32)
}

fn cased(c: char) -> bool {
    in_ranges(tables::CASED, c as u32)
}

/// CPython's `handle_capital_sigma`: the sigma at byte `at` is final when a
/// cased letter precedes it (skipping case-ignorables) and none follows.
fn final_sigma(text: &str, at: usize) -> bool {
    let before = text[..at].chars().rev().find(|&c| !case_ignorable(c));
    if !before.is_some_and(cased) {
        return false;
    }
    let after = text[at + '\u{3A3}'.len_utf8()..]
        .chars()
        .find(|&c| !case_ignorable(c));
    !after.is_some_and(cased)
}

/// Python's `html.unescape` (HTML5 named references with and without ';',
/// longest-prefix matching of the legacy names, numeric references with the
/// HTML5 replacement rules).
pub(crate) fn html_unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match charref(after, &mut out) {
            Some(consumed) => rest = &after[consumed..],
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// One match of `html._charref` right after an '&': pushes the replacement
/// and returns how many bytes of `after` it consumed, or `None` when the
/// pattern does not match there (the '&' stays literal).
fn charref(after: &str, out: &mut String) -> Option<usize> {
    let b = after.as_bytes();
    if b.first() == Some(&b'#') {
        let (radix, start) = match b.get(1) {
            Some(b'x' | b'X') => (16, 2),
            _ => (10, 1),
        };
        let digits = b[start..]
            .iter()
            .take_while(|d| {
                if radix == 16 {
                    d.is_ascii_hexdigit()
                } else {
                    d.is_ascii_digit()
                }
            })
            .count();
        if digits == 0 {
            return None;
        }
        let mut end = start + digits;
        if b.get(end) == Some(&b';') {
            end += 1;
        }
        // Saturate: anything past U+10FFFF behaves the same.
        let num = b[start..start + digits].iter().fold(0u32, |acc, &d| {
            let v = (d as char).to_digit(radix).unwrap_or(0);
            acc.saturating_mul(radix).saturating_add(v)
        });
        push_numeric(num, out);
        return Some(end);
    }
    // Named: [^\t\n\f <&#;]{1,32};?
    let mut name_end = 0;
    for (n, (i, c)) in after.char_indices().enumerate() {
        if n == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        name_end = i + c.len_utf8();
    }
    if name_end == 0 {
        return None;
    }
    let end = if b.get(name_end) == Some(&b';') {
        name_end + 1
    } else {
        name_end
    };
    let s = &after[..end];
    if let Some(v) = lookup(tables::HTML5, s) {
        out.push_str(v);
        return Some(end);
    }
    // Longest known prefix of at least two characters.
    let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
    for &x in bounds.iter().rev() {
        if let Some(v) = lookup(tables::HTML5, &s[..x]) {
            out.push_str(v);
            out.push_str(&s[x..]);
            return Some(end);
        }
    }
    None
}

fn push_numeric(num: u32, out: &mut String) {
    if let Some(v) = lookup(tables::HTML_INVALID_CHARREFS, &num) {
        out.push_str(v);
    } else if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
        out.push('\u{FFFD}');
    } else if tables::HTML_INVALID_CODEPOINTS.binary_search(&num).is_ok() {
        // dropped
    } else if let Some(c) = char::from_u32(num) {
        out.push(c);
    }
}

/// The value of an HTML entity `name` (with its ';', without '&') in ftfy's
/// table: HTML5 names ending in ';' plus ftfy's all-caps variants.
pub(crate) fn ftfy_entity(name: &str) -> Option<&'static str> {
    if !name.ends_with(';') {
        return None;
    }
    lookup(tables::HTML5, name).or_else(|| lookup(tables::FTFY_UPPER_ENTITIES, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_matches_python() {
        let cases = [
            ("&amp;amp;", "&amp;"),
            ("&amp", "&"),
            ("&ampfoo", "&foo"),
            ("&notit;", "¬it;"),
            ("&notin;", "∉"),
            ("&#65;&#x42;&#X43", "ABC"),
            ("&#0;", "\u{FFFD}"),
            ("&#128;", "€"),
            ("&#1;x", "x"),
            ("&#99999999999;", "\u{FFFD}"),
            ("&#;&#x;&;& &a", "&#;&#x;&;& &a"),
            ("a&lt;b&gt", "a<b>"),
        ];
        for (input, want) in cases {
            assert_eq!(html_unescape(input), want, "{input:?}");
        }
    }

    #[test]
    fn lower_matches_python() {
        assert_eq!(py_lower("ΟΔΟΣ ΣΑ Σ"), "οδος σα σ");
        assert_eq!(py_lower("İx"), "i\u{307}x");
        assert_eq!(py_lower("ABC"), "abc");
    }

    #[test]
    fn whitespace() {
        assert_eq!(whitespace_clean(" a \t b\u{a0}\u{1c}c "), "a b c");
        assert!(matches!(whitespace_clean("a b"), Cow::Borrowed(_)));
        assert_eq!(whitespace_clean("a\u{200b}b"), "a\u{200b}b");
        assert_eq!(whitespace_clean("   "), "");
    }
}
