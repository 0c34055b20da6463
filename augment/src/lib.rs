//! dfndr-augment: from encoded image bytes to pixels.
//!
//! Today this crate decodes images (bounded, RGB); the augmentations of SPEC section 6 build
//! on it.

pub mod decode;
