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
    let cut = TopPCut::new(probs, best, top_p);
    for (i, (&p, k)) in probs.iter().zip(keep.iter_mut()).enumerate() {
        *k = cut.keeps(i, p);
    }
}

/// Zeroes the probabilities [`top_p_keep`] removes, in place.
fn top_p_filter(probs: &mut [f32], best: Option<usize>, top_p: f64) {
    let cut = TopPCut::new(probs, best, top_p);
    // Branch-free (it vectorises): everything above the boundary sub-bucket stays, the rest
    // is zeroed, then the kept tokens of the boundary sub-bucket and the best one come back.
    let restore: Vec<(usize, f32)> = cut
        .inside_kept
        .iter()
        .copied()
        .chain(best)
        .filter_map(|i| probs.get(i).map(|&p| (i, p)))
        .collect();
    let boundary = ((cut.bucket as u32) << 12) | cut.sub as u32;
    for p in probs.iter_mut() {
        *p = if (p.to_bits() >> SUB_BITS_SHIFT) > boundary {
            *p
        } else {
            0.0
        };
    }
    for (i, p) in restore {
        probs[i] = p;
    }
}

/// Where `TopPLogitsWarper` cuts a row, found without sorting the row: non-negative floats
/// order like their bit patterns, so a histogram of the probability mass over the top 12 bits
/// finds the bucket holding the cut, a second one over the next 12 bits the sub-bucket, and
/// only the few tokens of that sub-bucket are sorted (ascending probability, ties by
/// descending index, as a stable ascending sort of HF's descending order leaves them).
struct TopPCut {
    /// Tokens in higher buckets stay, in lower ones go.
    bucket: usize,
    sub: usize,
    /// Tokens of the boundary sub-bucket that stay.
    inside_kept: Vec<usize>,
    best: Option<usize>,
}

const TOP_BITS_SHIFT: u32 = 20;
const SUB_BITS_SHIFT: u32 = 8;

fn top_bucket(p: f32) -> usize {
    (p.to_bits() >> TOP_BITS_SHIFT) as usize
}

fn sub_bucket(p: f32) -> usize {
    ((p.to_bits() >> SUB_BITS_SHIFT) & 0xfff) as usize
}

/// The first bucket whose mass takes the cumulative sum (from `below`) past `cut`, and the
/// mass below it; `mass.len()` when none does.
fn first_past(mass: &[f64], below: f64, cut: f64) -> (usize, f64) {
    let mut below = below;
    for (b, &m) in mass.iter().enumerate() {
        if below + m > cut {
            return (b, below);
        }
        below += m;
    }
    (mass.len(), below)
}

impl TopPCut {
    fn new(probs: &[f32], best: Option<usize>, top_p: f64) -> TopPCut {
        let cut = 1.0 - top_p;
        let mut mass = vec![0f64; (u32::MAX >> TOP_BITS_SHIFT) as usize + 1];
        for &p in probs {
            mass[top_bucket(p)] += p as f64;
        }
        let (bucket, below) = first_past(&mass, 0.0, cut);
        let mut sub_mass = vec![0f64; 1 << 12];
        for &p in probs {
            if top_bucket(p) == bucket {
                sub_mass[sub_bucket(p)] += p as f64;
            }
        }
        let (sub, below) = first_past(&sub_mass, below, cut);
        let mut inside: Vec<(f32, usize)> = probs
            .iter()
            .enumerate()
            .filter(|(_, &p)| top_bucket(p) == bucket && sub_bucket(p) == sub)
            .map(|(i, &p)| (p, i))
            .collect();
        inside.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut cum = below;
        let mut inside_kept = Vec::new();
        for &(p, i) in &inside {
            cum += p as f64;
            if cum > cut {
                inside_kept.push(i);
            }
        }
        inside_kept.sort_unstable();
        TopPCut {
            bucket,
            sub,
            inside_kept,
            best,
        }
    }

