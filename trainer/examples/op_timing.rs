//! Times the trainer's custom ops on MobileCLIP2-S0's largest shapes at batch 8 (forward and
//! backward, the fastest of five runs), to see which kernel a training step waits on.
//!
//! cargo run --release -p dfndr-trainer --example op_timing

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use dfndr_trainer::ops::*;

fn time(name: &str, f: impl Fn() -> candle_core::Result<()>) {
    f().unwrap();
    // The fastest of five runs: this VM's timings vary by 15% between identical runs.
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        f().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:50} {:8.1} ms", best * 1000.0);
}

fn main() {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (8, 64, 64, 64), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (8, 64, 64, 64), &dev).unwrap();
    let w7 = Var::randn(0f32, 1.0, (64, 1, 7, 7), &dev).unwrap();
    let w3 = Var::randn(0f32, 1.0, (64, 1, 3, 3), &dev).unwrap();
    let g1 = DepthwiseGeometry {
        stride: 1,
        padding: 3,
    };
    let g3 = DepthwiseGeometry {
        stride: 1,
        padding: 1,
    };
    time("dw7x7 fwd [8,64,64,64]", || {
        depthwise_conv2d(x.as_tensor(), w7.as_tensor(), g1).map(|_| ())
    });
    time("dw7x7 fwd+bwd", || {
        let y = depthwise_conv2d(x.as_tensor(), w7.as_tensor(), g1)?;
        (y * &r)?.sum_all()?.backward().map(|_| ())
    });
    time("dw3x3 fwd+bwd", || {
        let y = depthwise_conv2d(x.as_tensor(), w3.as_tensor(), g3)?;
        (y * &r)?.sum_all()?.backward().map(|_| ())
    });
    let xs = Var::randn(0f32, 1.0, (8, 256, 16, 16), &dev).unwrap();
    let rs = Tensor::randn(0f32, 1.0, (8, 256, 16, 16), &dev).unwrap();
    let w3s = Var::randn(0f32, 1.0, (256, 1, 3, 3), &dev).unwrap();
    time("dw3x3 fwd+bwd [8,256,16,16]", || {
        let y = depthwise_conv2d(xs.as_tensor(), w3s.as_tensor(), g3)?;
        (y * &rs)?.sum_all()?.backward().map(|_| ())
    });
    let w7d = Var::randn(0f32, 1.0, (128, 1, 7, 7), &dev).unwrap();
    let g7s2 = DepthwiseGeometry {
        stride: 2,
        padding: 3,
    };
    let rd = Tensor::randn(0f32, 1.0, (8, 128, 32, 32), &dev).unwrap();
    time("dw7x7 stride 2, multiplier 2, fwd+bwd", || {
        let y = depthwise_conv2d(x.as_tensor(), w7d.as_tensor(), g7s2)?;
        (y * &rd)?.sum_all()?.backward().map(|_| ())
    });
    let gamma = Var::randn(1f32, 0.1, 64, &dev).unwrap();
    let beta = Var::randn(0f32, 0.1, 64, &dev).unwrap();
    time("bn train fwd+bwd", || {
        let (y, _) = batch_norm_train(
            x.as_tensor(),
            gamma.as_tensor(),
            beta.as_tensor(),
            1e-5,
            None,
        )?;
        (y * &r)?.sum_all()?.backward().map(|_| ())
    });
    let w = Var::randn(0f32, 0.1, (192, 64), &dev).unwrap();
    time("1x1 64->192 fwd+bwd", || {
        let y = pointwise_conv(x.as_tensor(), w.as_tensor())?;
        y.sum_all()?.backward().map(|_| ())
    });
    time("scale channels fwd+bwd", || {
        let y = scale_channels(x.as_tensor(), gamma.as_tensor())?;
        (y * &r)?.sum_all()?.backward().map(|_| ())
    });
    time("candle add (residual) fwd+bwd", || {
        let y = (x.as_tensor() + &r)?;
        (y * &r)?.sum_all()?.backward().map(|_| ())
    });
    time("candle mul by r, sum, backward (the harness)", || {
        (x.as_tensor() * &r)?.sum_all()?.backward().map(|_| ())
    });
}
