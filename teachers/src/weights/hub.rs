//! `hf-hub:ORG/NAME` references, resolved in the standard Hugging Face cache.
//!
//! The cache layout is the one `huggingface_hub` writes
//! (`models--ORG--NAME/{refs/REVISION, snapshots/COMMIT/FILE}`), so weights downloaded by
//! OpenCLIP, `huggingface-cli download` or dfndr are found and shared.

use std::path::{Path, PathBuf};

use crate::error::{Result, TeacherError};

/// The files OpenCLIP looks for in a hub repository, in its order of preference.
pub const OPEN_CLIP_FILES: &[&str] =
    &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

/// A Hugging Face repository (and optional revision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRef {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit; `main` when absent.
    pub revision: Option<String>,
}

impl HubRef {
    /// Parses `ORG/NAME[@REVISION]` (a trailing `/`, as in OpenCLIP's tables, is allowed).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return Err("empty revision after `@`".into()),
            None => (s, None),
        };
        let repo = repo.trim_end_matches('/');
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid(p)) {
            return Err("expected hf-hub:ORG/NAME (letters, digits, '-', '_', '.')".into());
        }
        Ok(Self {
            repo: repo.to_string(),
            revision,
        })
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.repo),
            None => write!(f, "{}", self.repo),
        }
    }
}

/// The hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// True when `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) is set to a true value.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "on" | "yes" | "true"
                )
            })
            .unwrap_or(false)
    })
}

/// The cached checkpoint file of `hub` (OpenCLIP's file names, safetensors first).
pub fn resolve_hub(hub: &HubRef) -> Result<PathBuf> {
    resolve_in(&hub_cache_dir(), hub)
}

fn resolve_in(cache: &Path, hub: &HubRef) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", hub.repo.replace('/', "--")));
    let rev = hub.revision();
    // A branch or tag name is mapped to a commit by refs/; a commit is used directly.
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(rev))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| rev.to_string());
    let snapshot = repo_dir.join("snapshots").join(&commit);
    for file in OPEN_CLIP_FILES {
        let path = snapshot.join(file);
        if path.is_file() {
            return Ok(path);
        }
    }
    let how = format!(
        "download it once with `huggingface-cli download {repo} {file}` (or `hf download`), \
         or point `weights` at the file",
        repo = hub.repo,
        file = OPEN_CLIP_FILES[0]
    );
    let mode = if offline() {
        " (offline mode is on)"
    } else {
        ""
    };
    Err(TeacherError::Hub(format!(
        "hf-hub:{hub} is not in the Hugging Face cache{mode}: looked for {} in {}; {how}. \
         The cache is HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub.",
        OPEN_CLIP_FILES.join(" or "),
        snapshot.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_and_revision() {
        let h = HubRef::parse("apple/DFN2B-CLIP-ViT-L-14/").unwrap();
        assert_eq!(h.repo, "apple/DFN2B-CLIP-ViT-L-14");
        assert_eq!(h.revision, None);
        let h = HubRef::parse("apple/DFN2B-CLIP-ViT-L-14-39B@v1.0").unwrap();
        assert_eq!(h.revision.as_deref(), Some("v1.0"));
        for bad in ["apple", "a/b/c", "../x", "a/", "a/b@", "a b/c"] {
            assert!(HubRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_files_through_refs_and_prefers_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--apple--X");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        std::fs::write(snap.join("open_clip_pytorch_model.bin"), b"x").unwrap();
        let hub = HubRef::parse("apple/X").unwrap();
        assert_eq!(
            resolve_in(dir.path(), &hub).unwrap(),
            snap.join("open_clip_pytorch_model.bin")
        );
        std::fs::write(snap.join("open_clip_model.safetensors"), b"x").unwrap();
        assert_eq!(
            resolve_in(dir.path(), &hub).unwrap(),
            snap.join("open_clip_model.safetensors")
        );
        // A commit revision bypasses refs/.
        let pinned = HubRef::parse("apple/X@abc123").unwrap();
        assert!(resolve_in(dir.path(), &pinned).is_ok());
        let err = resolve_in(dir.path(), &HubRef::parse("apple/Y").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("huggingface-cli download apple/Y"), "{err}");
    }
}
