//! KV-cached incremental decoding: the unimodal text tower and the multimodal decoder run one
//! position at a time, each self-attention layer keeping the keys and values of earlier
//! positions, and each cross-attention layer using the image tokens' keys and values computed
//! once per image. OpenCLIP instead re-runs both stacks over the whole prefix (and recomputes
//! the cross-attention keys and values of every image token) at every step.
//!
//! Rows live in fixed slots; a finished row simply leaves the active set, so it costs nothing
//! in later steps and no cache is copied. Matrix products run through candle on the model's
//! device. Where the caches live follows the device ([`CacheLocation`]): on the CPU they are
//! float32 host buffers and the attention over them is a host kernel parallel over rows (its
//! cost is a few percent of the products at CoCa's sizes); on a GPU they are device tensors in
//! the model's precision and the attention is batched matrix products there, so a step moves
//! nothing between host and device but its token ids in and its logits out.

use candle_core::{DType, Device, Tensor};
use dfndr_teachers::blocks::{Kernels, MultiheadAttention, ResidualAttentionBlock};
use rayon::prelude::*;

use crate::error::{CaptionError, Result};
use crate::model::{CocaModel, ImageContext};

/// Keys and values of one attention layer for every slot: `[slots, heads, positions, d]`.
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Where a session keeps its key/value caches and attends over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLocation {
    /// float32 host buffers, attention by a host kernel (the CPU default).
    Host,
    /// Tensors on the model's device, attention by batched products there (the GPU default).
    Device,
}

impl CacheLocation {
    /// Host caches for a CPU model, device caches for any other.
    pub fn for_device(device: &Device) -> CacheLocation {
        if device.is_cpu() {
            CacheLocation::Host
        } else {
            CacheLocation::Device
        }
    }
}

/// Keys and values of one self-attention layer on the device: `[capacity, slots, heads, d]`,
/// position-major so that one position of every slot is one contiguous slice.
struct DeviceCache {
    k: Tensor,
    v: Tensor,
}

/// The device-side state of a [`CacheLocation::Device`] session.
struct DeviceState {
    text: Vec<DeviceCache>,
    decoder: Vec<DeviceCache>,
    /// Cross-attention keys and values per decoder layer: `[images, heads, tokens, d]`.
    cross: Vec<(Tensor, Tensor)>,
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
    /// The caches on the device (the host caches above are then empty).
    on_device: Option<DeviceState>,
}

impl<'m> DecodeSession<'m> {
    /// Prepares `slot_image.len()` rows (row `r` captions image `slot_image[r]` of `image`)
    /// that will hold at most `capacity` positions, and computes every cross-attention key and
    /// value once. The caches live where [`CacheLocation::for_device`] puts them.
    pub fn new(
        model: &'m CocaModel,
        image: &ImageContext,
        slot_image: Vec<usize>,
        capacity: usize,
    ) -> Result<Self> {
        let location = CacheLocation::for_device(image.tokens.device());
        Self::new_at(model, image, slot_image, capacity, location)
    }

