//! One row made a training sample (Apple's `preprocess_dr`): a stored view replayed at the
//! student's size and normalisation, its teacher image embedding, the ground-truth caption and
//! one synthetic caption with their teacher text embeddings, tokenised.

use dfndr_augment::decode::decode_rgb_part;
use dfndr_augment::params::{crops_region, normalize_chw, AugConfig};
use dfndr_dataset::paug::from_stored;
use dfndr_teachers::tokenizer::Tokenizer;

use super::stream::Item;
use super::{below, ViewSampling};

/// Salt of the view choice.
const VIEW: u64 = 0x5649_4557;
/// Salt of the synthetic caption choice.
const CAPTION: u64 = 0x4341_5054;

/// How samples are made.
#[derive(Clone, Debug)]
pub struct SampleSettings {
    /// The shard's augmentation config (its filter and fill; replayed at `size`).
    pub aug: AugConfig,
    /// The student's input side.
    pub size: u32,
    /// The student's normalisation.
    pub mean: [f32; 3],
    /// The student's normalisation.
    pub std: [f32; 3],
    /// Token positions of the student's text tower.
    pub context_length: usize,
    /// View choice.
    pub views: ViewSampling,
    /// Decompression-bomb guard.
    pub max_pixels: u64,
    /// Run seed.
    pub seed: u64,
}

/// A training sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `[3, size, size]` normalised pixels.
    pub pixels: Vec<f32>,
    /// Ground-truth caption tokens.
    pub gt: Vec<u32>,
    /// Synthetic caption tokens.
    pub syn: Vec<u32>,
    /// Teacher embedding of the view.
    pub image_emb: Vec<f32>,
    /// Teacher embedding of the ground-truth caption.
    pub gt_emb: Vec<f32>,
    /// Teacher embedding of the synthetic caption.
    pub syn_emb: Vec<f32>,
}

/// Makes item number `position` of `epoch` a sample, or says why it is skipped (a counted
/// reason).
pub fn materialize(
    item: &Item,
    settings: &SampleSettings,
    epoch: u64,
    position: u64,
) -> Result<Sample, &'static str> {
    let bytes = item.original.as_ref().map_err(|reason| *reason)?;
    let k = item.paug.len();
    if k == 0 || item.image_emb.len() != k {
        return Err("no_views");
    }
    let view = match settings.views {
        ViewSampling::Random => below(k, &[settings.seed, epoch, VIEW, position]),
        ViewSampling::Sequential => (epoch % k as u64) as usize,
    };
    let params = from_stored(&item.paug[view]).map_err(|_| "invalid_view")?;
    params
        .validate(item.width, item.height, settings.aug.size)
        .map_err(|_| "invalid_view")?;
    // Only the part of the image the crop reads is decoded (JPEG scanlines outside are skipped).
    let region = crops_region(std::slice::from_ref(&params), item.width, item.height);
    let part = decode_rgb_part(bytes, settings.max_pixels, |_, _| region)
        .map_err(|_| "undecodable_image")?;
    if (part.width, part.height) != (item.width, item.height) {
        return Err("changed_original");
    }
    let img = settings.aug.replay_part(&part, &params, settings.size);
    let pixels = normalize_chw(&img, settings.mean, settings.std);
    let tags = &item.syn;
    let tag = below(tags.len(), &[settings.seed, epoch, CAPTION, position, 0]);
    let Some(captions) = tags.get(tag).filter(|c| !c.is_empty()) else {
        return Err("no_synthetic_caption");
    };
    let (syn_text, syn_emb) = &captions[below(
        captions.len(),
        &[settings.seed, epoch, CAPTION, position, 1],
    )];
    let tok = Tokenizer::global();
    Ok(Sample {
        pixels,
        gt: tok.tokenize(&item.caption, settings.context_length),
        syn: tok.tokenize(syn_text, settings.context_length),
        image_emb: item.image_emb[view].clone(),
        gt_emb: item.text_emb.clone(),
        syn_emb: syn_emb.clone(),
    })
}
