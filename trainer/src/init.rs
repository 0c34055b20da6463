//! Deterministic initial weights: every random parameter is drawn from a stream seeded by
//! the run's seed and the parameter's name, so a student built twice with one seed is the
//! same bit for bit (candle's own random initialisers are not seedable on the CPU), whatever
//! the order its layers are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarMap};

/// A [`VarMap`] whose new variables are initialised from `(seed, name)`, or zero-filled.
pub struct SeededVarMap {
    map: VarMap,
    /// `None`: zeros (weights that a checkpoint overwrites).
    seed: Option<u64>,
}

impl SeededVarMap {
    /// New variables go into `map`.
    pub fn new(map: VarMap, seed: u64) -> Self {
        Self {
            map,
            seed: Some(seed),
        }
    }

    /// New variables go into `map`, zero-filled: for weights about to be loaded, where
    /// drawing random values would only cost time (seconds for the large students).
    pub fn zeros(map: VarMap) -> Self {
        Self { map, seed: None }
    }
}

/// SplitMix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform value in (0, 1).
fn unit(state: &mut u64) -> f64 {
    ((next(state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// FNV-1a of a name.
fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn values(init: Init, n: usize, seed: u64, name: &str) -> Result<Vec<f32>> {
    let mut state = seed ^ hash(name);
    Ok(match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * unit(&mut state)) as f32)
            .collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                // Box-Muller, one value per pair of draws (simple, and order-independent).
                let (u1, u2) = (unit(&mut state), unit(&mut state));
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mean + stdev * z) as f32
            })
            .collect(),
        Init::Kaiming { .. } => {
            candle_core::bail!("{name}: Kaiming initialisation is not supported by the student")
        }
    })
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data =
            self.map.data().lock().map_err(|_| {
                candle_core::Error::Msg("the variable map's lock was poisoned".into())
            })?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "{name} was registered with shape {:?}, now asked for {:?}",
                    var.shape(),
                    s
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let t = match self.seed {
            Some(seed) => Tensor::from_vec(values(h, s.elem_count(), seed, name)?, s, dev)?,
            None => Tensor::zeros(s, DType::F32, dev)?,
        };
        let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a student's parameters are created with their shapes")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}
