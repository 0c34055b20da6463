//! OpenCLIP tower throughput on CPU: `encode_image` and `encode_text` of a built-in
//! architecture (ViT-L-14-quickgelu by default) with deterministic random weights, fp32.
//! Run through `bench/teachers.sh`, which runs OpenCLIP (PyTorch) on the same shapes with the
//! same thread count in the same run and prints the ratios.
//!
//! Threads: candle's matmul (gemm) and element-wise pool read `RAYON_NUM_THREADS` /
//! `CANDLE_NUM_THREADS`; the script sets both.
//!
//! `--profile` also times one image-batch forward op by op (stderr): the vision tower rebuilt
//! from the same candle ops and public blocks as `dfndr_teachers` (`LayerNorm`,
//! `softmax_last_dim`, `Kernels::Fused`; QuickGELU's three ops written out so each is timed),
//! with one set of random weights per layer, each op timed on its own (CPU ops are
//! synchronous) and summed over the stack.
//!
//! `--device cuda:N` and `--precision bf16` run the towers on a GPU (a `--features cuda`
//! build); each timed call then ends with a device synchronisation. `--weights` loads a
//! checkpoint instead of `random:0`; `--images FILE` takes the batch from the `images`
//! tensor of a safetensors file (instead of random pixels) and `--out FILE` saves the first
//! call's image embeddings there (`image_features`, float32), for comparisons with OpenCLIP.
//!
//! Usage: teachers_bench [--model NAME] [--batch B] [--text-batch N] [--iters N]
//!                       [--demo DIR] [--device D] [--precision P] [--weights W]
//!                       [--images FILE] [--out FILE] [--profile]
//! Prints one JSON line on stdout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use dfndr_teachers::arch::LN_EPS;
use dfndr_teachers::blocks::{softmax_last_dim, Activation, Kernels, LayerNorm};
use dfndr_teachers::device::Compute;
use dfndr_teachers::tokenizer::Tokenizer;
use dfndr_teachers::weights::{bind, LoadedWeights, WeightSource, WeightsRef};
use dfndr_teachers::{ClipConfig, ClipModel};

struct Args {
    model: String,
    batch: usize,
    text_batch: usize,
    iters: usize,
    demo: PathBuf,
    device: String,
    precision: String,
    weights: String,
    images: Option<PathBuf>,
    out: Option<PathBuf>,
    profile: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: "ViT-L-14-quickgelu".into(),
        batch: 8,
        text_batch: 64,
        iters: 3,
        demo: PathBuf::from("assets/demo"),
        device: "cpu".into(),
        precision: "auto".into(),
        weights: "random:0".into(),
        images: None,
        out: None,
        profile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?,
            "--batch" => args.batch = value()?.parse().context("--batch must be a number")?,
            "--text-batch" => {
                args.text_batch = value()?.parse().context("--text-batch must be a number")?
            }
            "--iters" => args.iters = value()?.parse().context("--iters must be a number")?,
            "--demo" => args.demo = PathBuf::from(value()?),
            "--device" => args.device = value()?,
            "--precision" => args.precision = value()?,
            "--weights" => args.weights = value()?,
            "--images" => args.images = Some(PathBuf::from(value()?)),
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--profile" => args.profile = true,
            _ => bail!(
                "unknown argument {flag}\nusage: teachers_bench [--model NAME] [--batch B] \
                 [--text-batch N] [--iters N] [--demo DIR] [--device D] [--precision P] \
                 [--weights W] [--images FILE] [--out FILE] [--profile]"
            ),
        }
    }
    ensure!(
        args.batch > 0 && args.text_batch > 0 && args.iters > 0,
        "batch sizes and iters must be positive"
    );
    Ok(args)
}

/// Captions of the webdataset tars in `dir`, in file order (the reference reads the same
/// `.txt` members, stripped, in the same order).
fn captions(dir: &Path) -> Result<Vec<String>> {
    let out: Vec<String> = dfndr_bench::load_samples(dir)?
        .into_iter()
        .map(|s| s.caption)
        .collect();
    ensure!(!out.is_empty(), "no captions in {}", dir.display());
    Ok(out)
}

