//! The trainer's custom ops against PyTorch goldens and finite differences.

use crate::common::{json, load, max_abs, rel_err};
use candle_core::{Device, Tensor, Var};
use dfndr_trainer::ops::{batch_norm_train, depthwise_conv2d, DepthwiseGeometry};

/// The gradients of `Σ a·r` and `Σ b·r` with respect to each of `vars` agree within `tol`
/// (relative).
fn assert_same_gradients(a: &Tensor, b: &Tensor, r: &Tensor, vars: &[&Var], tol: f64) {
    let ga = (a * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let e = rel_err(
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
        );
        assert!(e < tol, "variable {i}: gradients differ by {e}");
    }
}

/// The depthwise convolution with its bias inside equals the convolution and then the bias,
/// forward and in all three gradients, at strides 1 and 2 and with a channel multiplier.
#[test]
fn depthwise_with_bias_equals_convolution_then_bias() {
    use dfndr_trainer::ops::{add_channel_bias, depthwise_conv2d_bias};
    let dev = Device::Cpu;
    for (stride, padding, m) in [(1, 1, 1), (2, 3, 2), (1, 3, 1)] {
        let k = 2 * padding + 1;
        let x = Var::randn(0f32, 1.0, (3, 4, 9, 7), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4 * m, 1, k, k), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, 4 * m, &dev).unwrap();
        let g = DepthwiseGeometry { stride, padding };
        let fused = depthwise_conv2d_bias(x.as_tensor(), w.as_tensor(), b.as_tensor(), g).unwrap();
        let composed = add_channel_bias(
            &depthwise_conv2d(x.as_tensor(), w.as_tensor(), g).unwrap(),
            b.as_tensor(),
        )
        .unwrap();
        assert!(max_abs(&fused, &composed) < 1e-5, "stride {stride}");
        let r = Tensor::randn(0f32, 1.0, fused.dims(), &dev).unwrap();
        assert_same_gradients(&fused, &composed, &r, &[&x, &w, &b], 1e-6);
    }
    let x = Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let bad = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
    let g = DepthwiseGeometry {
        stride: 1,
        padding: 1,
    };
    assert!(depthwise_conv2d_bias(&x, &w, &bad, g).is_err());
}

/// Every depthwise geometry MCi0 uses (kernels 1/3/7, strides 1/2, multipliers 1/2, odd
/// sizes): output and both gradients equal PyTorch's `conv2d(groups = C)`.
#[test]
fn depthwise_matches_pytorch() {
    let cases = json("depthwise.json");
    let t = load("depthwise.safetensors");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let get = |k: &str| t[&format!("{name}.{k}")].clone();
        let geometry = DepthwiseGeometry {
            stride: case["stride"].as_u64().unwrap() as usize,
            padding: case["padding"].as_u64().unwrap() as usize,
        };
        let x = Var::from_tensor(&get("x")).unwrap();
        let w = Var::from_tensor(&get("w")).unwrap();
        let mut y = depthwise_conv2d(x.as_tensor(), w.as_tensor(), geometry).unwrap();
        let bias = case["bias"].as_bool().unwrap();
        let b = Var::from_tensor(&if bias {
            get("b")
        } else {
            Tensor::zeros(w.dim(0).unwrap(), candle_core::DType::F32, &Device::Cpu).unwrap()
        })
        .unwrap();
        if bias {
            y = y
                .broadcast_add(&b.as_tensor().reshape((1, (), 1, 1)).unwrap())
                .unwrap();
        }
        assert!(max_abs(&y, &get("y")) < 1e-5, "{name}: output");
        let grads = (&y * get("grad_out"))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let gw = grads.get(w.as_tensor()).unwrap();
        assert!(rel_err(gx, &get("grad_x")) < 1e-6, "{name}: grad x");
        assert!(rel_err(gw, &get("grad_w")) < 1e-6, "{name}: grad w");
        if bias {
            let gb = grads.get(b.as_tensor()).unwrap();
            assert!(rel_err(gb, &get("grad_b")) < 1e-6, "{name}: grad b");
        }
    }
}

