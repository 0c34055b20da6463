//! Activation recomputation (OpenCLIP's `--grad-checkpointing`): the forward pass keeps only
//! the input of each unit of a tower (a FastViT block, a transformer block) and drops the
//! rest of the graph; the backward pass runs the units in reverse, forwarding each again from
//! its saved input with the graph and differentiating it with the gradient of its output.
//!
//! Memory then holds the units' inputs plus one unit's graph instead of every intermediate of
//! the step, for about one more forward pass of time. The numbers are those of the plain step:
//! BatchNorm recomputes the same batch statistics ([`Mode::Replay`] leaves the running averages
//! alone, so they are updated once), and the gradients reaching each parameter are the same
//! sums, in the same order within a unit.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, Var};

use crate::error::Result;
use crate::layers::Mode;

/// Applies unit `i` of a tower to `x` in `mode`.
type UnitFn<'a> = dyn Fn(usize, &Tensor, Mode) -> Result<Tensor> + 'a;

/// A tower as a sequence of units: `run(i, x, mode)` applies unit `i` to `x`. Unit 0's input
/// needs no gradient (the image, or nothing for a text tower that embeds its tokens).
pub struct Units<'a> {
    count: usize,
    run: Box<UnitFn<'a>>,
}

impl<'a> Units<'a> {
    /// `count` units applied by `run`.
    pub fn new(count: usize, run: impl Fn(usize, &Tensor, Mode) -> Result<Tensor> + 'a) -> Self {
        Self {
            count,
            run: Box::new(run),
        }
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no units.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Applies unit `i` to `x` in `mode`, keeping the graph.
    pub fn run(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        (self.run)(i, x, mode)
    }

    /// Runs every unit in training mode without keeping the graph. Returns the tape (each
    /// unit's input) and the tower's output, detached.
    pub fn forward(&self, x: &Tensor) -> Result<(Tape, Tensor)> {
        let mut inputs = Vec::with_capacity(self.count);
        let mut x = x.detach();
        for i in 0..self.count {
            let y = (self.run)(i, &x, Mode::Train)?.detach();
            inputs.push(x);
            x = y;
        }
        Ok((Tape { inputs }, x))
    }

    /// Runs every unit in `mode` for inference: each unit's output is detached, so memory
    /// holds one unit's graph at a time (the parameters are variables, so every operation on
    /// them records its inputs; a whole tower's graph at batch 64 is tens of GB).
    pub fn infer(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut x = x.detach();
        for i in 0..self.count {
            x = (self.run)(i, &x, mode)?.detach();
        }
        Ok(x)
    }

    /// Back-propagates `grad` (the gradient of the tower's output) through the units in
    /// reverse, recomputing each from `tape`, and adds the parameters' gradients to `store`.
    pub fn backward(&self, tape: Tape, grad: Tensor, store: &mut GradStore) -> Result<()> {
        let mut inputs = tape.inputs;
        if inputs.len() != self.count {
            return Err(crate::error::TrainError::Internal(format!(
                "a tape of {} inputs for {} units",
                inputs.len(),
                self.count
            )));
        }
        let mut grad = grad;
        for i in (0..self.count).rev() {
            let Some(input) = inputs.pop() else { break };
            // The saved input as a leaf whose gradient the unit's backward pass reports.
            let leaf = if i > 0 {
                Some(Var::from_tensor(&input)?)
            } else {
                None
            };
            let x = leaf.as_ref().map(|v| v.as_tensor()).unwrap_or(&input);
            let y = (self.run)(i, x, Mode::Replay)?;
            let mut grads = seeded(&y, grad)?.backward()?;
            drop(y);
            match &leaf {
                Some(v) => match grads.remove(v.as_tensor()) {
                    Some(g) => grad = g,
                    None => {
                        return Err(crate::error::TrainError::Internal(format!(
                            "unit {i} does not depend on its input"
                        )))
                    }
                },
                None => grad = Tensor::zeros((), candle_core::DType::F32, input.device())?,
            }
            store.extend(grads)?;
        }
        Ok(())
    }
}

/// The saved inputs of a tower's units.
pub struct Tape {
    inputs: Vec<Tensor>,
}

/// A scalar whose backward pass hands `grad` to `y`: `Σ y ⊙ grad`, without computing it on the
/// CPU.
fn seeded(y: &Tensor, grad: Tensor) -> Result<Tensor> {
    if y.dims() != grad.dims() {
        return Err(crate::error::TrainError::Internal(format!(
            "gradient {:?} for an output {:?}",
            grad.dims(),
            y.dims()
        )));
    }
    if y.device().is_cpu() {
        Ok(y.apply_op1(Seed { grad })?)
    } else {
        Ok((y * grad.detach())?.sum_all()?)
    }
}

struct Seed {
    grad: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "seed-gradient"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // The value is never read; only the backward pass matters.
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The seed is the root of the backward pass: its own gradient is 1.
        Ok(Some(self.grad.clone()))
    }
}
