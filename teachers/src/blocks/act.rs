//! Activation functions of OpenCLIP towers.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// The MLP activation. Both forms are differentiable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `nn.GELU()` with the exact erf form (OpenCLIP's default).
    Gelu,
    /// `x * sigmoid(1.702 x)`, used by OpenAI's CLIP and the DFN2B `dfn2b` weights.
    QuickGelu,
}

impl Activation {
    /// Applies the activation element-wise (candle's ops).
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }

    /// Applies the activation for training: the exact-erf GELU takes the parallel,
    /// vectorised kernel pair of [`super::gelu_erf`] on the CPU.
    pub fn forward_train(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => super::gelu_erf(x),
            Activation::QuickGelu => self.forward(x),
        }
    }
}
