//! `dfndr embed`: adds teacher embeddings to the shards of an existing DFNDR output (e.g. one
//! written without teachers, or imported, or captioned later), replaying each row's stored
//! views. Shards that already carry this ensemble's embeddings of every column are skipped.

use anyhow::Result;
use dfndr_augment::rgb::RgbImage;
use dfndr_shards::format::{FileMeta, Layout, Row, SynLayout, TeacherInfo};

use crate::embed::EmbedStage;
use crate::rewrite::{Originals, ShardUpdate};
use dfndr_dataset::views::{augmentation_of, replay_views};

/// The teacher-embedding update.
pub struct EmbedUpdate {
    /// The loaded teachers.
    pub stage: EmbedStage,
    infos: Vec<TeacherInfo>,
}

impl EmbedUpdate {
    /// Wraps a loaded stage.
    pub fn new(stage: EmbedStage) -> Self {
        let infos = stage.teacher_infos();
        Self { stage, infos }
    }
}

impl ShardUpdate for EmbedUpdate {
    fn verb(&self) -> &'static str {
        "embedded"
    }

    fn task(&self) -> &'static str {
        "embed"
    }

    fn key(&self) -> String {
        serde_json::to_string(&(&self.infos, self.stage.emb_layout().dtype)).unwrap_or_default()
    }

    fn needs_images(&self, old: &Layout) -> bool {
        old.paug
    }

    fn is_current(&self, meta: &FileMeta, layout: &Layout) -> bool {
        layout.text_emb
            && layout.syn.iter().all(|s| s.with_emb)
            && meta.teachers.as_slice() == self.infos
    }

    fn updated(&self, meta: &FileMeta, old: &Layout) -> Result<(FileMeta, Layout)> {
        if old.paug {
            augmentation_of(meta)?;
        }
        let layout = Layout {
            emb: Some(self.stage.emb_layout()),
            image_emb: old.paug,
            text_emb: true,
            syn: old
                .syn
                .iter()
                .map(|s| SynLayout {
                    tag: s.tag.clone(),
                    with_emb: true,
                })
                .collect(),
            ..old.clone()
        };
        let meta = FileMeta {
            teachers: self.infos.clone(),
            ..meta.clone()
        };
        Ok((meta, layout))
    }

    fn update_batch(
        &self,
        batch: &mut [Row],
        images: &Originals,
        meta: &FileMeta,
        old: &Layout,
    ) -> Result<()> {
        if old.paug {
            let aug = augmentation_of(meta)?;
            let views: Vec<Vec<RgbImage>> = images.map(batch, |row, img| {
                // The rewrite gave only originals of the recorded size (check_original).
                Ok(replay_views(&aug, &row.paug, img, aug.size)?)
            })?;
            let groups: Vec<&[RgbImage]> = views.iter().map(Vec::as_slice).collect();
            for (row, embs) in batch.iter_mut().zip(self.stage.embed_view_groups(&groups)?) {
                row.image_emb = embs;
            }
        }
        // Per row: the ground-truth caption, then every synthetic caption.
        let texts: Vec<Vec<&str>> = batch
            .iter()
            .map(|row| {
                std::iter::once(row.caption.as_str())
                    .chain(
                        row.syn
                            .iter()
                            .flat_map(|s| s.texts.iter().map(String::as_str)),
                    )
                    .collect()
            })
            .collect();
        let text_embs = self.stage.embed_text_groups(&texts)?;
        for (row, embs) in batch.iter_mut().zip(text_embs) {
            let mut embs = embs.into_iter();
            row.text_emb = embs.next().into_iter().collect();
            for syn in row.syn.iter_mut() {
                syn.emb = embs.by_ref().take(syn.texts.len()).collect();
            }
        }
        Ok(())
    }
}
