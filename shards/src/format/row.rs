//! The in-memory form of one DFNDR row, shared by the pipeline (producer) and the trainer.

use serde::{Deserialize, Serialize};

use super::schema::Layout;

/// Number of RandAugment ops; op indices are `0..NUM_AUG_OPS` in the order of SPEC section 6
/// (0 Identity, 1 ShearX, 2 ShearY, 3 TranslateX, 4 TranslateY, 5 Rotate, 6 Brightness,
/// 7 Color, 8 Contrast, 9 Sharpness, 10 Posterize, 11 Solarize, 12 AutoContrast, 13 Equalize).
pub const NUM_AUG_OPS: u8 = 14;

/// One applied RandAugment op.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AugOp {
    /// Op index, `< NUM_AUG_OPS`.
    pub op: u8,
    /// Signed magnitude, in the op's own units (as torchvision applies it).
    pub magnitude: f32,
}

/// Replayable parameters of one augmented view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paug {
    /// RandomResizedCrop box `(top, left, height, width)` in original image pixels.
    pub crop: [i32; 4],
    /// Whether the view was flipped horizontally.
    pub flip: bool,
    /// RandAugment ops in application order.
    pub ops: Vec<AugOp>,
}

/// Synthetic captions of one captioner, aligned with one [`super::SynLayout`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SynCaptions {
    /// The N captions.
    pub texts: Vec<String>,
    /// Their teacher text embeddings (one per text), or empty when the layout has no
    /// `syn_text_TAG_emb` column.
    pub emb: Vec<Vec<f32>>,
}

/// One sample. Fields of columns absent from the file's [`Layout`] are empty (`None` / empty
/// vectors); embeddings are f32 in memory whatever their storage precision.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Row {
    /// Webdataset key.
    pub key: String,
    /// Input shard URI.
    pub source: String,
    /// URL from `KEY.json`, if any.
    pub url: Option<String>,
    /// Ground-truth caption.
    pub caption: String,
    /// Decoded original width in pixels.
    pub width: u32,
    /// Decoded original height in pixels.
    pub height: u32,
    /// Original encoded image; `Some` iff the layout has `embed_images`.
    pub image: Option<Vec<u8>>,
    /// K augmentations (empty without the `paug` column).
    pub paug: Vec<Paug>,
    /// K image embeddings of D values (empty without the `image_emb` column).
    pub image_emb: Vec<Vec<f32>>,
    /// Exactly one embedding of the ground-truth caption (empty without `text_emb`).
    pub text_emb: Vec<Vec<f32>>,
    /// Synthetic captions, one entry per [`Layout::syn`] entry in the same order.
    pub syn: Vec<SynCaptions>,
}

impl Row {
    /// Checks the row against `layout`, returning a human-readable reason on mismatch.
    ///
    /// The same check runs on write and on read, so any file that reads is one the writer would
    /// have produced. Values (crop boxes, op indices, magnitudes) are checked by
    /// [`Row::validate_values`].
    pub fn check(&self, layout: &Layout) -> Result<(), String> {
        if layout.embed_images != self.image.is_some() {
            return Err(if layout.embed_images {
                "image is missing but the layout embeds images".into()
            } else {
                "image is set but the layout has no image column".into()
            });
        }
        if !layout.paug && !self.paug.is_empty() {
            return Err("paug is set but the layout has no paug column".into());
        }
        let dim = layout.emb.map(|e| e.dim);
        check_embs("image_emb", layout.image_emb, dim, &self.image_emb)?;
        if layout.paug && layout.image_emb && self.paug.len() != self.image_emb.len() {
            return Err(format!(
                "{} augmentations but {} image embeddings; image_emb holds one per view",
                self.paug.len(),
                self.image_emb.len()
            ));
        }
        check_embs("text_emb", layout.text_emb, dim, &self.text_emb)?;
        if layout.text_emb && self.text_emb.len() != 1 {
            return Err(format!(
                "text_emb has {} entries, expected exactly 1",
                self.text_emb.len()
            ));
        }
        if self.syn.len() != layout.syn.len() {
            return Err(format!(
                "{} synthetic-caption groups but the layout has {} tags",
                self.syn.len(),
                layout.syn.len()
            ));
        }
        for (captions, syn) in self.syn.iter().zip(&layout.syn) {
            let name = super::col::syn_text_emb(&syn.tag);
            check_embs(&name, syn.with_emb, dim, &captions.emb)?;
            if syn.with_emb && captions.emb.len() != captions.texts.len() {
                return Err(format!(
                    "{name} has {} embeddings for {} captions",
                    captions.emb.len(),
                    captions.texts.len()
                ));
            }
        }
        Ok(())
    }
}

fn check_embs(
    name: &str,
    present: bool,
    dim: Option<usize>,
    embs: &[Vec<f32>],
) -> Result<(), String> {
    if !present {
        return if embs.is_empty() {
            Ok(())
        } else {
            Err(format!("{name} is set but the layout has no {name} column"))
        };
    }
    let Some(dim) = dim else {
        return Err(format!("{name} is present but the layout has no emb dim"));
    };
    match embs.iter().position(|e| e.len() != dim) {
        Some(i) => Err(format!(
            "{name}[{i}] has {} values, expected {dim}",
            embs[i].len()
        )),
        None => Ok(()),
    }
}
