//! Parity of the Rust tokenizer with OpenCLIP 3.3.0, against goldens recorded
//! by `tests/fixtures/tokenizer_goldens.py`, plus behavioural unit tests.

use std::collections::HashMap;
use std::path::PathBuf;

use dfndr_teachers::tokenizer::{Tokenizer, CLIP_CONTEXT, COCA_CONTEXT, EOT, PAD, SOT, VOCAB_SIZE};
use serde_json::Value;

fn goldens() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/goldens.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("goldens.json parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

/// A trimmed golden row (through EOT) padded back to `ctx`.
fn padded(trimmed: &[u32], ctx: usize) -> Vec<u32> {
    let mut row = trimmed.to_vec();
    row.resize(ctx, PAD);
    row
}

fn cases(g: &Value) -> &Vec<Value> {
    g["cases"].as_array().expect("cases")
}

fn text_of(case: &Value) -> &str {
    case["text"].as_str().expect("text")
}

#[test]
fn ids_match_open_clip_at_context_77() {
    let g = goldens();
    let tok = Tokenizer::new();
    // Captions where the port knowingly differs: text -> (reason, Rust row).
    let known: HashMap<&str, (&str, Vec<u32>)> = g["known_differences"]
        .as_array()
        .expect("known_differences")
        .iter()
        .map(|k| {
            (
                k["text"].as_str().expect("text"),
                (k["reason"].as_str().expect("reason"), ids(&k["rust_row"])),
            )
        })
        .collect();
    let cases = cases(&g);
    let mut identical = 0;
    let mut failures = Vec::new();
    for case in cases {
        let text = text_of(case);
        let want = padded(&ids(&case["row"]), CLIP_CONTEXT);
        let got = tok.tokenize(text, CLIP_CONTEXT);
        if got == want {
            identical += 1;
            assert!(
                !known.contains_key(text),
                "{text:?} is listed as a known difference but matches"
            );
        } else if let Some((reason, rust_row)) = known.get(text) {
            assert_eq!(
                &got,
                &padded(rust_row, CLIP_CONTEXT),
                "known difference ({reason}) changed for {text:?}"
            );
        } else {
            failures.push(format!(
                "{text:?}\n   open_clip {want:?}\n   rust      {got:?}"
            ));
        }
    }
    println!(
        "tokenizer parity: {identical} of {} captions identical to open_clip, {} known differences",
        cases.len(),
        known.len()
    );
    assert!(
        failures.is_empty(),
        "{} captions differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(cases.len() >= 500);
}

#[test]
fn full_encodings_of_over_long_captions_match() {
    let g = goldens();
    let tok = Tokenizer::new();
    let mut n = 0;
    for case in cases(&g).iter().filter(|c| c.get("full").is_some()) {
        assert_eq!(
            tok.encode(text_of(case)),
            ids(&case["full"]),
            "{:?}",
            text_of(case)
        );
        n += 1;
    }
    assert!(n >= 10, "only {n} over-long captions");
}

#[test]
fn decode_of_encode_matches_open_clip() {
    let g = goldens();
    let tok = Tokenizer::new();
    for case in cases(&g) {
        let text = text_of(case);
        let want = case["decode"].as_str().expect("decode");
        assert_eq!(tok.decode(&tok.encode(text)), want, "{text:?}");
    }
}

#[test]
fn coca_context_76_matches() {
    let g = goldens();
    let tok = Tokenizer::new();
    let cases = cases(&g);
    let rows = g["ctx76"].as_array().expect("ctx76");
    assert!(!rows.is_empty());
    for r in rows {
        let i = r[0].as_u64().expect("index") as usize;
        let text = text_of(&cases[i]);
        assert_eq!(
            tok.tokenize(text, COCA_CONTEXT),
            padded(&ids(&r[1]), COCA_CONTEXT),
            "{text:?}"
        );
    }
}

#[test]
fn tiny_contexts_match() {
    let g = goldens();
    let tok = Tokenizer::new();
    let cases = cases(&g);
    for r in g["tiny"].as_array().expect("tiny") {
        let i = r[0].as_u64().expect("index") as usize;
        let ctx = r[1].as_u64().expect("ctx") as usize;
        let text = text_of(&cases[i]);
        assert_eq!(
            tok.tokenize(text, ctx),
            ids(&r[2]),
            "{text:?} at context {ctx}"
        );
    }
}

#[test]
fn decode_matches_open_clip() {
    let g = goldens();
    let tok = Tokenizer::new();
    let cases = cases(&g);
    for r in g["decode_rows"].as_array().expect("decode_rows") {
        let i = r[0].as_u64().expect("index") as usize;
        let row = tok.tokenize(text_of(&cases[i]), CLIP_CONTEXT);
        assert_eq!(tok.decode(&row), r[1].as_str().expect("text"));
    }
    for r in g["decode_ids"].as_array().expect("decode_ids") {
        let ids = ids(&r[0]);
        assert_eq!(tok.decode(&ids), r[1].as_str().expect("text"), "{ids:?}");
    }
}

#[test]
fn vocabulary_and_special_ids() {
    assert_eq!(VOCAB_SIZE, 49_408);
    assert_eq!((SOT, EOT, PAD), (49_406, 49_407, 0));
    let tok = Tokenizer::global();
    assert_eq!(tok.decode(&[SOT]), "<start_of_text>");
    assert_eq!(tok.decode(&[EOT]), "<end_of_text>");
    assert_eq!(tok.decode(&[PAD]), "!");
    // Every id decodes; the first id past the vocabulary is skipped.
    for id in 0..VOCAB_SIZE as u32 {
        let _ = tok.decode(&[id]);
    }
    assert_eq!(tok.decode(&[VOCAB_SIZE as u32, u32::MAX]), "");
    // Literal special-token text maps to the special ids, as in OpenCLIP.
    assert_eq!(tok.encode("<start_of_text>"), [SOT]);
    assert_eq!(tok.encode("<END_OF_TEXT>"), [EOT]);
}

#[test]
fn empty_and_whitespace_give_sot_eot_then_padding() {
    let tok = Tokenizer::new();
    for text in ["", " ", "\t\n", "\u{a0}\u{3000}"] {
        let row = tok.tokenize(text, CLIP_CONTEXT);
        assert_eq!(row.len(), CLIP_CONTEXT);
        assert_eq!(&row[..2], &[SOT, EOT], "{text:?}");
        assert!(row[2..].iter().all(|&x| x == PAD));
    }
    assert!(tok.encode("").is_empty());
    assert!(tok.tokenize("anything", 0).is_empty());
}

#[test]
fn truncation_keeps_eot_in_last_slot() {
    let tok = Tokenizer::new();
    let long = "word ".repeat(200);
    for ctx in [1, 2, 5, 76, 77, 128] {
        let row = tok.tokenize(&long, ctx);
        assert_eq!(row.len(), ctx);
        assert_eq!(row[ctx - 1], EOT, "context {ctx}");
        if ctx > 1 {
            assert_eq!(row[0], SOT);
            assert!(row[1..ctx - 1].iter().all(|&x| x != PAD && x != EOT));
        }
    }
    // Exactly 75 content tokens fit in 77 without truncation.
    let fits = "a ".repeat(75);
    let row = tok.tokenize(&fits, 77);
    assert_eq!(row[76], EOT);
    assert_eq!(tok.encode(&fits).len(), 75);
}

#[test]
fn decode_inverts_encode_on_plain_ascii() {
    let tok = Tokenizer::new();
    // decode ends every pre-token with a space (the `</w>` marker).
    for (text, want) in [
        ("a photo of a dog", "a photo of a dog "),
        (
            "the quick brown fox jumps over the lazy dog",
            "the quick brown fox jumps over the lazy dog ",
        ),
        (
            "supercalifragilistic antidisestablishment",
            "supercalifragilistic antidisestablishment ",
        ),
        ("hello world! 123 test.", "hello world ! 1 2 3 test . "),
        ("don't stop", "don 't stop "),
        ("Mixed CASE", "mixed case "),
    ] {
        assert_eq!(tok.decode(&tok.encode(text)), want, "{text:?}");
    }
}

#[test]
fn tokenize_batch_equals_single_rows() {
    let tok = Tokenizer::new();
    let texts = ["a cat", "", "Caf\u{e9} &amp; cr\u{e8}me"];
    let batch = tok.tokenize_batch(&texts, 77);
    for (t, row) in texts.iter().zip(&batch) {
        assert_eq!(row, &tok.tokenize(t, 77));
    }
    let mut flat = vec![7u32; 2 * 76];
    for (t, chunk) in texts.iter().zip(flat.chunks_mut(76)) {
        tok.tokenize_into(t, chunk);
    }
    assert_eq!(&flat[..76], &tok.tokenize("a cat", 76)[..]);
}

#[test]
fn shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    let g = goldens();
    let cases = cases(&g);
    let tok = Tokenizer::global();
    let serial: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| tok.tokenize(text_of(c), CLIP_CONTEXT))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let serial = &serial;
                s.spawn(move || {
                    // Different orders so the per-thread caches fill differently.
                    for k in 0..cases.len() {
                        let i = (k * (2 * t + 1) + t) % cases.len();
                        assert_eq!(tok.tokenize(text_of(&cases[i]), CLIP_CONTEXT), serial[i]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread panicked");
        }
    });
}
