//! A student as OpenCLIP loads it: the state dict with OpenCLIP's key names, as safetensors
//! (`open_clip_model.safetensors`) or as `torch.save({"state_dict": ...})`
//! (`open_clip_pytorch_model.bin`), and `open_clip_config.json` (`model_cfg` and
//! `preprocess_cfg`) beside it. The folder loads with
//! `open_clip.create_model_and_transforms('local-dir:FOLDER')`, and the weights file alone
//! with `open_clip.create_model('MobileCLIP2-S0', pretrained=FILE)`.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use dfndr_teachers::Resample;
use serde_json::{json, Value};

use crate::error::{Result, TrainError};
use crate::student::{Student, StudentConfig, VisionTower};

/// The weights file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// `open_clip_model.safetensors`.
    Safetensors,
    /// `open_clip_pytorch_model.bin`: a torch.save zip holding `{"state_dict": ...}`, as
    /// OpenCLIP's training checkpoints and Apple's `.pt` releases.
    Torch,
}

impl ExportFormat {
    /// The weights file's name.
    pub fn file_name(self) -> &'static str {
        match self {
            ExportFormat::Safetensors => "open_clip_model.safetensors",
            ExportFormat::Torch => "open_clip_pytorch_model.bin",
        }
    }
}

/// What [`export_student`] wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The weights.
    pub weights: PathBuf,
    /// `open_clip_config.json`, unless the student has no timm architecture name (OpenCLIP
    /// builds FastViT image towers by that name only).
    pub config: Option<PathBuf>,
}

/// OpenCLIP's model config of a student (as `model_configs/MobileCLIP2-S0.json`), when its
/// image tower is a named timm architecture.
pub fn open_clip_model_cfg(config: &StudentConfig) -> Option<Value> {
    let arch = config.vision.arch.as_ref()?;
    let (pool, drop_path) = match config.vision_tower().ok()? {
        VisionTower::FastVit(_) => ("avg", 0.0),
        VisionTower::Vit(v) => ("token", v.drop_path_rate),
    };
    let t = &config.text;
    let mut text = json!({
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "no_causal_mask": t.no_causal_mask,
    });
    if (t.mlp_ratio - 4.0).abs() > f64::EPSILON {
        text["mlp_ratio"] = json!(t.mlp_ratio);
    }
    Some(json!({
        "embed_dim": config.embed_dim,
        "vision_cfg": {
            "timm_model_name": arch,
            "timm_model_pretrained": false,
            "timm_pool": pool,
            "timm_proj": null,
            "timm_drop": 0.0,
            "timm_drop_path": drop_path,
            "image_size": config.vision.image_size,
        },
        "text_cfg": text,
        "custom_text": true,
    }))
}

/// `open_clip_config.json` of a student: `model_cfg` and the evaluation `preprocess_cfg`.
pub fn open_clip_config(config: &StudentConfig) -> Option<Value> {
    let p = &config.preprocess;
    Some(json!({
        "model_cfg": open_clip_model_cfg(config)?,
        "preprocess_cfg": {
            "mean": p.mean,
            "std": p.std,
            "interpolation": match p.interpolation {
                Resample::Bicubic => "bicubic",
                Resample::Bilinear => "bilinear",
            },
            "resize_mode": "shortest",
        },
    }))
}

/// Writes `student` into the folder `dir` (created if needed) in `format`, files written
/// under temporary names and renamed into place.
pub fn export_student(student: &Student, dir: &Path, format: ExportFormat) -> Result<Exported> {
    let io = |p: &Path, e: std::io::Error| TrainError::Io(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = student.state_dict()?.into_iter().collect();
    let weights = dir.join(format.file_name());
    match format {
        ExportFormat::Safetensors => {
            let tmp = dir.join(format!(".{}.tmp", format.file_name()));
            let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
            candle_core::safetensors::save(&map, &tmp)?;
            std::fs::rename(&tmp, &weights).map_err(|e| io(&weights, e))?;
        }
        ExportFormat::Torch => {
            dfndr_teachers::weights::save_torch(&weights, &tensors, Some("state_dict"))
                .map_err(|e| TrainError::Io(e.to_string()))?;
        }
    }
    let config = match open_clip_config(student.config()) {
        Some(cfg) => {
            let path = dir.join("open_clip_config.json");
            let tmp = dir.join(".open_clip_config.json.tmp");
            let text = serde_json::to_string_pretty(&cfg)
                .map_err(|e| TrainError::Internal(e.to_string()))?;
            std::fs::write(&tmp, text + "\n").map_err(|e| io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
            Some(path)
        }
        None => None,
    };
    Ok(Exported { weights, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s0_model_cfg_equals_openclips_mobileclip2_s0_json() {
        let cfg = crate::models::builtin_student("MobileCLIP2-S0").unwrap();
        // OpenCLIP 3.3.0's model_configs/MobileCLIP2-S0.json.
        let expected: Value = serde_json::from_str(
            r#"{"embed_dim": 512, "vision_cfg": {"timm_model_name": "fastvit_mci0",
            "timm_model_pretrained": false, "timm_pool": "avg", "timm_proj": null,
            "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": 256}, "text_cfg":
            {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
            "no_causal_mask": true}, "custom_text": true}"#,
        )
        .unwrap();
        assert_eq!(open_clip_model_cfg(&cfg).unwrap(), expected);
        let full = open_clip_config(&cfg).unwrap();
        assert_eq!(full["preprocess_cfg"]["interpolation"], "bilinear");
        assert_eq!(full["preprocess_cfg"]["mean"], json!([0.0, 0.0, 0.0]));
    }
}
