//! dfndr-augment: from encoded image bytes to the tensors teachers and students consume.
//!
//! - [`decode`]: bounded decoding to 8-bit RGB.
//! - [`rgb`]: the RGB image type every stage works on.
//! - [`rng`]: seeded randomness, one generator per (job seed, key, view).
//! - [`params`]: augmentation parameters: sampling, replay, normalisation, Apple's form.
//! - [`resize`], [`ops`]: PIL/torchvision-exact resampling and RandAugment ops.
//! - [`validate`]: range checks of parameters read from outside (shards, `paug.json`).

pub mod decode;
mod jpeg;
pub mod ops;
pub mod params;
pub mod resize;
pub mod rgb;
pub mod rng;
pub mod validate;

pub use rgb::RgbImage;
