//! Training checkpoints: everything a run needs to continue bit for bit.
//!
//! A checkpoint is a folder `ckpt-SSSSSSSS` (the step, zero padded) holding
//! - `model.safetensors`: the student's state dict with OpenCLIP's key names (loads in
//!   OpenCLIP as `MobileCLIP2-S0` weights),
//! - `optimizer.safetensors`: AdamW's moments, `exp_avg.KEY` and `exp_avg_sq.KEY`, flat,
//! - `state.json`: the step counts and the caller's resumable state (RNG, data position).
//!
//! It is written under a temporary name and renamed into place, so a run killed while
//! writing leaves either the previous checkpoints or the new one complete, never a torn one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{AdamW, ParamState};
use crate::student::Student;

/// File of the model weights inside a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// File of the optimiser moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File of the counters and the caller's state.
pub const STATE_FILE: &str = "state.json";
const PREFIX: &str = "ckpt-";

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimisation steps completed.
    pub step: u64,
    /// AdamW's step counter (bias correction).
    pub optimizer_steps: u64,
    /// What the caller needs to resume (RNG states, data position, metrics), opaque here.
    pub resume: serde_json::Value,
}

/// Writes a checkpoint of `student` and `optimizer` after `step` steps into `dir`, then
/// removes all but the newest `keep` checkpoints. Returns the checkpoint's folder.
pub fn save(
    dir: &Path,
    step: u64,
    student: &Student,
    optimizer: &AdamW,
    resume: serde_json::Value,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = dir.join(format!("{PREFIX}{step:08}"));
    let tmp = dir.join(format!(".{PREFIX}{step:08}.tmp"));
    let io = |what: &str, e: std::io::Error| TrainError::Io(format!("{what}: {e}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp.display().to_string(), e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp.display().to_string(), e))?;
    let model: HashMap<String, Tensor> = student.state_dict()?.into_iter().collect();
    candle_core::safetensors::save(&model, tmp.join(MODEL_FILE))?;
    let mut moments = HashMap::new();
    for st in optimizer.state() {
        let n = st.exp_avg.len();
        moments.insert(
            format!("exp_avg.{}", st.name),
            Tensor::from_slice(&st.exp_avg, n, &Device::Cpu)?,
        );
        moments.insert(
            format!("exp_avg_sq.{}", st.name),
            Tensor::from_slice(&st.exp_avg_sq, n, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&moments, tmp.join(OPTIMIZER_FILE))?;
    let state = CheckpointState {
        step,
        optimizer_steps: optimizer.steps(),
        resume,
    };
    let json = serde_json::to_vec_pretty(&state)
        .map_err(|e| TrainError::Internal(format!("checkpoint state: {e}")))?;
    std::fs::write(tmp.join(STATE_FILE), json).map_err(|e| io("state.json", e))?;
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir.display().to_string(), e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir.display().to_string(), e))?;
    sync_dir(dir);
    let all = list(dir)?;
    for (_, old) in all.iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(old).map_err(|e| io(&old.display().to_string(), e))?;
    }
    Ok(final_dir)
}

/// Flushes a folder's entries (file creation and renames) to disk where the platform allows.
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::Io(format!("{}: {e}", dir.display()))),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Restores `student` and `optimizer` from the checkpoint folder `path` and returns its
/// state.
pub fn load(path: &Path, student: &Student, optimizer: &mut AdamW) -> Result<CheckpointState> {
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let p = path.join(file);
        candle_core::safetensors::load(&p, &Device::Cpu)
            .map_err(|e| TrainError::Weights(format!("{}: {e}", p.display())))
    };
    student.load(&read(MODEL_FILE)?, true)?;
    let moments = read(OPTIMIZER_FILE)?;
    let state_path = path.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", state_path.display())))?;
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Weights(format!("{}: {e}", state_path.display())))?;
    let mut restored = Vec::with_capacity(optimizer.state().len());
    for st in optimizer.state() {
        let get = |k: String| -> Result<Vec<f32>> {
            match moments.get(&k) {
                Some(t) => Ok(t.flatten_all()?.to_vec1()?),
                None => Err(TrainError::Weights(format!(
                    "{}: no {k}",
                    path.join(OPTIMIZER_FILE).display()
                ))),
            }
        };
        restored.push(ParamState {
            name: st.name.clone(),
            exp_avg: get(format!("exp_avg.{}", st.name))?,
            exp_avg_sq: get(format!("exp_avg_sq.{}", st.name))?,
        });
    }
    optimizer.restore(restored, state.optimizer_steps)?;
    Ok(state)
}
