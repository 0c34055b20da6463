//! Linear layers in both of OpenCLIP's conventions.

use candle_core::{Result, Tensor};

use super::{Activation, Kernels, VarBuilder};

/// `nn.Linear`: weight `[out, in]` (applied as `x Wᵀ`), optional bias `[out]`.
///
/// [`Linear::prepared`] readies a layer for the fused CPU kernels (inference): it then keeps
/// its weight transposed, `[in, out]`, which the `gemm` crate multiplies faster (measured on
/// the ViT-L shapes with 2 threads: 210-215 vs 189-200 GFLOP/s for the widening q|k|v and MLP
/// up projections, and up to 2x for the others on an earlier host). The `[out, in]` weight is
/// then a view of the transposed copy, so nothing is stored twice; [`Linear::narrow_out`]
/// takes slices of it (q, k and v of a packed projection) without a copy.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    /// `[in, out]`, column stride 1, when prepared and transposed.
    weight_t: Option<Tensor>,
    /// Prepared for the fused CPU kernels.
    fused: bool,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `PREFIX.weight` and, if `bias`, `PREFIX.bias`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let std = (in_dim as f64).powf(-0.5);
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self::from_parts(weight, bias))
    }

    /// Builds the layer from tensors already loaded (e.g. slices of a packed projection).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            weight_t: None,
            fused: false,
            bias,
        }
    }

    /// The layer readied for `kernels` on the weight's device: with [`Kernels::Fused`] on the
    /// CPU it takes the fused kernels, with the weight transposed; otherwise unchanged.
    pub fn prepared(mut self, kernels: Kernels) -> Result<Self> {
        self.fused = kernels == Kernels::Fused && self.weight.device().is_cpu();
        if self.fused && self.weight_t.is_none() {
            let weight_t = self.weight.t()?.contiguous()?;
            self.weight = weight_t.t()?;
            self.weight_t = Some(weight_t);
        }
        Ok(self)
    }

    /// Output features `start..start + len` as a layer of their own, sharing this layer's
    /// storage (the q, k and v parts of a packed projection).
    pub fn narrow_out(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            weight: self.weight.narrow(0, start, len)?,
            weight_t: match &self.weight_t {
                Some(wt) => Some(wt.narrow(1, start, len)?),
                None => None,
            },
            fused: self.fused,
            bias: match &self.bias {
                Some(b) => Some(b.narrow(0, start, len)?),
                None => None,
            },
        })
    }

    /// The weight `[out, in]` (a view of the transposed copy when there is one).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `act(x Wᵀ + b)`: on a prepared layer the activation runs over the product's output in
    /// place (inference only: no backward pass); elsewhere the plain ops.
    pub fn forward_act_fused(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match self.fused(x, Some(act))? {
            Some(y) => Ok(y),
            None => act.forward(&self.forward(x)?),
        }
    }

    /// `act(x Wᵀ + b)` for inference, prepared or not: on the CPU in float32 the fused kernel
    /// (no backward pass, nothing recorded for one, the activation over the product's output in
    /// place); elsewhere the plain ops.
    pub fn forward_inference(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        if super::cpu_kernels::usable(x) {
            return self.fused_kernel(x, act);
        }
        let y = self.forward(x)?;
        match act {
            Some(act) => act.forward(&y),
            None => Ok(y),
        }
    }

    /// The fused CPU kernel's `act(x Wᵀ + b)` on a prepared layer, or `None` where it does not
    /// apply.
    fn fused(&self, x: &Tensor, activation: Option<Activation>) -> Result<Option<Tensor>> {
        if !self.fused || !super::cpu_kernels::usable(x) {
            return Ok(None);
        }
        self.fused_kernel(x, activation).map(Some)
    }

    /// `act(x Wᵀ + b)` by the fused CPU kernel (float32 on the CPU), with the transposed
    /// weight where the layer keeps one.
    fn fused_kernel(&self, x: &Tensor, activation: Option<Activation>) -> Result<Tensor> {
        let bias = match &self.bias {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        let (weight, transposed) = match &self.weight_t {
            Some(wt) => (wt, true),
            None => (&self.weight, false),
        };
        let op = super::cpu_kernels::BiasLinear {
            bias,
            transposed,
            activation,
        };
        x.contiguous()?.apply_op2_no_bwd(weight, &op)
    }

    /// Applies the layer to `[..., in]`. Leading dimensions are folded into one so the whole
    /// batch is a single large matrix product. A prepared layer takes the fused CPU kernel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, None)? {
            return Ok(y);
        }
        if let Some(bias) = &self.bias {
            if super::grad_kernels::usable(x) {
                return super::grad_kernels::linear(x, &self.weight, bias);
            }
        }
        matmul_last_dim(x, &self.weight.t()?, self.bias.as_ref())
    }
}

/// A bare projection matrix `[in, out]` applied as `x P` (OpenCLIP's `proj` and
/// `text_projection` Parameters), or a biased `nn.Linear` when the config asks for one.
#[derive(Clone, Debug)]
pub enum Projection {
    /// `x P` with `P: [in, out]`.
    Matrix(Tensor),
    /// `nn.Linear` (keys `PREFIX.weight`, `PREFIX.bias`).
    Linear(Linear),
}

impl Projection {
    /// Loads the Parameter `NAME` of shape `[in, out]` from `vb`.
    pub fn matrix(
        vb: &VarBuilder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        init_std: f64,
    ) -> Result<Self> {
        let p = vb.get_with_hints(
            (in_dim, out_dim),
            name,
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: init_std,
            },
        )?;
        Ok(Self::Matrix(p))
    }

    /// Applies the projection to `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Projection::Matrix(p) => matmul_last_dim(x, p, None),
            Projection::Linear(l) => l.forward(x),
        }
    }
}

/// `x @ w (+ bias)` over the last dimension of `x`, with `w: [in, out]`.
fn matmul_last_dim(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    let flat = x.reshape((rows, in_dim))?;
    let mut y = flat.matmul(w)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(1)?;
    y.reshape(out_dims)
}
