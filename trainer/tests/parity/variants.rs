//! Every MobileCLIP2 variant besides S0 (S2, S3, S4, B, L-14) at reduced width and depth
//! against OpenCLIP + timm goldens (`tests/fixtures/variants_goldens.py`: random weights,
//! randomised BatchNorm statistics and layer scales): embeddings in evaluation and training
//! mode, BatchNorm running statistics, the reparameterised form against timm's
//! `reparameterize_model`, and the loss and gradients of one step of Apple's loss, with
//! activation recomputation off, per tower and on.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use dfndr_trainer::loss::{LossConfig, TeacherLayout};
use dfndr_trainer::step::{forward_loss, gradients, Batch, Plan, Recompute};
use dfndr_trainer::{Mode, Student, StudentConfig};
use serde_json::{json, Value};

use crate::common::{golden_layout, max_abs, rel_err, student_layout, token_rows, values};

const VARIANTS: [&str; 5] = ["s2", "s3", "s4", "b", "l14"];

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/variants")
        .join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn golden_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// The student config of a reduced golden model, from the numbers the script read back.
fn config_of(g: &Value) -> StudentConfig {
    let v = &g["vision"];
    let vision = match v["family"].as_str().unwrap() {
        "fastvit" => json!({
            "image_size": g["image_size"],
            "fastvit": {
                "layers": v["layers"],
                "embed_dims": v["embed_dims"],
                "mlp_ratios": v["mlp_ratios"],
                "token_mixers": v["token_mixers"],
                "se_downsamples": v["se_downsamples"],
                "pos_embs": v["pos_embs"],
                "attn_norm": v["attn_norm"],
                "stem_use_scale_branch": v["stem_use_scale_branch"],
                "lkc_use_act": v["lkc_use_act"],
            }
        }),
        "vit" => {
            let mut vit = json!({
                "width": v["embed_dim"],
                "depth": v["depth"],
                "heads": v["num_heads"],
                "mlp_ratio": v["mlp_ratio"],
                "qkv_bias": v["qkv_bias"],
                "patch_bias": v["patch_bias"],
                "pre_norm": v["pre_norm"],
                "no_embed_class": v["no_embed_class"],
                "norm_eps": v["norm_eps"],
                "drop_path_rate": v["drop_path_rate"],
            });
            assert_eq!(v["global_pool"], "token");
            assert_eq!(v["class_token"], true);
            if v["conv_stem"].is_null() {
                vit["patch_size"] = v["patch_size"].clone();
            } else {
                let s = &v["conv_stem"];
                vit["conv_stem"] = json!({
                    "channels": s["channels"],
                    "kernel_sizes": s["kernel_sizes"],
                    "strides": s["strides"],
                });
            }
            json!({"image_size": g["image_size"], "vit": vit})
        }
        other => panic!("unknown family {other}"),
    };
    let t = &g["text"];
    serde_json::from_value(json!({
        "embed_dim": g["embed_dim"],
        "vision": vision,
        "text": {
            "context_length": t["context_length"],
            "vocab_size": t["vocab_size"],
            "width": t["width"],
            "heads": t["heads"],
            "layers": t["layers"],
            "mlp_ratio": t["mlp_ratio"],
            "no_causal_mask": t["no_causal_mask"],
        },
    }))
    .unwrap()
}

/// A reduced golden model with its weights, and its golden numbers.
fn golden(variant: &str) -> (Student, Value, HashMap<String, Tensor>) {
    let g = golden_json(&format!("{variant}_tiny.json"));
    let student = Student::new(&config_of(&g), &Device::Cpu).unwrap();
    student
        .load(&load(&format!("{variant}_tiny.safetensors")), true)
        .unwrap_or_else(|e| panic!("{variant}: {e}"));
    (student, g, load(&format!("{variant}_tiny.io.safetensors")))
}

/// Image features of distinct images differ, so agreement means something.
fn assert_not_degenerate(what: &str, f: &Tensor) {
    let a = f.get(0).unwrap();
    let b = f.get(1).unwrap();
    let d = max_abs(&a, &b);
    assert!(
        d > 1e-3,
        "{what}: the first two images give nearly equal features ({d:e})"
    );
}

#[test]
fn reduced_variants_have_openclips_keys_and_embeddings() {
    for v in VARIANTS {
        let (s, g, io) = golden(v);
        assert_eq!(
            student_layout(&s),
            golden_layout(&g["keys"]),
            "{v}: key layout"
        );
        assert_eq!(
            s.num_params().unwrap() as u64,
            g["num_params"].as_u64().unwrap(),
            "{v}: parameter count"
        );
        let images = &io["images"];
        let image = s.encode_image(images, Mode::Eval).unwrap();
        let text = s.encode_text(&token_rows(&io["texts"])).unwrap();
        let ei = max_abs(&image, &io["eval.image_features"]);
        let et = max_abs(&text, &io["eval.text_features"]);
        assert_not_degenerate(v, &io["eval.image_features"]);
        eprintln!("{v}: eval image {ei:.2e}, text {et:.2e}");
        assert!(ei < 1e-4, "{v}: eval image features differ by {ei}");
        assert!(et < 1e-4, "{v}: eval text features differ by {et}");
    }
}

