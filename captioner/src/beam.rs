//! Beam search with the semantics of OpenCLIP's `CoCa._generate_beamsearch` (Hugging Face's
//! `BeamSearchScorer`, length penalty 1, no early stopping, one hypothesis kept).
//!
//! OpenCLIP scores beams with sums of *raw* logits (after the minimum-length and repetition
//! processors, without log-softmax) and splits its 6 beams into 3 groups of 2 with no
//! diversity penalty between them. Groups with equal inputs and no penalty evolve identically,
//! so every group holds the same hypotheses and the result is that of one group: dfndr runs one
//! group of `num_beams / num_beam_groups` beams per image (a third of the work, same output).
//! Token 0 does not end a beam here (only end-of-text does), and end-of-text is not forced at
//! the last position.

use crate::decode::DecodeSession;
use crate::error::{CaptionError, Result};
use crate::generate::{host_rows, SpecialTokens};
use crate::model::{CocaModel, ImageContext};
use crate::sampling::{process, GenerationConfig};

/// Finished hypotheses of one image (`BeamHypotheses`).
struct Hypotheses {
    capacity: usize,
    beams: Vec<(f64, Vec<u32>)>,
    worst: f64,
}

impl Hypotheses {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            beams: Vec::new(),
            worst: 1e9,
        }
    }

    /// Adds `tokens` with its summed score, normalised by `generated_len`.
    fn add(&mut self, tokens: Vec<u32>, sum: f32, generated_len: usize) {
        let score = sum as f64 / generated_len as f64;
        if self.beams.len() < self.capacity || score > self.worst {
            self.beams.push((score, tokens));
            if self.beams.len() > self.capacity {
                // Python's sorted() over (score, index): the lowest score, first index on ties.
                let mut order: Vec<(f64, usize)> = self
                    .beams
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.0, i))
                    .collect();
                order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                self.beams.remove(order[0].1);
                self.worst = order[1].0;
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    /// Whether no running beam can beat the worst kept hypothesis (the `early_stopping=False`
    /// heuristic).
    fn is_done(&self, best_sum: f32, cur_len: usize) -> bool {
        self.beams.len() >= self.capacity && self.worst >= best_sum as f64 / cur_len as f64
    }

    /// The best hypothesis; among equal scores the one added last (Python's stable sort, then
    /// `pop()`).
    fn best(&self) -> Option<&[u32]> {
        let mut best: Option<&(f64, Vec<u32>)> = None;
        for b in &self.beams {
            if best.is_none_or(|x| b.0 >= x.0) {
                best = Some(b);
            }
        }
        best.map(|b| b.1.as_slice())
    }
}

/// One beam-search caption per entry of `images` (indices into `image`'s batch), each a row of
/// `seq_len` tokens: the best hypothesis, end-of-text after it when it is shorter than
/// `seq_len`, then padding (OpenCLIP's output row, padded to the full length).
pub fn beam_search(
    model: &CocaModel,
    image: &ImageContext,
    images: &[usize],
    cfg: &GenerationConfig,
    special: SpecialTokens,
) -> Result<Vec<Vec<u32>>> {
    let vocab = model.config().multimodal.vocab_size;
    let context = model
        .text()
        .context_length()
        .min(model.decoder().context_length());
    cfg.validate(context)?;
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let beams = cfg.num_beams / cfg.num_beam_groups;
    let seq_len = cfg.seq_len;
    let slot_image: Vec<usize> = images
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, beams))
        .collect();
    let mut session = DecodeSession::new(model, image, slot_image, seq_len - 1)?;
    let slots = images.len() * beams;
    let mut ids: Vec<Vec<u32>> = vec![vec![special.sot]; slots];
    // The first beam of a group starts at 0 and the others at -1e9, so the first step does not
    // pick the same token in every beam.
    let mut scores: Vec<f32> = (0..slots)
        .map(|s| if s % beams == 0 { 0.0 } else { -1e9 })
        .collect();
    let mut hyps: Vec<Hypotheses> = images.iter().map(|_| Hypotheses::new(beams)).collect();
    let mut done = vec![false; images.len()];
    // Tokens per running beam (finished images stop growing, the others all advance).
    let mut cur_len = 1;
    loop {
        let active: Vec<usize> = (0..slots).filter(|&s| !done[s / beams]).collect();
        if active.is_empty() {
            break;
        }
        let last: Vec<u32> = active
            .iter()
            .map(|&s| ids[s].last().copied().unwrap_or(special.sot))
            .collect();
        let logits = host_rows(&session.step(&active, &last)?, active.len(), vocab)?;
        let mut moves: Vec<(usize, usize)> = Vec::new();
        let mut next_ids = ids.clone();
        for (b, chunk) in active.chunks(beams).zip(logits.chunks(beams)) {
            let img = b[0] / beams;
            // Every candidate: (score, beam, token), the best 2 * beams of them.
            let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(2 * beams * 4);
            for (j, (&slot, row)) in b.iter().zip(chunk).enumerate() {
                let mut row = row.clone();
                process(&mut row, &ids[slot], special.eos, cfg);
                for (tok, &l) in row.iter().enumerate() {
                    candidates.push((l + scores[slot], j, tok as u32));
                }
            }
            let k = 2 * beams;
            let by_score = |a: &(f32, usize, u32), c: &(f32, usize, u32)| {
                c.0.total_cmp(&a.0)
                    .then((a.1 * vocab + a.2 as usize).cmp(&(c.1 * vocab + c.2 as usize)))
            };
            if candidates.len() > k {
                candidates.select_nth_unstable_by(k - 1, by_score);
                candidates.truncate(k);
            }
            candidates.sort_by(by_score);
            let mut kept: Vec<(f32, usize, u32)> = Vec::with_capacity(beams);
            for (rank, &(score, j, tok)) in candidates.iter().enumerate() {
                if tok == special.eos {
                    if rank < beams {
                        hyps[img].add(ids[b[j]].clone(), score, cur_len + 1);
                    }
                } else {
                    kept.push((score, j, tok));
                }
                if kept.len() == beams {
                    break;
                }
            }
            if kept.len() < beams {
                return Err(CaptionError::Input(
                    "beam search ran out of candidates (vocabulary smaller than the beams?)".into(),
                ));
            }
            for (i, &(score, j, tok)) in kept.iter().enumerate() {
                let (dst, src) = (b[i], b[j]);
                next_ids[dst] = ids[src].clone();
                next_ids[dst].push(tok);
                scores[dst] = score;
                moves.push((dst, src));
            }
            let best = candidates.first().map_or(f32::NEG_INFINITY, |c| c.0);
            done[img] = hyps[img].is_done(best, cur_len + 1);
        }
        session.reorder(&moves)?;
        ids = next_ids;
        cur_len += 1;
        if done.iter().all(|&d| d) || cur_len >= seq_len {
            break;
        }
    }
    let len = cur_len;
    let mut out = Vec::with_capacity(images.len());
    for (img, h) in hyps.iter_mut().enumerate() {
        if !done[img] {
            for s in img * beams..(img + 1) * beams {
                h.add(ids[s].clone(), scores[s], len);
            }
        }
        let mut row = h
            .best()
            .map(<[u32]>::to_vec)
            .unwrap_or_else(|| vec![special.sot]);
        if row.len() < seq_len {
            row.push(special.eos);
        }
        row.resize(seq_len, special.pad);
        out.push(row);
    }
    Ok(out)
}
