//! dfndr-captioner: OpenCLIP's CoCa (vision tower with attentional pooler, text tower with a
//! class token, multimodal decoder) with KV-cached decoding, OpenCLIP `generate()`'s sampling
//! strategies, and RayGen's caption cleaning.
//!
//! The image is encoded once per sample for all its captions, the cross-attention keys and
//! values once per image, and every self-attention layer keeps a cache, so a caption of `L`
//! tokens costs `L` single-position steps instead of OpenCLIP's `L` full-prefix forwards.

pub mod arch;
pub mod beam;
pub mod captioner;
pub mod clean;
pub mod decode;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod model;
pub mod rng;
pub mod sampling;

pub use arch::{CocaArch, CocaConfig, MultimodalConfig};
pub use beam::beam_search;
pub use captioner::{Captioner, CaptionerConfig};
pub use clean::{caption_text, clean_caption};
pub use error::{CaptionError, Result};
pub use generate::{generate, RowRequest, SpecialTokens};
pub use model::{CocaModel, ImageContext};
pub use rng::CaptionRng;
pub use sampling::{GenerationConfig, Strategy};
