//! Tower parity with OpenCLIP 3.3.0: tiny random-weight models built, run and exported by
//! `tests/fixtures/teacher_goldens.py`; our towers load the same state dicts and must
//! reproduce every output within 1e-4.

use dfndr_teachers::device::Compute;
use std::collections::HashMap;
use std::path::PathBuf;

use dfndr_teachers::arch::{ClipConfig, TextConfig, TextPool, VisionConfig, VisionPool};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::device::Precision;
use dfndr_teachers::weights::{StateDict, WeightSource};
use dfndr_teachers::{l2_normalize, ClipModel, DType, Device, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/teachers")
}

/// Our config from the numbers the golden script read back from the OpenCLIP model.
fn config_of(entry: &Value) -> ClipConfig {
    let v = &entry["vision"];
    let t = &entry["text"];
    let u = |x: &Value| x.as_u64().unwrap() as usize;
    let width = u(&v["width"]);
    ClipConfig {
        embed_dim: u(&entry["embed_dim"]),
        quick_gelu: entry["quick_gelu"].as_bool().unwrap(),
        custom_text: entry["text_prefix"] == "text.",
        vision: VisionConfig {
            image_size: u(&v["image_size"]),
            patch_size: u(&v["patch_size"]),
            width,
            layers: u(&v["layers"]),
            head_width: width / u(&v["heads"]),
            mlp_ratio: v["mlp_ratio"].as_f64().unwrap(),
            ls_init_value: v["ls_init_value"].as_f64(),
            pool_type: match v["pool_type"].as_str().unwrap() {
                "tok" => VisionPool::Tok,
                "avg" => VisionPool::Avg,
                other => panic!("pool {other}"),
            },
            final_ln_after_pool: v["final_ln_after_pool"].as_bool().unwrap(),
            no_ln_pre: v["no_ln_pre"].as_bool().unwrap(),
            attentional_pool: v["attentional_pool"].as_bool().unwrap(),
            attn_pooler_heads: v["attn_pooler_heads"].as_u64().unwrap_or(8) as usize,
            attn_pooler_queries: v["attn_pooler_queries"].as_u64().unwrap_or(256) as usize,
        },
        text: TextConfig {
            context_length: u(&t["context_length"]),
            vocab_size: u(&t["vocab_size"]),
            width: u(&t["width"]),
            heads: u(&t["heads"]),
            layers: u(&t["layers"]),
            mlp_ratio: t["mlp_ratio"].as_f64().unwrap(),
            ls_init_value: t["ls_init_value"].as_f64(),
            no_causal_mask: !t["causal"].as_bool().unwrap(),
            embed_cls: t["embed_cls"].as_bool().unwrap(),
            pad_id: t["pad_id"].as_u64().unwrap() as u32,
            eos_id: 49407,
            pool_type: match t["pool_type"].as_str().unwrap() {
                "argmax" => TextPool::Argmax,
                // With embed_cls the class token is pooled whatever pool_type says.
                "last" => TextPool::Last,
                other => panic!("pool {other}"),
            },
            proj_bias: t["proj_bias"].as_bool().unwrap(),
        },
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
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

struct Case {
    name: String,
    model: ClipModel,
    io: HashMap<String, Tensor>,
}

fn cases() -> Vec<Case> {
    cases_in(&Compute::cpu())
}

/// The fixture models built in `compute`'s precision.
fn cases_in(compute: &Compute) -> Vec<Case> {
    let models: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models.json")).unwrap())
            .unwrap();
    assert_eq!(models.len(), 4, "fixture set changed");
    models
        .iter()
        .map(|entry| {
            let name = entry["name"].as_str().unwrap().to_string();
            let cfg = config_of(entry);
            let mut state =
                StateDict::load(&fixtures().join(entry["weights"].as_str().unwrap())).unwrap();
            // The CoCa decoder belongs to the captioner; the towers must use everything else.
            let decoder = state.split_off("text_decoder.");
            assert_eq!(decoder.is_empty(), entry["kind"] != "coca");
            let model = ClipModel::load(
                &cfg,
                &WeightSource::Tensors(state),
                compute,
                Kernels::Fused,
                &name,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let io = candle_core::safetensors::load(
                fixtures().join(entry["io"].as_str().unwrap()),
                &Device::Cpu,
            )
            .unwrap();
            Case { name, model, io }
        })
        .collect()
}

fn texts(io: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    io["texts"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

const TOL: f32 = 1e-4;

/// The stored logit scale equals OpenCLIP's (read as float32 in every precision).
fn assert_logit_scale_matches(case: &Case) {
    let scale = case.io["logit_scale"].to_vec1::<f32>().unwrap()[0];
    assert_eq!(
        case.model.logit_scale_log().unwrap(),
        scale,
        "{}",
        case.name
    );
}

/// Cosine similarity of each row pair of two `[N, D]` tensors.
fn row_cosines(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let n = |v: &[f32]| v.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            dot / (n(x) * n(y))
        })
        .collect()
}

#[test]
fn bf16_towers_stay_within_bf16_rounding_of_openclip_float32() {
    // The GPU default: bfloat16 weights and products, float32 norms, softmax and outputs.
    // Run here on the CPU (candle's bf16 kernels), against OpenCLIP's float32 outputs.
    let compute = Compute {
        device: Device::Cpu,
        precision: Precision::Bf16,
    };
    let mut worst = 1f64;
    for case in cases_in(&compute) {
        let io = &case.io;
        let image = case.model.encode_image(&io["images"]).unwrap();
        let text = case.model.encode_text(&texts(io)).unwrap();
        assert_eq!((image.dtype(), text.dtype()), (DType::F32, DType::F32));
        for (key, ours) in [("image_features", image), ("text_features", text)] {
            let cosines = row_cosines(&ours, &io[key]);
            let min = cosines.iter().copied().fold(1f64, f64::min);
            eprintln!(
                "{} {key} in bf16: min cosine to OpenCLIP f32 {min:.6}",
                case.name
            );
            assert!(min > 0.999, "{} {key}: cosine {min}", case.name);
            worst = worst.min(min);
        }
        assert_logit_scale_matches(&case);
    }
    // bf16 is really in use: float32 would agree to ~1e-7.
    assert!(
        worst < 0.999_999,
        "bf16 embeddings are as exact as float32 ({worst})"
    );
}

#[test]
fn image_and_text_embeddings_match_openclip() {
    for case in cases() {
        let io = &case.io;
        let vis = case
            .model
            .visual()
            .forward_with_tokens(&io["images"])
            .unwrap();
        let txt = case.model.text().forward_with_tokens(&texts(io)).unwrap();
        let mut checks = vec![
            ("image_features", vis.pooled.clone()),
            (
                "image_features_normalized",
                l2_normalize(&vis.pooled).unwrap(),
            ),
            ("text_features", txt.pooled.clone()),
            (
                "text_features_normalized",
                l2_normalize(&txt.pooled).unwrap(),
            ),
        ];
        if io.contains_key("image_tokens") {
            checks.push(("image_tokens", vis.tokens.clone()));
            checks.push(("text_tokens", txt.tokens.clone()));
        }
        // The pooled-only paths: text rows cut after their end-of-text token and run in
        // groups by length; the vision tower's last block on the class token alone.
        checks.push(("text_features", case.model.encode_text(&texts(io)).unwrap()));
        checks.push((
            "image_features",
            case.model.encode_image(&io["images"]).unwrap(),
        ));
        for (key, ours) in checks {
            let d = max_abs_diff(&ours, &io[key]);
            assert!(d <= TOL, "{} {key}: max |diff| {d:e}", case.name);
            eprintln!("{} {key}: max |diff| {d:.2e}", case.name);
        }
        assert_logit_scale_matches(&case);
    }
}

#[test]
fn encode_matches_the_pooled_outputs_and_differentiable_kernels_agree() {
    // encode_* is the pooled output; the training kernels give the same numbers.
    let entry: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models.json")).unwrap())
            .unwrap();
    let entry = &entry[1]; // clip_gelu_ls: layer scale, avg pool, final ln after pool
    let cfg = config_of(entry);
    let load = |kernels| {
        let state = StateDict::load(&fixtures().join(entry["weights"].as_str().unwrap())).unwrap();
        ClipModel::load(
            &cfg,
            &WeightSource::Tensors(state),
            &Compute::cpu(),
            kernels,
            "tiny",
        )
        .unwrap()
    };
    let io = candle_core::safetensors::load(
        fixtures().join(entry["io"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    let slow = load(Kernels::Differentiable);
    let img = slow.encode_image(&io["images"]).unwrap();
    let txt = slow.encode_text(&texts(&io)).unwrap();
    assert!(max_abs_diff(&img, &io["image_features"]) <= TOL);
    assert!(max_abs_diff(&txt, &io["text_features"]) <= TOL);
    let fast = load(Kernels::Fused);
    assert!(max_abs_diff(&fast.encode_image(&io["images"]).unwrap(), &img) <= 1e-5);
    // The fused CPU attention with the causal mask, against candle's ops.
    assert!(max_abs_diff(&fast.encode_text(&texts(&io)).unwrap(), &txt) <= 1e-5);
}

#[test]
fn single_samples_equal_their_rows_in_a_batch() {
    // Batching must not change a sample's embedding (masks and pooling are per row).
    for case in cases() {
        let all = texts(&case.io);
        let batch = case.model.text().forward(&all).unwrap();
        let images = &case.io["images"];
        let img_batch = case.model.visual().forward(images).unwrap();
        for i in 0..all.len() {
            let one = case.model.text().forward(&all[i..=i]).unwrap();
            let d = max_abs_diff(&one, &batch.narrow(0, i, 1).unwrap());
            assert!(d <= 1e-5, "{} text row {i}: {d:e}", case.name);
            let one = case
                .model
                .visual()
                .forward(&images.narrow(0, i, 1).unwrap())
                .unwrap();
            let d = max_abs_diff(&one, &img_batch.narrow(0, i, 1).unwrap());
            assert!(d <= 1e-5, "{} image row {i}: {d:e}", case.name);
        }
    }
}

#[test]
fn pooled_paths_equal_the_full_towers_on_large_mixed_batches() {
    // Text rows of every length in shuffled order, more than one group's worth of positions:
    // the grouped, cut rows must give each row's full-context embedding, in input order.
    for case in cases() {
        let base = texts(&case.io);
        let l = base[0].len();
        // The tiny vocabularies end with their end-of-text id, the largest id in a row.
        let eot_id = base.iter().flatten().copied().max().unwrap();
        let mut rows = Vec::new();
        for i in 0..48usize {
            let mut row = base[i % base.len()].clone();
            // Move the end-of-text token to a varied position (1..l) to spread the lengths.
            let eot = (i * 37) % (l - 1) + 1;
            row.iter_mut().skip(eot + 1).for_each(|t| *t = 0);
            row[eot] = eot_id;
            rows.push(row);
        }
        let text = case.model.text();
        let fast = text.forward(&rows).unwrap();
        let full = text.forward_with_tokens(&rows).unwrap().pooled;
        let d = max_abs_diff(&fast, &full);
        assert!(d <= 1e-5, "{} text: max |diff| {d:e}", case.name);
        // Rows longer than the context are refused on both paths, even when the pooled
        // position is early.
        let mut long = rows[1].clone();
        long.push(0);
        assert!(text.forward(&[long]).is_err(), "{}", case.name);
        let images = &case.io["images"];
        let visual = case.model.visual();
        let d = max_abs_diff(
            &visual.forward(images).unwrap(),
            &visual.forward_with_tokens(images).unwrap().pooled,
        );
        assert!(d <= 1e-5, "{} image: max |diff| {d:e}", case.name);
    }
}
