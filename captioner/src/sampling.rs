//! Next-token selection with the semantics of OpenCLIP's `CoCa.generate` (which uses Hugging
//! Face's logits processors and warpers): minimum length, repetition penalty, top-p / top-k
//! filtering, temperature after filtering, and a seeded draw.

use serde::{Deserialize, Serialize};

use crate::error::{CaptionError, Result};
use crate::rng::CaptionRng;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum past `top_p`
    /// (MobileCLIP2's choice), then sample.
    #[default]
    TopP,
    /// Keep the `top_k` most likely tokens (ties at the boundary kept), then sample.
    TopK,
    /// The most likely token (what OpenCLIP's `top_k` with `top_k = 1` amounts to).
    Greedy,
    /// OpenCLIP's beam search (`num_beams`, `num_beam_groups`): deterministic, so every caption
    /// of an image is the same, as when RayGen calls it once per caption.
    BeamSearch,
}

/// Decoding settings, with OpenCLIP `generate()`'s names and MobileCLIP2's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Token selection: `top_p` (default), `top_k` or `greedy`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Probability mass kept by `top_p` (MobileCLIP2: 0.9).
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Tokens kept by `top_k`.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Beams of `beam_search` (OpenCLIP: 6).
    #[serde(default = "default_num_beams")]
    pub num_beams: usize,
    /// Beam groups of `beam_search` (OpenCLIP: 3); `num_beams` must be a multiple.
    #[serde(default = "default_num_beam_groups")]
    pub num_beam_groups: usize,
    /// Tokens per caption including start- and end-of-text; end-of-text is forced in the last
    /// slot (OpenCLIP: 30).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// End-of-text is blocked while fewer than this many tokens (start-of-text included) exist
    /// (OpenCLIP: 5, so at least 4 content tokens).
    #[serde(default = "default_min_seq_len")]
    pub min_seq_len: usize,
    /// Softmax temperature, applied after filtering.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Hugging Face's repetition penalty over the tokens so far (1.0: none).
    #[serde(default = "default_repetition_penalty")]
    pub repetition_penalty: f64,
}

fn default_top_p() -> f64 {
    0.9
}
fn default_top_k() -> usize {
    1
}
fn default_num_beams() -> usize {
    6
}
fn default_num_beam_groups() -> usize {
    3
}
fn default_seq_len() -> usize {
    30
}
fn default_min_seq_len() -> usize {
    5
}
fn default_temperature() -> f64 {
    1.0
}
fn default_repetition_penalty() -> f64 {
    1.0
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            top_p: default_top_p(),
            top_k: default_top_k(),
            num_beams: default_num_beams(),
            num_beam_groups: default_num_beam_groups(),
            seq_len: default_seq_len(),
            min_seq_len: default_min_seq_len(),
            temperature: default_temperature(),
            repetition_penalty: default_repetition_penalty(),
        }
    }
}

impl GenerationConfig {
    /// Checks the settings, as OpenCLIP asserts `seq_len > min_seq_len`.
    pub fn validate(&self, context_length: usize) -> Result<()> {
        let bad = |m: String| Err(CaptionError::InvalidGeneration(m));
        if self.seq_len <= self.min_seq_len {
            return bad(format!(
                "seq_len {} must be greater than min_seq_len {}",
                self.seq_len, self.min_seq_len
            ));
        }
        if self.seq_len < 2 || self.seq_len > context_length + 1 {
            return bad(format!(
                "seq_len {} must be within 2..={} (the model's context plus the forced end-of-text)",
                self.seq_len,
                context_length + 1
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature {} must be positive", self.temperature));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty {} must be positive",
                self.repetition_penalty
            ));
        }
        if self.strategy == Strategy::TopP && !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if self.strategy == Strategy::TopK && self.top_k == 0 {
            return bad("top_k must be at least 1".into());
        }
        if self.strategy == Strategy::BeamSearch
            && (self.num_beams < 2
                || self.num_beam_groups == 0
                || !self.num_beams.is_multiple_of(self.num_beam_groups))
        {
            return bad(format!(
                "beam search needs num_beams >= 2 and a multiple of num_beam_groups (got {} and {})",
                self.num_beams, self.num_beam_groups
            ));
        }
        Ok(())
    }
}

