//! Parity of the CoCa captioner with OpenCLIP 3.3.0 `CoCa.forward` / `CoCa.generate` on the
//! tiny random CoCa of `tests/fixtures/teacher_goldens.py`, with the goldens of
//! `tests/fixtures/captioner_goldens.py` (vocabulary of 1000: start 998, end 999, pad 0).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use dfndr_captioner::decode::{CacheLocation, DecodeSession};
use dfndr_captioner::sampling::{kept_probs, top_k_keep, top_p_keep};
use dfndr_captioner::{
    clean_caption, generate, CaptionRng, CocaConfig, CocaModel, GenerationConfig, ImageContext,
    RowRequest, SpecialTokens, Strategy,
};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::device::{Compute, Precision};
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::weights::{StateDict, WeightSource};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

const SPECIAL: SpecialTokens = SpecialTokens {
    sot: 998,
    eos: 999,
    pad: 0,
};

/// The tiny CoCa's numbers, as the teacher golden script read them back from OpenCLIP.
fn tiny_config() -> CocaConfig {
    let models: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("teachers/models.json")).unwrap(),
    )
    .unwrap();
    let e = models.iter().find(|m| m["name"] == "coca").unwrap();
    let u = |x: &Value| x.as_u64().unwrap() as usize;
    let mut c = CocaConfig::named("coca_ViT-L-14").unwrap();
    c.embed_dim = u(&e["embed_dim"]);
    let v = &e["vision"];
    c.vision.image_size = u(&v["image_size"]);
    c.vision.patch_size = u(&v["patch_size"]);
    c.vision.width = u(&v["width"]);
    c.vision.layers = u(&v["layers"]);
    c.vision.head_width = u(&v["width"]) / u(&v["heads"]);
    c.vision.attn_pooler_heads = u(&v["attn_pooler_heads"]);
    c.vision.attn_pooler_queries = u(&v["attn_pooler_queries"]);
    let t = &e["text"];
    c.text.context_length = u(&t["context_length"]);
    c.text.vocab_size = u(&t["vocab_size"]);
    c.text.width = u(&t["width"]);
    c.text.heads = u(&t["heads"]);
    c.text.layers = u(&t["layers"]);
    let m = &e["multimodal"];
    c.multimodal.context_length = u(&m["context_length"]);
    c.multimodal.vocab_size = u(&m["vocab_size"]);
    c.multimodal.width = u(&m["width"]);
    c.multimodal.heads = u(&m["heads"]);
    c.multimodal.layers = u(&m["layers"]);
    c.validate().unwrap();
    c
}

struct Fixture {
    base: CocaModel,
    eos: CocaModel,
    images: Tensor,
}

fn load(override_file: Option<&str>) -> CocaModel {
    load_in(override_file, &Compute::cpu())
}

fn load_in(override_file: Option<&str>, compute: &Compute) -> CocaModel {
    let mut state = StateDict::load(&root().join("teachers/coca.safetensors")).unwrap();
    if let Some(file) = override_file {
        let changed =
            candle_core::safetensors::load(root().join("captioner").join(file), &Device::Cpu)
                .unwrap();
        assert!(!changed.is_empty());
        for (k, v) in changed {
            assert!(
                state.tensors.contains_key(&k),
                "override of unknown key {k}"
            );
            state.tensors.insert(k, v);
        }
    }
    CocaModel::load(
        &tiny_config(),
        &WeightSource::Tensors(state),
        compute,
        Kernels::Fused,
        "tiny coca",
    )
    .unwrap()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let io = candle_core::safetensors::load(
            root().join("teachers/coca.io.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        Fixture {
            base: load(None),
            eos: load(Some("coca_eos.override.safetensors")),
            images: io["images"].clone(),
        }
    })
}

fn golden(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("captioner").join(file), &Device::Cpu).unwrap()
}

fn json(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("captioner").join(file)).unwrap())
        .unwrap()
}

fn rows_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn context(model: &CocaModel) -> ImageContext {
    model.encode_image(&fixture().images).unwrap()
}

#[test]
fn teacher_forced_logits_match_openclip() {
    let g = golden("forced.safetensors");
    let texts = rows_of(&g["texts"]);
    for (model, key) in [(&fixture().base, "logits"), (&fixture().eos, "logits_eos")] {
        let ours = model.forced_logits(&context(model), &texts).unwrap();
        let diff = max_abs_diff(&ours, &g[key]);
        println!("{key}: max |ours - OpenCLIP| = {diff:e}");
        assert!(diff <= 1e-3, "{key}: {diff}");
    }
}

