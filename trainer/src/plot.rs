//! The loss curve as a PNG, redrawn at every checkpoint: no plotting library, just lines on a
//! canvas (the curve, its running mean, and a grid of tenths of the range).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};
use crate::run::StepLog;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 400;
const MARGIN: u32 = 20;

/// Draws `logs`' loss against their step into `path` (written atomically).
pub fn write_loss_png(path: &Path, logs: &[StepLog]) -> Result<()> {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let points: Vec<(f64, f64)> = logs
        .iter()
        .filter(|l| l.loss.is_finite())
        .map(|l| (l.step as f64, l.loss))
        .collect();
    let (x0, x1) = (MARGIN as f64, (WIDTH - MARGIN) as f64);
    let (y0, y1) = ((HEIGHT - MARGIN) as f64, MARGIN as f64);
    for i in 0..=10 {
        let y = y0 + (y1 - y0) * i as f64 / 10.0;
        line(&mut img, (x0, y), (x1, y), Rgb([225, 225, 225]));
        let x = x0 + (x1 - x0) * i as f64 / 10.0;
        line(&mut img, (x, y0), (x, y1), Rgb([225, 225, 225]));
    }
    line(&mut img, (x0, y0), (x1, y0), Rgb([0, 0, 0]));
    line(&mut img, (x0, y0), (x0, y1), Rgb([0, 0, 0]));
    if points.len() >= 2 {
        let (smin, smax) = (points[0].0, points[points.len() - 1].0);
        let lmin = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let lmax = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let sx = |s: f64| x0 + (x1 - x0) * (s - smin) / (smax - smin).max(1e-12);
        let sy = |l: f64| y0 + (y1 - y0) * (l - lmin) / (lmax - lmin).max(1e-12);
        let to_px = |(s, l): (f64, f64)| (sx(s), sy(l));
        for w in points.windows(2) {
            line(&mut img, to_px(w[0]), to_px(w[1]), Rgb([120, 160, 230]));
        }
        // Running mean over a twentieth of the run, the trend through the noise.
        let k = (points.len() / 20).max(1);
        let mean: Vec<(f64, f64)> = (0..points.len())
            .map(|i| {
                let lo = i.saturating_sub(k - 1);
                let win = &points[lo..=i];
                (
                    points[i].0,
                    win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64,
                )
            })
            .collect();
        for w in mean.windows(2) {
            line(&mut img, to_px(w[0]), to_px(w[1]), Rgb([200, 30, 30]));
        }
    }
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| TrainError::Io(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// A straight line (DDA), clipped to the canvas.
fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), color: Rgb<u8>) {
    let n = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, color);
        }
    }
}
