//! Zero-shot evaluation with clip_benchmark's definitions: classification (acc@1, acc@5,
//! mean per-class recall) and image-text retrieval (recall@k both ways).
//!
//! - [`towers`]: what evaluation needs of a model, for students and OpenCLIP-style models;
//! - [`prompts`]: built-in ImageNet class names and OpenAI templates, or files;
//! - [`classifier`]: the zero-shot classifier from class names and templates;
//! - [`data`]: image folders, clip_benchmark webdatasets and DFNDR datasets;
//! - [`metrics`]: the metrics on logits and scores (and the tie rule);
//! - [`runner`]: one evaluation, batched, into a report;
//! - [`in_training`]: the `[eval]` section of a training config.

pub mod classifier;
pub mod data;
pub mod in_training;
pub mod metrics;
pub mod prompts;
pub mod runner;
pub mod towers;

pub use data::{DataOptions, EvalData, Task};
pub use runner::{evaluate, EvalProgress, EvalReport, EvalSettings, Quiet};
pub use towers::{ClipTowers, ImageTransform, Towers};