/// The cached decoder, fed the golden rows one token at a time (interior pad id, end-of-text
/// in the middle included), gives OpenCLIP's full-prefix logits at every position, and the
/// same as our own full recomputation.
#[test]
fn cached_decoding_equals_full_prefix_recomputation() {
    let g = golden("forced.safetensors");
    let texts = rows_of(&g["texts"]);
    for (model, key) in [(&fixture().base, "logits"), (&fixture().eos, "logits_eos")] {
        let ctx = context(model);
        let full = model.forced_logits(&ctx, &texts).unwrap();
        let l = texts[0].len();
        let mut session = DecodeSession::new(model, &ctx, (0..texts.len()).collect(), l).unwrap();
        let mut worst_golden = 0f32;
        let mut worst_full = 0f32;
        for t in 0..l {
            // Drop one row half-way through: a finished row must not disturb the others.
            let active: Vec<usize> = (0..texts.len()).filter(|&r| r != 1 || t < l / 2).collect();
            let tokens: Vec<u32> = active.iter().map(|&r| texts[r][t]).collect();
            let step = session.step(&active, &tokens).unwrap();
            for (i, &r) in active.iter().enumerate() {
                let ours = step.get(i).unwrap();
                let want = g[key].get(r).unwrap().get(t).unwrap();
                let recomputed = full.get(r).unwrap().get(t).unwrap();
                worst_golden = worst_golden.max(max_abs_diff(&ours, &want));
                worst_full = worst_full.max(max_abs_diff(&ours, &recomputed));
            }
        }
        println!(
            "{key}: cached vs OpenCLIP {worst_golden:e}, cached vs full recompute {worst_full:e}"
        );
        assert!(worst_golden <= 1e-3, "{worst_golden}");
        assert!(worst_full <= 1e-4, "{worst_full}");
    }
}

/// The GPU default (bfloat16 weights and products; float32 norms, softmax, caches and
/// logits), run here on the CPU: the cached decoder's logits stay within bf16 rounding of
/// OpenCLIP's float32 ones at every position.
#[test]
fn bf16_cached_decoding_stays_close_to_openclip_float32() {
    let compute = Compute {
        device: Device::Cpu,
        precision: Precision::Bf16,
    };
    let model = load_in(None, &compute);
    let g = golden("forced.safetensors");
    let texts = rows_of(&g["texts"]);
    let ctx = context(&model);
    let l = texts[0].len();
    let mut session = DecodeSession::new(&model, &ctx, (0..texts.len()).collect(), l).unwrap();
    let (mut worst_cos, mut same_argmax, mut positions) = (1f64, 0, 0);
    for t in 0..l {
        let active: Vec<usize> = (0..texts.len()).collect();
        let tokens: Vec<u32> = active.iter().map(|&r| texts[r][t]).collect();
        let step = session.step(&active, &tokens).unwrap();
        assert_eq!(step.dtype(), candle_core::DType::F32);
        for &r in &active {
            let ours = step.get(r).unwrap().to_vec1::<f32>().unwrap();
            let want = g["logits"]
                .get(r)
                .unwrap()
                .get(t)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let dot: f64 = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
            worst_cos = worst_cos.min(dot / (norm(&ours) * norm(&want)));
            let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
            same_argmax += usize::from(argmax(&ours) == argmax(&want));
            positions += 1;
        }
    }
    println!("bf16 cached logits: min cosine {worst_cos:.6}, argmax agrees at {same_argmax} of {positions}");
    assert!(worst_cos > 0.999, "{worst_cos}");
    assert!(
        same_argmax * 10 >= positions * 9,
        "{same_argmax} of {positions}"
    );
}