    /// Whether token `i` of probability `p` stays.
    #[inline]
    fn keeps(&self, i: usize, p: f32) -> bool {
        let b = top_bucket(p);
        if b != self.bucket {
            return b > self.bucket || Some(i) == self.best;
        }
        let s = sub_bucket(p);
        if s != self.sub {
            return s > self.sub || Some(i) == self.best;
        }
        Some(i) == self.best || self.inside_kept.binary_search(&i).is_ok()
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

/// `e^x` for `x <= 0` to within about one unit in the last place of float64, in plain
/// arithmetic so the softmax loop vectorises (libm's `exp` is a call per value, and a
/// vocabulary of 49,408 logits per row and step made it a large part of decoding). Inputs
/// below -708 give 0 (their float32 probabilities underflow anyway).
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 * 2^52 rounds to an integer kept in the low mantissa bits.
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    let xc = x.max(-708.0);
    let shifted = xc * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series to r^12 / 12!: |r| <= ln2 / 2 leaves a relative error below 2e-16.
    let mut p = 1.0 / 479_001_600.0;
    for d in [
        39_916_800.0,
        3_628_800.0,
        362_880.0,
        40_320.0,
        5_040.0,
        720.0,
        120.0,
        24.0,
        6.0,
        2.0,
        1.0,
        1.0,
    ] {
        p = p * r + 1.0 / d;
    }
    let bits = (shifted.to_bits().wrapping_sub(SHIFTER.to_bits()) as i64 + 1023) << 52;
    let scaled = p * f64::from_bits(bits as u64);
    if x < -708.0 {
        0.0
    } else {
        scaled
    }
}

/// `out = softmax(x)` given `max(x)`, with `exps` as scratch: exponentials and their sum in
/// float64, the quotients rounded to float32.
fn softmax_into(x: &[f32], max: f32, exps: &mut [f64], out: &mut [f32]) {
    dfndr_teachers::simd_dispatch!(softmax_into_generic(x, max, exps, out))
}

#[inline(always)]
fn softmax_into_generic(x: &[f32], max: f32, exps: &mut [f64], out: &mut [f32]) {
    let mut acc = [0f64; 8];
    for (chunk_e, chunk_x) in exps.chunks_mut(8).zip(x.chunks(8)) {
        for ((e, &v), a) in chunk_e.iter_mut().zip(chunk_x).zip(acc.iter_mut()) {
            *e = exp_nonpositive((v - max) as f64);
            *a += *e;
        }
    }
    let sum: f64 = acc.iter().sum();
    for (o, &e) in out.iter_mut().zip(exps.iter()) {
        *o = (e / sum) as f32;
    }
}

/// `softmax(x)` in float32 with float64 accumulation (`-inf` entries get 0).
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let n = x.len().max(1) as f32;
        return vec![1.0 / n; x.len()];
    }
    let mut exps = vec![0f64; x.len()];
    let mut out = vec![0f32; x.len()];
    softmax_into(x, max, &mut exps, &mut out);
    out
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
    let keep = || vec![true; logits.len()];
    match cfg.strategy {
        Strategy::Greedy | Strategy::BeamSearch => argmax(logits).unwrap_or(0) as u32,
        Strategy::TopK => {
            let mut keep = keep();
            top_k_keep(logits, cfg.top_k, &mut keep);
            let probs = kept_probs(logits, &keep, cfg.temperature);
            sample(probs.iter().copied(), logits, rng)
        }
        Strategy::TopP if cfg.temperature == 1.0 => {
            // softmax over the kept tokens is the full softmax renormalised: one pass fewer,
            // and no renormalisation: the kept mass scales the uniform draw instead.
            let mut full = softmax(logits);
            top_p_filter(&mut full, argmax(logits), cfg.top_p);
            sample_unnormalised(&full, logits, rng)
        }
        Strategy::TopP => {
            let mut keep = keep();
            top_p_keep(logits, cfg.top_p, &mut keep);
            let probs = kept_probs(logits, &keep, cfg.temperature);
            sample(probs.iter().copied(), logits, rng)
        }
    }
}

/// Tokens per block of [`sample_unnormalised`]'s scan.
const BLOCK: usize = 256;

/// Inverse-CDF sampling of one token from non-negative weights in token order (zero weight:
/// never chosen). A large vocabulary is scanned a block at a time: whole blocks are skipped on
/// their sums (vectorised), and only the block holding the draw is walked token by token.
fn sample_unnormalised(weights: &[f32], logits: &[f32], rng: &mut CaptionRng) -> u32 {
    let block_sums: Vec<f64> = weights.chunks(BLOCK).map(sum_f64).collect();
    let total: f64 = block_sums.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return argmax(logits).unwrap_or(0) as u32;
    }
    let target = rng.unit_f64() * total;
    let mut cum = 0.0;
    let mut last = None;
    for (b, (block, &sum)) in weights.chunks(BLOCK).zip(&block_sums).enumerate() {
        if sum <= 0.0 {
            continue;
        }
        if cum + sum <= target {
            cum += sum;
            last = block.iter().rposition(|&w| w > 0.0).map(|i| b * BLOCK + i);
            continue;
        }
        for (i, &w) in block.iter().enumerate() {
            if w > 0.0 {
                cum += w as f64;
                last = Some(b * BLOCK + i);
                if target < cum {
                    return (b * BLOCK + i) as u32;
                }
            }
        }
    }
    // Rounding left the walked sum a hair below the total: the last possible token.
    last.or_else(|| argmax(logits)).unwrap_or(0) as u32
}

/// Sum in float64 with eight independent accumulators (vectorises; the order differs from a
/// sequential sum by a few units in the last place at most).
fn sum_f64(values: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>()
}

/// Inverse-CDF sampling of one token from probabilities in token order.
fn sample(probs: impl Iterator<Item = f64>, logits: &[f32], rng: &mut CaptionRng) -> u32 {
    let u = rng.unit_f64();
    let mut cum = 0.0;
    let mut last = None;
    for (i, p) in probs.enumerate() {
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
    fn exp_nonpositive_is_within_two_ulp_of_libm() {
        let mut x = -750.0f64;
        let mut worst = 0f64;
        while x <= 0.0 {
            let want = x.exp();
            let got = exp_nonpositive(x);
            if want > 1e-300 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert!(got <= 1e-300, "{x}: {got}");
            }
            x += 0.000_917;
        }
        assert!(worst < 4.5e-16, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn blocked_sampling_follows_the_weights() {
        // Weights over 1,000 tokens with two heavy ones; draws land in proportion.
        let mut w = vec![0f32; 1000];
        w[3] = 1.0;
        w[700] = 3.0;
        w[999] = 1e-9;
        let logits = vec![0f32; 1000];
        let mut counts = std::collections::HashMap::new();
        for i in 0..4000 {
            let mut rng = CaptionRng::for_caption(7, "t", "k", i);
            *counts
                .entry(sample_unnormalised(&w, &logits, &mut rng))
                .or_insert(0) += 1;
        }
        let (a, b) = (counts[&3], counts[&700]);
        assert!(
            counts.keys().all(|k| [3, 700, 999].contains(k)),
            "{counts:?}"
        );
        assert!(
            (2700..3300).contains(&b) && (700..1300).contains(&a),
            "{counts:?}"
        );
        assert_eq!(
            sample_unnormalised(
                &[0.0; 8],
                &[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                &mut CaptionRng::for_caption(1, "t", "k", 0)
            ),
            1
        );
    }

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
