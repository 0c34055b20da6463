//! Seeded randomness for caption sampling.
//!
//! Every caption gets its own generator, derived from (job seed, sample key, caption index)
//! alone, so a caption never depends on which worker, batch or thread produced it and a rerun
//! reproduces it. sha256 seeding and xoshiro256** are fixed here rather than borrowed from a
//! crate whose stream could change between versions. (torch's `multinomial` stream cannot be
//! reproduced outside torch, so captions match OpenCLIP in distribution, not draw for draw.)

use sha2::{Digest, Sha256};

/// Domain separation from the augmentation streams; changing the derivation changes this.
const SEED_TAG: &[u8] = b"dfndr-caption-v1";

/// xoshiro256** seeded from a sha256 digest.
#[derive(Debug, Clone)]
pub struct CaptionRng {
    s: [u64; 4],
}

impl CaptionRng {
    /// The generator of caption `index` of sample `key` in a job with seed `seed`; `tag`
    /// (the captioner's tag) keeps the streams of several captioners apart.
    pub fn for_caption(seed: u64, tag: &str, key: &str, index: u32) -> CaptionRng {
        let mut h = Sha256::new();
        h.update(SEED_TAG);
        h.update(seed.to_le_bytes());
        for part in [tag, key] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(index.to_le_bytes());
        let digest = h.finalize();
        let mut s = [0u64; 4];
        for (i, word) in s.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&digest[i * 8..i * 8 + 8]);
            *word = u64::from_le_bytes(b);
        }
        // The all-zero state is xoshiro's one fixed point.
        if s == [0; 4] {
            s[0] = 0x9e37_79b9_7f4a_7c15;
        }
        CaptionRng { s }
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

    /// A uniform double in `[0, 1)` (53 random bits).
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_every_part_of_the_key_and_nothing_else() {
        let a = CaptionRng::for_caption(7, "coco", "000001", 0).next_u64();
        assert_eq!(
            a,
            CaptionRng::for_caption(7, "coco", "000001", 0).next_u64()
        );
        for other in [
            CaptionRng::for_caption(8, "coco", "000001", 0),
            CaptionRng::for_caption(7, "coc", "o000001", 0),
            CaptionRng::for_caption(7, "coco", "000002", 0),
            CaptionRng::for_caption(7, "coco", "000001", 1),
        ] {
            assert_ne!(a, other.clone().next_u64());
        }
        let mut r = CaptionRng::for_caption(1, "", "k", 0);
        let mean = (0..20_000).map(|_| r.unit_f64()).sum::<f64>() / 20_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
