//! Differentiable CPU operations candle lacks or differentiates too slowly for training
//! convolutional students: depthwise convolution and batch normalisation with batch
//! statistics. Each is a candle custom op whose backward pass is another custom op.

mod batch_norm;
mod depthwise;

pub use batch_norm::{batch_norm_train, BatchStats};
pub use depthwise::{depthwise_conv2d, DepthwiseGeometry};
