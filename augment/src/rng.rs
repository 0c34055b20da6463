//! Seeded randomness for augmentation sampling.
//!
//! Every augmentation view gets its own generator, derived from (job seed, sample key, view
//! index) alone, so the parameters of a sample never depend on which worker, thread or batch
//! drew them, and re-running a shard reproduces it exactly. The algorithm is fixed and
//! documented here (sha256 seeding, xoshiro256**) rather than borrowed from a crate whose
//! stream could change between versions.

use sha2::{Digest, Sha256};

/// Domain separation: changing the derivation must change this tag.
const SEED_TAG: &[u8] = b"dfndr-augment-v1";

/// xoshiro256** seeded from a sha256 digest.
#[derive(Debug, Clone)]
pub struct AugRng {
    s: [u64; 4],
}

impl AugRng {
    /// The generator of view `index` of sample `key` in a job with seed `seed`.
    pub fn for_view(seed: u64, key: &str, index: u32) -> AugRng {
        let mut h = Sha256::new();
        h.update(SEED_TAG);
        h.update(seed.to_le_bytes());
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(index.to_le_bytes());
        let digest = h.finalize();
        let mut s = [0u64; 4];
        for (i, word) in s.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&digest[i * 8..i * 8 + 8]);
            *word = u64::from_le_bytes(b);
        }
        // The all-zero state is the one fixed point of xoshiro; a digest never realistically
        // produces it, but the generator must not be able to get stuck.
        if s == [0; 4] {
            s[0] = 0x9e37_79b9_7f4a_7c15;
        }
        AugRng { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A float32 uniform in `[lo, hi)`, computed as torch's `uniform_` does on CPU for
    /// float32 (24 random bits scaled into the interval).
    pub fn uniform_f32(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
        let v = u * (hi - lo) + lo;
        // Rounding can land exactly on `hi`; the interval is half-open.
        if v >= hi && hi > lo {
            lo.max(f32::from_bits(hi.to_bits() - 1))
        } else {
            v
        }
    }

    /// An integer uniform in `[0, n)` without modulo bias; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        // Lemire's multiply-shift with rejection of the biased zone.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// An integer uniform in `[lo, hi)` (torch's `randint(lo, hi)`); `lo` when empty.
    pub fn int_range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo) as u64) as i64
    }

    /// True with probability `p` (compared like torch's `rand(1) < p`).
    pub fn chance(&mut self, p: f32) -> bool {
        self.uniform_f32(0.0, 1.0) < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_view_same_stream_different_views_differ() {
        let mut a = AugRng::for_view(7, "000000001", 0);
        let mut b = AugRng::for_view(7, "000000001", 0);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut c = AugRng::for_view(7, "000000001", 1);
        let mut d = AugRng::for_view(8, "000000001", 0);
        let mut e = AugRng::for_view(7, "000000002", 0);
        assert_ne!(c.next_u64(), xs[0]);
        assert_ne!(d.next_u64(), xs[0]);
        assert_ne!(e.next_u64(), xs[0]);
    }

    #[test]
    fn stream_is_pinned() {
        // The derivation is part of the format's reproducibility promise: a change here
        // changes every sampled augmentation of every future job. The value was checked
        // against an independent Python implementation of the same derivation.
        let mut r = AugRng::for_view(0, "k", 0);
        let first = r.next_u64();
        let mut again = AugRng::for_view(0, "k", 0);
        assert_eq!(first, again.next_u64());
        assert_eq!(first, PINNED_FIRST);
    }
    const PINNED_FIRST: u64 = 14_804_556_311_963_909_922;

    #[test]
    fn ranges_are_respected_and_unbiased_enough() {
        let mut r = AugRng::for_view(1, "x", 0);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            let v = r.int_range(0, 6);
            assert!((0..6).contains(&v));
            counts[v as usize] += 1;
        }
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
        for _ in 0..10_000 {
            let f = r.uniform_f32(0.08, 1.0);
            assert!((0.08..1.0).contains(&f));
        }
        assert_eq!(r.int_range(5, 5), 5);
        assert_eq!(r.below(0), 0);
    }
}
