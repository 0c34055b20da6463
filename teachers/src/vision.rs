//! OpenCLIP's `VisionTransformer`.

use candle_core::{Result, Tensor, D};

use crate::arch::{ClipConfig, VisionPool, LN_EPS};
use crate::blocks::{Kernels, LayerNorm, MultiheadAttention, Projection, Transformer, VarBuilder};

/// CoCa's `AttentionalPooler`: learned queries attending over the image tokens.
#[derive(Clone, Debug)]
pub struct AttentionalPooler {
    query: Tensor,
    ln_q: LayerNorm,
    ln_k: LayerNorm,
    attn: MultiheadAttention,
}

impl AttentionalPooler {
    /// Loads `PREFIX.{query, ln_q, ln_k, attn}`.
    pub fn new(
        vb: VarBuilder,
        d_model: usize,
        context_dim: usize,
        heads: usize,
        queries: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        Ok(Self {
            query: vb.get_with_hints(
                (queries, d_model),
                "query",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            ln_q: LayerNorm::new(vb.pp("ln_q"), d_model, LN_EPS, kernels)?,
            ln_k: LayerNorm::new(vb.pp("ln_k"), context_dim, LN_EPS, kernels)?,
            attn: MultiheadAttention::new(
                vb.pp("attn"),
                d_model,
                heads,
                context_dim,
                context_dim,
                kernels,
            )?,
        })
    }

    /// `[B, T, context_dim]` to `[B, queries, d_model]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let x = self.ln_k.forward(x)?;
        let q = self.ln_q.forward(&self.query)?;
        let q = q
            .unsqueeze(0)?
            .broadcast_as((b, q.dim(0)?, q.dim(1)?))?
            .contiguous()?;
        self.attn.forward(&q, &x, None)
    }
}

/// The image tower: patch embedding, class token, positions, transformer, pooling, projection.
#[derive(Clone, Debug)]
pub struct VisionTransformer {
    /// `conv1.weight` reshaped to `[width, 3·p·p]`: the patch embedding as one matrix product.
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: Option<LayerNorm>,
    transformer: Transformer,
    attn_pool: Option<AttentionalPooler>,
    ln_post: LayerNorm,
    proj: Projection,
    image_size: usize,
    patch_size: usize,
    pool: VisionPool,
    final_ln_after_pool: bool,
}

/// Output of the vision tower.
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// Projected pooled embedding `[B, embed_dim]` (not normalised).
    pub pooled: Tensor,
    /// The remaining tokens `[B, N, C]` (not projected).
    pub tokens: Tensor,
}

impl VisionTransformer {
    /// Loads the tower at `vb`'s prefix (`visual` in a CLIP state dict).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig, kernels: Kernels) -> Result<Self> {
        let v = &cfg.vision;
        let w = v.width;
        let p = v.patch_size;
        let grid = v.image_size / p;
        let scale = (w as f64).powf(-0.5);
        let randn = |std: f64| candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let conv = vb.get_with_hints(
            (w, 3, p, p),
            "conv1.weight",
            randn(((3 * p * p) as f64).powf(-0.5)),
        )?;
        let patch_weight = conv.reshape((w, 3 * p * p))?;
        let class_embedding = vb.get_with_hints(w, "class_embedding", randn(scale))?;
        let positional_embedding =
            vb.get_with_hints((grid * grid + 1, w), "positional_embedding", randn(scale))?;
        let ln_pre = if v.no_ln_pre {
            None
        } else {
            Some(LayerNorm::new(vb.pp("ln_pre"), w, LN_EPS, kernels)?)
        };
        let transformer =
            Transformer::new(vb.pp("transformer"), &cfg.vision_transformer(), kernels)?;
        let (attn_pool, pool_dim) = if v.attentional_pool {
            let pooler = AttentionalPooler::new(
                vb.pp("attn_pool"),
                cfg.embed_dim,
                w,
                v.attn_pooler_heads,
                v.attn_pooler_queries,
                kernels,
            )?;
            (Some(pooler), cfg.embed_dim)
        } else {
            (None, w)
        };
        let ln_post = LayerNorm::new(vb.pp("ln_post"), pool_dim, LN_EPS, kernels)?;
        let proj = Projection::matrix(&vb, "proj", pool_dim, cfg.embed_dim, scale)?;
        Ok(Self {
            patch_weight,
            class_embedding,
            positional_embedding,
            ln_pre,
            transformer,
            attn_pool,
            ln_post,
            proj,
            image_size: v.image_size,
            patch_size: p,
            pool: v.pool_type,
            final_ln_after_pool: v.final_ln_after_pool,
        })
    }

    /// Input side in pixels.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Pooled, projected embeddings of normalised images `[B, 3, S, S]`.
    ///
    /// With class-token pooling and no attentional pooler only the class token's output is
    /// read, so the last block computes that position alone (its keys and values still come
    /// from every patch): the same numbers, about 3% less work for ViT-L/14.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        if self.attn_pool.is_some() || self.pool != VisionPool::Tok {
            return Ok(self.forward_with_tokens(images)?.pooled);
        }
        let x = self.embed_patches(images)?;
        let cls = self.transformer.forward_first(&x, 1)?.squeeze(1)?;
        self.proj.forward(&self.ln_post.forward(&cls)?)
    }

    /// Pooled embeddings and the remaining tokens.
    pub fn forward_with_tokens(&self, images: &Tensor) -> Result<VisionOutput> {
        let x = self.embed_patches(images)?;
        let x = self.transformer.forward(&x, None)?;
        let (pooled, tokens) = if let Some(pooler) = &self.attn_pool {
            let x = self.ln_post.forward(&pooler.forward(&x)?)?;
            self.pool_tokens(&x)?
        } else if self.final_ln_after_pool {
            let (pooled, tokens) = self.pool_tokens(&x)?;
            (self.ln_post.forward(&pooled)?, tokens)
        } else {
            self.pool_tokens(&self.ln_post.forward(&x)?)?
        };
        Ok(VisionOutput {
            pooled: self.proj.forward(&pooled)?,
            tokens,
        })
    }

    /// The transformer's input `[B, 1 + patches, W]`: patch embeddings after the class token,
    /// plus positions, through `ln_pre` when there is one.
    fn embed_patches(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        if c != 3 || h != self.image_size || w != self.image_size {
            candle_core::bail!(
                "vision tower expects [B, 3, {s}, {s}] images, got [{b}, {c}, {h}, {w}]",
                s = self.image_size
            );
        }
        let p = self.patch_size;
        let g = self.image_size / p;
        // Non-overlapping patches in (row, column) order, each flattened as (channel, y, x):
        // exactly the stride-p convolution of OpenCLIP's conv1.
        // Pixels arrive as float32 and join the model's precision here.
        let patches = images
            .to_dtype(self.patch_weight.dtype())?
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, 3 * p * p))?;
        let width = self.patch_weight.dim(0)?;
        let x = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, g * g, width))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let mut x = x.broadcast_add(&self.positional_embedding)?;
        if let Some(ln) = &self.ln_pre {
            x = ln.forward(&x)?;
        }
        Ok(x)
    }

    fn pool_tokens(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.dim(1)?;
        let rest = x.narrow(1, 1, n - 1)?;
        let pooled = match self.pool {
            VisionPool::Tok => x.narrow(1, 0, 1)?.squeeze(1)?,
            VisionPool::Avg => rest.mean(D::Minus2)?,
        };
        Ok((pooled, rest))
    }
}
