//! KV-cached incremental decoding: the unimodal text tower and the multimodal decoder run one
//! position at a time, each self-attention layer keeping the keys and values of earlier
//! positions, and each cross-attention layer using the image tokens' keys and values computed
//! once per image. OpenCLIP instead re-runs both stacks over the whole prefix (and recomputes
//! the cross-attention keys and values of every image token) at every step.
//!
//! Rows live in fixed slots; a finished row simply leaves the active set, so it costs nothing
//! in later steps and no cache is copied. Matrix products run through candle on the model's
//! device; the attention over the caches runs on the host (its cost is a few percent of the
//! products at CoCa's sizes), parallel over rows.

use candle_core::{DType, Device, Tensor};
use dfndr_teachers::blocks::{MultiheadAttention, ResidualAttentionBlock};
use rayon::prelude::*;

use crate::error::{CaptionError, Result};
use crate::model::{CocaModel, ImageContext};

/// Keys and values of one attention layer for every slot: `[slots, heads, positions, d]`.
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Incremental decoding state of a batch of rows over a batch of images.
pub struct DecodeSession<'m> {
    model: &'m CocaModel,
    device: Device,
    heads: usize,
    head_dim: usize,
    /// Positions each slot can hold.
    capacity: usize,
    /// Image of each slot.
    slot_image: Vec<usize>,
    /// Text tower and decoder self-attention caches.
    text_cache: Vec<LayerCache>,
    decoder_cache: Vec<LayerCache>,
    /// Cross-attention keys and values per decoder layer: `[images, heads, tokens, d]`.
    cross: Vec<LayerCache>,
    image_tokens: usize,
    /// Text tower key validity per slot and position (OpenCLIP's shifted pad mask: key `j` is
    /// valid iff `j == 0` or token `j - 1` is not padding).
    key_valid: Vec<bool>,
    /// Last token fed to each slot.
    last_token: Vec<Option<u32>>,
    /// Positions filled so far (all rows advance together).
    len: usize,
}

