//! Linear layers in both of OpenCLIP's conventions.

use candle_core::{Result, Tensor};

use super::{Kernels, VarBuilder};

/// `nn.Linear`: weight `[out, in]` (applied as `x Wᵀ`), optional bias `[out]`.
///
/// For inference on the CPU ([`Linear::prepared`]) the weight is kept transposed, `[in, out]`
/// with unit column stride, which the `gemm` crate multiplies 1.1-2x faster than the
/// `[out, in]` layout (most on the MLP's down projection), and the `[out, in]` weight becomes a
/// view of it, so nothing is stored twice.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    /// `[in, out]`, column stride 1 (row stride may exceed `out`: a column slice of a packed
    /// projection); only for the fused CPU kernels.
    weight_t: Option<Tensor>,
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
        Ok(Self {
            weight,
            weight_t: None,
            bias,
        })
    }

    /// Builds the layer from tensors already loaded (e.g. slices of a packed projection).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            weight_t: None,
            bias,
        }
    }

    /// Builds the layer from a transposed weight `[in, out]` with unit column stride (e.g. a
    /// column slice of a prepared packed projection), ready for the fused CPU kernels.
    pub fn from_transposed(weight_t: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: weight_t.t()?,
            weight_t: Some(weight_t),
            bias,
        })
    }

    /// The layer laid out for `kernels` on the weight's device: with [`Kernels::Fused`] on the
    /// CPU the weight is stored transposed for the fused kernels; otherwise unchanged.
    pub fn prepared(self, kernels: Kernels) -> Result<Self> {
        if kernels != Kernels::Fused || !self.weight.device().is_cpu() || self.weight_t.is_some() {
            return Ok(self);
        }
        Self::from_transposed(self.weight.t()?.contiguous()?, self.bias)
    }

    /// The weight `[out, in]` (a view of the transposed copy when prepared).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The weight transposed `[in, out]`, when the layer is prepared for the fused CPU kernels.
    pub fn weight_t(&self) -> Option<&Tensor> {
        self.weight_t.as_ref()
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

    /// [`Linear::forward_no_bias`] through the fused CPU kernel when the layer is prepared for
    /// it (inference only: no backward pass); elsewhere the same.
    pub fn forward_no_bias_fused(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, false)?
            .map_or_else(|| self.forward_no_bias(x), Ok)
    }

    /// [`Linear::forward`] with the bias written into the product's output on the CPU when the
    /// layer is prepared for it (inference only: no backward pass); elsewhere the same.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, true)?.map_or_else(|| self.forward(x), Ok)
    }

    fn fused(&self, x: &Tensor, with_bias: bool) -> Result<Option<Tensor>> {
        let Some(weight_t) = &self.weight_t else {
            return Ok(None);
        };
        if !super::cpu_kernels::usable(x) {
            return Ok(None);
        }
        let bias = match (&self.bias, with_bias) {
            (Some(b), true) => Some(b.to_vec1::<f32>()?),
            _ => None,
        };
        let op = super::cpu_kernels::BiasLinear { bias };
        x.contiguous()?.apply_op2_no_bwd(weight_t, &op).map(Some)
    }

    /// Applies the layer to `[..., in]`. Leading dimensions are folded into one so the whole
    /// batch is a single large matrix product. A prepared layer takes the fused CPU kernel
    /// (its weight may be a strided view that candle's matmul would have to copy).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, true)? {
            return Ok(y);
        }
        let w = if self.weight_t.is_some() {
            self.weight.t()?.contiguous()?
        } else {
            self.weight.t()?
        };
        matmul_last_dim(x, &w, self.bias.as_ref())
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
