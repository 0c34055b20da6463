//! Linear layers in both of OpenCLIP's conventions.

use candle_core::{Result, Tensor};

use super::VarBuilder;

/// `nn.Linear`: weight `[out, in]` (applied as `x Wᵀ`), optional bias `[out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
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
        Ok(Self { weight, bias })
    }

    /// Builds the layer from tensors already loaded (e.g. slices of a packed projection).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Output features.
    pub fn out_dim(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x Wᵀ` without the bias.
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        matmul_last_dim(x, &self.weight.t()?, None)
    }

    /// [`Linear::forward_no_bias`] through the fused CPU kernel when it applies (inference
    /// only: no backward pass); elsewhere the same.
    pub fn forward_no_bias_fused(&self, x: &Tensor) -> Result<Tensor> {
        if super::cpu_kernels::usable(x) && self.weight.is_contiguous() {
            let op = super::cpu_kernels::BiasLinear { bias: None };
            return x.contiguous()?.apply_op2_no_bwd(&self.weight, &op);
        }
        self.forward_no_bias(x)
    }

    /// [`Linear::forward`] with the bias fused into the product on the CPU (inference only:
    /// no backward pass); elsewhere the same as `forward`.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(bias) if super::cpu_kernels::usable(x) && self.weight.is_contiguous() => {
                let op = super::cpu_kernels::BiasLinear {
                    bias: Some(bias.to_vec1::<f32>()?),
                };
                x.contiguous()?.apply_op2_no_bwd(&self.weight, &op)
            }
            _ => self.forward(x),
        }
    }

    /// Applies the layer to `[..., in]`. Leading dimensions are folded into one so the whole
    /// batch is a single large matrix product.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
