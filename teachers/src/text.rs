//! OpenCLIP's `TextTransformer`.

use candle_core::{Device, Result, Tensor};

use crate::arch::{ClipConfig, TextPool, LN_EPS};
use crate::blocks::{Kernels, LayerNorm, Linear, Projection, Transformer, VarBuilder};

/// The text tower: token and position embeddings, transformer, pooling, projection.
#[derive(Clone, Debug)]
pub struct TextTransformer {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    cls_emb: Option<Tensor>,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Projection,
    context_length: usize,
    causal: bool,
    pad_id: u32,
    eos_id: u32,
    pool: TextPool,
}

/// Output of the text tower.
#[derive(Clone, Debug)]
pub struct TextOutput {
    /// Projected pooled embedding `[B, embed_dim]` (not normalised).
    pub pooled: Tensor,
    /// Per-position features `[B, L, W]`: after `ln_final` without a class token, before it
    /// with one (what CoCa's decoder consumes).
    pub tokens: Tensor,
}

impl TextTransformer {
    /// Loads the tower at `vb`'s prefix (the top level of a CLIP state dict, `text` of a
    /// CustomTextCLIP or CoCa one).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig, kernels: Kernels) -> Result<Self> {
        let t = &cfg.text;
        let w = t.width;
        let randn = |std: f64| candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let token_embedding =
            vb.get_with_hints((t.vocab_size, w), "token_embedding.weight", randn(0.02))?;
        let num_pos = t.context_length + usize::from(t.embed_cls);
        let positional_embedding =
            vb.get_with_hints((num_pos, w), "positional_embedding", randn(0.01))?;
        let cls_emb = if t.embed_cls {
            Some(vb.get_with_hints(w, "cls_emb", randn(0.01))?)
        } else {
            None
        };
        let transformer = Transformer::new(vb.pp("transformer"), &cfg.text_transformer(), kernels)?;
        let ln_final = LayerNorm::new(vb.pp("ln_final"), w, LN_EPS, kernels)?;
        let text_projection = if t.proj_bias {
            Projection::Linear(Linear::new(
                vb.pp("text_projection"),
                w,
                cfg.embed_dim,
                true,
            )?)
        } else {
            Projection::matrix(
                &vb,
                "text_projection",
                w,
                cfg.embed_dim,
                (w as f64).powf(-0.5),
            )?
        };
        Ok(Self {
            token_embedding,
            positional_embedding,
            cls_emb,
            transformer,
            ln_final,
            text_projection,
            context_length: t.context_length,
            causal: !t.no_causal_mask,
            pad_id: t.pad_id,
            eos_id: t.eos_id,
            pool: t.pool_type,
        })
    }

    /// Token positions the tower accepts.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The transformer stack.
    pub fn transformer(&self) -> &Transformer {
        &self.transformer
    }

    /// Padding id (keys after it are masked when a class token is appended).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Whether a learned class token is appended (CoCa).
    pub fn has_cls(&self) -> bool {
        self.cls_emb.is_some()
    }

    /// Whether positions attend only to earlier positions.
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// `token_embedding[ids[i]] + positional_embedding[positions[i]]` as `[N, W]`: the
    /// input of one decoding step (each row's next token at its own position).
    pub fn embed_at(&self, ids: &[u32], positions: &[usize]) -> Result<Tensor> {
        let vocab = self.token_embedding.dim(0)?;
        let num_pos = self.positional_embedding.dim(0)?;
        if ids.len() != positions.len() {
            candle_core::bail!(
                "embed_at: {} ids for {} positions",
                ids.len(),
                positions.len()
            );
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        if let Some(bad) = positions
            .iter()
            .find(|&&p| p >= self.context_length.min(num_pos))
        {
            candle_core::bail!(
                "position {bad} is beyond the context of {}",
                self.context_length
            );
        }
        let device = self.token_embedding.device();
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), device)?;
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let pos = Tensor::from_vec(pos, positions.len(), device)?;
        self.token_embedding
            .index_select(&idx, 0)?
            .add(&self.positional_embedding.index_select(&pos, 0)?)
    }

    /// Pooled, projected embeddings of token rows `ids` (`[B, L]`, `L <= context_length`).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        Ok(self.forward_with_tokens(ids)?.pooled)
    }

    /// Pooled embeddings and per-position features.
    pub fn forward_with_tokens(&self, ids: &[Vec<u32>]) -> Result<TextOutput> {
        let b = ids.len();
        let Some(l) = ids.first().map(Vec::len) else {
            candle_core::bail!("text tower called with an empty batch");
        };
        if l == 0 || l > self.context_length || ids.iter().any(|r| r.len() != l) {
            candle_core::bail!(
                "text tower expects rows of equal length 1..={} (got lengths {:?})",
                self.context_length,
                ids.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
        let vocab = self.token_embedding.dim(0)?;
        if let Some(bad) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let device = self.token_embedding.device();
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let idx = Tensor::from_vec(flat, b * l, device)?;
        let w = self.token_embedding.dim(1)?;
        let mut x = self
            .token_embedding
            .index_select(&idx, 0)?
            .reshape((b, l, w))?;
        let seq = l + usize::from(self.cls_emb.is_some());
        if let Some(cls) = &self.cls_emb {
            let cls = cls.reshape((1, 1, w))?.broadcast_as((b, 1, w))?;
            x = Tensor::cat(&[&x, &cls], 1)?;
        }
        x = x.broadcast_add(&self.positional_embedding.narrow(0, 0, seq)?)?;
        let mask = self.attention_mask(ids, seq, device)?;
        let x = self.transformer.forward(&x, mask.as_ref())?;
        let (pooled, tokens) = if self.cls_emb.is_some() {
            let pooled = self.ln_final.forward(&x.narrow(1, l, 1)?.squeeze(1)?)?;
            (pooled, x.narrow(1, 0, l)?)
        } else {
            let x = self.ln_final.forward(&x)?;
            let rows: Vec<u32> = ids
                .iter()
                .enumerate()
                .map(|(i, row)| (i * l + self.pool_index(row)) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, b, device)?;
            let pooled = x.reshape((b * l, w))?.index_select(&rows, 0)?;
            (pooled, x)
        };
        Ok(TextOutput {
            pooled: self.text_projection.forward(&pooled)?,
            tokens,
        })
    }

    /// Position pooled for one row.
    fn pool_index(&self, row: &[u32]) -> usize {
        match self.pool {
            // First position of the largest id, like torch.argmax.
            TextPool::Argmax => {
                let mut best = 0;
                for (i, &id) in row.iter().enumerate() {
                    if id > row[best] {
                        best = i;
                    }
                }
                best
            }
            TextPool::First => 0,
            TextPool::Last => row.len() - 1,
            TextPool::Eos => row.iter().position(|&id| id == self.eos_id).unwrap_or(0),
        }
    }

    /// The additive attention mask `[B or 1, 1, S, S]`, or none.
    fn attention_mask(
        &self,
        ids: &[Vec<u32>],
        seq: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let neg = f32::NEG_INFINITY;
        let causal = self.causal;
        if self.cls_emb.is_none() {
            if !causal {
                return Ok(None);
            }
            let mask: Vec<f32> = (0..seq * seq)
                .map(|i| if i % seq > i / seq { neg } else { 0.0 })
                .collect();
            return Tensor::from_vec(mask, (1, 1, seq, seq), device).map(Some);
        }
        // With a class token, key j is valid iff j == 0 or token j-1 is not padding (OpenCLIP's
        // shifted pad mask); it applies to every query row, on top of the causal mask.
        let b = ids.len();
        let mut mask = Vec::with_capacity(b * seq * seq);
        for row in ids {
            for q in 0..seq {
                for k in 0..seq {
                    let valid_key = k == 0 || row[k - 1] != self.pad_id;
                    let allowed = valid_key && (!causal || k <= q);
                    mask.push(if allowed { 0.0 } else { neg });
                }
            }
        }
        Tensor::from_vec(mask, (b, 1, seq, seq), device).map(Some)
    }
}
