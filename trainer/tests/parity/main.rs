//! Numerical parity of the trainer with PyTorch, timm and OpenCLIP, in one test binary (one
//! link instead of three on CI's two cores):
//!
//! - [`ops`]: the custom ops (depthwise convolution, BatchNorm) against PyTorch;
//! - [`s0`]: the MobileCLIP2-S0 student, two optimisation steps included;
//! - [`variants`]: every other MobileCLIP2 variant (S2, S3, S4, B, L-14) at reduced depth and
//!   at full size by key layout, with their reparameterised forms.

#[path = "../common/mod.rs"]
mod common;

mod ops;
mod s0;
mod variants;
