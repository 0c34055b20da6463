//! Binds a state dict to an architecture through candle's `VarBuilder`, strictly: every key
//! the architecture asks for must exist with the right shape and nothing may be left over.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::checkpoint::StateDict;
use super::random;
use crate::blocks::VarBuilder;
use crate::device::Compute;
use crate::error::{KeyMismatch, Result, TeacherError};

/// What a model is built from.
#[derive(Debug)]
pub enum WeightSource {
    /// Tensors read from a checkpoint.
    Tensors(StateDict),
    /// Deterministic random weights from this seed.
    Random(u64),
}

/// What the constructor asked for, in order.
#[derive(Default)]
struct Log {
    requested: Vec<(String, Vec<usize>)>,
    missing: Vec<(String, Vec<usize>)>,
    wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

enum Mode {
    Tensors(HashMap<String, Tensor>),
    Random(u64),
    /// Only record names and shapes; return zero-strided placeholders (no allocation).
    Shapes,
}

struct Binder {
    mode: Mode,
    log: Arc<Mutex<Log>>,
}

impl Binder {
    fn placeholder(s: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
}

impl SimpleBackend for Binder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut log = self
            .log
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight log poisoned".into()))?;
        log.requested.push((name.to_string(), s.dims().to_vec()));
        match &self.mode {
            Mode::Shapes => Self::placeholder(&s, dtype, dev),
            Mode::Random(seed) => random::tensor(*seed, name, &s, h, dtype, dev),
            Mode::Tensors(map) => match map.get(name) {
                Some(t) if t.dims() == s.dims() => t.to_dtype(dtype)?.to_device(dev),
                Some(t) => {
                    log.wrong_shape
                        .push((name.to_string(), s.dims().to_vec(), t.dims().to_vec()));
                    Self::placeholder(&s, dtype, dev)
                }
                None => {
                    log.missing.push((name.to_string(), s.dims().to_vec()));
                    Self::placeholder(&s, dtype, dev)
                }
            },
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.mode {
            Mode::Tensors(map) => match map.get(name) {
                Some(t) => t.to_dtype(dtype)?.to_device(dev),
                None => candle_core::bail!("cannot find tensor {name}"),
            },
            _ => candle_core::bail!("tensor {name} has no known shape"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.mode {
            Mode::Tensors(map) => map.contains_key(name),
            Mode::Random(_) | Mode::Shapes => true,
        }
    }
}

/// Builds a model with `build` from `source`, on `compute`'s device in its precision (blocks
/// that stay float32 ask for it), and checks that the checkpoint matched exactly. `context`
/// names the architecture in error messages.
pub fn bind<M>(
    source: &WeightSource,
    compute: &Compute,
    context: &str,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let log = Arc::new(Mutex::new(Log::default()));
    let (mode, available) = match source {
        WeightSource::Random(seed) => (Mode::Random(*seed), Vec::new()),
        WeightSource::Tensors(state) => (Mode::Tensors(state.tensors.clone()), state.shapes()),
    };
    let binder = Binder {
        mode,
        log: Arc::clone(&log),
    };
    let vb = VarBuilder::from_backend(Box::new(binder), compute.dtype(), compute.device.clone());
    let built = build(vb);
    let log = std::mem::take(
        &mut *log
            .lock()
            .map_err(|_| TeacherError::Input("weight log poisoned".into()))?,
    );
    let requested: BTreeMap<&str, ()> = log
        .requested
        .iter()
        .map(|(k, _)| (k.as_str(), ()))
        .collect();
    let mismatch = KeyMismatch {
        context: match source {
            WeightSource::Tensors(state) => format!("{context} (from {})", state.path.display()),
            WeightSource::Random(_) => context.to_string(),
        },
        missing: log.missing,
        unexpected: available
            .into_iter()
            .filter(|(k, _)| !requested.contains_key(k.as_str()))
            .collect(),
        wrong_shape: log.wrong_shape,
    };
    // A mismatch explains a construction error better than the error itself.
    if !mismatch.is_empty() {
        return Err(mismatch.into());
    }
    Ok(built?)
}

/// The `(key, shape)` list an architecture asks for, in construction order, without
/// allocating any weights.
pub fn requested_shapes<M>(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let log = Arc::new(Mutex::new(Log::default()));
    let binder = Binder {
        mode: Mode::Shapes,
        log: Arc::clone(&log),
    };
    let vb = VarBuilder::from_backend(Box::new(binder), DType::F32, Device::Cpu);
    build(vb)?;
    let log = std::mem::take(
        &mut *log
            .lock()
            .map_err(|_| TeacherError::Input("weight log poisoned".into()))?,
    );
    Ok(log.requested)
}
