//! `nn.BatchNorm2d` in both modes, with torch's running-average update.

use candle_core::{Result, Tensor, Var};
use candle_nn::Init;
use serde::{Deserialize, Serialize};

use super::{Builder, Mode};
use crate::ops::batch_norm_train;

/// BatchNorm settings shared by every layer of a model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormConfig {
    /// Added to the variance (torch: 1e-5).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Weight of the batch in the running averages (torch: 0.1).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// "Ghost" BatchNorm: normalise each slice of this many samples with its own statistics,
    /// as a multi-GPU run with per-GPU BatchNorm does (Apple: 256 or 512 per GPU). The running
    /// averages take the mean of the slices' statistics. `None`: the whole batch.
    #[serde(default)]
    pub ghost_batch: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_momentum() -> f64 {
    0.1
}

impl Default for NormConfig {
    fn default() -> Self {
        Self {
            eps: default_eps(),
            momentum: default_momentum(),
            ghost_batch: None,
        }
    }
}

/// `nn.BatchNorm2d` with keys `weight`, `bias`, `running_mean`, `running_var`.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    config: NormConfig,
}

impl BatchNorm2d {
    /// Loads the layer at `b`'s prefix.
    pub fn new(b: &Builder, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: b.param(channels, "weight", Init::Const(1.0))?,
            bias: b.param(channels, "bias", Init::Const(0.0))?,
            running_mean: b.buffer(channels, "running_mean", Init::Const(0.0))?,
            running_var: b.buffer(channels, "running_var", Init::Const(1.0))?,
            config: b.norm(),
        })
    }

    /// Normalises `x: [N, C, H, W]`. In [`Mode::Train`] with batch statistics, updating the
    /// running averages as torch does (the variance's running average is unbiased).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Eval => {
                let scale =
                    (&self.weight / (self.running_var.as_tensor() + self.config.eps)?.sqrt()?)?;
                let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
                let c = scale.dim(0)?;
                x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
                    .broadcast_add(&shift.reshape((1, c, 1, 1))?)
            }
            Mode::Replay => Ok(batch_norm_train(
                x,
                &self.weight,
                &self.bias,
                self.config.eps,
                self.config.ghost_batch,
            )?
            .0),
            Mode::Train => {
                let (y, stats) = batch_norm_train(
                    x,
                    &self.weight,
                    &self.bias,
                    self.config.eps,
                    self.config.ghost_batch,
                )?;
                let c = stats.channels;
                let slices = stats.slice_counts.len();
                let mut mean = vec![0f64; c];
                let mut var = vec![0f64; c];
                for s in 0..slices {
                    let count = stats.slice_counts[s] as f64;
                    let unbias = if count > 1.0 {
                        count / (count - 1.0)
                    } else {
                        1.0
                    };
                    for ch in 0..c {
                        mean[ch] += stats.mean[s * c + ch] / slices as f64;
                        var[ch] += stats.var[s * c + ch] * unbias / slices as f64;
                    }
                }
                let device = x.device();
                let m = self.config.momentum;
                let to_t = |v: Vec<f64>| {
                    Tensor::from_vec(
                        v.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
                        c,
                        device,
                    )
                };
                // torch: running = (1 − m)·running + m·batch, in float32.
                let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (to_t(mean)? * m)?)?;
                let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (to_t(var)? * m)?)?;
                self.running_mean.set(&rm.detach())?;
                self.running_var.set(&rv.detach())?;
                Ok(y)
            }
        }
    }

    /// `(scale, shift)` of the evaluation form, `y = x·scale + shift` (for fusing into a
    /// preceding convolution).
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (self.running_var.as_tensor() + self.config.eps)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }
}
