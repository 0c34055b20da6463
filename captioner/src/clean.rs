//! Caption cleaning exactly as RayGen does it after `open_clip.decode`:
//! `text.split("<end_of_text>")[0].split("<start_of_text>")[-1].split(".")[0].rstrip()`.

use dfndr_teachers::tokenizer::Tokenizer;

const EOT_TEXT: &str = "<end_of_text>";
const SOT_TEXT: &str = "<start_of_text>";

/// RayGen's cleaning of a decoded caption: cut at the first end-of-text, drop everything up to
/// the last start-of-text, keep the text before the first period, strip trailing whitespace
/// (Python's `rstrip()`: Unicode whitespace).
pub fn clean_caption(decoded: &str) -> String {
    let text = decoded.split(EOT_TEXT).next().unwrap_or("");
    let text = text.rsplit(SOT_TEXT).next().unwrap_or("");
    let text = text.split('.').next().unwrap_or("");
    text.trim_end_matches(is_python_whitespace).to_string()
}

/// `str.isspace()` of Python: Unicode White_Space plus the ASCII separators 0x1c..=0x1f.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A generated token row as text: `open_clip.decode` then, unless `raw`, RayGen's cleaning.
pub fn caption_text(tokenizer: &Tokenizer, ids: &[u32], raw: bool) -> String {
    let decoded = tokenizer.decode(ids);
    if raw {
        decoded
    } else {
        clean_caption(&decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_follows_raygen() {
        assert_eq!(
            clean_caption("<start_of_text>hello world . <end_of_text>!!!!"),
            "hello world"
        );
        assert_eq!(
            clean_caption("<start_of_text>pi is 3 . 1 4 <end_of_text>"),
            "pi is 3"
        );
        assert_eq!(clean_caption("<start_of_text>a <start_of_text>b c "), "b c");
        assert_eq!(clean_caption(". leading"), "");
        assert_eq!(clean_caption("<start_of_text><end_of_text>"), "");
    }
}
