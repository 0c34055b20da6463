//! The blocks are trainable: with differentiable kernels every parameter of both towers
//! receives a gradient, and the fused inference kernels provably do not give one (so this
//! test would catch a fused op slipping into the training path).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::{l2_normalize, ClipConfig, ClipModel};

fn config(toml: &str) -> ClipConfig {
    toml::from_str(toml).unwrap()
}

fn clip_like() -> ClipConfig {
    config(
        r#"
        embed_dim = 16
        quick_gelu = true
        [vision]
        image_size = 16
        patch_size = 8
        width = 32
        layers = 2
        head_width = 16
        ls_init_value = 0.5
        [text]
        vocab_size = 50
        context_length = 8
        width = 32
        heads = 2
        layers = 2
        "#,
    )
}

fn coca_like() -> ClipConfig {
    config(
        r#"
        embed_dim = 16
        custom_text = true
        [vision]
        image_size = 16
        patch_size = 8
        width = 24
        layers = 1
        head_width = 12
        attentional_pool = true
        attn_pooler_heads = 2
        attn_pooler_queries = 4
        [text]
        vocab_size = 50
        context_length = 8
        width = 16
        heads = 2
        layers = 1
        embed_cls = true
        "#,
    )
}

/// (parameters with a non-zero gradient, all parameters) after one CLIP-style loss.
fn gradient_coverage(cfg: &ClipConfig, kernels: Kernels) -> (Vec<String>, usize) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ClipModel::new(vb, cfg, kernels).unwrap();
    let images = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
    let ids = vec![vec![49, 3, 7, 9, 0, 0, 0, 0], vec![5, 49, 0, 0, 0, 0, 0, 0]];
    let vis = model.visual().forward_with_tokens(&images).unwrap();
    let txt = model.text().forward_with_tokens(&ids).unwrap();
    let img = l2_normalize(&vis.pooled).unwrap();
    let text = l2_normalize(&txt.pooled).unwrap();
    let logits = img
        .matmul(&text.t().unwrap())
        .unwrap()
        .broadcast_mul(&model.logit_scale().exp().unwrap())
        .unwrap();
    // Include the tokens so the parameters that only feed them (CoCa's tokens) count too.
    let loss = (logits.sqr().unwrap().sum_all().unwrap()
        + vis.tokens.sqr().unwrap().mean_all().unwrap()
        + txt.tokens.sqr().unwrap().mean_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let with_grad = data
        .iter()
        .filter(|(_, var)| {
            grads.get(var.as_tensor()).is_some_and(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
        })
        .map(|(name, _)| name.clone())
        .collect();
    (with_grad, data.len())
}

#[test]
fn every_parameter_gets_a_gradient_with_differentiable_kernels() {
    for cfg in [clip_like(), coca_like()] {
        let (with_grad, total) = gradient_coverage(&cfg, Kernels::Differentiable);
        assert!(total > 20);
        assert_eq!(
            with_grad.len(),
            total,
            "parameters without gradient: {total} - {with_grad:?}"
        );
    }
}

#[test]
fn fused_kernels_cut_the_gradient() {
    let (with_grad, total) = gradient_coverage(&clip_like(), Kernels::Fused);
    assert!(
        with_grad.len() < total,
        "fused layer-norm should block gradients"
    );
}
