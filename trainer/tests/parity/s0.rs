//! The MobileCLIP2-S0 student against OpenCLIP + timm goldens (random weights, randomised
//! BatchNorm statistics and layer scales): key layout, embeddings in evaluation and training
//! mode, running statistics, and two optimisation steps with Apple's loss and OpenCLIP's
//! AdamW groups.

use crate::common::{golden_layout, json, load, max_abs, rel_err, student_layout, token_rows};
use candle_core::Device;
use dfndr_trainer::loss::{LossConfig, TeacherLayout};
use dfndr_trainer::optim::{cosine_lr, AdamW, AdamWConfig};
use dfndr_trainer::step::{train_step, Batch};
use dfndr_trainer::{Mode, Student, StudentConfig};

fn tiny() -> Student {
    let cfg: StudentConfig = toml::from_str(crate::common::TINY_S0).unwrap();
    let student = Student::new(&cfg, &Device::Cpu).unwrap();
    student.load(&load("s0_tiny.safetensors"), true).unwrap();
    student
}

#[test]
fn tiny_key_layout_equals_openclip() {
    let golden = json("s0_tiny.json");
    let s = tiny();
    assert_eq!(student_layout(&s), golden_layout(&golden["keys"]));
    assert_eq!(
        s.num_params().unwrap() as u64,
        golden["num_params"].as_u64().unwrap()
    );
}

/// The real MobileCLIP2-S0: every key and shape of OpenCLIP's state dict, and its parameter
/// count.
#[test]
fn full_size_key_layout_equals_openclip() {
    let golden = json("s0_full.json");
    let cfg: StudentConfig = toml::from_str(
        r#"
        embed_dim = 512
        [vision]
        image_size = 256
        arch = "fastvit_mci0"
        [text]
        width = 512
        heads = 8
        layers = 12
        no_causal_mask = true
        "#,
    )
    .unwrap();
    let s = Student::new(&cfg, &Device::Cpu).unwrap();
    let ours = student_layout(&s);
    let theirs = golden_layout(&golden["keys"]);
    assert_eq!(ours.len(), golden["num_keys"].as_u64().unwrap() as usize);
    assert_eq!(ours, theirs);
    assert_eq!(
        s.num_params().unwrap() as u64,
        golden["num_params"].as_u64().unwrap()
    );
}

