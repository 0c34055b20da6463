//! Differentiable CPU operations candle lacks or differentiates too slowly for training
//! convolutional students: depthwise convolution, batch normalisation with batch statistics,
//! 1×1 convolution and per-channel scale and bias. Each is a candle custom op whose backward pass is another custom op.

mod batch_norm;
mod channel;
mod depthwise;

pub use batch_norm::{batch_norm_train, BatchStats};
pub use channel::{
    add_channel_bias, add_scaled_channels, pointwise_conv, pointwise_conv_bias, scale_channels,
};
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_bias, DepthwiseGeometry};