/// Median seconds per call of `f` over `iters` calls after one untimed warm-up call (the
/// median, because this shared machine's speed drifts by 10% or more from call to call).
fn time_per_call(
    device: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    let check = |t: Tensor| -> Result<()> {
        let s = t.sum_all()?.to_scalar::<f32>()?;
        ensure!(s.is_finite(), "non-finite embeddings");
        Ok(())
    };
    check(f()?)?;
    device.synchronize()?;
    let mut seconds = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        let out = std::hint::black_box(f()?);
        // GPU calls return before the work is done: wait for it inside the clock, then check
        // the output outside it.
        device.synchronize()?;
        seconds.push(start.elapsed().as_secs_f64());
        check(out)?;
    }
    seconds.sort_by(f64::total_cmp);
    Ok(seconds[seconds.len() / 2])
}

/// Multiply-adds ×2 of one transformer stack on `t` tokens: the four attention projections,
/// the two MLP matrices, and q·kᵀ plus attn·v (4·T²·W).
fn stack_flops(t: usize, width: usize, hidden: usize, layers: usize) -> f64 {
    let (t, w, h) = (t as f64, width as f64, hidden as f64);
    layers as f64 * (2.0 * t * (4.0 * w * w + 2.0 * w * h) + 4.0 * t * t * w)
}

/// FLOPs of one image through the vision tower: patch embedding, stack, projection.
fn image_flops(cfg: &ClipConfig) -> f64 {
    let v = &cfg.vision;
    let grid = v.image_size / v.patch_size;
    let tc = cfg.vision_transformer();
    let patch = 2.0 * (grid * grid * 3 * v.patch_size * v.patch_size * v.width) as f64;
    let proj = 2.0 * (v.width * cfg.embed_dim) as f64;
    patch + stack_flops(grid * grid + 1, v.width, tc.mlp_width(), v.layers) + proj
}

/// FLOPs of one caption through the text tower (full context, as both implementations run it).
fn text_flops(cfg: &ClipConfig) -> f64 {
    let t = &cfg.text;
    let tc = cfg.text_transformer();
    stack_flops(t.context_length, t.width, tc.mlp_width(), t.layers)
        + 2.0 * (t.width * cfg.embed_dim) as f64
}

