//! `dfndr inspect FILE`: what a webdataset tar or a DFNDR parquet file holds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result};
use dfndr_shards::format::ShardReader;
use dfndr_shards::wds::{ReaderLimits, WdsEvent, WdsReader};

/// Prints a summary of `path` and its first `rows` samples or rows.
pub fn run(path: &Path, rows: usize) -> Result<()> {
    let mut magic = [0u8; 4];
    let n = File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .read(&mut magic)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if n == 4 && &magic == b"PAR1" {
        inspect_parquet(path, rows)
    } else {
        inspect_tar(path, rows)
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn inspect_parquet(path: &Path, rows: usize) -> Result<()> {
    let reader = ShardReader::open_path(path)
        .with_context(|| format!("cannot open {} as a DFNDR shard", path.display()))?;
    let meta = reader.meta().clone();
    let layout = reader.layout().clone();
    println!("file            {}", path.display());
    println!(
        "format          DFNDR v{} (written by dfndr {})",
        meta.schema_version, meta.dfndr_version
    );
    println!("source          {}", meta.source);
    println!("config          {}", meta.config_fingerprint);
    println!(
        "rows            {} in {} row group(s)",
        reader.num_rows(),
        reader.num_row_groups()
    );
    println!("columns         {}", layout.column_names().join(", "));
    if !meta.teachers.is_empty() {
        println!("teachers        {}", serde_json::to_string(&meta.teachers)?);
    }
    if !meta.captioners.is_empty() {
        println!(
            "captioners      {}",
            serde_json::to_string(&meta.captioners)?
        );
    }
    if !meta.augmentation.is_null() {
        println!("augmentation    {}", meta.augmentation);
    }
    for (i, row) in reader.rows()?.take(rows).enumerate() {
        let row = row.with_context(|| format!("shard {}", path.display()))?;
        println!();
        println!("[{i}] key       {}", row.key);
        println!("    caption   {}", clip(&row.caption, 100));
        println!("    size      {}x{}", row.width, row.height);
        println!("    url       {}", row.url.as_deref().unwrap_or("-"));
        if let Some(image) = &row.image {
            println!("    image     {} bytes", image.len());
        }
        if layout.paug {
            println!("    paug      {} view(s)", row.paug.len());
            for (k, p) in row.paug.iter().enumerate() {
                println!("      [{k}] {}", dfndr_dataset::paug::describe(p));
            }
        }
        if layout.image_emb {
            println!(
                "    image_emb {} x {}",
                row.image_emb.len(),
                row.image_emb.first().map_or(0, Vec::len)
            );
        }
        for (syn, s) in layout.syn.iter().zip(&row.syn) {
            println!("    syn_text_{} {:?}", syn.tag, s.texts);
        }
    }
    Ok(())
}

fn inspect_tar(path: &Path, rows: usize) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = WdsReader::new(BufReader::new(file), ReaderLimits::default());
    println!("file            {}", path.display());
    println!("format          webdataset tar");
    let mut samples = 0u64;
    let mut skipped: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut image_types: BTreeMap<String, u64> = BTreeMap::new();
    let mut failure = None;
    for event in reader {
        match event {
            Ok(WdsEvent::Sample(s)) => {
                if (samples as usize) < rows {
                    let dims = match dfndr_augment::decode::probe(&s.image) {
                        Ok((_, w, h)) => format!("{w}x{h}"),
                        Err(e) => format!("(header unreadable: {e})"),
                    };
                    println!();
                    println!("[{samples}] key     {}", s.key);
                    println!("    image   {} {} bytes {dims}", s.image_ext, s.image.len());
                    println!("    caption {}", clip(&s.caption, 100));
                    println!("    url     {}", s.url.as_deref().unwrap_or("-"));
                }
                samples += 1;
                *image_types.entry(s.image_ext).or_default() += 1;
            }
            Ok(WdsEvent::Skip(skip)) => {
                if rows > 0 {
                    println!();
                    println!(
                        "    skipped {}: {} ({})",
                        skip.key, skip.reason, skip.detail
                    );
                }
                *skipped.entry(skip.reason.as_str()).or_default() += 1;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    println!();
    let types: Vec<String> = image_types
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("samples         {samples} ({})", types.join(", "));
    let total_skipped: u64 = skipped.values().sum();
    println!("skipped         {total_skipped}");
    for (reason, n) in skipped {
        println!("  {n:>8}  {reason}");
    }
    match failure {
        // A shard the reinforce job would record as failed: say so with a failing status.
        Some(e) => Err(anyhow::anyhow!(e)).with_context(|| {
            format!(
                "{} cannot be read past the samples above (dfndr reinforce records it as a failed shard)",
                path.display()
            )
        }),
        None => Ok(()),
    }
}
