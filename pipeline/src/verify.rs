//! `dfndr verify OUT`: re-checks every done shard from its bytes.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use dfndr_shards::format::{ShardReader, SCHEMA_VERSION};
use dfndr_shards::job::{sha256_of, DoneRecord, Job, WorkerIdentity};
use dfndr_shards::store::{local_copy, open_store};

/// Largest deviation from unit norm accepted for a stored embedding (float16 storage keeps
/// about 3 decimal digits per component).
const NORM_TOLERANCE: f32 = 1e-2;

/// Verifies the job at `output`; exit status 0 iff every done shard passes.
pub fn run(output: &str) -> Result<ExitCode> {
    let store = open_store(output)?;
    let job = Job::new(store, WorkerIdentity::current(0), Duration::from_secs(300));
    let Some(card) = job.read_card()? else {
        bail!("{output} is not a dfndr output: it has no dfndr.json");
    };
    let fingerprint = card
        .get("config_fingerprint")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let done = job.all_done()?;
    let mut bad = 0usize;
    for (name, rec) in &done {
        let checked = if rec.config_fingerprint != fingerprint {
            Err(anyhow::anyhow!(
                "written under config fingerprint {}, but the dataset card's is {fingerprint} \
                 (a config changed with --force; rerun the job to redo the shard)",
                rec.config_fingerprint
            ))
        } else {
            verify_shard(&job, rec)
        };
        match checked {
            Ok(rows) => println!("ok      {name}  {rows} rows"),
            Err(problem) => {
                bad += 1;
                println!("FAILED  {name}  {problem:#}");
            }
        }
    }
    println!(
        "{} of {} done shards verified, {bad} failed",
        done.len() - bad,
        done.len()
    );
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify_shard(job: &Job, rec: &DoneRecord) -> Result<u64> {
    let Some(meta) = job.store().stat(&rec.output)? else {
        bail!("output {} is missing", rec.output);
    };
    if meta.size != rec.bytes {
        bail!(
            "size is {} bytes, the done record says {}",
            meta.size,
            rec.bytes
        );
    }
    // One download on object stores: hash the local copy the parquet reader needs anyway.
    let copy = local_copy(&**job.store(), &rec.output)?;
    let (sha, _) = sha256_of(std::fs::File::open(copy.path())?)?;
    if sha != rec.sha256 {
        bail!("sha256 is {sha}, the done record says {}", rec.sha256);
    }
    let reader = ShardReader::open_path(copy.path())?;
    if reader.meta().schema_version != SCHEMA_VERSION {
        bail!("schema version {}", reader.meta().schema_version);
    }
    if reader.num_rows() != rec.rows {
        bail!(
            "{} rows, the done record says {}",
            reader.num_rows(),
            rec.rows
        );
    }
    // Each teacher's part of an embedding is normalised on its own.
    let parts: Vec<(String, usize)> = reader
        .meta()
        .teachers
        .iter()
        .map(|t| (t.name.clone(), t.dim))
        .collect();
    if let Some(emb) = reader.layout().emb {
        let total: usize = parts.iter().map(|p| p.1).sum();
        if !parts.is_empty() && total != emb.dim {
            bail!(
                "the teachers' dimensions add up to {total}, the embeddings have {}",
                emb.dim
            );
        }
    }
    let mut keys = HashSet::new();
    let mut n = 0u64;
    for row in reader.rows()? {
        let row = row?;
        n += 1;
        let embeddings = row
            .image_emb
            .iter()
            .chain(&row.text_emb)
            .chain(row.syn.iter().flat_map(|s| &s.emb));
        for emb in embeddings {
            let mut rest = emb.as_slice();
            let whole = [("embedding".to_string(), emb.len())];
            let parts = if parts.is_empty() {
                &whole[..]
            } else {
                &parts[..]
            };
            for (teacher, dim) in parts {
                let (part, tail) = rest.split_at((*dim).min(rest.len()));
                rest = tail;
                let norm = part.iter().map(|v| v * v).sum::<f32>().sqrt();
                if !norm.is_finite() || (norm - 1.0).abs() > NORM_TOLERANCE {
                    bail!(
                        "row {:?}: {teacher} embedding norm {norm} is not 1",
                        row.key
                    );
                }
            }
        }
        if !keys.insert(row.key.clone()) {
            bail!("key {:?} appears twice", row.key);
        }
    }
    if n != rec.rows {
        bail!("read {n} rows, the done record says {}", rec.rows);
    }
    Ok(n)
}