/// The GPU layout of the caches (device tensors, batched attention), run here on the CPU,
/// gives the host caches' logits: with rows dropping out, after a beam-search reorder, in
/// float32 and in bf16.
#[test]
#[allow(clippy::needless_range_loop)] // t is the decoding position, not only an index
fn device_caches_give_the_host_caches_logits() {
    let g = golden("forced.safetensors");
    let texts = rows_of(&g["texts"]);
    let bf16 = Compute {
        device: Device::Cpu,
        precision: Precision::Bf16,
    };
    let bf16_model = load_in(None, &bf16);
    // In bf16 the device caches hold bf16 keys and values where the host ones hold float32:
    // the logits then differ by that rounding (a few hundredths here), not more.
    for (model, tol, name) in [
        (&fixture().base, 1e-5f32, "f32"),
        (&bf16_model, 0.1, "bf16"),
    ] {
        let ctx = context(model);
        let l = texts[0].len();
        let rows = texts.len();
        let open = |at| DecodeSession::new_at(model, &ctx, (0..rows).collect(), l, at).unwrap();
        let (mut host, mut device) = (open(CacheLocation::Host), open(CacheLocation::Device));
        let mut worst = 0f32;
        let mut swapped = false;
        for t in 0..l {
            if t == l / 3 {
                // Beam search's reorder: slot 0 takes slot 1's past, slot 2 keeps its own.
                for s in [&mut host, &mut device] {
                    s.reorder(&[(0, 1), (1, 0)]).unwrap();
                }
                swapped = true;
            }
            let active: Vec<usize> = (0..rows).filter(|&r| r != 2 || t < l / 2).collect();
            let tokens: Vec<u32> = active.iter().map(|&r| texts[r][t]).collect();
            let a = host.step(&active, &tokens).unwrap();
            let b = device.step(&active, &tokens).unwrap();
            worst = worst.max(max_abs_diff(&a, &b));
        }
        println!("device vs host caches ({name}): max |diff| {worst:e}");
        assert!(swapped && worst <= tol, "{worst}");
    }
}

fn greedy_cfg(seq_len: usize) -> GenerationConfig {
    GenerationConfig {
        strategy: Strategy::Greedy,
        seq_len,
        ..GenerationConfig::default()
    }
}

fn run_generate(model: &CocaModel, cfg: &GenerationConfig) -> Vec<Vec<u32>> {
    let ctx = context(model);
    let mut rows: Vec<RowRequest> = (0..fixture().images.dim(0).unwrap())
        .map(|i| RowRequest {
            image: i,
            rng: CaptionRng::for_caption(0, "t", "k", i as u32),
        })
        .collect();
    generate(model, &ctx, &mut rows, cfg, SPECIAL).unwrap()
}

#[test]
fn greedy_sequences_equal_openclip() {
    let g = json("greedy.json");
    let cases = g["runs"].as_array().unwrap();
    assert!(cases.len() >= 6, "fixture set changed");
    for case in cases {
        let model = match case["weights"].as_str().unwrap() {
            "base" => &fixture().base,
            "eos" => &fixture().eos,
            other => panic!("weights {other}"),
        };
        let args = &case["args"];
        assert_eq!(args["generation_type"], "top_k");
        assert_eq!(args["top_k"], 1);
        let seq_len = args["seq_len"].as_u64().unwrap() as usize;
        let fixed = args["fixed_output_length"].as_bool().unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(case["ids"].clone()).unwrap();
        let mut ours = run_generate(model, &greedy_cfg(seq_len));
        if !fixed {
            // OpenCLIP stops once every row is finished; ours is always padded to seq_len.
            let len = want[0].len();
            assert!(ours
                .iter()
                .all(|r| r[len..].iter().all(|&t| t == SPECIAL.pad)));
            ours.iter_mut().for_each(|r| r.truncate(len));
        }
        assert_eq!(ours, want, "{}", case["name"]);
    }
}