impl<'m> DecodeSession<'m> {
    /// Prepares `slot_image.len()` rows (row `r` captions image `slot_image[r]` of `image`)
    /// that will hold at most `capacity` positions, and computes every cross-attention key and
    /// value once.
    pub fn new(
        model: &'m CocaModel,
        image: &ImageContext,
        slot_image: Vec<usize>,
        capacity: usize,
    ) -> Result<Self> {
        let (images, tokens, width) = image.tokens.dims3()?;
        if let Some(&bad) = slot_image.iter().find(|&&i| i >= images) {
            return Err(CaptionError::Input(format!(
                "row refers to image {bad} of a batch of {images}"
            )));
        }
        let max = model
            .text()
            .context_length()
            .min(model.decoder().context_length());
        if capacity == 0 || capacity > max {
            return Err(CaptionError::Input(format!(
                "decoding capacity {capacity} must be within 1..={max}"
            )));
        }
        let dec = model.decoder();
        let attn = dec.self_block(0).attention();
        let (heads, head_dim) = (attn.heads(), attn.head_dim());
        if heads * head_dim != width {
            return Err(CaptionError::Input(format!(
                "image tokens of width {width} do not fit the decoder ({heads} heads of {head_dim})"
            )));
        }
        let slots = slot_image.len();
        let cache = || LayerCache {
            k: vec![0.0; slots * width * capacity],
            v: vec![0.0; slots * width * capacity],
        };
        let text_layers = model.text().transformer().blocks().len();
        let mut cross = Vec::with_capacity(dec.layers());
        for i in 0..dec.layers() {
            let block = dec.cross_block(i);
            let kv = block.norm_kv(&image.tokens)?;
            let (k, v) = block.attention().project_kv(&kv)?;
            cross.push(LayerCache {
                k: split_heads(&k, heads, head_dim)?,
                v: split_heads(&v, heads, head_dim)?,
            });
        }
        Ok(Self {
            model,
            device: image.tokens.device().clone(),
            heads,
            head_dim,
            capacity,
            slot_image,
            text_cache: (0..text_layers).map(|_| cache()).collect(),
            decoder_cache: (0..dec.layers()).map(|_| cache()).collect(),
            cross,
            image_tokens: tokens,
            key_valid: vec![false; slots * capacity],
            last_token: vec![None; slots],
            len: 0,
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes each `dst` slot a copy of its `src` slot (caches, pad-mask state) as it was before
    /// the call, for beam search's reordering; slots not named as `dst` are unchanged.
    pub fn reorder(&mut self, moves: &[(usize, usize)]) -> Result<()> {
        let slots = self.slot_image.len();
        if let Some(bad) = moves.iter().find(|(d, s)| *d >= slots || *s >= slots) {
            return Err(CaptionError::Input(format!(
                "reorder of slot {bad:?} out of {slots}"
            )));
        }
        if moves.iter().all(|(d, s)| d == s) {
            return Ok(());
        }
        let block = self.heads * self.head_dim * self.capacity;
        for cache in self
            .text_cache
            .iter_mut()
            .chain(self.decoder_cache.iter_mut())
        {
            for buf in [&mut cache.k, &mut cache.v] {
                let copies: Vec<Vec<f32>> = moves
                    .iter()
                    .map(|&(_, s)| buf[s * block..(s + 1) * block].to_vec())
                    .collect();
                for (&(d, _), data) in moves.iter().zip(copies) {
                    buf[d * block..(d + 1) * block].copy_from_slice(&data);
                }
            }
        }
        let cap = self.capacity;
        let valid: Vec<Vec<bool>> = moves
            .iter()
            .map(|&(_, s)| self.key_valid[s * cap..(s + 1) * cap].to_vec())
            .collect();
        let last: Vec<Option<u32>> = moves.iter().map(|&(_, s)| self.last_token[s]).collect();
        for ((&(d, _), v), l) in moves.iter().zip(valid).zip(last) {
            self.key_valid[d * cap..(d + 1) * cap].copy_from_slice(&v);
            self.last_token[d] = l;
        }
        Ok(())
    }

    /// Feeds `tokens[i]` at the next position of slot `active[i]` and returns the next-token
    /// logits of those rows `[active.len(), vocab]` (float32). Slots left out of `active` are finished:
    /// they are skipped from now on (their caches are simply never read again).
    pub fn step(&mut self, active: &[usize], tokens: &[u32]) -> Result<Tensor> {
        if active.len() != tokens.len() || active.is_empty() {
            return Err(CaptionError::Input(format!(
                "step with {} slots and {} tokens",
                active.len(),
                tokens.len()
            )));
        }
        if self.len >= self.capacity {
            return Err(CaptionError::Input(format!(
                "decoding beyond the capacity of {} positions",
                self.capacity
            )));
        }
        if let Some(&bad) = active.iter().find(|&&s| s >= self.slot_image.len()) {
            return Err(CaptionError::Input(format!("slot {bad} does not exist")));
        }
        let t = self.len;
        let pad = self.model.text().pad_id();
        for &slot in active {
            let valid = match self.last_token[slot] {
                None => true,
                Some(prev) => prev != pad,
            };
            self.key_valid[slot * self.capacity + t] = t == 0 || valid;
        }
        for (&slot, &tok) in active.iter().zip(tokens) {
            self.last_token[slot] = Some(tok);
        }
        let positions = vec![t; active.len()];
        let mut x = self.model.text().embed_at(tokens, &positions)?;
        let text_blocks = self.model.text().transformer().blocks();
        for (block, cache) in text_blocks.iter().zip(self.text_cache.iter_mut()) {
            let ctx = SelfAttention {
                cache,
                active,
                t,
                capacity: self.capacity,
                heads: self.heads,
                head_dim: self.head_dim,
                key_valid: Some(&self.key_valid),
            };
            x = run_block(block, &x, |attn, h| ctx.attend(attn, h, &self.device))?;
        }
        let dec = self.model.decoder();
        for i in 0..dec.layers() {
            let ctx = SelfAttention {
                cache: &mut self.decoder_cache[i],
                active,
                t,
                capacity: self.capacity,
                heads: self.heads,
                head_dim: self.head_dim,
                key_valid: None,
            };
            x = run_block(dec.self_block(i), &x, |attn, h| {
                ctx.attend(attn, h, &self.device)
            })?;
            let cross = CrossAttention {
                cache: &self.cross[i],
                images: active.iter().map(|&s| self.slot_image[s]).collect(),
                tokens: self.image_tokens,
                heads: self.heads,
                head_dim: self.head_dim,
            };
            x = run_block(dec.cross_block(i), &x, |attn, h| {
                cross.attend(attn, h, &self.device)
            })?;
        }
        self.len += 1;
        // Sampling takes a softmax of them: float32 in every precision.
        Ok(dec.logits(&x)?.to_dtype(DType::F32)?)
    }
}

fn run_block<F>(block: &ResidualAttentionBlock, x: &Tensor, attend: F) -> Result<Tensor>
where
    F: FnOnce(&MultiheadAttention, &Tensor) -> Result<Tensor>,
{
    // The closure's typed error travels through candle's error type and back.
    let mut err = None;
    let out = block.forward_with(x, |attn, h| {
        attend(attn, h).map_err(|e| {
            let msg = e.to_string();
            err = Some(e);
            candle_core::Error::Msg(msg)
        })
    });
    match (out, err) {
        (Ok(x), _) => Ok(x),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

/// `[B, T, H·d]` to host `[B, H, T, d]`.
fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Vec<f32>> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// Causal self-attention of one new position per row over that row's cache.
struct SelfAttention<'a> {
    cache: &'a mut LayerCache,
    active: &'a [usize],
    t: usize,
    capacity: usize,
    heads: usize,
    head_dim: usize,
    key_valid: Option<&'a [bool]>,
}

impl SelfAttention<'_> {
    fn attend(self, attn: &MultiheadAttention, h: &Tensor, device: &Device) -> Result<Tensor> {
        let n = self.active.len();
        let (heads, d, cap, t) = (self.heads, self.head_dim, self.capacity, self.t);
        let w = heads * d;
        // The cache and the attention over it are float32 on the host in every precision.
        let qkv = attn
            .project_qkv(h)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if qkv.len() != n * 3 * w {
            return Err(CaptionError::Input(format!(
                "packed projection of {} values for {n} rows of width {w}",
                qkv.len()
            )));
        }
        // Append this position's keys and values.
        for (r, &slot) in self.active.iter().enumerate() {
            for head in 0..heads {
                let dst = ((slot * heads + head) * cap + t) * d;
                let k = &qkv[r * 3 * w + w + head * d..][..d];
                let v = &qkv[r * 3 * w + 2 * w + head * d..][..d];
                self.cache.k[dst..dst + d].copy_from_slice(k);
                self.cache.v[dst..dst + d].copy_from_slice(v);
            }
        }
        let cache = &*self.cache;
        let key_valid = self.key_valid;
        let mut merged = vec![0f32; n * w];
        merged
            .par_chunks_mut(w)
            .zip(self.active.par_iter())
            .enumerate()
            .for_each(|(r, (out, &slot))| {
                let mut scores = vec![0f32; t + 1];
                for head in 0..heads {
                    let q = &qkv[r * 3 * w + head * d..][..d];
                    let base = (slot * heads + head) * cap * d;
                    let valid = |j: usize| key_valid.is_none_or(|kv| kv[slot * cap + j]);
                    attend_one(
                        q,
                        &cache.k[base..base + (t + 1) * d],
                        &cache.v[base..base + (t + 1) * d],
                        valid,
                        &mut scores,
                        &mut out[head * d..(head + 1) * d],
                    );
                }
            });
        let merged = Tensor::from_vec(merged, (n, w), device)?.to_dtype(h.dtype())?;
        Ok(attn.project_out(&merged)?)
    }
}

/// Attention of one position per row over its image's tokens.
struct CrossAttention<'a> {
    cache: &'a LayerCache,
    images: Vec<usize>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

impl CrossAttention<'_> {
    fn attend(self, attn: &MultiheadAttention, h: &Tensor, device: &Device) -> Result<Tensor> {
        let n = self.images.len();
        let (heads, d, tokens) = (self.heads, self.head_dim, self.tokens);
        let w = heads * d;
        let q = attn
            .project_q(h)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if q.len() != n * w {
            return Err(CaptionError::Input(format!(
                "query projection of {} values for {n} rows of width {w}",
                q.len()
            )));
        }
        let cache = self.cache;
        let mut merged = vec![0f32; n * w];
        merged
            .par_chunks_mut(w)
            .zip(self.images.par_iter())
            .enumerate()
            .for_each(|(r, (out, &image))| {
                let mut scores = vec![0f32; tokens];
                for head in 0..heads {
                    let base = (image * heads + head) * tokens * d;
                    attend_one(
                        &q[r * w + head * d..][..d],
                        &cache.k[base..base + tokens * d],
                        &cache.v[base..base + tokens * d],
                        |_| true,
                        &mut scores,
                        &mut out[head * d..(head + 1) * d],
                    );
                }
            });
        let merged = Tensor::from_vec(merged, (n, w), device)?.to_dtype(h.dtype())?;
        Ok(attn.project_out(&merged)?)
    }
}

/// `softmax(q·kⱼ/√d over valid j) · v` for one query `q [d]` over keys and values `[T, d]`.
fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    valid: impl Fn(usize) -> bool,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let scale = (d as f32).powf(-0.5);
    let mut max = f32::NEG_INFINITY;
    for (j, (s, key)) in scores.iter_mut().zip(k.chunks_exact(d)).enumerate() {
        *s = if valid(j) {
            dot(q, key) * scale
        } else {
            f32::NEG_INFINITY
        };
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = if *s == f32::NEG_INFINITY {
            0.0
        } else {
            (*s - max).exp()
        };
        sum += *s;
    }
    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    out.fill(0.0);
    for (&p, value) in scores.iter().zip(v.chunks_exact(d)) {
        if p != 0.0 {
            let p = p * inv;
            for (o, &x) in out.iter_mut().zip(value) {
                *o += p * x;
            }
        }
    }
}

/// Dot product with eight independent accumulators (vectorises; the order differs from a
/// sequential sum only by rounding).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}