/// `MinLengthLogitsProcessor` and `RepetitionPenaltyLogitsProcessor` in OpenCLIP's order, on
/// one row of logits; `prefix` is every token so far (start-of-text included).
pub fn process(logits: &mut [f32], prefix: &[u32], eos: u32, cfg: &GenerationConfig) {
    if prefix.len() < cfg.min_seq_len {
        if let Some(l) = logits.get_mut(eos as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if cfg.repetition_penalty != 1.0 {
        let penalty = cfg.repetition_penalty as f32;
        let mut seen: Vec<u32> = prefix.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// Marks the tokens Hugging Face's `TopPLogitsWarper(top_p)` keeps: sorted ascending, the
/// tokens whose cumulative probability is at most `1 - top_p` are removed, and the most likely
/// token always stays. Runs in linear time (a histogram over the probabilities' bit patterns
/// finds the cut; only the boundary bucket is sorted), because a full 49,408-entry sort per
/// row and step would cost more than the decoder.
pub fn top_p_keep(logits: &[f32], top_p: f64, keep: &mut [bool]) {
    top_p_keep_probs(&softmax(logits), argmax(logits), top_p, keep);
}

/// [`top_p_keep`] on probabilities already computed (`best`: the most likely token).
fn top_p_keep_probs(probs: &[f32], best: Option<usize>, top_p: f64, keep: &mut [bool]) {
    let cut = 1.0 - top_p;
    // Non-negative floats order like their bit patterns; 4096 buckets on the top bits.
    const SHIFT: u32 = 20;
    let bucket = |p: f32| (p.to_bits() >> SHIFT) as usize;
    let mut mass = vec![0f64; (u32::MAX >> SHIFT) as usize + 1];
    for &p in probs {
        mass[bucket(p)] += p as f64;
    }
    // Ascending: find the bucket where the cumulative mass first exceeds the cut.
    let mut below = 0f64;
    let mut boundary = mass.len();
    for (b, &m) in mass.iter().enumerate() {
        if below + m > cut {
            boundary = b;
            break;
        }
        below += m;
    }
    let mut inside: Vec<(f32, usize)> = Vec::new();
    for (i, (&p, k)) in probs.iter().zip(keep.iter_mut()).enumerate() {
        let b = bucket(p);
        *k = b > boundary;
        if b == boundary {
            inside.push((p, i));
        }
    }
    inside.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut cum = below;
    for &(p, i) in &inside {
        cum += p as f64;
        keep[i] = cum > cut;
    }
    // The most likely token is never removed.
    if let Some(best) = best {
        keep[best] = true;
    }
}

/// Marks the tokens `TopKLogitsWarper(top_k)` keeps: every token at least as likely as the
/// k-th most likely one.
pub fn top_k_keep(logits: &[f32], top_k: usize, keep: &mut [bool]) {
    let k = top_k.clamp(1, logits.len().max(1));
    let mut sorted: Vec<f32> = logits.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for (l, keep) in logits.iter().zip(keep.iter_mut()) {
        *keep = *l >= kth;
    }
}

/// First index of the largest value (NaN never wins).
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some(b) if x[b] >= v => {}
            _ => best = Some(i),
        }
    }
    best
}

/// `softmax(x)` in float32 with float64 accumulation (`-inf` entries get 0).
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let n = x.len().max(1) as f32;
        return vec![1.0 / n; x.len()];
    }
    let exps: Vec<f64> = x.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

/// Probabilities `softmax(filtered / temperature)` over the kept tokens (0 elsewhere).
pub fn kept_probs(logits: &[f32], keep: &[bool], temperature: f64) -> Vec<f64> {
    let t = temperature;
    let max = logits
        .iter()
        .zip(keep)
        .filter(|(_, &k)| k)
        .map(|(&l, _)| l as f64 / t)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = logits
        .iter()
        .zip(keep)
        .map(|(&l, &k)| if k { (l as f64 / t - max).exp() } else { 0.0 })
        .collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|v| *v /= sum);
    }
    p
}

