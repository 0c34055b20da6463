//! The two towers of any CLIP model dfndr can load (a student, a teacher, any OpenCLIP ViT),
//! as evaluation sees them, and OpenCLIP's evaluation transform of an image.

use candle_core::{Device, Tensor};
use dfndr_augment::params::normalize_chw;
use dfndr_augment::resize::{center_crop, resize_shorter, Filter};
use dfndr_augment::rgb::RgbImage;
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::{l2_normalize, ClipModel, Resample};

use crate::error::Result;
use crate::layers::Mode;
use crate::student::Student;

/// OpenCLIP's `image_transform(is_train=False)` with `resize_mode='shortest'`: resize the
/// shorter side to `size`, centre crop `size`×`size`, scale to [0, 1], normalise.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTransform {
    /// Output side in pixels.
    pub size: usize,
    /// Resize filter.
    pub interpolation: Resample,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl ImageTransform {
    /// The `[3, size, size]` input of `img`, channel-major.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let size = self.size as u32;
        let filter = match self.interpolation {
            Resample::Bicubic => Filter::Bicubic,
            Resample::Bilinear => Filter::Bilinear,
        };
        let resized = resize_shorter(img, size, filter);
        normalize_chw(&center_crop(&resized, size, size), self.mean, self.std)
    }
}

/// What evaluation needs of a CLIP model. Embeddings come back unnormalised, float32.
pub trait Towers: Sync {
    /// How images are prepared for [`Towers::encode_images`].
    fn transform(&self) -> ImageTransform;
    /// Tokens per text row.
    fn context_length(&self) -> usize;
    /// Where the inputs must be.
    fn device(&self) -> Device;
    /// Image embeddings `[N, D]` of transformed images `[N, 3, S, S]`.
    fn encode_images(&self, pixels: &Tensor) -> Result<Tensor>;
    /// Text embeddings `[N, D]` of token rows.
    fn encode_texts(&self, ids: &[Vec<u32>]) -> Result<Tensor>;
    /// The model's logit scale (the multiplier, `exp` of the stored value).
    fn logit_scale(&self) -> Result<f32>;
}

impl Towers for Student {
    fn transform(&self) -> ImageTransform {
        let c = self.config();
        ImageTransform {
            size: c.vision.image_size,
            interpolation: c.preprocess.interpolation,
            mean: c.preprocess.mean,
            std: c.preprocess.std,
        }
    }
    fn context_length(&self) -> usize {
        Student::context_length(self)
    }
    fn device(&self) -> Device {
        Student::device(self).clone()
    }
    // Unit by unit with the graph cut between units: the student's weights are variables,
    // and a whole tower's recorded graph would hold every activation of the batch.
    fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        self.image_units().infer(pixels, Mode::Eval)
    }
    fn encode_texts(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        // The text units ignore their first input (they embed `ids`).
        let unused = Tensor::zeros(1, candle_core::DType::F32, Student::device(self))?;
        self.text_units(ids)?.infer(&unused, Mode::Eval)
    }
    fn logit_scale(&self) -> Result<f32> {
        Ok(Student::logit_scale(self)
            .flatten_all()?
            .to_vec1::<f32>()?
            .first()
            .map_or(1.0, |v| v.exp()))
    }
}

/// A teacher-style CLIP model (OpenCLIP ViT, CustomTextCLIP) with its preprocessing.
pub struct ClipTowers {
    /// The model.
    pub model: ClipModel,
    /// Its evaluation transform.
    pub transform: ImageTransform,
    /// Where the model is.
    pub device: Device,
}

impl Towers for ClipTowers {
    fn transform(&self) -> ImageTransform {
        self.transform.clone()
    }
    fn context_length(&self) -> usize {
        self.model.config().text.context_length
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.model.encode_image(pixels)?)
    }
    fn encode_texts(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        Ok(self.model.encode_text(ids)?)
    }
    fn logit_scale(&self) -> Result<f32> {
        Ok(self.model.logit_scale_log()?.exp())
    }
}

/// L2-normalised embeddings `[N, D]` of `texts` on the CPU (as `F.normalize`), tokenised at
/// the model's context length and encoded `batch_size` at a time; `progress` gets the number
/// of texts encoded so far.
pub fn text_embeddings(
    towers: &dyn Towers,
    texts: &[String],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    let tokenizer = Tokenizer::global();
    let mut out = Vec::with_capacity(texts.len().div_ceil(batch_size.max(1)));
    let mut done = 0;
    for chunk in texts.chunks(batch_size.max(1)) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let ids = tokenizer.tokenize_batch(&refs, towers.context_length());
        out.push(l2_normalize(
            &towers.encode_texts(&ids)?.to_device(&Device::Cpu)?,
        )?);
        done += chunk.len();
        progress(done);
    }
    Ok(Tensor::cat(&out, 0)?)
}
