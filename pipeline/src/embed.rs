//! The embedding stage: teacher image embeddings of every augmented view and text
//! embeddings of every caption, batched across samples.

use anyhow::{bail, Context, Result};
use dfndr_augment::params::normalize_chw;
use dfndr_augment::rgb::RgbImage;
use dfndr_shards::format::{EmbDtype, EmbLayout, TeacherInfo};
use dfndr_teachers::device::Compute;
use dfndr_teachers::{Ensemble, Preprocess, Teacher, TeacherConfig, Tensor};
use dfndr_trainer::eval::ImageTransform;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// `[embed]`: how the teacher stage runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedSection {
    /// Images (augmented views) or texts per teacher forward pass.
    pub batch_size: usize,
    /// Storage precision of the embedding columns: "f16" (default; the embeddings are
    /// unit-normalised, so float16 keeps 10 mantissa bits) or "f32" ("float16"/"float32"
    /// are accepted too).
    pub dtype: EmbDtype,
    /// Compute device: "cpu", "cuda" or "cuda:N" (CUDA needs a `--features cuda` build).
    pub device: String,
    /// Compute precision of the teachers: "auto" (bf16 on a GPU, f32 on the CPU), "f32" or
    /// "bf16" (weights and matrix products; norms, softmax and the stored embeddings stay
    /// float32 before `dtype` applies). Like the device, it does not change the job's
    /// fingerprint.
    pub precision: String,
}

impl Default for EmbedSection {
    fn default() -> Self {
        Self {
            batch_size: 32,
            dtype: EmbDtype::F16,
            device: "cpu".into(),
            precision: "auto".into(),
        }
    }
}

/// A teacher's eval preprocessing of a whole image: resize the shorter side, centre crop,
/// normalise (OpenCLIP's `image_transform(is_train=False)`), as CHW floats.
pub fn preprocess_image(img: &RgbImage, p: &Preprocess, size: usize) -> Vec<f32> {
    ImageTransform {
        size,
        interpolation: p.interpolation,
        mean: p.mean,
        std: p.std,
    }
    .apply(img)
}

/// The loaded ensemble and its settings.
pub struct EmbedStage {
    /// The teachers.
    pub ensemble: Ensemble,
    compute: Compute,
    batch_size: usize,
    dtype: EmbDtype,
}

impl EmbedStage {
    /// Loads every teacher (says loudly when weights are random).
    pub fn load(
        teachers: &[TeacherConfig],
        section: &EmbedSection,
        device_override: Option<&str>,
    ) -> Result<Self> {
        let spec = device_override.unwrap_or(&section.device);
        let compute = Compute::parse(spec, &section.precision)?;
        let started = std::time::Instant::now();
        let ensemble = Ensemble::load(teachers, &compute).context("cannot load the teachers")?;
        for t in &ensemble.teachers {
            if t.random_weights {
                tracing::warn!(
                    teacher = %t.config.name,
                    weights = %t.config.weights,
                    "RANDOM teacher weights: embeddings are meaningless (for demos and tests only)"
                );
            }
            tracing::info!(
                teacher = %t.config.name,
                arch = %t.config.arch.label(),
                dim = t.dim(),
                logit_scale = t.logit_scale,
                weights = %t.weights_id,
                "teacher loaded"
            );
        }
        tracing::info!(
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            compute = %compute.describe(),
            "teachers ready"
        );
        Ok(Self {
            ensemble,
            compute,
            batch_size: section.batch_size.max(1),
            dtype: section.dtype,
        })
    }

    /// Shape and precision of the embedding columns.
    pub fn emb_layout(&self) -> EmbLayout {
        EmbLayout {
            dim: self.ensemble.dim(),
            dtype: self.dtype,
        }
    }

    /// The teachers as recorded in the shard metadata.
    pub fn teacher_infos(&self) -> Vec<TeacherInfo> {
        self.ensemble
            .teachers
            .iter()
            .map(|t| TeacherInfo {
                name: t.config.name.clone(),
                architecture: t.config.arch.label(),
                dim: t.dim(),
                logit_scale: t.logit_scale,
                weights_sha256: t.weights_id.clone(),
            })
            .collect()
    }

    /// [`EmbedStage::embed_views`] over groups of views (one group per sample) in one run of
    /// batches, returned in the same groups.
    pub fn embed_view_groups(&self, groups: &[&[RgbImage]]) -> Result<Vec<Vec<Vec<f32>>>> {
        let flat: Vec<&RgbImage> = groups.iter().flat_map(|g| g.iter()).collect();
        let embs = self.embed_views(&flat)?;
        Ok(regroup(embs, groups.iter().map(|g| g.len())))
    }