/// Central finite differences of `Σ y·r` in float64 arithmetic over float32 perturbations.
fn finite_difference(f: &dyn Fn(&Tensor) -> f64, x: &Tensor, samples: usize) -> Vec<(usize, f64)> {
    let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-2f32;
    let step = (base.len() / samples).max(1);
    (0..base.len())
        .step_by(step)
        .map(|i| {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let t = |v: Vec<f32>| Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            (i, (f(&t(plus)) - f(&t(minus))) / (2.0 * h as f64))
        })
        .collect()
}

fn sum_weighted(y: &Tensor, r: &Tensor) -> f64 {
    (y.to_dtype(candle_core::DType::F64).unwrap() * r.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The depthwise gradients agree with finite differences (a check independent of PyTorch).
#[test]
fn depthwise_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    // Sizes down to 2x2 under a 7x7 kernel: most taps fall in the padding. Widths of 19 and
    // 21 take the stride-1 kernels' eight-wide path and their scalar tail in the same row.
    for (c, m, k, s, p, h, wd) in [
        (2, 2, 7, 1, 3, 6, 19),
        (3, 1, 3, 1, 1, 5, 21),
        (3, 1, 3, 1, 1, 9, 7),
        (3, 1, 3, 2, 1, 9, 7),
        (2, 2, 7, 2, 3, 9, 7),
        (2, 2, 1, 1, 0, 9, 7),
        (2, 1, 7, 1, 3, 2, 2),
        (2, 2, 7, 2, 3, 2, 3),
    ] {
        let g = DepthwiseGeometry {
            stride: s,
            padding: p,
        };
        let x = Var::randn(0f32, 1.0, (2, c, h, wd), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (c * m, 1, k, k), &dev).unwrap();
        let y = depthwise_conv2d(x.as_tensor(), w.as_tensor(), g).unwrap();
        let r = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gw: Vec<f32> = grads
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let fx = |xp: &Tensor| sum_weighted(&depthwise_conv2d(xp, w.as_tensor(), g).unwrap(), &r);
        for (i, fd) in finite_difference(&fx, x.as_tensor(), 40) {
            assert!(
                (fd - gx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "k{k} s{s} m{m} x[{i}]: {fd} vs {}",
                gx[i]
            );
        }
        let fw = |wp: &Tensor| sum_weighted(&depthwise_conv2d(x.as_tensor(), wp, g).unwrap(), &r);
        for (i, fd) in finite_difference(&fw, w.as_tensor(), 40) {
            assert!(
                (fd - gw[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "k{k} s{s} m{m} w[{i}]: {fd} vs {}",
                gw[i]
            );
        }
    }
}

/// Bad shapes are errors, not panics.
#[test]
fn depthwise_rejects_bad_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 5, 5), candle_core::DType::F32, &dev).unwrap();
    let g = DepthwiseGeometry {
        stride: 1,
        padding: 1,
    };
    let w = Tensor::zeros((4, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d(&x, &w, g).is_err());
    let w = Tensor::zeros((3, 1, 9, 9), candle_core::DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d(&x, &w, g).is_err());
}

/// Training-mode BatchNorm against the textbook composition of differentiable candle ops
/// (biased variance), output and all three gradients, with and without ghost slices.
#[test]
fn batch_norm_matches_composed_reference() {
    let dev = Device::Cpu;
    let eps = 1e-5;
    let reference = |x: &Tensor, w: &Tensor, b: &Tensor| -> Tensor {
        let (_, c, _, _) = x.dims4().unwrap();
        let mean = x
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let normed = centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed
            .broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    };
    for ghost in [None, Some(2), Some(3)] {
        let x = Var::randn(0.5f32, 2.0, (6, 4, 5, 3), &dev).unwrap();
        let w = Var::randn(1f32, 0.3, 4, &dev).unwrap();
        let b = Var::randn(0f32, 0.3, 4, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (6, 4, 5, 3), &dev).unwrap();
        let (y, stats) =
            batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps, ghost).unwrap();
        let slice = ghost.unwrap_or(6);
        let slices: Vec<Tensor> = (0..6usize.div_ceil(slice))
            .map(|s| {
                let len = slice.min(6 - s * slice);
                reference(
                    &x.as_tensor().narrow(0, s * slice, len).unwrap(),
                    w.as_tensor(),
                    b.as_tensor(),
                )
            })
            .collect();
        let y_ref = Tensor::cat(&slices, 0).unwrap();
        assert!(max_abs(&y, &y_ref) < 1e-5, "ghost {ghost:?}: output");
        assert_eq!(stats.slice_counts.len(), 6usize.div_ceil(slice));
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (what, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let e = rel_err(
                g.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "ghost {ghost:?}: grad {what} {e}");
        }
    }
}

/// The per-channel ops against their compositions of candle ops: outputs and every gradient.
#[test]
fn channel_ops_match_composed_references() {
    use dfndr_trainer::ops::{
        add_channel_bias, add_scaled_channels, pointwise_conv, pointwise_conv_bias, scale_channels,
    };
    let dev = Device::Cpu;
    // Batches of 1 (one product at a time on every thread), 3 (samples in parallel, one
    // group of the weight gradient) and 9 (three groups, the last one short).
    for n in [1, 3, 9] {
        let x = Var::randn(0f32, 1.0, (n, 5, 4, 6), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (n, 7, 4, 6), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let ours = pointwise_conv(x.as_tensor(), w.as_tensor()).unwrap();
        let theirs = w
            .as_tensor()
            .broadcast_matmul(&x.as_tensor().reshape((n, 5, 24)).unwrap())
            .unwrap()
            .reshape((n, 7, 4, 6))
            .unwrap();
        assert!(max_abs(&ours, &theirs) < 1e-5, "batch {n}");
        let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            assert!(
                rel_err(
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap()
                ) < 1e-5,
                "batch {n}"
            );
        }
        // With the bias inside the product: the same as the product and then the bias.
        let b = Var::randn(0f32, 1.0, 7, &dev).unwrap();
        let fused = pointwise_conv_bias(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let composed = add_channel_bias(&ours, b.as_tensor()).unwrap();
        assert!(max_abs(&fused, &composed) < 1e-5, "batch {n}");
        assert_same_gradients(&fused, &composed, &r, &[&x, &w, &b], 1e-6);
    }
    let x = Var::randn(0f32, 1.0, (3, 5, 4, 6), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, 5, 4, 6), &dev).unwrap();
    for scale_shape in [vec![5], vec![3, 5]] {
        let s = Var::randn(0f32, 1.0, scale_shape.as_slice(), &dev).unwrap();
        let ours = scale_channels(x.as_tensor(), s.as_tensor()).unwrap();
        let shaped = if scale_shape.len() == 1 {
            (1, 5, 1, 1)
        } else {
            (3, 5, 1, 1)
        };
        let theirs = x
            .as_tensor()
            .broadcast_mul(&s.as_tensor().reshape(shaped).unwrap())
            .unwrap();
        assert!(max_abs(&ours, &theirs) < 1e-6);
        let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &s] {
            assert!(
                rel_err(
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap()
                ) < 1e-5
            );
        }
    }
    // The scaled residual: the same as adding the scaled branch, in all three gradients.
    let y = Var::randn(0f32, 1.0, (3, 5, 4, 6), &dev).unwrap();
    let s = Var::randn(0f32, 1.0, 5, &dev).unwrap();
    let fused = add_scaled_channels(x.as_tensor(), y.as_tensor(), s.as_tensor()).unwrap();
    let composed = (x.as_tensor() + scale_channels(y.as_tensor(), s.as_tensor()).unwrap()).unwrap();
    assert!(max_abs(&fused, &composed) < 1e-6);
    assert_same_gradients(&fused, &composed, &r, &[&x, &y, &s], 1e-6);
    let wrong = Var::randn(0f32, 1.0, 4, &dev).unwrap();
    assert!(add_scaled_channels(x.as_tensor(), y.as_tensor(), wrong.as_tensor()).is_err());

    let b = Var::randn(0f32, 1.0, 5, &dev).unwrap();
    let ours = add_channel_bias(x.as_tensor(), b.as_tensor()).unwrap();
    let theirs = x
        .as_tensor()
        .broadcast_add(&b.as_tensor().reshape((1, 5, 1, 1)).unwrap())
        .unwrap();
    assert!(max_abs(&ours, &theirs) < 1e-6);
    let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&x, &b] {
        assert!(
            rel_err(
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap()
            ) < 1e-5
        );
    }
}