/// Accumulated time of named ops, in first-seen order.
#[derive(Default)]
struct Profile {
    rows: Vec<(&'static str, f64, usize, f64)>, // name, seconds, calls, flops
}

impl Profile {
    fn time<T>(
        &mut self,
        name: &'static str,
        flops: f64,
        f: impl FnOnce() -> candle_core::Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let out = f()?;
        let secs = start.elapsed().as_secs_f64();
        match self.rows.iter_mut().find(|r| r.0 == name) {
            Some(r) => {
                r.1 += secs;
                r.2 += 1;
                r.3 += flops;
            }
            None => self.rows.push((name, secs, 1, flops)),
        }
        Ok(out)
    }
}

struct Layer {
    ln_1: LayerNorm,
    ln_2: LayerNorm,
    w_qkv: Tensor,
    b_qkv: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    w_fc: Tensor,
    b_fc: Tensor,
    w_proj: Tensor,
    b_proj: Tensor,
}

/// The vision tower of `cfg` rebuilt op by op (same op sequence as vision.rs, transformer.rs,
/// attention.rs and linear.rs), each op timed.
struct ProfiledVision {
    cfg: ClipConfig,
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    layers: Vec<Layer>,
    ln_post: LayerNorm,
    proj: Tensor,
    act: Activation,
}

impl ProfiledVision {
    fn new(cfg: &ClipConfig) -> Result<Self> {
        let v = &cfg.vision;
        let tc = cfg.vision_transformer();
        let (w, h, p) = (v.width, tc.mlp_width(), v.patch_size);
        let grid = v.image_size / p;
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize), std: f64| Tensor::randn(0f32, std as f32, shape, &dev);
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, &dev);
        // LayerNorms through the library block (random source: weight 1, bias 0).
        let lns = bind(&WeightSource::Random(0), &Compute::cpu(), "profile", |vb| {
            (0..2 * v.layers + 2)
                .map(|i| LayerNorm::new(vb.pp(i), w, LN_EPS, Kernels::Fused))
                .collect::<candle_core::Result<Vec<_>>>()
        })?;
        let mut lns = lns.into_iter();
        let mut next_ln = || lns.next().context("layer norms");
        let ln_pre = next_ln()?;
        let ln_post = next_ln()?;
        let mut layers = Vec::with_capacity(v.layers);
        for _ in 0..v.layers {
            layers.push(Layer {
                ln_1: next_ln()?,
                ln_2: next_ln()?,
                w_qkv: randn((3 * w, w), (w as f64).powf(-0.5))?,
                b_qkv: zeros(3 * w)?,
                w_out: randn((w, w), (w as f64).powf(-0.5))?,
                b_out: zeros(w)?,
                w_fc: randn((h, w), (w as f64).powf(-0.5))?,
                b_fc: zeros(h)?,
                w_proj: randn((w, h), (h as f64).powf(-0.5))?,
                b_proj: zeros(w)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight: randn((w, 3 * p * p), ((3 * p * p) as f64).powf(-0.5))?,
            class_embedding: Tensor::randn(0f32, 0.03, w, &dev)?,
            positional_embedding: randn((grid * grid + 1, w), 0.03)?,
            ln_pre,
            layers,
            ln_post,
            proj: randn((w, cfg.embed_dim), 0.03)?,
            act: cfg.activation(),
        })
    }

    /// `Linear::forward` of linear.rs, matmul and bias timed apart.
    fn linear(
        prof: &mut Profile,
        name: &'static str,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
    ) -> Result<Tensor> {
        let (bt, t, k) = x.dims3()?;
        let n = w.dim(0)?;
        let flops = 2.0 * (bt * t * k * n) as f64;
        let y = prof.time(name, flops, || x.reshape((bt * t, k))?.matmul(&w.t()?))?;
        let y = prof.time("bias adds", 0.0, || y.broadcast_add(b))?;
        Ok(y.reshape((bt, t, n))?)
    }

