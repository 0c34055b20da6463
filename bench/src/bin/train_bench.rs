//! MobileCLIP2 training steps on CPU (S0 unless `--model` names another student): the same
//! random weights and in-memory batch the reference script saved, Apple's loss (distillation
//! only, two 768-d teachers at 70/60), AdamW with OpenCLIP's groups, clipping 1.0. Run through
//! `bench/train.sh` (S0) and `bench/students.sh` (every student, with `--forward`).
//!
//! Usage: train_bench --weights FILE --data FILE [--model NAME] [--steps N]
//! [--forward | --towers | --tower image|text | --units] [--recompute]
//! (`--model`: a built-in student, `MobileCLIP2-S0` (default) to `MobileCLIP2-L-14`)
//! (`--forward`: images/s of the image tower in evaluation mode, branched and, for FastViT
//! towers, reparameterised; `--steps` timed calls after one warm-up, one JSON line)
//! (`--units`: forward and backward seconds of every unit of both towers, as
//! [`dfndr_trainer::recompute`] splits them, one JSON line each; with `--forward`, the
//! evaluation seconds of every image-tower unit, branched and reparameterised)
//! (`--recompute`: with activation recomputation, OpenCLIP's `--grad-checkpointing`)
//! Prints one JSON line on stdout: samples/s of the median step, every step's seconds, and
//! the median split into forward+loss, backward and clip+optimiser.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use dfndr_trainer::eval::Towers;
use dfndr_trainer::loss::{LossConfig, TeacherLayout};
use dfndr_trainer::models::builtin_student;
use dfndr_trainer::optim::{clip_factor, grad_norm, AdamW, AdamWConfig};
use dfndr_trainer::step::{gradients, Batch, Plan, Recompute};
use dfndr_trainer::{Mode, Student};

fn main() -> Result<()> {
    // As `dfndr` does at start-up.
    dfndr_teachers::memory::reuse_large_buffers();
    let (mut weights, mut data, mut steps) = (None, None, 3usize);
    let (mut towers, mut recompute, mut units, mut forward) = (false, false, false, false);
    let mut model = "MobileCLIP2-S0".to_string();
    let mut only_tower: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--weights" => weights = Some(value()?),
            "--data" => data = Some(value()?),
            "--model" => model = value()?,
            "--steps" => steps = value()?.parse()?,
            "--forward" => forward = true,
            "--towers" => towers = true,
            "--tower" => {
                only_tower = Some(value()?);
                towers = true;
            }
            "--recompute" => recompute = true,
            "--units" => units = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let (Some(weights), Some(data)) = (weights, data) else {
        bail!("usage: train_bench --weights FILE --data FILE [--model NAME] [--steps N]");
    };
    let dev = Device::Cpu;
    let config = builtin_student(&model).with_context(|| format!("no built-in student {model}"))?;
    let student = Student::for_loading(&config, &dev)?;
    student
        .load(&candle_core::safetensors::load(&weights, &dev)?, true)
        .with_context(|| format!("loading {weights} into {model}"))?;
    let d = candle_core::safetensors::load(&data, &dev)?;
    let get = |k: &str| {
        d.get(k)
            .cloned()
            .with_context(|| format!("{data} has no {k}"))
    };
    let ids: Vec<Vec<u32>> = get("texts")?
        .to_dtype(candle_core::DType::I64)?
        .to_vec2::<i64>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect();
    if forward && units {
        return time_eval_units(student, &get("images")?);
    }
    if forward {
        return time_forward(student, &get("images")?, steps);
    }
    let b = get("images")?.dim(0)?;
    let batch = Batch {
        images: get("images")?,
        text_gt: ids[..b].to_vec(),
        text_syn: ids[b..].to_vec(),
        teacher_image: get("teacher_image")?,
        teacher_gt: get("teacher_gt")?,
        teacher_syn: get("teacher_syn")?,
    };
    if towers {
        return time_towers(&student, &batch, steps, only_tower.as_deref());
    }
    if units {
        return time_units(&student, &batch);
    }
    let layout = TeacherLayout {
        dims: vec![768, 768],
        scales: vec![70.0, 60.0],
    };
    let loss_cfg = LossConfig::default();
    let mut opt = AdamW::new(student.parameters()?, AdamWConfig::default());
    let vars: Vec<_> = student.parameters()?.into_iter().map(|(_, v)| v).collect();
    let mut rows = Vec::new();
    let mut last_loss = 0.0;
    for step in 0..=steps {
        let t0 = Instant::now();
        let plan = Plan {
            micro_batches: 1,
            recompute: if recompute {
                Recompute::BOTH
            } else {
                Recompute::NONE
            },
        };
        let g = gradients(&student, &batch, plan, &layout, &loss_cfg)?;
        let t2 = Instant::now();
        let norm = grad_norm(&g.grads, &vars)?;
        opt.step_scaled(&g.grads, 1e-3, clip_factor(norm, 1.0))?;
        let t3 = Instant::now();
        last_loss = g.loss.total;
        if step > 0 {
            let optimizer = (t3 - t2).as_secs_f64();
            let (f, b) = (g.forward.as_secs_f64(), g.backward.as_secs_f64());
            rows.push(((t3 - t0).as_secs_f64(), f, b, optimizer));
        }
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let median = rows[rows.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "samples_per_s": b as f64 / median.0,
            "step_seconds": rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            "forward_seconds": median.1,
            "backward_seconds": median.2,
            "optimizer_seconds": median.3,
            "loss": last_loss,
        })
    );
    Ok(())
}