/// Training mode: batch statistics (FastViT and B's stem), stochastic depth off (as the
/// goldens), and the running statistics after one forward.
#[test]
fn reduced_variants_match_in_training_mode() {
    for v in VARIANTS {
        let (s, g, io) = golden(v);
        let mut cfg = s.config().clone();
        if let Some(vit) = cfg.vision.vit.as_mut() {
            // The golden's training forward ran without drop path.
            vit.drop_path_rate = 0.0;
        }
        let s2 = Student::new(&cfg, &Device::Cpu).unwrap();
        let state: HashMap<String, Tensor> = s.state_dict().unwrap().into_iter().collect();
        s2.load(&state, true).unwrap();
        let train = s2.encode_image(&io["images"], Mode::Train).unwrap();
        let e = max_abs(&train, &io["train.image_features"]);
        eprintln!("{v}: train image {e:.2e}");
        assert!(e < 1e-4, "{v}: train-mode image features differ by {e}");
        let mut checked = 0;
        for (name, var) in s2.buffers().unwrap() {
            if let Some(golden) = io.get(&format!("train.running.{name}")) {
                let e = max_abs(var.as_tensor(), golden);
                assert!(e < 1e-5, "{v}: {name} differs by {e}");
                checked += 1;
            }
        }
        let has_bn = g["keys"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.ends_with("running_var"));
        assert!(!has_bn || checked > 0, "{v}: no running statistic checked");
    }
}

/// The reparameterised form: every fused tensor equals timm's `reparameterize_model`, the
/// fused model's features equal timm's fused model and the branched model's.
#[test]
fn reduced_fastvits_reparameterise_as_timm() {
    for v in ["s2", "s3", "s4"] {
        let (s, _, io) = golden(v);
        let images = &io["images"];
        let branched = s.encode_image(images, Mode::Eval).unwrap();
        let fused = s.into_inference().unwrap();
        assert!(fused.config().vision.inference_mode);
        let mut compared = 0;
        let state = fused.state_dict().unwrap();
        for (key, golden) in io
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix("fused.")?, t)))
        {
            if key == "image_features" {
                continue;
            }
            let ours = state
                .get(key)
                .unwrap_or_else(|| panic!("{v}: the fused student lacks {key}"));
            let e = max_abs(ours, golden);
            assert!(e < 1e-5, "{v}: fused {key} differs from timm's by {e}");
            compared += 1;
        }
        let trunk_keys = state.keys().filter(|k| k.starts_with("visual.")).count();
        assert_eq!(compared, trunk_keys, "{v}: fused trunk keys");
        assert!(state.keys().any(|k| k.contains("reparam_conv")));
        let out = fused.encode_image(images, Mode::Eval).unwrap();
        let vs_timm = max_abs(&out, &io["fused.image_features"]);
        let vs_branched = max_abs(&out, &branched);
        eprintln!("{v}: fused vs timm {vs_timm:.2e}, vs branched {vs_branched:.2e}");
        assert!(
            vs_timm < 1e-4,
            "{v}: fused features differ from timm's by {vs_timm}"
        );
        assert!(vs_branched < 1e-5, "{v}: fused vs branched {vs_branched}");
    }
}

fn step_batch(io: &HashMap<String, Tensor>) -> Batch {
    Batch {
        images: io["images"].clone(),
        text_gt: token_rows(&io["step.text_gt"]),
        text_syn: token_rows(&io["step.text_syn"]),
        teacher_image: io["step.teacher_image"].clone(),
        teacher_gt: io["step.teacher_text_gt"].clone(),
        teacher_syn: io["step.teacher_text_syn"].clone(),
    }
}

