//! What the trainer exchanges with other tools, in one test binary (one link instead of three
//! on CI's two cores):
//!
//! - [`eval_parity`]: zero-shot metrics and classifier against clip_benchmark and OpenCLIP;
//! - [`interchange`]: checkpoints to and from OpenCLIP;
//! - [`tensorboard`]: event files read back by an independent reader.

#[path = "../common/mod.rs"]
mod common;

mod eval_parity;
mod interchange;
mod tensorboard;
