//! Structural reparameterisation (timm's `reparameterize_model`): the branches of MobileOne
//! blocks, large-kernel convolutions, RepMixers and conditional positional encodings, each
//! folded with its BatchNorms into one biased convolution (`PREFIX.reparam_conv`) that gives
//! the same output in evaluation mode. The fused form only evaluates: batch statistics make
//! the folding invalid in training.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor};

/// The changes reparameterisation makes to a state dict: keys under the removed prefixes go,
/// the fused kernels come in.
#[derive(Debug, Default)]
pub struct Fused {
    /// Key prefixes (with their trailing dot) whose tensors the fused form drops.
    removed: Vec<String>,
    /// Fused tensors by key.
    added: BTreeMap<String, Tensor>,
}

impl Fused {
    /// Replaces the sub-modules `branches` of the module at `prefix` by one convolution
    /// `PREFIX.name` with `weight` and `bias`.
    pub fn replace(
        &mut self,
        prefix: &str,
        branches: &[&str],
        name: &str,
        weight: Tensor,
        bias: Tensor,
    ) {
        for branch in branches {
            self.removed.push(format!("{prefix}.{branch}."));
        }
        self.added.insert(format!("{prefix}.{name}.weight"), weight);
        self.added.insert(format!("{prefix}.{name}.bias"), bias);
    }

    /// `state` with the changes applied.
    pub fn apply(self, state: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
        let mut out: BTreeMap<String, Tensor> = state
            .into_iter()
            .filter(|(k, _)| !self.removed.iter().any(|p| k.starts_with(p.as_str())))
            .collect();
        out.extend(self.added);
        out
    }
}

/// The kernel of the identity map as a convolution `[channels, in_per_group, k, k]`: output
/// channel i reads input i (i mod in_per_group within its group) at the centre tap.
pub fn identity_kernel(
    channels: usize,
    in_per_group: usize,
    k: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut v = vec![0f32; channels * in_per_group * k * k];
    let centre = (k / 2) * k + k / 2;
    for i in 0..channels {
        v[(i * in_per_group + i % in_per_group) * k * k + centre] = 1.0;
    }
    Tensor::from_vec(v, (channels, in_per_group, k, k), device)
}

/// `w [O, I, k, k]` zero-padded on every side to `[O, I, size, size]` (centred).
pub fn pad_kernel(w: &Tensor, size: usize) -> Result<Tensor> {
    let k = w.dim(3)?;
    if k > size || !(size - k).is_multiple_of(2) {
        candle_core::bail!("cannot centre a {k}x{k} kernel in {size}x{size}");
    }
    let p = (size - k) / 2;
    if p == 0 {
        return Ok(w.clone());
    }
    w.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_kernel_is_one_hot_at_the_centre() {
        let dev = Device::Cpu;
        let dw = identity_kernel(3, 1, 3, &dev).unwrap();
        let v: Vec<f32> = dw.flatten_all().unwrap().to_vec1().unwrap();
        for c in 0..3 {
            for t in 0..9 {
                assert_eq!(v[c * 9 + t], if t == 4 { 1.0 } else { 0.0 });
            }
        }
        let dense = identity_kernel(2, 2, 1, &dev).unwrap();
        let v: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![1.0, 0.0, 0.0, 1.0]);
        let padded = pad_kernel(
            &Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap(),
            7,
        )
        .unwrap();
        let v: Vec<f32> = padded.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v.iter().sum::<f32>(), 9.0);
        assert_eq!(v[2 * 7 + 2], 1.0);
        assert_eq!(v[7 + 1], 0.0);
        assert!(pad_kernel(&padded, 3).is_err());
    }
}