/// One step of Apple's loss: the loss terms within 1e-5 (relative) of PyTorch's float64
/// values and every gradient within 1e-4 of the exact (float64) gradient; with activation
/// recomputation on either or both towers the gradients are the same.
#[test]
fn one_training_step_per_variant_matches_pytorch() {
    for v in VARIANTS {
        let (s, g, io) = golden(v);
        let mut cfg = s.config().clone();
        if let Some(vit) = cfg.vision.vit.as_mut() {
            vit.drop_path_rate = 0.0;
        }
        let state: HashMap<String, Tensor> = s.state_dict().unwrap().into_iter().collect();
        let fresh = || {
            let s = Student::new(&cfg, &Device::Cpu).unwrap();
            s.load(&state, true).unwrap();
            s
        };
        let step = &g["step"];
        let f = |v: &Value| v.as_f64().unwrap();
        let list = |v: &Value| v.as_array().unwrap().iter().map(f).collect::<Vec<_>>();
        let layout = TeacherLayout {
            dims: step["teacher_dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
            scales: list(&step["teacher_scales"]),
        };
        let weights = list(&step["loss_weights"]);
        let loss_cfg = LossConfig {
            contrastive_weight: weights[0],
            distill_weight: weights[1],
        };
        let batch = step_batch(&io);
        let student = fresh();
        let terms = forward_loss(&student, &batch, &layout, &loss_cfg, Mode::Train).unwrap();
        let got = values(&terms.total)[0];
        let want = f(&step["loss"]["total"]);
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{v}: loss {got} vs PyTorch {want}"
        );
        let torch_f32 = f(&step["torch_f32_grad_rel_err"]["max"]);
        let torch_f32_of = |name: &str| {
            step["torch_f32_grad_rel_err_above_1e-5"]
                .get(name)
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
        };
        let mut reference: Option<Vec<(String, Tensor)>> = None;
        for recompute in [
            Recompute::NONE,
            Recompute {
                image: true,
                text: false,
            },
            Recompute::BOTH,
        ] {
            let student = fresh();
            let plan = Plan {
                micro_batches: 1,
                recompute,
            };
            let out = gradients(&student, &batch, plan, &layout, &loss_cfg).unwrap();
            // Against the exact (float64) gradient: within 1e-4, or within twice PyTorch
            // float32's own error for that parameter where a gradient is a sum with heavy
            // cancellation and that is larger. That error is the largest over several
            // orders of the samples (the golden script's F32_ROTATIONS): one order's error is
            // one draw of rounding noise, and gemm's AVX-512 and AVX2 kernels draw others.
            let mut worst = (0.0f64, String::new());
            let mut grads = Vec::new();
            for (name, var) in student.parameters().unwrap() {
                let ours = out
                    .grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{v}: {name} got no gradient"))
                    .clone();
                let theirs = &io[&format!("grad.{name}")];
                let e = rel_err(&ours, theirs) / (2.0 * torch_f32_of(&name)).max(1e-4);
                if e > worst.0 {
                    worst = (e, name.clone());
                }
                grads.push((name, ours));
            }
            eprintln!(
                "{v} {recompute:?}: worst gradient at {:.2} of its tolerance ({}); PyTorch \
                 float32's worst {torch_f32:.2e}",
                worst.0, worst.1
            );
            assert!(
                worst.0 < 1.0,
                "{v} {recompute:?}: gradient of {} is {} times its tolerance",
                worst.1,
                worst.0
            );
            match &reference {
                None => reference = Some(grads),
                Some(r) => {
                    for ((name, a), (_, b)) in grads.iter().zip(r) {
                        let e = max_abs(a, b);
                        assert!(
                            e <= 1e-6
                                * (1.0 + values(b).iter().fold(0.0f64, |m, x| m.max(x.abs()))),
                            "{v}: {name} with recomputation {recompute:?} differs by {e}"
                        );
                    }
                }
            }
        }
    }
}

/// Stochastic depth under recomputation: a recomputed block draws the same masks as its first
/// forward, so with drop path on the gradients are still those of the plain step (and differ
/// from the gradients without drop path).
#[test]
fn stochastic_depth_gives_the_same_gradients_with_recomputation() {
    let (s, g, io) = golden("l14");
    let state: HashMap<String, Tensor> = s.state_dict().unwrap().into_iter().collect();
    let step = &g["step"];
    let layout = TeacherLayout {
        dims: vec![16, 16],
        scales: step["teacher_scales"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect(),
    };
    let loss_cfg = LossConfig::default();
    let batch = step_batch(&io);
    let grads = |rate: f64, recompute: Recompute| {
        let mut cfg = s.config().clone();
        cfg.vision.vit.as_mut().unwrap().drop_path_rate = rate;
        let student = Student::new(&cfg, &Device::Cpu).unwrap();
        student.load(&state, true).unwrap();
        student.set_forward_seed(5);
        let plan = Plan {
            micro_batches: 1,
            recompute,
        };
        let out = gradients(&student, &batch, plan, &layout, &loss_cfg).unwrap();
        student
            .parameters()
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, out.grads.get(v.as_tensor()).unwrap().clone()))
            .collect::<Vec<_>>()
    };
    let plain = grads(0.5, Recompute::NONE);
    let recomputed = grads(0.5, Recompute::BOTH);
    let without = grads(0.0, Recompute::NONE);
    let mut differs = false;
    for (((name, a), (_, b)), (_, c)) in plain.iter().zip(&recomputed).zip(&without) {
        let e = max_abs(a, b);
        assert!(
            e < 1e-6,
            "{name}: recomputation changed the gradient by {e}"
        );
        differs |= name.starts_with("visual.") && max_abs(a, c) > 1e-4;
    }
    assert!(
        differs,
        "drop path 0.5 left every image-tower gradient unchanged"
    );
}