    fn forward(&self, images: &Tensor, prof: &mut Profile) -> Result<Tensor> {
        let v = &self.cfg.vision;
        let tc = self.cfg.vision_transformer();
        let (b, _, _, _) = images.dims4()?;
        let (p, w, heads) = (v.patch_size, v.width, tc.heads);
        let g = v.image_size / p;
        let d = w / heads;
        let t = g * g + 1;
        // Patch embedding (vision.rs).
        let patches = prof.time("patch embed: patchify copy", 0.0, || {
            images
                .reshape((b, 3, g, p, g, p))?
                .permute((0, 2, 4, 1, 3, 5))?
                .contiguous()?
                .reshape((b * g * g, 3 * p * p))
        })?;
        let pf = 2.0 * (b * g * g * 3 * p * p * w) as f64;
        let x = prof.time("patch embed: matmul", pf, || {
            patches
                .matmul(&self.patch_weight.t()?)?
                .reshape((b, g * g, w))
        })?;
        let x = prof.time("class token + positions", 0.0, || {
            let cls = self
                .class_embedding
                .reshape((1, 1, w))?
                .broadcast_as((b, 1, w))?;
            Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)
        })?;
        let mut x = prof.time("layernorm (ln_pre, ln_1, ln_2, ln_post)", 0.0, || {
            self.ln_pre.forward(&x)
        })?;
        // Residual blocks (transformer.rs, attention.rs).
        for layer in &self.layers {
            let h = prof.time("layernorm (ln_pre, ln_1, ln_2, ln_post)", 0.0, || {
                layer.ln_1.forward(&x)
            })?;
            let qkv = Self::linear(
                prof,
                "attn: qkv proj matmul",
                &h,
                &layer.w_qkv,
                &layer.b_qkv,
            )?;
            let packed = prof.time("attn: qkv permute copy", 0.0, || {
                qkv.reshape((b, t, 3, heads, d))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()
            })?;
            let (q, k, vv) = (packed.get(0)?, packed.get(1)?, packed.get(2)?);
            let q = prof.time("attn: q scale", 0.0, || &q * (d as f64).powf(-0.5))?;
            let af = 2.0 * (b * heads * t * t * d) as f64;
            let scores = prof.time("attn: scores q·kᵀ", af, || q.matmul(&k.t()?))?;
            let probs = prof.time("attn: softmax", 0.0, || {
                softmax_last_dim(&scores, Kernels::Fused)
            })?;
            let o = prof.time("attn: probs·v", af, || probs.matmul(&vv))?;
            let o = prof.time("attn: head merge copy", 0.0, || {
                o.transpose(1, 2)?.reshape((b, t, w))
            })?;
            let o = Self::linear(
                prof,
                "attn: out proj matmul",
                &o,
                &layer.w_out,
                &layer.b_out,
            )?;
            x = prof.time("residual adds", 0.0, || &x + o)?;
            let h = prof.time("layernorm (ln_pre, ln_1, ln_2, ln_post)", 0.0, || {
                layer.ln_2.forward(&x)
            })?;
            let h = Self::linear(prof, "mlp: c_fc matmul", &h, &layer.w_fc, &layer.b_fc)?;
            let h = match self.act {
                // Activation::QuickGelu's three ops (act.rs), timed apart.
                Activation::QuickGelu => {
                    let s = prof.time("mlp: quickgelu x·1.702", 0.0, || &h * 1.702)?;
                    let s = prof.time("mlp: quickgelu sigmoid", 0.0, || {
                        candle_nn::ops::sigmoid(&s)
                    })?;
                    prof.time("mlp: quickgelu x·sigmoid", 0.0, || &h * s)?
                }
                Activation::Gelu => prof.time("mlp: gelu (erf)", 0.0, || self.act.forward(&h))?,
            };
            let h = Self::linear(prof, "mlp: c_proj matmul", &h, &layer.w_proj, &layer.b_proj)?;
            x = prof.time("residual adds", 0.0, || &x + h)?;
        }
        let x = prof.time("layernorm (ln_pre, ln_1, ln_2, ln_post)", 0.0, || {
            self.ln_post.forward(&x)
        })?;
        let pf = 2.0 * (b * w * self.cfg.embed_dim) as f64;
        prof.time("pool + proj", pf, || {
            x.narrow(1, 0, 1)?
                .squeeze(1)?
                .reshape((b, w))?
                .matmul(&self.proj)
        })
    }
}

fn print_profile(prof: &Profile, images: usize, measured: f64, image_flops: f64) {
    let total: f64 = prof.rows.iter().map(|r| r.1).sum();
    eprintln!(
        "\nprofile: one forward of {images} images, ops timed one by one and summed over the stack \
         (ms per forward)"
    );
    eprintln!(
        "{:<42} {:>6} {:>10} {:>7} {:>9}",
        "op", "calls", "ms", "share", "GFLOP/s"
    );
    let mut rows: Vec<_> = prof.rows.iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (name, secs, calls, flops) in rows {
        let gflops = if *flops > 0.0 {
            format!("{:9.1}", flops / secs / 1e9)
        } else {
            String::new()
        };
        eprintln!(
            "{name:<42} {calls:>6} {:>10.1} {:>6.1}% {gflops:>9}",
            secs * 1e3,
            100.0 * secs / total
        );
    }
    let group = |prefix: &str| {
        prof.rows
            .iter()
            .filter(|r| r.0.starts_with(prefix))
            .map(|r| r.1)
            .sum::<f64>()
    };
    let mm: f64 = prof.rows.iter().filter(|r| r.3 > 0.0).map(|r| r.1).sum();
    let mm_flops: f64 = prof.rows.iter().map(|r| r.3).sum();
    eprintln!(
        "groups: attention {:.0} ms, mlp {:.0} ms, layernorm {:.0} ms, residual+bias {:.0} ms, patch embed {:.0} ms",
        group("attn:") * 1e3,
        group("mlp:") * 1e3,
        group("layernorm") * 1e3,
        (group("residual") + group("bias")) * 1e3,
        group("patch embed") * 1e3
    );
    eprintln!(
        "all matmuls: {:.0} ms ({:.1}% of the sum) at {:.1} GFLOP/s; everything else: {:.0} ms",
        mm * 1e3,
        100.0 * mm / total,
        mm_flops / mm / 1e9,
        (total - mm) * 1e3
    );
    eprintln!(
        "sum of ops {:.0} ms vs measured encode_image {:.0} ms per batch; whole forward {:.1} GFLOP/s \
         (measured), {:.1} GFLOP per image",
        total * 1e3,
        measured * 1e3,
        image_flops * images as f64 / measured / 1e9,
        image_flops / 1e9
    );
}