    /// [`EmbedStage::embed_texts`] over groups of texts (one group per sample) in one run of
    /// batches, returned in the same groups.
    pub fn embed_text_groups(&self, groups: &[Vec<&str>]) -> Result<Vec<Vec<Vec<f32>>>> {
        let flat: Vec<&str> = groups.iter().flatten().copied().collect();
        let embs = self.embed_texts(&flat)?;
        Ok(regroup(embs, groups.iter().map(Vec::len)))
    }

    /// Concatenated image embeddings of augmented views (any square size; each teacher
    /// resizes to its own input size if it differs, then normalises with its mean and std).
    pub fn embed_views(&self, views: &[&RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(views.len());
        for chunk in views.chunks(self.batch_size) {
            let rows = self
                .ensemble
                .embed_images(chunk.len(), |t| self.view_batch(t, chunk))?;
            out.extend(rows);
        }
        Ok(out)
    }

    fn view_batch(&self, t: &Teacher, views: &[&RgbImage]) -> dfndr_teachers::Result<Tensor> {
        let size = t.image_size();
        let p = &t.config.preprocess;
        let data: Vec<f32> = views
            .par_iter()
            .flat_map_iter(|v| {
                if v.width as usize == size && v.height as usize == size {
                    normalize_chw(v, p.mean, p.std)
                } else {
                    preprocess_image(v, p, size)
                }
            })
            .collect();
        Ok(Tensor::from_vec(
            data,
            (views.len(), 3, size, size),
            &self.compute.device,
        )?)
    }

    /// Concatenated text embeddings, one row per text.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch_size) {
            out.extend(self.ensemble.embed_texts(chunk)?);
        }
        Ok(out)
    }
}

/// Splits `flat` into consecutive groups of the given sizes.
fn regroup<T>(flat: Vec<T>, sizes: impl Iterator<Item = usize>) -> Vec<Vec<T>> {
    let mut rest = flat.into_iter();
    sizes.map(|n| rest.by_ref().take(n).collect()).collect()
}

/// Checks that a `[[teachers]]` list is usable before any shard is touched.
pub fn validate_teachers(teachers: &[TeacherConfig]) -> Result<()> {
    let mut names = std::collections::BTreeSet::new();
    for t in teachers {
        if t.name.is_empty() || !names.insert(t.name.as_str()) {
            bail!(
                "teacher names must be non-empty and unique (got {:?})",
                t.name
            );
        }
        t.arch
            .resolve()
            .with_context(|| format!("teacher {}", t.name))?;
        dfndr_teachers::WeightsRef::parse(&t.weights)
            .with_context(|| format!("teacher {}", t.name))?;
        if let Some(s) = t.logit_scale {
            if !(s.is_finite() && s > 0.0) {
                bail!("teacher {}: logit_scale must be a positive number", t.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfndr_augment::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
    use std::io::Read;
    use std::path::PathBuf;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn member(shard: &str, name: &str) -> Vec<u8> {
        let file = std::fs::File::open(root().join("assets/demo").join(shard)).unwrap();
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().to_string_lossy() == name {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                return bytes;
            }
        }
        panic!("{name} not in {shard}");
    }

    /// OpenCLIP's eval transform (resize shortest side, centre crop, to tensor, normalise) on
    /// real demo JPEGs (RGB and greyscale, square, portrait, landscape), goldens from
    /// tests/fixtures/teacher_goldens.py.
    #[test]
    fn teacher_preprocessing_matches_openclip() {
        let dir = root().join("tests/fixtures/teachers");
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("preprocess.json")).unwrap())
                .unwrap();
        let golden = candle_core::safetensors::load(
            dir.join("preprocess.io.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let images = spec["images"].as_array().unwrap();
        let settings = spec["settings"].as_array().unwrap();
        assert!(images.len() >= 6 && settings.len() == 2);
        for setting in settings {
            let key = setting["key"].as_str().unwrap();
            let size = setting["size"].as_u64().unwrap() as usize;
            let three = |v: &serde_json::Value| {
                let v: Vec<f32> = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                [v[0], v[1], v[2]]
            };
            let p = Preprocess {
                image_size: Some(size),
                interpolation: match setting["interpolation"].as_str().unwrap() {
                    "bicubic" => dfndr_teachers::Resample::Bicubic,
                    _ => dfndr_teachers::Resample::Bilinear,
                },
                mean: three(&setting["mean"]),
                std: three(&setting["std"]),
            };
            for image in images {
                let i = image["index"].as_u64().unwrap();
                let bytes = member(
                    image["shard"].as_str().unwrap(),
                    image["member"].as_str().unwrap(),
                );
                let img = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
                let ours = preprocess_image(&img, &p, size);
                let want = golden[&format!("{key}.{i}")]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(ours.len(), want.len());
                let max = ours
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(max <= 1e-6, "{key} image {i}: max |diff| {max:e}");
            }
        }
    }
}
