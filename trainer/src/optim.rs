//! AdamW with OpenCLIP's weight-decay groups, gradient clipping by global norm and OpenCLIP's
//! cosine schedule. The optimiser's state is plain vectors, so a checkpoint holds it exactly.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW's settings (OpenCLIP's defaults and Apple's MobileCLIP2 recipe values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// β₁.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// β₂ (Apple: 0.95).
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// ε (OpenCLIP: 1e-8 for non-ViT models).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay of the decayed group (Apple: 0.2).
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_wd() -> f64 {
    0.2
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_wd(),
        }
    }
}

/// OpenCLIP's rule (main.py): no weight decay for parameters with fewer than two dimensions
/// or whose name contains `bn`, `ln`, `bias` or `logit_scale`. FastViT's `[C, 1, 1]`
/// layer-scale gammas therefore are decayed.
pub fn excluded_from_decay(name: &str, rank: usize) -> bool {
    rank < 2
        || name.contains("bn")
        || name.contains("ln")
        || name.contains("bias")
        || name.contains("logit_scale")
}

/// One parameter's optimiser state.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    /// State-dict key.
    pub name: String,
    /// First moment.
    pub exp_avg: Vec<f32>,
    /// Second moment.
    pub exp_avg_sq: Vec<f32>,
}

/// AdamW over named variables, as `torch.optim.AdamW` computes it.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var, bool)>,
    state: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// An optimiser over `params` (name, variable), with zero moments.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Self {
        let state = params
            .iter()
            .map(|(name, var)| ParamState {
                name: name.clone(),
                exp_avg: vec![0.0; var.as_tensor().elem_count()],
                exp_avg_sq: vec![0.0; var.as_tensor().elem_count()],
            })
            .collect();
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let decay = !excluded_from_decay(&name, var.as_tensor().rank());
                (name, var, decay)
            })
            .collect();
        Self {
            config,
            params,
            state,
            step: 0,
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Names of the parameters without weight decay, sorted.
    pub fn no_decay(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .params
            .iter()
            .filter(|(_, _, decay)| !decay)
            .map(|(n, _, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// The moments, one entry per parameter in the optimiser's order.
    pub fn state(&self) -> &[ParamState] {
        &self.state
    }

    /// Restores moments and the step count saved by [`AdamW::state`] / [`AdamW::steps`].
    pub fn restore(&mut self, state: Vec<ParamState>, step: u64) -> Result<()> {
        if state.len() != self.state.len() {
            return Err(TrainError::Weights(format!(
                "optimiser state has {} parameters, the model {}",
                state.len(),
                self.state.len()
            )));
        }
        for (saved, current) in state.iter().zip(&self.state) {
            if saved.name != current.name
                || saved.exp_avg.len() != current.exp_avg.len()
                || saved.exp_avg_sq.len() != current.exp_avg_sq.len()
            {
                return Err(TrainError::Weights(format!(
                    "optimiser state for {} does not fit parameter {}",
                    saved.name, current.name
                )));
            }
        }
        self.state = state;
        self.step = step;
        Ok(())
    }

    /// One update with learning rate `lr` from the gradients in `grads` (parameters without
    /// a gradient are left alone, as torch does).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let b2 = c.beta2 as f32;
        let (one_m_b1, one_m_b2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        let eps = c.eps as f32;
        let bc2_sqrt = bc2_sqrt as f32;
        for ((name, var, decay), st) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
            let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            if g.len() != p.len() {
                return Err(TrainError::Internal(format!(
                    "gradient of {name} has the wrong size"
                )));
            }
            let decay_factor = if *decay {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            p.par_iter_mut()
                .zip(st.exp_avg.par_iter_mut())
                .zip(st.exp_avg_sq.par_iter_mut())
                .zip(g.par_iter())
                .for_each(|(((p, m), v), &g)| {
                    *p *= decay_factor;
                    // torch: exp_avg.lerp_(grad, 1 − β₁); exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂)
                    *m += one_m_b1 * (g - *m);
                    *v = *v * b2 + one_m_b2 * g * g;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * (*m / denom);
                });
            let shape = var.as_tensor().shape().clone();
            var.set(&Tensor::from_vec(p, shape, var.as_tensor().device())?)?;
        }
        Ok(())
    }
}

/// `clip_grad_norm_(params, max_norm)`: the global L2 norm of every gradient, and the
/// gradients scaled by `max_norm / (norm + 1e-6)` when that is below 1. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let v: Vec<f32> = g.flatten_all()?.to_vec1()?;
            // Fixed chunks summed in order: rayon's own `sum` splits by thread timing, which
            // would make the norm (and so a resumed run) differ in the last bits.
            let partial: Vec<f64> = v
                .par_chunks(1 << 14)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            total += partial.iter().sum::<f64>();
        }
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// OpenCLIP's `cosine_lr`: linear warm-up `base·(s + 1)/warmup` for `s < warmup`, then
/// `½(1 + cos(π·(s − warmup)/(total − warmup)))·base`, no floor. `step` is 0-based.
pub fn cosine_lr(base: f64, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        let e = (step - warmup) as f64;
        let es = total.saturating_sub(warmup) as f64;
        if es <= 0.0 {
            return base;
        }
        0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base
    }
}
