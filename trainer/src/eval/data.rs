//! Evaluation datasets, read in a fixed order:
//!
//! - an **image folder**: one sub-folder per class (`ROOT/CLASS/IMAGE`), classes in sorted
//!   folder order as torchvision's `ImageFolder`; class names from `ROOT/classnames.txt` when
//!   present (one per line, in that order), else the folder names with `_` as spaces;
//! - a **clip_benchmark webdataset** (`clip_benchmark_export_wds`' layout):
//!   `ROOT/SPLIT/nshards.txt`, `ROOT/SPLIT/0.tar` …, `ROOT/classnames.txt`,
//!   `ROOT/zeroshot_classification_templates.txt`, and `ROOT/dataset_type.txt` (`retrieval`
//!   for image-text sets, whose `txt` member holds one caption per line; otherwise
//!   classification with a `cls` member);
//! - a **DFNDR dataset** (a dfndr output folder, local or on an object store): retrieval of
//!   each original image against its ground-truth caption (and, on request, its synthetic
//!   captions).
//!
//! A sample whose image is missing or whose label cannot be read is counted by reason and
//! left out; images that do not decode are counted by the runner.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use dfndr_shards::format::ShardReader;
use dfndr_shards::originals::OriginalsCursor;
use dfndr_shards::spool::Spool;
use dfndr_shards::store::local_copy;
use dfndr_shards::wds::{member_key_ext, ReaderLimits, IMAGE_EXTENSIONS};

use super::prompts::read_lines;
use crate::data::Dataset;
use crate::error::{Result, TrainError};

/// One evaluation sample: its encoded image and its label or captions.
#[derive(Clone, Debug)]
pub struct EvalSample {
    /// Where it came from (file path or webdataset key), for messages.
    pub key: String,
    /// Encoded image bytes.
    pub image: Vec<u8>,
    /// Class index (classification).
    pub label: usize,
    /// Captions (retrieval).
    pub captions: Vec<String>,
}

/// What a dataset is evaluated on.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// Zero-shot classification with these class names and, when the dataset brings them,
    /// templates.
    Classification {
        /// Class names in label order.
        classnames: Vec<String>,
        /// The dataset's own templates.
        templates: Option<Vec<String>>,
    },
    /// Image-text retrieval.
    Retrieval,
}

impl Task {
    /// clip_benchmark's task name.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Classification { .. } => "zeroshot_classification",
            Task::Retrieval => "zeroshot_retrieval",
        }
    }
}

enum Source {
    Folder(Vec<(PathBuf, usize)>),
    Tars(Vec<PathBuf>, TarKind),
    Dfndr {
        dataset: Box<Dataset>,
        synthetic: bool,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum TarKind {
    Classification,
    Retrieval,
}

/// An opened evaluation dataset.
pub struct EvalData {
    /// Its name in results (the folder's name).
    pub name: String,
    /// What it is evaluated on.
    pub task: Task,
    /// Samples, when known in advance (for progress).
    pub total: Option<u64>,
    source: Source,
}

/// How to read a dataset.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// The webdataset split folder (clip_benchmark's `--split`, default `test`).
    pub split: String,
    /// DFNDR datasets: also use every synthetic caption as a caption of its image.
    pub synthetic_captions: bool,
    /// Largest member read into memory.
    pub max_member_bytes: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            split: "test".into(),
            synthetic_captions: false,
            max_member_bytes: ReaderLimits::DEFAULT_MAX_MEMBER_BYTES,
        }
    }
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn name_of(location: &str) -> String {
    let trimmed = location.trim_end_matches('/');
    trimmed
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(trimmed)
        .to_string()
}

impl EvalData {
    /// Opens `location`, recognising its layout (see the module docs).
    pub fn open(location: &str, options: &DataOptions) -> Result<Self> {
        let root = Path::new(location);
        if location.contains("://") || root.join("manifest.json").is_file() {
            let dataset = Dataset::open(location)?;
            return Ok(Self {
                name: name_of(location),
                task: Task::Retrieval,
                total: Some(dataset.rows()),
                source: Source::Dfndr {
                    dataset: Box::new(dataset),
                    synthetic: options.synthetic_captions,
                },
            });
        }
        if !root.is_dir() {
            return Err(TrainError::Data(format!(
                "{location}: not a folder (expected an image folder, a clip_benchmark webdataset \
                 or a dfndr output)"
            )));
        }
        let nshards = root.join(&options.split).join("nshards.txt");
        if nshards.is_file() {
            return Self::open_wds(root, &nshards, options);
        }
        Self::open_folder(root)
    }

