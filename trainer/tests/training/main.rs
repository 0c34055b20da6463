//! The trainer's behaviour beyond numerical parity, in one test binary (one optimised compile
//! and link instead of five on CI's two cores):
//!
//! - [`accumulation`]: gradient accumulation and activation recomputation;
//! - [`configs`]: the shipped student and training configs (full-size layouts included);
//! - [`learning`]: students learn on generated data, and evaluate zero-shot above chance;
//! - [`loss_ranks`]: the loss is ready for data parallelism;
//! - [`resume`]: checkpoints restore a run exactly.

#[path = "../common/mod.rs"]
mod common;

mod accumulation;
mod configs;
mod learning;
mod loss_ranks;
mod resume;