fn main() -> Result<()> {
    // As `dfndr` does at start-up.
    dfndr_teachers::memory::reuse_large_buffers();
    let args = parse_args()?;
    let cfg = ClipConfig::named(&args.model)?;
    let threads = candle_core::utils::get_num_threads();

    let compute = Compute::parse(&args.device, &args.precision)?;
    let device = compute.device.clone();
    let start = Instant::now();
    let weights = LoadedWeights::load(&WeightsRef::parse(&args.weights)?)?;
    let model = ClipModel::load(&cfg, &weights.source, &compute, Kernels::Fused, &args.model)?;
    drop(weights);
    let load_s = start.elapsed().as_secs_f64();

    let s = cfg.vision.image_size;
    let images = match &args.images {
        Some(file) => candle_core::safetensors::load(file, &device)?
            .remove("images")
            .with_context(|| format!("no `images` tensor in {}", file.display()))?
            .narrow(0, 0, args.batch)?,
        None => {
            Tensor::randn(0f32, 1f32, (args.batch, 3, s, s), &Device::Cpu)?.to_device(&device)?
        }
    };
    if let Some(out) = &args.out {
        let features = model.encode_image(&images)?.to_device(&Device::Cpu)?;
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("image_features".to_string(), features)]),
            out,
        )?;
    }
    let caps = captions(&args.demo)?;
    let texts: Vec<&str> = (0..args.text_batch)
        .map(|i| caps[i % caps.len()].as_str())
        .collect();
    let ids = Tokenizer::global().tokenize_batch(&texts, cfg.text.context_length);
    let token_sum: u64 = ids.iter().flatten().map(|&i| u64::from(i)).sum();

    let image_s = time_per_call(&device, args.iters, || Ok(model.encode_image(&images)?))?;
    let text_s = time_per_call(&device, args.iters, || Ok(model.encode_text(&ids)?))?;
    let (fi, ft) = (image_flops(&cfg), text_flops(&cfg));
    let images_per_s = args.batch as f64 / image_s;
    let texts_per_s = args.text_batch as f64 / text_s;

    if args.profile {
        let tower = ProfiledVision::new(&cfg)?;
        tower.forward(&images, &mut Profile::default())?; // warm-up
        let mut prof = Profile::default();
        let out = tower.forward(&images, &mut prof)?;
        ensure!(
            out.sum_all()?.to_scalar::<f32>()?.is_finite(),
            "profiled forward is not finite"
        );
        print_profile(&prof, args.batch, image_s, fi);
    }

    println!(
        "{}",
        serde_json::json!({
            "impl": "dfndr (candle)",
            "model": args.model,
            "compute": compute.describe(),
            "threads": threads,
            "batch": args.batch,
            "text_batch": args.text_batch,
            "iters": args.iters,
            "images_per_s": images_per_s,
            "texts_per_s": texts_per_s,
            "image_gflop": fi / 1e9,
            "text_gflop": ft / 1e9,
            "token_sum": token_sum,
            "load_s": load_s,
        })
    );
    Ok(())
}
