//! Deterministic random tensors for `random:SEED` weights.
//!
//! Each tensor draws from its own stream keyed by (seed, key name), so a weight does not
//! change when another tensor is added to the architecture, and two runs (or two machines)
//! build bit-identical models.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::{FanInOut, NormalOrUniform};
use sha2::{Digest, Sha256};

/// SplitMix64: tiny, fast and statistically fine for initialisation.
struct SplitMix64(u64);

impl SplitMix64 {
    fn keyed(seed: u64, name: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(b"dfndr-random-weights-v1")
            .chain_update(seed.to_le_bytes())
            .chain_update(name.as_bytes())
            .finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self(u64::from_le_bytes(first))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal pairs (Box-Muller).
    fn normals(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = 1.0 - self.unit(); // (0, 1]: ln is finite
            let u2 = self.unit();
            let r = (-2.0 * u1.ln()).sqrt();
            let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
            out.push((mean + std * r * c) as f32);
            out.push((mean + std * r * s) as f32);
        }
        out.truncate(n);
        out
    }

    fn uniforms(&mut self, n: usize, lo: f64, up: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (up - lo) * self.unit()) as f32)
            .collect()
    }
}

/// A tensor of `shape` drawn as `init` asks, from the stream of (`seed`, `name`).
pub fn tensor(
    seed: u64,
    name: &str,
    shape: &Shape,
    init: candle_nn::Init,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = SplitMix64::keyed(seed, name);
    let values = match init {
        candle_nn::Init::Const(v) => return Tensor::full(v as f32, shape, device)?.to_dtype(dtype),
        candle_nn::Init::Randn { mean, stdev } => rng.normals(n, mean, stdev),
        candle_nn::Init::Uniform { lo, up } => rng.uniforms(n, lo, up),
        candle_nn::Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => rng.normals(n, 0.0, std),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    rng.uniforms(n, -bound, bound)
                }
            }
        }
    };
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_keyed_by_seed_and_name() {
        let s = Shape::from((3, 4));
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let get = |seed, name| {
            tensor(seed, name, &s, init, DType::F32, &Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .unwrap()
        };
        assert_eq!(get(1, "a"), get(1, "a"));
        assert_ne!(get(1, "a"), get(2, "a"));
        assert_ne!(get(1, "a"), get(1, "b"));
    }

    #[test]
    fn normals_have_the_requested_moments() {
        let mut rng = SplitMix64::keyed(7, "x");
        let v = rng.normals(100_000, 0.5, 2.0);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 0.5).abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.03, "std {}", var.sqrt());
    }
}