    fn open_wds(root: &Path, nshards: &Path, options: &DataOptions) -> Result<Self> {
        let text = std::fs::read_to_string(nshards).map_err(|e| io(nshards, e))?;
        let n: usize = text.trim().parse().map_err(|_| {
            TrainError::Data(format!(
                "{}: {:?} is not a shard count",
                nshards.display(),
                text.trim()
            ))
        })?;
        let tars: Vec<PathBuf> = (0..n)
            .map(|i| root.join(&options.split).join(format!("{i}.tar")))
            .collect();
        if let Some(missing) = tars.iter().find(|t| !t.is_file()) {
            return Err(TrainError::Data(format!(
                "{} names {n} shards but {} is missing",
                nshards.display(),
                missing.display()
            )));
        }
        let kind_file = root.join("dataset_type.txt");
        let kind = match std::fs::read_to_string(&kind_file) {
            Ok(t) => t.trim().to_lowercase(),
            Err(_) => "classification".into(),
        };
        let (task, kind) = match kind.as_str() {
            "retrieval" => (Task::Retrieval, TarKind::Retrieval),
            "classification" => {
                let names = root.join("classnames.txt");
                let classnames = read_lines(&names).map_err(|e| {
                    TrainError::Data(format!(
                        "{e} (a classification webdataset needs classnames.txt)"
                    ))
                })?;
                let t = root.join("zeroshot_classification_templates.txt");
                let templates = if t.is_file() {
                    Some(read_lines(&t)?)
                } else {
                    None
                };
                (
                    Task::Classification {
                        classnames,
                        templates,
                    },
                    TarKind::Classification,
                )
            }
            other => {
                return Err(TrainError::Data(format!(
                    "{}: dataset type {other:?} is not supported (classification or retrieval)",
                    kind_file.display()
                )))
            }
        };
        Ok(Self {
            name: name_of(&root.to_string_lossy()),
            task,
            total: None,
            source: Source::Tars(tars, kind),
        })
    }

    fn open_folder(root: &Path) -> Result<Self> {
        let mut classes: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| io(root, e))? {
            let entry = entry.map_err(|e| io(root, e))?;
            if entry.path().is_dir() {
                classes.push(entry.file_name().to_string_lossy().to_string());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: no class folders (an image folder holds one folder of images per class)",
                root.display()
            )));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut found: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let path = entry.map_err(|e| io(&dir, e))?.path();
                if path.is_file() && is_image(&path) {
                    found.push(path);
                }
            }
            found.sort();
            files.extend(found.into_iter().map(|p| (p, label)));
        }
        if files.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: no images in its {} class folders (extensions: {})",
                root.display(),
                classes.len(),
                IMAGE_EXTENSIONS.join(", ")
            )));
        }
        let names_file = root.join("classnames.txt");
        let classnames = if names_file.is_file() {
            let names = read_lines(&names_file)?;
            if names.len() != classes.len() {
                return Err(TrainError::Data(format!(
                    "{} has {} names for {} class folders",
                    names_file.display(),
                    names.len(),
                    classes.len()
                )));
            }
            names
        } else {
            classes.iter().map(|c| c.replace('_', " ")).collect()
        };
        let t = root.join("zeroshot_classification_templates.txt");
        let templates = if t.is_file() {
            Some(read_lines(&t)?)
        } else {
            None
        };
        Ok(Self {
            name: name_of(&root.to_string_lossy()),
            task: Task::Classification {
                classnames,
                templates,
            },
            total: Some(files.len() as u64),
            source: Source::Folder(files),
        })
    }

    /// Hands every readable sample to `f` in the dataset's order; returns the samples left
    /// out, by reason.
    pub fn for_each(
        &self,
        options: &DataOptions,
        f: &mut dyn FnMut(EvalSample) -> Result<()>,
    ) -> Result<BTreeMap<String, u64>> {
        let mut skipped = BTreeMap::new();
        match &self.source {
            Source::Folder(files) => {
                for (path, label) in files {
                    let image = std::fs::read(path).map_err(|e| io(path, e))?;
                    f(EvalSample {
                        key: path.display().to_string(),
                        image,
                        label: *label,
                        captions: Vec::new(),
                    })?;
                }
            }
            Source::Tars(tars, kind) => {
                for tar in tars {
                    read_tar(tar, *kind, options.max_member_bytes, &mut skipped, f)?;
                }
            }
            Source::Dfndr { dataset, synthetic } => {
                read_dfndr(dataset, *synthetic, options, &mut skipped, f)?
            }
        }
        Ok(skipped)
    }
}

