//! dfndr-augment: from encoded image bytes to the tensors teachers and students consume.
//!
//! - [`decode`]: bounded decoding to 8-bit RGB.
//! - [`rgb`]: the RGB image type every stage works on.

pub mod decode;
pub mod rgb;

pub use rgb::RgbImage;
