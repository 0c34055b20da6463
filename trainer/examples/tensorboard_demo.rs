//! Writes a small TensorBoard event file (and optionally a PNG of the same metrics), to look at
//! them with TensorBoard itself or to check the files with `tests/fixtures/tensorboard_check.py`.
//!
//! `cargo run -p dfndr-trainer --example tensorboard_demo -- OUT_DIR [PLOT.png]`

use std::path::PathBuf;

use dfndr_trainer::plot::{self, Curve, Panel};
use dfndr_trainer::tensorboard::EventWriter;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: tensorboard_demo OUT_DIR [PLOT.png]")?,
    );
    let png = args.next().map(PathBuf::from);

    let mut writer = EventWriter::create(&dir)?;
    let t0 = 1_700_000_000.0;
    let (mut loss, mut lr, mut terms) = (Vec::new(), Vec::new(), vec![Vec::new(); 2]);
    for step in 1..=200u64 {
        let s = step as f64;
        let noise = ((step * 7919) % 101) as f64 / 101.0 - 0.5;
        let total = 6.0 * (-s / 60.0).exp() + 0.5 + 0.3 * noise;
        let rate = 1e-3 * (std::f64::consts::PI * s / 200.0).cos().mul_add(0.5, 0.5);
        let (gt, syn) = (0.6 * total, 0.4 * total + 0.1 * noise);
        writer.scalars(
            step,
            t0 + s * 0.5,
            &[
                ("loss/total", total),
                ("loss/contrastive_gt", gt),
                ("loss/contrastive_syn", syn),
            ],
        )?;
        writer.scalar("lr", step, rate, t0 + s * 0.5)?;
        loss.push((s, total));
        lr.push((s, rate));
        terms[0].push((s, gt));
        terms[1].push((s, syn));
    }
    writer.scalar("nan_check", 1, f64::NAN, t0)?;
    writer.flush()?;
    println!("{}", writer.path().display());

    if let Some(png) = png {
        let mean = plot::running_mean(&loss, 10);
        let panels = [
            Panel::new(
                "loss (weighted total)",
                vec![Curve::new("loss", loss), Curve::new("mean of 10", mean)],
            ),
            Panel::new(
                "loss terms (unweighted)",
                vec![
                    Curve::new("contrastive_gt", terms[0].clone()),
                    Curve::new("contrastive_syn", terms[1].clone()),
                ],
            ),
            Panel::new("learning rate", vec![Curve::new("lr", lr)]),
            Panel::new("nothing yet", vec![Curve::new("empty", vec![])]),
        ];
        plot::write_panels_png(&png, &panels)?;
        println!("{}", png.display());
    }
    Ok(())
}
