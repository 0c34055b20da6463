//! Times the trainer's custom ops on MobileCLIP2-S0's largest shapes at batch 8 (forward and
//! backward), to see which kernel a training step waits on.
//!
//! cargo run --release -p dfndr-trainer --example op_timing

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use dfndr_trainer::ops::*;

fn time(name: &str, f: impl Fn() -> candle_core::Result<()>) {
    f().unwrap();
    let t = Instant::now();
    for _ in 0..3 {
        f().unwrap();
    }
    println!(
        "{name:50} {:8.1} ms",
        t.elapsed().as_secs_f64() * 1000.0 / 3.0
    );
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
