//! Class names and prompt templates: OpenAI's 80 ImageNet templates and the 1,000 ImageNet
//! class names built in (equal to OpenCLIP's `OPENAI_IMAGENET_TEMPLATES` /
//! `IMAGENET_CLASSNAMES` and clip_benchmark's `imagenet1k` entries), others from text files
//! with one entry per line.

use std::path::Path;

use crate::error::{Result, TrainError};

const IMAGENET_CLASSNAMES: &str = include_str!("imagenet_classnames.txt");
const OPENAI_IMAGENET_TEMPLATES: &str = include_str!("openai_imagenet_templates.txt");

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The 1,000 ImageNet class names, in class-index order.
pub fn imagenet_classnames() -> Vec<String> {
    lines(IMAGENET_CLASSNAMES)
}

/// OpenAI's 80 ImageNet prompt templates (placeholder `{c}`).
pub fn openai_imagenet_templates() -> Vec<String> {
    lines(OPENAI_IMAGENET_TEMPLATES)
}

/// Non-empty, trimmed lines of a text file (clip_benchmark's `classnames.txt`,
/// `zeroshot_classification_templates.txt`).
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let out = lines(&text);
    if out.is_empty() {
        return Err(TrainError::Data(format!("{}: no entries", path.display())));
    }
    Ok(out)
}

/// A list given as the name of a built-in one (`builtin`, made by `make`) or as a file.
pub fn named_or_file(
    spec: Option<&str>,
    builtin: &str,
    make: fn() -> Vec<String>,
) -> Result<Option<Vec<String>>> {
    Ok(match spec {
        None => None,
        Some(s) if s == builtin => Some(make()),
        Some(path) => Some(read_lines(Path::new(path))?),
    })
}

/// Checks that every template has a placeholder (`{c}` as clip_benchmark writes them, or
/// Python's `{}` as OpenCLIP's string templates).
pub fn check_templates(templates: &[String]) -> Result<()> {
    if templates.is_empty() {
        return Err(TrainError::Config("no prompt templates".into()));
    }
    match templates
        .iter()
        .find(|t| !t.contains("{c}") && !t.contains("{}"))
    {
        Some(t) => Err(TrainError::Config(format!(
            "template {t:?} has no {{c}} placeholder for the class name"
        ))),
        None => Ok(()),
    }
}

/// `template` with the class name in place of `{c}` (or `{}`).
pub fn fill(template: &str, classname: &str) -> String {
    template.replace("{c}", classname).replace("{}", classname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_lists_have_their_sizes_and_placeholders() {
        let names = imagenet_classnames();
        assert_eq!(names.len(), 1000);
        assert_eq!(names[0], "tench");
        assert_eq!(names[999], "toilet paper");
        let templates = openai_imagenet_templates();
        assert_eq!(templates.len(), 80);
        check_templates(&templates).unwrap();
        assert_eq!(fill(&templates[0], "cat"), "a bad photo of a cat.");
        assert!(check_templates(&["a photo".to_string()]).is_err());
    }
}