/// The members of one webdataset sample.
#[derive(Default)]
struct Group {
    key: String,
    members: BTreeMap<String, Vec<u8>>,
}

fn read_tar(
    path: &Path,
    kind: TarKind,
    max_member: u64,
    skipped: &mut BTreeMap<String, u64>,
    f: &mut dyn FnMut(EvalSample) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let bad = |e: std::io::Error| TrainError::Data(format!("{}: {e}", path.display()));
    let mut group = Group::default();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().to_string();
        let Some((key, ext)) = member_key_ext(&name) else {
            continue;
        };
        if key != group.key {
            let done = std::mem::replace(
                &mut group,
                Group {
                    key,
                    ..Group::default()
                },
            );
            emit(done, kind, skipped, f)?;
        }
        if entry.size() > max_member {
            group.members.insert(ext, Vec::new());
            *skipped.entry("member_too_large".into()).or_default() += 1;
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(bad)?;
        group.members.insert(ext, bytes);
    }
    emit(group, kind, skipped, f)
}

fn emit(
    group: Group,
    kind: TarKind,
    skipped: &mut BTreeMap<String, u64>,
    f: &mut dyn FnMut(EvalSample) -> Result<()>,
) -> Result<()> {
    if group.members.is_empty() {
        return Ok(());
    }
    let mut skip = |reason: &str| {
        *skipped.entry(reason.to_string()).or_default() += 1;
        Ok(())
    };
    // clip_benchmark's order of preference among image members.
    let image = ["webp", "png", "jpg", "jpeg"]
        .iter()
        .find_map(|e| group.members.get(*e).filter(|b| !b.is_empty()));
    let Some(image) = image.cloned() else {
        return skip("missing_image");
    };
    let text = |ext: &str| {
        group
            .members
            .get(ext)
            .map(|b| String::from_utf8_lossy(b).to_string())
    };
    match kind {
        TarKind::Classification => {
            let Some(cls) = text("cls") else {
                return skip("missing_label");
            };
            let Ok(label) = cls.trim().parse::<usize>() else {
                return skip("bad_label");
            };
            f(EvalSample {
                key: group.key,
                image,
                label,
                captions: Vec::new(),
            })
        }
        TarKind::Retrieval => {
            let Some(txt) = text("txt") else {
                return skip("missing_caption");
            };
            // Python's str.splitlines, as clip_benchmark.
            let captions = txt.lines().map(str::to_string).collect();
            f(EvalSample {
                key: group.key,
                image,
                label: 0,
                captions,
            })
        }
    }
}

fn read_dfndr(
    dataset: &Dataset,
    synthetic: bool,
    options: &DataOptions,
    skipped: &mut BTreeMap<String, u64>,
    f: &mut dyn FnMut(EvalSample) -> Result<()>,
) -> Result<()> {
    let spool = Spool::new(None, 1, std::sync::Arc::new(|| {}));
    let limits = ReaderLimits {
        max_member_bytes: options.max_member_bytes,
    };
    for shard in &dataset.shards {
        let unreadable =
            |e: String| TrainError::Data(format!("shard {} cannot be read: {e}", shard.name));
        let copy = local_copy(dataset.store.as_ref(), &shard.path)
            .map_err(|e| unreadable(e.to_string()))?;
        let reader = ShardReader::open_path(copy.path()).map_err(|e| unreadable(e.to_string()))?;
        let mut columns: Vec<String> = Vec::new();
        if reader.layout().embed_images {
            columns.push("image".into());
        }
        if synthetic {
            for s in &reader.layout().syn {
                columns.push(format!("syn_text_{}", s.tag));
            }
        }
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        let rows = reader
            .select(&names)
            .and_then(|r| r.rows())
            .map_err(|e| unreadable(e.to_string()))?;
        let mut cursor = OriginalsCursor::new(&spool, limits);
        for row in rows {
            let row = row.map_err(|e| unreadable(e.to_string()))?;
            let image = match cursor.original(&row) {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(missing)) => {
                    *skipped.entry(missing.reason().to_string()).or_default() += 1;
                    continue;
                }
                Err(e) => return Err(unreadable(e.to_string())),
            };
            let mut captions = vec![row.caption.clone()];
            for s in &row.syn {
                captions.extend(s.texts.iter().cloned());
            }
            f(EvalSample {
                key: row.key.clone(),
                image,
                label: 0,
                captions,
            })?;
        }
    }
    Ok(())
}
