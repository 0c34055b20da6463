//! dfndr on a CPU without AVX-512, emulated (qemu user mode, an AMD EPYC Milan: AVX2 + FMA),
//! so that every kernel choice follows that CPU, including the matrix-product kernels of the
//! `gemm` crate, which `DFNDR_SIMD` cannot force. It replays the case that failed on a real
//! AVX2 machine: a ground-truth caption embedded by a job without captioner, by a job with
//! one (other text batches), and after `dfndr caption` added captions: the embeddings agree
//! within one float16 step (docs/FORMAT.md, "Determinism") with each other and with the native
//! CPU's, keys and views exactly, and captions exactly on the one machine.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use dfndr_shards::format::{Row, ShardReader};

const TEACHER: &str = "[[teachers]]\nname = \"t\"\nweights = \"random:4\"\nlogit_scale = 70.0\n[teachers.arch]\nembed_dim = 24\n[teachers.arch.vision]\nimage_size = 64\npatch_size = 16\nwidth = 32\nlayers = 2\nhead_width = 16\n[teachers.arch.text]\nwidth = 32\nheads = 2\nlayers = 2\n";
const CAPTIONER: &str = "[[captioners]]\ntag = \"coca\"\nweights = \"random:5\"\nnum_captions = 2\n[captioners.arch]\nembed_dim = 32\n[captioners.arch.vision]\nimage_size = 64\npatch_size = 16\nwidth = 32\nlayers = 1\nhead_width = 16\nattentional_pool = true\nattn_pooler_heads = 2\nattn_pooler_queries = 8\n[captioners.arch.text]\nwidth = 32\nheads = 2\nlayers = 1\nembed_cls = true\ncontext_length = 76\n[captioners.arch.multimodal]\nwidth = 32\nheads = 2\nlayers = 1\n[captioners.generation]\nseq_len = 8\n[caption]\nbatch_size = 4\n";
const BASE: &str = "seed = 9\nbatch_size = 5\n[augment]\nsize = 64\nnum_augmentations = 1\n";

fn rows(out: &Path, shard: &str) -> Vec<Row> {
    ShardReader::open_path(out.join(format!("shards/{shard}.parquet")))
        .unwrap()
        .rows()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Runs `cmd` (a dfndr command line after the binary) and returns its log.
fn ok(mut cmd: Command, args: &[&str], config: &Path, extra: Option<&Path>) -> String {
    cmd.args(args)
        .arg("--no-progress")
        .arg("--config")
        .arg(config);
    if let Some(out) = extra {
        cmd.arg(out);
    }
    let o = run(&mut cmd);
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

#[test]
fn on_an_avx2_cpu_embeddings_across_batches_and_machines_agree_within_one_float16_step() {
    let dir = tempfile::tempdir().unwrap();
    // One demo shard (13 samples: three image batches, text batches that differ with the
    // captioner), two short captions per image: emulation is slow, and 5-10x slower on some
    // CI hosts than on others.
    let input = format!("{}/demo-00000.tar", demo_dir().display());
    let job = |name: &str, extra: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let out = d.join("out");
        (write_config(&d, &input, &out, extra), out)
    };
    let (plain, plain_out) = job("plain", &format!("{BASE}{TEACHER}"));
    let (full, full_out) = job("full", &format!("{BASE}{CAPTIONER}{TEACHER}"));
    let (native, native_out) = job("native", &format!("{BASE}{CAPTIONER}{TEACHER}"));
    let avx2 = || {
        let mut cmd = dfndr_on_cpu("EPYC-Milan");
        cmd.env_remove("DFNDR_SIMD");
        cmd
    };
    let log = ok(avx2(), &["reinforce"], &plain, None);
    assert!(log.contains("simd=avx2"), "{log}");
    ok(avx2(), &["reinforce"], &full, None);
    ok(avx2(), &["caption"], &full, Some(&plain_out));
    ok(dfndr(), &["reinforce"], &native, None);

    let (mut values, mut differing) = (0usize, 0usize);
    let (mut captions, mut other_captions) = (0usize, 0usize);
    for shard in ["demo-00000"] {
        let (p, f, n) = (
            rows(&plain_out, shard),
            rows(&full_out, shard),
            rows(&native_out, shard),
        );
        assert_eq!((p.len(), f.len()), (n.len(), n.len()));
        for ((p, f), n) in p.iter().zip(&f).zip(&n) {
            // Keys, views and captions are identical on one machine in any batch, and views
            // on every machine.
            assert_eq!((&p.key, &p.paug), (&n.key, &n.paug));
            assert_eq!((&p.paug, &p.syn[0].texts), (&f.paug, &f.syn[0].texts));
            // Captions are seeded draws from the model's probabilities: another CPU's last
            // bits can move a draw across a boundary (counted, documented).
            captions += n.syn[0].texts.len();
            other_captions += f.syn[0]
                .texts
                .iter()
                .zip(&n.syn[0].texts)
                .filter(|(a, b)| a != b)
                .count();
            // The ground-truth caption in other text batches, and on another CPU.
            let pairs = [
                (&p.text_emb, &f.text_emb),
                (&f.text_emb, &n.text_emb),
                (&f.image_emb, &n.image_emb),
            ];
            for (a, b) in pairs {
                for (x, y) in a.iter().zip(b.iter()) {
                    assert!(
                        within_one_f16_step(x, y),
                        "{shard} {}: {x:?} vs {y:?}",
                        p.key
                    );
                    values += x.len();
                    differing += x.iter().zip(y).filter(|(u, v)| u != v).count();
                }
            }
        }
    }
    eprintln!(
        "emulated AVX2 CPU: {differing} of {values} compared embedding values differ (across text batches and against the native CPU), all within one float16 step; {other_captions} of {captions} synthetic captions differ from the native CPU's"
    );
}
