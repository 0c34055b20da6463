//! Evaluation during training: the `[eval]` section of a training config, its datasets
//! opened (and checked) before the first step, and the evaluations run every N steps and at
//! the end.

use serde::{Deserialize, Serialize};

use super::data::{DataOptions, EvalData};
use super::prompts::{imagenet_classnames, named_or_file, openai_imagenet_templates};
use super::runner::{evaluate, EvalReport, EvalSettings, Quiet};
use crate::error::{Result, TrainError};
use crate::student::Student;

/// `[eval]`: what to evaluate and how often.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every this many steps (and always after the last step); 0: only at the end.
    #[serde(default)]
    pub every_steps: u64,
    /// Images (and prompts) encoded at a time.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// The datasets.
    pub datasets: Vec<EvalDatasetConfig>,
}

fn default_batch() -> usize {
    64
}

fn default_split() -> String {
    "test".into()
}

/// `[[eval.datasets]]`: one dataset, as `dfndr eval --data` takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDatasetConfig {
    /// An image folder, a clip_benchmark webdataset or a dfndr output.
    pub path: String,
    /// Name in the logs (default: the folder's name).
    #[serde(default)]
    pub name: Option<String>,
    /// Class names file, or `imagenet`.
    #[serde(default)]
    pub classnames: Option<String>,
    /// Templates file, or `openai-imagenet`.
    #[serde(default)]
    pub templates: Option<String>,
    /// Webdataset split.
    #[serde(default = "default_split")]
    pub split: String,
    /// DFNDR datasets: synthetic captions count as captions too.
    #[serde(default)]
    pub synthetic_captions: bool,
    /// At most this many images (a fixed subset: the first ones in the dataset's order).
    #[serde(default)]
    pub limit: Option<u64>,
}

/// The opened datasets of a run's `[eval]`.
pub struct TrainingEval {
    every_steps: u64,
    datasets: Vec<(String, EvalData, EvalSettings)>,
}

impl TrainingEval {
    /// Opens every dataset of `section` (a missing folder or file is a config error now, not
    /// hours into the run).
    pub fn open(section: &EvalSection) -> Result<Self> {
        if section.datasets.is_empty() {
            return Err(TrainError::Config("eval.datasets: none given".into()));
        }
        let mut datasets = Vec::new();
        for (i, d) in section.datasets.iter().enumerate() {
            let field = format!("eval.datasets[{i}]");
            let options = DataOptions {
                split: d.split.clone(),
                synthetic_captions: d.synthetic_captions,
                ..DataOptions::default()
            };
            let data = EvalData::open(&d.path, &options)
                .map_err(|e| TrainError::Config(format!("{field}.path: {e}")))?;
            let settings = EvalSettings {
                batch_size: section.batch_size.max(1),
                classnames: named_or_file(d.classnames.as_deref(), "imagenet", imagenet_classnames)
                    .map_err(|e| TrainError::Config(format!("{field}.classnames: {e}")))?,
                templates: named_or_file(
                    d.templates.as_deref(),
                    "openai-imagenet",
                    openai_imagenet_templates,
                )
                .map_err(|e| TrainError::Config(format!("{field}.templates: {e}")))?,
                limit: d.limit,
                data: options,
                ..EvalSettings::default()
            };
            let name = d.name.clone().unwrap_or_else(|| data.name.clone());
            datasets.push((name, data, settings));
        }
        Ok(Self {
            every_steps: section.every_steps,
            datasets,
        })
    }

    /// Whether to evaluate after `step` of `steps`.
    pub fn due(&self, step: u64, steps: u64) -> bool {
        step == steps || (self.every_steps > 0 && step.is_multiple_of(self.every_steps))
    }

    /// Evaluates `student` on every dataset (named as configured).
    pub fn run(&self, student: &Student) -> Result<Vec<EvalReport>> {
        let mut out = Vec::with_capacity(self.datasets.len());
        for (name, data, settings) in &self.datasets {
            let mut report = evaluate(student, data, settings, &mut Quiet)?;
            report.dataset = name.clone();
            out.push(report);
        }
        Ok(out)
    }
}
