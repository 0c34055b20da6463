//! Shared helpers of the benchmark binaries.

use std::path::Path;

use anyhow::{Context, Result};
use dfndr_shards::wds::{RawSample, ReaderLimits, WdsEvent, WdsReader};

/// (key, encoded image) of every sample of the webdataset tars in `dir`, in file order.
pub fn load_images(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(load_samples(dir)?
        .into_iter()
        .map(|s| (s.key, s.image))
        .collect())
}

/// Every sample of the webdataset tars in `dir`, in file order.
pub fn load_samples(dir: &Path) -> Result<Vec<RawSample>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    paths.sort();
    let mut images = Vec::new();
    for path in paths {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        for event in WdsReader::new(std::io::BufReader::new(file), ReaderLimits::default()) {
            if let WdsEvent::Sample(s) = event? {
                images.push(s);
            }
        }
    }
    Ok(images)
}