/// Chooses the next token of one row from its processed logits.
pub fn choose(logits: &[f32], cfg: &GenerationConfig, rng: &mut CaptionRng) -> u32 {
    let mut keep = vec![true; logits.len()];
    let probs = match cfg.strategy {
        Strategy::Greedy | Strategy::BeamSearch => return argmax(logits).unwrap_or(0) as u32,
        Strategy::TopK => {
            top_k_keep(logits, cfg.top_k, &mut keep);
            kept_probs(logits, &keep, cfg.temperature)
        }
        Strategy::TopP if cfg.temperature == 1.0 => {
            // softmax over the kept tokens is the full softmax renormalised: one pass fewer.
            let full = softmax(logits);
            top_p_keep_probs(&full, argmax(logits), cfg.top_p, &mut keep);
            let kept: f64 = full
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(&p, _)| p as f64)
                .sum();
            full.iter()
                .zip(&keep)
                .map(|(&p, &k)| {
                    if k && kept > 0.0 {
                        p as f64 / kept
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        Strategy::TopP => {
            top_p_keep(logits, cfg.top_p, &mut keep);
            kept_probs(logits, &keep, cfg.temperature)
        }
    };
    let u = rng.unit_f64();
    let mut cum = 0.0;
    let mut last = None;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = Some(i);
            if u < cum {
                return i as u32;
            }
        }
    }
    // Rounding left the sum a hair below 1: the last possible token.
    last.or_else(|| argmax(logits)).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus_and_at_least_the_best_token() {
        // probs 0.5, 0.3, 0.15, 0.05
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut keep = vec![false; 4];
        top_p_keep(&logits, 0.9, &mut keep);
        assert_eq!(keep, [true, true, true, false]);
        top_p_keep(&logits, 0.5, &mut keep);
        assert_eq!(keep, [true, true, false, false]);
        top_p_keep(&logits, 0.01, &mut keep);
        assert_eq!(keep, [true, false, false, false]);
        top_p_keep(&logits, 1.0, &mut keep);
        assert_eq!(keep, [true; 4]);
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let mut keep = vec![false; 5];
        top_k_keep(&[1.0, 3.0, 2.0, 2.0, 0.0], 2, &mut keep);
        assert_eq!(keep, [false, true, true, true, false]);
    }

    #[test]
    fn min_length_blocks_eos_and_penalty_follows_hugging_face() {
        let cfg = GenerationConfig {
            repetition_penalty: 2.0,
            ..GenerationConfig::default()
        };
        let mut l = vec![1.0f32, -1.0, 4.0, 3.0];
        process(&mut l, &[0, 1, 0], 3, &cfg);
        assert_eq!(l, [0.5, -2.0, 4.0, f32::NEG_INFINITY]);
        let mut l = vec![1.0f32; 4];
        process(&mut l, &[2; 5], 3, &GenerationConfig::default());
        assert_eq!(l, [1.0; 4]);
    }

    #[test]
    fn sampling_follows_the_kept_distribution() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let cfg = GenerationConfig::default();
        let mut rng = CaptionRng::for_caption(3, "t", "k", 0);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[choose(&logits, &cfg, &mut rng) as usize] += 1;
        }
        // Kept: 0.5, 0.3, 0.15 renormalised by 0.95.
        assert_eq!(counts[3], 0);
        for (c, want) in counts.iter().zip([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]) {
            let got = *c as f64 / 20_000.0;
            assert!((got - want).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let mut cfg = GenerationConfig::default();
        cfg.validate(76).unwrap();
        cfg.seq_len = 5;
        assert!(cfg.validate(76).is_err());
        cfg.seq_len = 30;
        cfg.top_p = 0.0;
        assert!(cfg.validate(76).is_err());
        cfg.top_p = 0.9;
        cfg.strategy = Strategy::TopK;
        cfg.top_k = 0;
        assert!(cfg.validate(76).is_err());
    }
}