    /// [`DecodeSession::new`] with the caches at `location` (either works on any device).
    pub fn new_at(
        model: &'m CocaModel,
        image: &ImageContext,
        slot_image: Vec<usize>,
        capacity: usize,
        location: CacheLocation,
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
        let text_layers = model.text().transformer().blocks().len();
        let mut cross_kv = Vec::with_capacity(dec.layers());
        for i in 0..dec.layers() {
            let block = dec.cross_block(i);
            let kv = block.norm_kv(&image.tokens)?;
            let (k, v) = block.attention().project_kv(&kv)?;
            cross_kv.push((
                heads_first(&k, heads, head_dim)?,
                heads_first(&v, heads, head_dim)?,
            ));
        }
        let host_size = match location {
            CacheLocation::Host => slots * width * capacity,
            CacheLocation::Device => 0,
        };
        let cache = || LayerCache {
            k: vec![0.0; host_size],
            v: vec![0.0; host_size],
        };
        let (cross, on_device) = match location {
            CacheLocation::Host => {
                let host = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
                };
                let cross = cross_kv
                    .iter()
                    .map(|(k, v)| {
                        Ok(LayerCache {
                            k: host(k)?,
                            v: host(v)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (cross, None)
            }
            CacheLocation::Device => {
                let zeros = || -> Result<DeviceCache> {
                    let shape = (capacity, slots, heads, head_dim);
                    let (dtype, device) = (image.tokens.dtype(), image.tokens.device());
                    Ok(DeviceCache {
                        k: Tensor::zeros(shape, dtype, device)?,
                        v: Tensor::zeros(shape, dtype, device)?,
                    })
                };
                let state = DeviceState {
                    text: (0..text_layers).map(|_| zeros()).collect::<Result<_>>()?,
                    decoder: (0..dec.layers()).map(|_| zeros()).collect::<Result<_>>()?,
                    cross: cross_kv,
                };
                (Vec::new(), Some(state))
            }
        };
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
            on_device,
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
        if let Some(state) = &mut self.on_device {
            // Every slot gathers its source (itself unless moved), all at once.
            let mut source: Vec<u32> = (0..slots as u32).collect();
            for &(d, s) in moves {
                source[d] = s as u32;
            }
            let source = Tensor::from_vec(source, slots, &self.device)?;
            for cache in state.text.iter_mut().chain(state.decoder.iter_mut()) {
                cache.k = cache.k.index_select(&source, 1)?;
                cache.v = cache.v.index_select(&source, 1)?;
            }
        }
        let block = self.heads * self.head_dim * self.capacity;
        let host_caches = match self.on_device {
            Some(_) => Vec::new(),
            None => self
                .text_cache
                .iter_mut()
                .chain(self.decoder_cache.iter_mut())
                .collect(),
        };
        for cache in host_caches {
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
        if self.on_device.is_some() {
            return self.step_on_device(x, active);
        }
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

impl DecodeSession<'_> {
    /// The rest of [`DecodeSession::step`] with the caches on the device, from the embedded
    /// tokens `x` of the `active` slots (the validity and last-token bookkeeping is done).
    fn step_on_device(&mut self, mut x: Tensor, active: &[usize]) -> Result<Tensor> {
        let t = self.len;
        let (heads, d, cap) = (self.heads, self.head_dim, self.capacity);
        let n = active.len();
        let idx = |v: Vec<u32>| Tensor::from_vec(v, n, &self.device);
        let slots = idx(active.iter().map(|&s| s as u32).collect())?;
        let images = idx(active.iter().map(|&s| self.slot_image[s] as u32).collect())?;
        // The text tower's shifted pad mask for these rows, additive, float32 `[n, 1, 1, t+1]`.
        let mask: Vec<f32> = active
            .iter()
            .flat_map(|&s| {
                let valid = &self.key_valid[s * cap..s * cap + t + 1];
                valid
                    .iter()
                    .map(|&ok| if ok { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, 1, 1, t + 1), &self.device)?;
        let Some(state) = self.on_device.as_mut() else {
            return Err(CaptionError::Input("device caches missing".into()));
        };
        let text_blocks = self.model.text().transformer().blocks();
        for (block, cache) in text_blocks.iter().zip(state.text.iter_mut()) {
            x = run_block(block, &x, |attn, h| {
                device_self_attention(attn, h, cache, &slots, t, heads, d, Some(&mask))
            })?;
        }
        let dec = self.model.decoder();
        for (i, cache) in state.decoder.iter_mut().enumerate() {
            x = run_block(dec.self_block(i), &x, |attn, h| {
                device_self_attention(attn, h, cache, &slots, t, heads, d, None)
            })?;
            let (k, v) = &state.cross[i];
            x = run_block(dec.cross_block(i), &x, |attn, h| {
                let q = attn.project_q(h)?.reshape((n, heads, 1, d))?;
                let k = k.index_select(&images, 0)?;
                let v = v.index_select(&images, 0)?;
                let out = attend_on_device(&q, &k, &v, None)?;
                Ok(attn.project_out(&out.reshape((n, heads * d))?)?)
            })?;
        }
        self.len += 1;
        // Sampling takes a softmax of them: float32 in every precision.
        Ok(dec.logits(&x)?.to_dtype(DType::F32)?)
    }
}

/// Self-attention of one new position per active row with the caches on the device: the
/// new keys and values are written at position `t` of their slots, then each row attends over
/// its positions `0..=t`.
#[allow(clippy::too_many_arguments)]
fn device_self_attention(
    attn: &MultiheadAttention,
    h: &Tensor,
    cache: &mut DeviceCache,
    slots: &Tensor,
    t: usize,
    heads: usize,
    d: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let qkv = attn.project_qkv(h)?.reshape((n, 3, heads, d))?;
    let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.contiguous();
    let (q, k_new, v_new) = (part(0)?, part(1)?, part(2)?);
    for (buf, new) in [(&cache.k, &k_new), (&cache.v, &v_new)] {
        // Position t of every slot: what it holds (nothing yet: positions fill in order), with
        // the active slots' new rows added in; one contiguous slice of the cache.
        let row = buf.narrow(0, t, 1)?.squeeze(0)?.index_add(slots, new, 0)?;
        buf.slice_set(&row.unsqueeze(0)?, 0, t)?;
    }
    // `[t+1, slots, H, d]` -> the active rows' `[n, H, t+1, d]`.
    let gather = |buf: &Tensor| -> Result<Tensor> {
        Ok(buf
            .narrow(0, 0, t + 1)?
            .index_select(slots, 1)?
            .permute((1, 2, 0, 3))?
            .contiguous()?)
    };
    let (k, v) = (gather(&cache.k)?, gather(&cache.v)?);
    let out = attend_on_device(&q.reshape((n, heads, 1, d))?, &k, &v, mask)?;
    Ok(attn.project_out(&out.reshape((n, heads * d))?)?)
}

/// `softmax(q·kᵀ/√d + mask) · v` of one query per row and head, `q: [n, H, 1, d]` over
/// `k, v: [n, H, T, d]`; scores and softmax in float32, the result `[n, H, 1, d]` in `v`'s dtype.
fn attend_on_device(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(3)?;
    let scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let p = dfndr_teachers::blocks::softmax_last_dim(&scores, Kernels::Fused)?;
    Ok(p.to_dtype(v.dtype())?.matmul(v)?)
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

/// `[B, T, H·d]` to `[B, H, T, d]`.
fn heads_first(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?)
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
