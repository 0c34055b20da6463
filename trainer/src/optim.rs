//! AdamW with OpenCLIP's weight-decay groups, gradient clipping by global norm and OpenCLIP's
//! cosine schedule. The optimiser's state is plain vectors, so a checkpoint holds it exactly.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
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
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] from the gradients multiplied by `grad_scale` (the factor of
    /// [`clip_factor`]), as torch's `clip_grad_norm_` then `step` compute it. CPU float32
    /// parameters are updated in place in one pass over parameter, gradient and moments; the
    /// gradients themselves are not changed.
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f32) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let coeffs = Coefficients {
            step_size: (lr / bc1) as f32,
            beta2: c.beta2 as f32,
            one_m_b1: (1.0 - c.beta1) as f32,
            one_m_b2: (1.0 - c.beta2) as f32,
            eps: c.eps as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            grad_scale,
            decay_factor: 1.0,
        };
        for ((name, var, decay), st) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            if grad.elem_count() != st.exp_avg.len() || grad.dims() != var.as_tensor().dims() {
                return Err(TrainError::Internal(format!(
                    "gradient of {name} has the wrong size"
                )));
            }
            let coeffs = Coefficients {
                decay_factor: if *decay {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                },
                ..coeffs
            };
            let param = var.as_tensor();
            if dfndr_teachers::blocks::cpu_kernels_usable(param) {
                let update = InPlaceUpdate {
                    moments: Mutex::new(Some((&mut st.exp_avg, &mut st.exp_avg_sq))),
                    coeffs,
                };
                param.inplace_op2(&grad.to_dtype(DType::F32)?.contiguous()?, &update)?;
                continue;
            }
            let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
            let mut p: Vec<f32> = param.flatten_all()?.to_vec1()?;
            coeffs.apply(&mut p, &mut st.exp_avg, &mut st.exp_avg_sq, &g);
            var.set(&Tensor::from_vec(p, param.shape().clone(), param.device())?)?;
        }
        Ok(())
    }
}

/// The numbers of one AdamW update of one parameter.
#[derive(Clone, Copy, Debug)]
struct Coefficients {
    step_size: f32,
    beta2: f32,
    one_m_b1: f32,
    one_m_b2: f32,
    eps: f32,
    bc2_sqrt: f32,
    grad_scale: f32,
    decay_factor: f32,
}

impl Coefficients {
    /// Updates parameter `p` and its moments `m`, `v` from gradient `g`, in parallel.
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let c = *self;
        p.par_iter_mut()
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .zip(g.par_iter())
            .for_each(|(((p, m), v), &g)| {
                // torch: clip_grad_norm_ scales the gradient (by exactly 1 when not clipping).
                let g = g * c.grad_scale;
                *p *= c.decay_factor;
                // torch: exp_avg.lerp_(grad, 1 − β₁); exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂)
                *m += c.one_m_b1 * (g - *m);
                *v = *v * c.beta2 + c.one_m_b2 * g * g;
                let denom = v.sqrt() / c.bc2_sqrt + c.eps;
                *p -= c.step_size * (*m / denom);
            });
    }
}

/// The update of one CPU parameter in place: the moments are the optimiser's own vectors,
/// handed to the kernel once.
struct InPlaceUpdate<'a> {
    moments: Mutex<Option<(&'a mut Vec<f32>, &'a mut Vec<f32>)>>,
    coeffs: Coefficients,
}

impl InplaceOp2 for InPlaceUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = dfndr_teachers::blocks::contiguous_f32(s2, l2, "gradient")?;
        let CpuStorage::F32(data) = s1 else {
            candle_core::bail!("AdamW: the parameter is not float32");
        };
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("AdamW: the parameter is not contiguous");
        };
        let p = &mut data[start..end];
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("AdamW: moments lock poisoned".into()))?;
        let Some((m, v)) = moments.take() else {
            candle_core::bail!("AdamW: one update applied twice");
        };
        if p.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            candle_core::bail!(
                "AdamW: parameter {}, gradient {} and moments {} differ in size",
                p.len(),
                g.len(),
                m.len()
            );
        }
        self.coeffs.apply(p, m, v, g);
        Ok(())
    }
}

/// The global L2 norm of every gradient of `vars`, as torch's `clip_grad_norm_` computes it
/// (summed in float64 over fixed chunks in order, so the norm does not depend on thread
/// timing and a resumed run equals an uninterrupted one).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut total = 0f64;
    let sum_sq = |v: &[f32]| -> f64 {
        // Fixed chunks summed in order: rayon's own `sum` splits by thread timing.
        let partial: Vec<f64> = v
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        partial.iter().sum::<f64>()
    };
    for var in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        let direct = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(sum_sq(&v[a..b])),
            _ => None,
        };
        drop(storage);
        total += match direct {
            Some(s) => s,
            None => sum_sq(&g.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?),
        };
    }
    Ok(total.sqrt())
}

/// The factor torch's `clip_grad_norm_(params, max_norm)` scales every gradient by for a
/// global norm `norm`: `max_norm / (norm + 1e-6)` when that is below 1, else exactly 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        coef as f32
    } else {
        1.0
    }
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
