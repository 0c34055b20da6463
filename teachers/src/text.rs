//! OpenCLIP's `TextTransformer`.

use candle_core::{Device, Result, Tensor};

use crate::arch::{ClipConfig, TextPool, LN_EPS};
use crate::blocks::{Kernels, LayerNorm, Linear, Projection, Transformer, VarBuilder};

/// Padded positions per group in [`TextTransformer::forward`]: enough rows that the matrix
/// products stay large, few enough that short captions are not padded to long ones.
pub const TOKENS_PER_GROUP: usize = 512;

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

/// The text tower's input to its first block.
#[derive(Clone, Debug)]
pub struct TextEmbedded {
    /// `[B, S, W]` embeddings.
    pub x: Tensor,
    /// The additive attention mask the blocks take, if any.
    pub mask: Option<Tensor>,
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
    ///
    /// Under a causal mask a position sees only itself and earlier positions, so the pooled
    /// position's features do not depend on anything after it. Where that holds (causal, no
    /// class token, pooling at the EOT / argmax / first position) each row is cut after its
    /// pooled position, rows are ordered by that length and run in groups of similar length
    /// (up to [`TOKENS_PER_GROUP`] positions, at most a quarter of them padding), and the
    /// embeddings come back in the input order: the same numbers as running all `L`
    /// positions, without computing the padding. A 15-token caption in a 77-token context
    /// costs about a fifth as much.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let Some(lengths) = self.pooled_prefix_lengths(ids) else {
            return Ok(self.forward_with_tokens(ids)?.pooled);
        };
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| lengths[i]);
        let mut pooled = Vec::new();
        let mut start = 0;
        while start < order.len() {
            // Sorted ascending, so the group's last row sets its padded length. A row joins
            // while the group stays within the position budget and pads at most a quarter of
            // its positions.
            let mut end = start + 1;
            let mut real = lengths[order[start]];
            while end < order.len() {
                let (rows, len) = (end + 1 - start, lengths[order[end]]);
                if rows * len > TOKENS_PER_GROUP || 4 * rows * len > 5 * (real + len) {
                    break;
                }
                real += len;
                end += 1;
            }
            let len = lengths[order[end - 1]];
            let group: Vec<Vec<u32>> = order[start..end]
                .iter()
                .map(|&i| ids[i][..len].to_vec())
                .collect();
            pooled.push(self.forward_with_tokens(&group)?.pooled);
            start = end;
        }
        let sorted = Tensor::cat(&pooled, 0)?;
        // Row i of the result is row rank[i] of the sorted batch.
        let mut rank = vec![0u32; order.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r as u32;
        }
        let rank = Tensor::from_vec(rank, ids.len(), sorted.device())?;
        sorted.index_select(&rank, 0)
    }

    /// Per row, the number of leading positions the pooled output depends on, when that can
    /// be less than the row (see [`TextTransformer::forward`]); `None` when every position is
    /// needed or the batch is malformed (the full path reports that).
    fn pooled_prefix_lengths(&self, ids: &[Vec<u32>]) -> Option<Vec<usize>> {
        let prefix_only = self.causal
            && self.cls_emb.is_none()
            && matches!(
                self.pool,
                TextPool::Argmax | TextPool::Eos | TextPool::First
            );
        let l = ids.first()?.len();
        if !prefix_only || l == 0 || l > self.context_length || ids.iter().any(|r| r.len() != l) {
            return None;
        }
        let lengths: Vec<usize> = ids.iter().map(|r| self.pool_index(r) + 1).collect();
        lengths.iter().any(|&n| n < l).then_some(lengths)
    }

    /// Pooled embeddings and per-position features.
    pub fn forward_with_tokens(&self, ids: &[Vec<u32>]) -> Result<TextOutput> {
        let embedded = self.embed(ids)?;
        let x = self
            .transformer
            .forward(&embedded.x, embedded.mask.as_ref())?;
        self.finish(&x, ids)
    }

    /// The first part of [`TextTransformer::forward_with_tokens`]: token (and class) plus
    /// position embeddings of rows of equal length, and the attention mask the blocks take.
    /// With [`Transformer::blocks`] and [`TextTransformer::finish`] a caller can run the tower
    /// one block at a time (a trainer that recomputes activations block by block).
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<TextEmbedded> {
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
        let x = x.broadcast_add(&self.positional_embedding.narrow(0, 0, seq)?)?;
        let mask = self.attention_mask(ids, seq, device)?;
        Ok(TextEmbedded { x, mask })
    }

    /// The last part of [`TextTransformer::forward_with_tokens`]: `ln_final`, pooling and
    /// projection of the last block's output `x` for the rows `ids`.
    pub fn finish(&self, x: &Tensor, ids: &[Vec<u32>]) -> Result<TextOutput> {
        let (b, seq, w) = x.dims3()?;
        let l = seq - usize::from(self.cls_emb.is_some());
        if ids.len() != b || ids.iter().any(|r| r.len() != l) {
            candle_core::bail!(
                "text tower: the token rows do not match the features {:?}",
                x.dims()
            );
        }
        let (pooled, tokens) = if self.cls_emb.is_some() {
            let pooled = self.ln_final.forward(&x.narrow(1, l, 1)?.squeeze(1)?)?;
            (pooled, x.narrow(1, 0, l)?)
        } else {
            let x = self.ln_final.forward(x)?;
            let rows: Vec<u32> = ids
                .iter()
                .enumerate()
                .map(|(i, row)| (i * l + self.pool_index(row)) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, b, x.device())?;
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