#[test]
fn top_p_and_top_k_keep_the_same_tokens_as_hugging_face() {
    let g = golden("sampling.safetensors");
    let logits = g["logits"].to_vec2::<f32>().unwrap();
    let mut checked = 0;
    for (name, mask) in &g {
        let Some((kind, param)) = name
            .strip_prefix("top_p_")
            .map(|p| ("p", p))
            .or_else(|| name.strip_prefix("top_k_").map(|k| ("k", k)))
        else {
            continue;
        };
        let want = mask.to_vec2::<u8>().unwrap();
        for (row, want) in logits.iter().zip(want) {
            let mut keep = vec![false; row.len()];
            match kind {
                "p" => top_p_keep(row, param.parse().unwrap(), &mut keep),
                _ => top_k_keep(row, param.parse().unwrap(), &mut keep),
            }
            let want: Vec<bool> = want.iter().map(|&m| m != 0).collect();
            assert_eq!(keep, want, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 7 * logits.len(), "{checked}");
    for (t, key) in [(0.7, "probs_p0.9_t0.7"), (1.0, "probs_p0.9_t1.0")] {
        let want = g[key].to_vec2::<f32>().unwrap();
        for (row, want) in logits.iter().zip(want) {
            let mut keep = vec![false; row.len()];
            top_p_keep(row, 0.9, &mut keep);
            let probs = kept_probs(row, &keep, t);
            let worst = probs
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f32 - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{key}: {worst}");
        }
    }
}

#[test]
fn cleaning_equals_raygen_on_decoded_rows() {
    let cases = json("cleaning.json");
    let cases = cases["rows"].as_array().unwrap();
    assert!(cases.len() >= 20, "fixture set changed");
    let tok = Tokenizer::global();
    for case in cases {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let raw = tok.decode(&ids);
        assert_eq!(raw, case["raw"].as_str().unwrap(), "decode of {ids:?}");
        assert_eq!(
            clean_caption(&raw),
            case["cleaned"].as_str().unwrap(),
            "{}: {raw:?}",
            case["name"]
        );
    }
}

/// Sampled captions depend only on (seed, tag, key, index): the same rows in another batch
/// composition and order give the same tokens.
#[test]
fn top_p_captions_are_reproducible_in_any_batch() {
    let model = &fixture().eos;
    let ctx = context(model);
    let cfg = GenerationConfig::default();
    let row = |image: usize, c: u32| RowRequest {
        image,
        rng: CaptionRng::for_caption(42, "t", &format!("key{image}"), c),
    };
    let mut all: Vec<RowRequest> = (0..4)
        .flat_map(|i| (0..3).map(move |c| row(i, c)))
        .collect();
    let together = generate(model, &ctx, &mut all, &cfg, SPECIAL).unwrap();
    let mut some = vec![row(2, 1), row(0, 2)];
    let apart = generate(model, &ctx, &mut some, &cfg, SPECIAL).unwrap();
    assert_eq!(apart[0], together[2 * 3 + 1]);
    assert_eq!(apart[1], together[2]);
    // Different captions of one image differ (sampling, not greedy).
    assert_ne!(together[0], together[1]);
    for r in &together {
        assert_eq!(r[0], SPECIAL.sot);
        assert_eq!(r.len(), cfg.seq_len);
        let end = r
            .iter()
            .position(|&t| t == SPECIAL.eos || t == SPECIAL.pad)
            .unwrap();
        if r[end] == SPECIAL.eos {
            assert!(
                end >= cfg.min_seq_len,
                "end-of-text before the minimum length: {r:?}"
            );
        }
        assert!(r[end + 1..].iter().all(|&t| t == SPECIAL.pad));
    }
}

#[test]
fn beam_search_equals_openclip() {
    let g = json("beam.json");
    let runs = g["runs"].as_array().unwrap();
    assert!(runs.len() >= 6, "fixture set changed");
    let defaults = &g["generate_defaults"];
    for run in runs {
        let model = match run["weights"].as_str().unwrap() {
            "base" => &fixture().base,
            "eos" => &fixture().eos,
            other => panic!("weights {other}"),
        };
        let want: Vec<Vec<u32>> = serde_json::from_value(run["ids"].clone()).unwrap();
        let cfg = GenerationConfig {
            strategy: Strategy::BeamSearch,
            seq_len: run["args"]["seq_len"].as_u64().unwrap() as usize,
            num_beams: run["args"]["num_beams"].as_u64().unwrap() as usize,
            num_beam_groups: run["args"]["num_beam_groups"].as_u64().unwrap() as usize,
            min_seq_len: defaults["min_seq_len"].as_u64().unwrap() as usize,
            ..GenerationConfig::default()
        };
        let ctx = context(model);
        assert_eq!(want.len(), run["images"].as_u64().unwrap() as usize);
        let images: Vec<usize> = (0..want.len()).collect();
        let mut ours = dfndr_captioner::beam_search(model, &ctx, &images, &cfg, SPECIAL).unwrap();
        // OpenCLIP's batch is as wide as its longest row (+ end-of-text); ours is seq_len.
        let width = want[0].len();
        for row in &mut ours {
            assert!(row[width..].iter().all(|&t| t == SPECIAL.pad), "{row:?}");
            row.truncate(width);
        }
        assert_eq!(ours, want, "{}", run["name"]);
        // Through generate(): every caption row of an image gets the same search.
        let mut rows: Vec<RowRequest> = [1usize, 0, 1]
            .iter()
            .map(|&image| RowRequest {
                image,
                rng: CaptionRng::for_caption(0, "t", "k", 0),
            })
            .collect();
        let via = generate(model, &ctx, &mut rows, &cfg, SPECIAL).unwrap();
        assert_eq!(via[0][..width], want[1][..]);
        assert_eq!(via[1][..width], want[0][..]);
        assert_eq!(via[2], via[0]);
    }
}
