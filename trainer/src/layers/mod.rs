//! Convolutional building blocks with timm's state-dict key names, each with a training
//! (batch statistics, differentiable) and an evaluation forward.

mod attention;
mod batch_norm;
mod conv;

pub use attention::SelfAttention;
pub use batch_norm::{BatchNorm2d, NormConfig};
pub use conv::{Conv2d, ConvBn, ConvKind, SqueezeExcite};

use dfndr_teachers::blocks::{Kernels, LayerNorm};

use candle_core::{DType, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};

/// Whether a forward trains (batch statistics, running averages updated) or evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// BatchNorm normalises with batch statistics and updates its running averages.
    Train,
    /// BatchNorm normalises with its running averages; the ViT towers take the inference
    /// kernels, which have no backward pass.
    Eval,
    /// A training forward computed again for its gradients (activation recomputation):
    /// batch statistics as in [`Mode::Train`], running averages left as they are, so they
    /// are updated once per step.
    Replay,
}

/// Builds a student's layers: trainable parameters through a [`VarBuilder`] over one
/// [`VarMap`], non-trainable buffers (BatchNorm running statistics) in a second map under the
/// same key names, so that together they are the model's state dict.
#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    buffers: VarMap,
    norm: NormConfig,
    inference_mode: bool,
}

impl<'a> Builder<'a> {
    /// A builder over `params` (trainable) and `buffers`, on `vb`'s device, float32.
    pub fn new(vb: VarBuilder<'a>, buffers: VarMap, norm: NormConfig) -> Self {
        Self {
            vb,
            buffers,
            norm,
            inference_mode: false,
        }
    }

    /// The builder of the reparameterised (inference) form, as timm's `inference_mode`:
    /// re-parameterisable layers are built as one convolution each (`reparam_conv`).
    pub fn with_inference_mode(mut self, inference_mode: bool) -> Self {
        self.inference_mode = inference_mode;
        self
    }

    /// Whether re-parameterisable layers are built fused.
    pub fn inference_mode(&self) -> bool {
        self.inference_mode
    }

    /// The builder one key level down (`PREFIX.name`).
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            buffers: self.buffers.clone(),
            norm: self.norm,
            inference_mode: self.inference_mode,
        }
    }

    /// The parameter builder at this prefix.
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// BatchNorm settings of the model.
    pub fn norm(&self) -> NormConfig {
        self.norm
    }

    /// A trainable parameter `PREFIX.name`.
    pub fn param(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        self.vb.get_with_hints(shape, name, init)
    }

    /// A non-trainable buffer `PREFIX.name`, as a variable so it can be updated in place.
    pub fn buffer(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Var> {
        let prefix = self.vb.prefix();
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        self.buffers
            .get(shape, &path, init, DType::F32, self.vb.device())?;
        let data = self.buffers.data().lock().map_err(|_| {
            candle_core::Error::Msg("the buffer map's lock was poisoned".to_string())
        })?;
        match data.get(&path) {
            Some(var) => Ok(var.clone()),
            None => candle_core::bail!("buffer {path} was not registered"),
        }
    }
}

/// `LayerScale2d`: `x · gamma` with `gamma: [C, 1, 1]` (key `PREFIX.gamma`).
#[derive(Clone, Debug)]
pub struct LayerScale2d {
    gamma: Tensor,
}

impl LayerScale2d {
    /// Loads `PREFIX.gamma`, initialised to `init`.
    pub fn new(b: &Builder, dim: usize, init: f64) -> Result<Self> {
        Ok(Self {
            gamma: b.param((dim, 1, 1), "gamma", Init::Const(init))?,
        })
    }

    /// The scale, `[C, 1, 1]`.
    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }

    /// `x + branch · gamma`: a residual branch behind the scale, in one pass.
    pub fn residual(&self, x: &Tensor, branch: &Tensor) -> Result<Tensor> {
        crate::ops::add_scaled_channels(x, branch, &self.gamma.flatten_all()?)
    }
}

/// timm's `LayerNorm2d`: LayerNorm over the channels of each pixel of `[N, C, H, W]` (keys
/// `PREFIX.weight`, `PREFIX.bias`), differentiable.
#[derive(Clone, Debug)]
pub struct LayerNorm2d {
    norm: LayerNorm,
}

impl LayerNorm2d {
    /// Loads the layer at `b`'s prefix (weight 1, bias 0 when fresh).
    pub fn new(b: &Builder, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(b.vb().clone(), channels, eps, Kernels::Differentiable)?,
        })
    }

    /// Normalises each pixel's channel vector.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Self::per_pixel(x, |nhwc| self.norm.forward(nhwc))
    }

    /// [`LayerNorm2d::forward`] with the fused kernel (no backward pass), for evaluation.
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        Self::per_pixel(x, |nhwc| self.norm.forward_inference(nhwc))
    }

    /// `norm` applied over the channels of `[N, C, H, W]` as `[N, H, W, C]`.
    fn per_pixel(x: &Tensor, norm: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        norm(&x.permute((0, 2, 3, 1))?.contiguous()?)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}