/// `--forward`: images/s of the image tower in evaluation mode (the median of `iters` calls
/// after one warm-up), as `dfndr eval` and `dfndr encode` run it (unit by unit, no graph kept),
/// branched and then, where there is anything to fuse, after [`Student::into_inference`]; the
/// mean absolute feature and the fused features' largest difference from the branched ones.
fn time_forward(student: Student, images: &candle_core::Tensor, iters: usize) -> Result<()> {
    let b = images.dim(0)?;
    let rate = |s: &Student| -> Result<(f64, candle_core::Tensor)> {
        let mut times = Vec::new();
        let mut features = None;
        for i in 0..=iters {
            let t0 = Instant::now();
            let f = s.encode_images(images)?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
            features = Some(f);
        }
        times.sort_by(f64::total_cmp);
        let f = features.context("no forward")?;
        Ok((b as f64 / times[times.len() / 2], f))
    };
    let (branched, f) = rate(&student)?;
    let mut out = serde_json::json!({
        "images_per_s": branched,
        "features_abs_mean": f.abs()?.mean_all()?.to_scalar::<f32>()?,
        "fused_images_per_s": null,
        "fused_max_diff": null,
    });
    if student.reparameterizable() {
        let fused = student.into_inference()?;
        let (rate, g) = rate(&fused)?;
        out["fused_images_per_s"] = rate.into();
        out["fused_max_diff"] = (g - &f)?.abs()?.max_all()?.to_scalar::<f32>()?.into();
    }
    println!("{out}");
    Ok(())
}

/// `--forward --units`: seconds of every image-tower unit in evaluation mode (the second of
/// two runs), branched and, where there is anything to fuse, reparameterised; one JSON line
/// per unit.
fn time_eval_units(student: Student, images: &candle_core::Tensor) -> Result<()> {
    let times = |s: &Student| -> Result<Vec<(f64, Vec<usize>)>> {
        let units = s.image_units();
        let mut x = images.clone();
        let mut out = Vec::new();
        for i in 0..units.len() {
            let mut seconds = 0.0;
            let mut y = x.clone();
            for _ in 0..2 {
                let t0 = Instant::now();
                y = units.run(i, &x, Mode::Eval)?.detach();
                seconds = t0.elapsed().as_secs_f64();
            }
            out.push((seconds, y.dims().to_vec()));
            x = y;
        }
        Ok(out)
    };
    let branched = times(&student)?;
    let fused = if student.reparameterizable() {
        times(&student.into_inference()?)?
    } else {
        Vec::new()
    };
    for (i, (seconds, output)) in branched.iter().enumerate() {
        println!(
            "{}",
            serde_json::json!({
                "unit": i, "output": output, "branched_seconds": seconds,
                "fused_seconds": fused.get(i).map(|f| f.0),
            })
        );
    }
    Ok(())
}

/// `--towers`: forward and backward seconds of each tower alone (the sum of its features as
/// the loss), the median of `steps` runs, to show where a step's time goes.
fn time_towers(student: &Student, batch: &Batch, steps: usize, only: Option<&str>) -> Result<()> {
    let mut ids = batch.text_gt.clone();
    ids.extend(batch.text_syn.iter().cloned());
    let mut out = serde_json::Map::new();
    for tower in ["image", "text"] {
        if only.is_some_and(|o| o != tower) {
            continue;
        }
        let mut rows = Vec::new();
        for _ in 0..=steps {
            let t0 = Instant::now();
            let f = match tower {
                "image" => student.encode_image(&batch.images, Mode::Train)?,
                _ => student.encode_text(&ids)?,
            };
            let loss = f.sqr()?.sum_all()?;
            let t1 = Instant::now();
            loss.backward()?;
            rows.push(((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64()));
        }
        rows.sort_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
        let (f, b) = rows[rows.len() / 2];
        out.insert(format!("{tower}_forward_seconds"), f.into());
        out.insert(format!("{tower}_backward_seconds"), b.into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

/// `--units`: each unit of each tower forwarded from the previous unit's output and
/// differentiated with a gradient of ones, one JSON line per unit (input and output shapes,
/// forward and backward seconds); the second of two runs.
fn time_units(student: &Student, batch: &Batch) -> Result<()> {
    let mut ids = batch.text_gt.clone();
    ids.extend(batch.text_syn.iter().cloned());
    let none = candle_core::Tensor::zeros((), candle_core::DType::F32, student.device())?;
    for (tower, units, input) in [
        ("image", student.image_units(), batch.images.clone()),
        ("text", student.text_units(&ids)?, none),
    ] {
        let mut x = input;
        for i in 0..units.len() {
            let mut timing = (0.0, 0.0);
            let mut out = None;
            for _ in 0..2 {
                let leaf = candle_core::Var::from_tensor(&x)?;
                let input = if i == 0 { &x } else { leaf.as_tensor() };
                let t0 = Instant::now();
                let y = units.run(i, input, Mode::Train)?;
                let t1 = Instant::now();
                y.sum_all()?.backward()?;
                timing = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
                out = Some(y.detach());
            }
            let Some(y) = out else { bail!("no output") };
            println!(
                "{}",
                serde_json::json!({
                    "tower": tower, "unit": i, "input": x.dims(), "output": y.dims(),
                    "forward_seconds": timing.0, "backward_seconds": timing.1,
                })
            );
            x = y;
        }
    }
    Ok(())
}