#[test]
fn embeddings_match_in_eval_and_train_mode() {
    let io = load("s0_tiny.io.safetensors");
    let s = tiny();
    let images = &io["images"];
    let texts = token_rows(&io["texts"]);
    let img = s.encode_image(images, Mode::Eval).unwrap();
    let e = max_abs(&img, &io["eval.image_features"]);
    assert!(e < 1e-4, "eval image features {e}");
    let txt = s.encode_text(&texts).unwrap();
    let e = max_abs(&txt, &io["eval.text_features"]);
    assert!(e < 1e-4, "text features {e}");
    // Evaluation leaves the running statistics alone; a training forward updates them.
    let before = s.state_dict().unwrap();
    let img = s.encode_image(images, Mode::Train).unwrap();
    let e = max_abs(&img, &io["train.image_features"]);
    assert!(e < 1e-4, "train image features {e}");
    let after = s.state_dict().unwrap();
    let mut checked = 0;
    for (key, t) in &after {
        if let Some(golden) = io.get(&format!("train.running.{key}")) {
            let e = max_abs(t, golden);
            assert!(e < 1e-5, "{key}: {e}");
            assert!(max_abs(t, &before[key]) > 0.0, "{key} was not updated");
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} running statistics compared");
}

/// Two steps of Apple's loss, OpenCLIP's AdamW groups, clipping and schedule: loss terms,
/// gradient norms, every gradient, and every parameter and running statistic after each step.
#[test]
fn two_training_steps_match_pytorch() {
    let io = load("s0_step.io.safetensors");
    let g = json("s0_step.json");
    let s = tiny();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let layout = TeacherLayout {
        dims: g["teacher_dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
        scales: g["teacher_scales"]
            .as_array()
            .unwrap()
            .iter()
            .map(f)
            .collect(),
    };
    let loss = LossConfig {
        contrastive_weight: f(&g["loss_weights"][0]),
        distill_weight: f(&g["loss_weights"][1]),
    };
    let mut opt = AdamW::new(
        s.parameters().unwrap(),
        AdamWConfig {
            beta1: f(&g["betas"][0]),
            beta2: f(&g["betas"][1]),
            eps: f(&g["eps"]),
            weight_decay: f(&g["weight_decay"]),
        },
    );
    let no_decay: Vec<String> = g["no_decay"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(opt.no_decay(), no_decay);
    let batch = Batch {
        images: io["images"].clone(),
        text_gt: token_rows(&io["text_gt"]),
        text_syn: token_rows(&io["text_syn"]),
        teacher_image: io["teacher_image"].clone(),
        teacher_gt: io["teacher_text_gt"].clone(),
        teacher_syn: io["teacher_text_syn"].clone(),
    };
    for (i, golden) in g["steps"].as_array().unwrap().iter().enumerate() {
        let lr = cosine_lr(
            f(&g["base_lr"]),
            g["warmup"].as_u64().unwrap(),
            g["total_steps"].as_u64().unwrap(),
            i as u64,
        );
        assert!((lr - f(&golden["lr"])).abs() < 1e-12);
        if i > 0 {
            // Each step starts from PyTorch's weights after the previous one (the optimiser
            // moments stay ours), so the comparison measures one step, not the drift of the
            // near-ε values of the previous step through the network.
            let previous: std::collections::HashMap<String, candle_core::Tensor> = io
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&format!("after{i}."))
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect();
            s.load(&previous, true).unwrap();
        }
        let report = train_step(
            &s,
            &mut opt,
            &batch,
            &layout,
            &loss,
            lr,
            Some(f(&g["grad_clip"])),
        )
        .unwrap();
        let l = &golden["loss"];
        for (ours, key) in [
            (report.loss.contrastive_gt, "contrastive_gt"),
            (report.loss.contrastive_syn, "contrastive_syn"),
            (report.loss.distill_gt, "distill_gt"),
            (report.loss.distill_syn, "distill_syn"),
            (report.loss.total, "total"),
        ] {
            let theirs = f(&l[key]);
            assert!(
                ((ours - theirs) / theirs).abs() < 1e-5,
                "step {i} {key}: {ours} vs {theirs}"
            );
        }
        let gn = f(&golden["grad_norm"]);
        assert!(
            ((report.grad_norm - gn) / gn).abs() < 1e-4,
            "step {i} grad norm {} vs {gn}",
            report.grad_norm
        );
        // Adam's first steps divide each gradient by its own magnitude: where the clipped
        // gradient is within a few orders of ε (1e-8), the update depends on that value's
        // last float32 bits (both PyTorch's and ours). Those elements are held to the update's
        // size, every other value to 1e-5.
        let clip = (f(&g["grad_clip"]) / (f(&g["steps"][0]["grad_norm"]) + 1e-6)).min(1.0);
        let prefix = format!("after{}.", i + 1);
        let (mut worst, mut exempt, mut total) = ((0.0, String::new()), 0usize, 0usize);
        for (key, t) in s.state_dict().unwrap() {
            let golden = crate::common::values(&io[&format!("{prefix}{key}")]);
            let grad0 = io.get(&format!("grad.{key}")).map(crate::common::values);
            for (j, (ours, theirs)) in crate::common::values(&t).iter().zip(&golden).enumerate() {
                // Relative to the value where it is above 1 (running variances).
                let e = (ours - theirs).abs() / theirs.abs().max(1.0);
                total += 1;
                // An exact zero counts where our value moved: the key bias's gradient is zero
                // analytically (a softmax ignores a shift shared by a row's scores), so both
                // sides hold rounding noise there, which PyTorch sometimes rounds to 0.
                let ill = grad0.as_ref().is_some_and(|g0| {
                    (g0[j] != 0.0 || e > 0.0) && (g0[j] * clip).abs() < 100.0 * f(&g["eps"])
                });
                if ill {
                    exempt += 1;
                    assert!(
                        e <= 2.0 * lr,
                        "step {i}: {key}[{j}] moved by more than one update: {e}"
                    );
                } else if e > worst.0 {
                    worst = (e, format!("{key}[{j}]"));
                }
            }
        }
        assert!(
            worst.0 < 1e-5,
            "step {i}: {} differs by {}",
            worst.1,
            worst.0
        );
        assert!(
            exempt * 200 < total,
            "step {i}: {exempt} of {total} values ill-conditioned"
        );
        eprintln!(
            "step {i}: worst {:.2e} at {}; {exempt} of {total} values near ε",
            worst.0, worst.1
        );
    }
}

/// Every parameter's gradient (before clipping) within 1e-4 of PyTorch's, norm-wise, and none
/// of them zero.
#[test]
fn gradients_match_pytorch() {
    let io = load("s0_step.io.safetensors");
    let g = json("s0_step.json");
    let s = tiny();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let layout = TeacherLayout {
        dims: vec![16, 16],
        scales: g["teacher_scales"]
            .as_array()
            .unwrap()
            .iter()
            .map(f)
            .collect(),
    };
    let loss = LossConfig {
        contrastive_weight: f(&g["loss_weights"][0]),
        distill_weight: f(&g["loss_weights"][1]),
    };
    let batch = Batch {
        images: io["images"].clone(),
        text_gt: token_rows(&io["text_gt"]),
        text_syn: token_rows(&io["text_syn"]),
        teacher_image: io["teacher_image"].clone(),
        teacher_gt: io["teacher_text_gt"].clone(),
        teacher_syn: io["teacher_text_syn"].clone(),
    };
    let terms = dfndr_trainer::step::forward_loss(&s, &batch, &layout, &loss, Mode::Train).unwrap();
    let grads = terms.total.backward().unwrap();
    let mut worst = (0.0, String::new());
    for (name, var) in s.parameters().unwrap() {
        let ours = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let theirs = &io[&format!("grad.{name}")];
        assert!(
            crate::common::values(ours).iter().any(|v| *v != 0.0),
            "{name}: zero gradient"
        );
        let e = rel_err(ours, theirs);
        if e > worst.0 {
            worst = (e, name);
        }
    }
    // Against the exact (float64) gradient: within 1e-4, or within PyTorch float32's own error
    // where a gradient is a sum with heavy cancellation and that is larger.
    let torch_f32 = g["torch_f32_grad_rel_err"]["max"].as_f64().unwrap();
    let tolerance = torch_f32.max(1e-4);
    eprintln!(
        "worst gradient {:.2e} ({}); PyTorch float32: {torch_f32:.2e}",
        worst.0, worst.1
    );
    assert!(
        worst.0 < tolerance,
        "gradient of {} differs by {} (relative)",
        worst.1,
        worst.0
    );
}
