//! `dfndr caption`: adds (or replaces) the synthetic-caption columns of the configured
//! captioners in the shards of an existing DFNDR output, leaving every other column as it is.

use anyhow::{bail, Result};
use dfndr_shards::format::{CaptionerInfo, FileMeta, Layout, Row, SynCaptions, SynLayout};

use crate::caption::CaptionStage;
use crate::rewrite::{Originals, ShardUpdate};

/// The caption update.
pub struct CaptionUpdate {
    stage: CaptionStage,
    infos: Vec<CaptionerInfo>,
}

impl CaptionUpdate {
    /// Wraps a loaded stage.
    pub fn new(stage: CaptionStage) -> Self {
        let infos = stage.infos();
        Self { stage, infos }
    }
}

impl ShardUpdate for CaptionUpdate {
    fn verb(&self) -> &'static str {
        "captioned"
    }

    fn task(&self) -> &'static str {
        "caption"
    }

    fn key(&self) -> String {
        serde_json::to_string(&self.infos).unwrap_or_default()
    }

    fn needs_images(&self, _old: &Layout) -> bool {
        true
    }

    fn is_current(&self, meta: &FileMeta, layout: &Layout) -> bool {
        self.infos.iter().all(|info| {
            meta.captioners.contains(info) && layout.syn.iter().any(|s| s.tag == info.tag)
        })
    }

    fn updated(&self, meta: &FileMeta, old: &Layout) -> Result<(FileMeta, Layout)> {
        let mut syn = old.syn.clone();
        let mut captioners = meta.captioners.clone();
        for info in &self.infos {
            // A replaced column's embeddings belong to the old captions: drop them.
            match syn.iter_mut().find(|s| s.tag == info.tag) {
                Some(s) => s.with_emb = false,
                None => syn.push(SynLayout {
                    tag: info.tag.clone(),
                    with_emb: false,
                }),
            }
            match captioners.iter_mut().find(|c| c.tag == info.tag) {
                Some(c) => *c = info.clone(),
                None => captioners.push(info.clone()),
            }
        }
        let layout = Layout { syn, ..old.clone() };
        let meta = FileMeta {
            captioners,
            ..meta.clone()
        };
        Ok((meta, layout))
    }

    fn update_batch(
        &self,
        batch: &mut [Row],
        images: &Originals,
        _meta: &FileMeta,
        old: &Layout,
    ) -> Result<()> {
        let inputs = images.map(batch, |_, img| Ok(self.stage.prepare(img)))?;
        let keys: Vec<&str> = batch.iter().map(|r| r.key.as_str()).collect();
        let refs: Vec<&[Vec<f32>]> = inputs.iter().map(Vec::as_slice).collect();
        let captions = self.stage.caption_batch(&keys, &refs)?;
        for (info, per_sample) in self.infos.iter().zip(captions) {
            let slot = old.syn.iter().position(|s| s.tag == info.tag);
            for (row, texts) in batch.iter_mut().zip(per_sample) {
                let fresh = SynCaptions {
                    texts,
                    emb: Vec::new(),
                };
                match slot {
                    Some(i) if i < row.syn.len() => row.syn[i] = fresh,
                    Some(_) => bail!("row {} lacks its syn_text columns", row.key),
                    None => row.syn.push(fresh),
                }
            }
        }
        Ok(())
    }
}
