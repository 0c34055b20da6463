//! Training metrics as PNGs, redrawn at every checkpoint: no plotting library, just lines and
//! an 8x8 bitmap font on a canvas.
//!
//! [`write_panels_png`] draws any number of [`Panel`]s in a grid of two columns; each panel has
//! a frame, a light grid, its curves in a fixed palette, its title, a legend with the curve
//! names, and its x and y ranges printed as numbers on the axes. [`write_metrics_png`] is the
//! trainer's use of it: the weighted loss with its running mean, the unweighted loss terms, the
//! learning rate, the gradient norm, the logit scale, the throughput and the evaluations.

use std::collections::BTreeMap;
use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};
use crate::run::StepLog;

/// One panel: a title and one or more named curves of (step, value) points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Panel {
    /// Printed above the plot area.
    pub title: String,
    /// Drawn in [`PALETTE`] order.
    pub curves: Vec<Curve>,
}

/// A named curve of (step, value) points, drawn as given (in order, joined by lines);
/// non-finite points are skipped. For a trend line, add a [`running_mean`] of it as a second
/// curve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curve {
    /// Shown in the panel's legend.
    pub name: String,
    /// (step, value) points.
    pub points: Vec<(f64, f64)>,
}

impl Curve {
    /// A curve named `name` of `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

impl Panel {
    /// A panel titled `title` of `curves`.
    pub fn new(title: impl Into<String>, curves: Vec<Curve>) -> Self {
        Self {
            title: title.into(),
            curves,
        }
    }
}

/// The curves' colours, in order (the i-th curve of a panel gets `PALETTE[i % len]`).
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],  // blue
    [255, 127, 14],  // orange
    [44, 160, 44],   // green
    [214, 39, 40],   // red
    [148, 103, 189], // purple
    [140, 86, 75],   // brown
    [227, 119, 194], // pink
    [23, 190, 207],  // cyan
];

/// Size of one panel in pixels.
pub const PANEL_WIDTH: u32 = 560;
/// Size of one panel in pixels.
pub const PANEL_HEIGHT: u32 = 320;
const COLUMNS: u32 = 2;

// Plot area inside a panel (offsets from the panel's corner).
const PLOT_LEFT: i64 = 92;
const PLOT_RIGHT: i64 = PANEL_WIDTH as i64 - 16;
const PLOT_TOP: i64 = 28;
const PLOT_BOTTOM: i64 = PANEL_HEIGHT as i64 - 34;
/// Data are drawn this far inside the frame, so that the extremes do not hide in it.
const INSET: i64 = 4;
/// Where the title's glyphs sit (offset from the panel's top).
const TITLE_Y: i64 = 10;

const GLYPH: i64 = 8;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([25, 25, 25]);
const FRAME: Rgb<u8> = Rgb([90, 90, 90]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const LEGEND_FRAME: Rgb<u8> = Rgb([170, 170, 170]);
const SEPARATOR: Rgb<u8> = Rgb([200, 200, 200]);

/// Draws the panels in a grid (2 columns) into one PNG at `path`, written atomically
/// (tmp + rename).
pub fn write_panels_png(path: &Path, panels: &[Panel]) -> Result<()> {
    let img = render_panels(panels);
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| TrainError::Io(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// Draws `logs`' metrics against their step into `path` (written atomically): the weighted
/// loss with its running mean over a twentieth of the run, the four unweighted loss terms, the
/// learning rate, the gradient norm before clipping, the logit scale, the throughput and, per
/// evaluated dataset, its metrics.
pub fn write_metrics_png(path: &Path, logs: &[StepLog]) -> Result<()> {
    write_panels_png(path, &step_panels(logs))
}

/// The panels [`write_metrics_png`] draws.
pub fn step_panels(logs: &[StepLog]) -> Vec<Panel> {
    let series = |f: fn(&StepLog) -> f64| -> Vec<(f64, f64)> {
        logs.iter().map(|l| (l.step as f64, f(l))).collect()
    };
    let loss = series(|l| l.loss);
    let window = (loss.len() / 20).max(1);
    let mean = running_mean(&loss, window);
    let mut panels = vec![
        Panel::new(
            "loss (weighted total)",
            vec![
                Curve::new("loss", loss),
                Curve::new(format!("mean of {window}"), mean),
            ],
        ),
        Panel::new(
            "loss terms (unweighted)",
            vec![
                Curve::new("contrastive_gt", series(|l| l.contrastive_gt)),
                Curve::new("contrastive_syn", series(|l| l.contrastive_syn)),
                Curve::new("distill_gt", series(|l| l.distill_gt)),
                Curve::new("distill_syn", series(|l| l.distill_syn)),
            ],
        ),
        Panel::new("learning rate", vec![Curve::new("lr", series(|l| l.lr))]),
        Panel::new(
            "gradient norm (before clipping)",
            vec![Curve::new("grad_norm", series(|l| l.grad_norm))],
        ),
        Panel::new(
            "logit scale (exp)",
            vec![Curve::new("logit_scale", series(|l| l.logit_scale))],
        ),
        Panel::new(
            "throughput (samples/s)",
            vec![Curve::new("samples_per_s", series(|l| l.samples_per_s))],
        ),
    ];
    // One panel per evaluated dataset, a curve per metric, points at the evaluated steps.
    type Curves<'a> = BTreeMap<&'a str, Vec<(f64, f64)>>;
    let mut eval: BTreeMap<&str, Curves> = BTreeMap::new();
    for l in logs {
        for (key, v) in &l.eval {
            let (dataset, metric) = key.rsplit_once('/').unwrap_or(("eval", key));
            eval.entry(dataset)
                .or_default()
                .entry(metric)
                .or_default()
                .push((l.step as f64, *v));
        }
    }
    for (dataset, metrics) in eval {
        panels.push(Panel::new(
            format!("eval: {dataset}"),
            metrics
                .into_iter()
                .map(|(m, points)| Curve::new(m, points))
                .collect(),
        ));
    }
    panels
}

/// The mean of each point's value and the `window - 1` finite values before it, at the
/// point's step; non-finite points are left out (before averaging). Linear in the number of
/// points.
pub fn running_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let window = window.max(1);
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(finite.len());
    for (i, &(x, y)) in finite.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= finite[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

/// The whole image: panels row by row, two per row (one column when there is one panel).
fn render_panels(panels: &[Panel]) -> RgbImage {
    let n = panels.len().max(1) as u32;
    let cols = n.min(COLUMNS);
    let rows = n.div_ceil(cols);
    let mut img = RgbImage::from_pixel(cols * PANEL_WIDTH, rows * PANEL_HEIGHT, WHITE);
    let empty = [Panel::default()];
    let panels = if panels.is_empty() {
        &empty[..]
    } else {
        panels
    };
    for (i, panel) in panels.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let origin = ((c * PANEL_WIDTH) as i64, (r * PANEL_HEIGHT) as i64);
        draw_panel(&mut img, origin, panel);
    }
    // Thin separators between panels.
    let (w, h) = (img.width() as i64, img.height() as i64);
    for c in 1..cols {
        let x = (c * PANEL_WIDTH) as i64;
        line(&mut img, (x, 0), (x, h - 1), SEPARATOR, None);
    }
    for r in 1..rows {
        let y = (r * PANEL_HEIGHT) as i64;
        line(&mut img, (0, y), (w - 1, y), SEPARATOR, None);
    }
    img
}

/// A clip rectangle, inclusive: (left, top, right, bottom).
type Rect = (i64, i64, i64, i64);

fn draw_panel(img: &mut RgbImage, (px, py): (i64, i64), panel: &Panel) {
    let (left, top, right, bottom) = (
        px + PLOT_LEFT,
        py + PLOT_TOP,
        px + PLOT_RIGHT,
        py + PLOT_BOTTOM,
    );
    let plot: Rect = (left, top, right, bottom);

    // Title, centred over the plot area and cut to the panel's width.
    let max_chars = ((PANEL_WIDTH as i64 - 16) / GLYPH) as usize;
    let title = clip_text(&panel.title, max_chars);
    let tx = ((left + right) / 2 - text_width(&title) / 2).max(px + 8);
    text(img, (tx, py + TITLE_Y), &title, TEXT);

    // Grid: fifths of the x range, quarters of the y range.
    for i in 1..5 {
        let x = left + (right - left) * i / 5;
        line(img, (x, top), (x, bottom), GRID, None);
    }
    for i in 1..4 {
        let y = top + (bottom - top) * i / 4;
        line(img, (left, y), (right, y), GRID, None);
    }

    // Data ranges over every finite point of every curve.
    let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in panel
        .curves
        .iter()
        .flat_map(|c| c.points.iter().filter(finite))
    {
        (xlo, xhi, ylo, yhi) = (xlo.min(*x), xhi.max(*x), ylo.min(*y), yhi.max(*y));
    }
    let has_data = xlo <= xhi;

    let (dl, dt, dr, db) = (left + INSET, top + INSET, right - INSET, bottom - INSET);
    if has_data {
        let sx = Scale::new(xlo, xhi, dl as f64, dr as f64);
        let sy = Scale::new(ylo, yhi, db as f64, dt as f64);
        for (k, curve) in panel.curves.iter().enumerate() {
            draw_curve(img, &curve.points, &sx, &sy, color(k), plot);
        }

        // y range at the left, x range below, with ticks.
        let (ymin, ymax) = format_pair(ylo, yhi);
        for (label, y) in [(&ymax, dt), (&ymin, db)] {
            line(img, (left - 4, y), (left - 1, y), FRAME, None);
            text(
                img,
                (left - 7 - text_width(label), y - GLYPH / 2),
                label,
                TEXT,
            );
        }
        let (xmin, xmax) = format_pair(xlo, xhi);
        let ly = bottom + 7;
        line(img, (dl, bottom + 1), (dl, bottom + 4), FRAME, None);
        line(img, (dr, bottom + 1), (dr, bottom + 4), FRAME, None);
        let x_first = (dl - text_width(&xmin) / 2).max(px + 4);
        let x_last =
            (dr - text_width(&xmax) / 2).min(px + PANEL_WIDTH as i64 - 4 - text_width(&xmax));
        text(img, (x_first, ly), &xmin, TEXT);
        text(
            img,
            (x_last.max(x_first + text_width(&xmin) + GLYPH), ly),
            &xmax,
            TEXT,
        );
        text(
            img,
            ((left + right) / 2 - text_width("step") / 2, ly + 12),
            "step",
            FRAME,
        );
    } else {
        let msg = "no data";
        text(
            img,
            (
                (left + right) / 2 - text_width(msg) / 2,
                (top + bottom) / 2 - GLYPH / 2,
            ),
            msg,
            TEXT,
        );
    }

    // Frame last but one, so curves on the edge do not eat it; legend last, above everything.
    rectangle(img, plot, FRAME);
    draw_legend(img, panel, plot);
}

/// Maps a data interval onto a pixel interval; a zero-width interval maps to the middle.
struct Scale {
    lo: f64,
    span: f64,
    p0: f64,
    p1: f64,
}

impl Scale {
    fn new(lo: f64, hi: f64, p0: f64, p1: f64) -> Self {
        // Halved, so that a range from -f64::MAX to f64::MAX does not overflow.
        Self {
            lo: lo * 0.5,
            span: hi * 0.5 - lo * 0.5,
            p0,
            p1,
        }
    }

    fn map(&self, v: f64) -> i64 {
        let t = if self.span > 0.0 {
            (v * 0.5 - self.lo) / self.span
        } else {
            0.5
        };
        (self.p0 + (self.p1 - self.p0) * t).round() as i64
    }
}

/// Draws the finite points joined in order, decimated to pixel columns: consecutive points
/// that fall in one column become one vertical stroke from their lowest to their highest value,
/// joined to the neighbouring columns by their first and last points. Exact at the pixel level
/// and linear in the number of points.
fn draw_curve(
    img: &mut RgbImage,
    points: &[(f64, f64)],
    sx: &Scale,
    sy: &Scale,
    c: Rgb<u8>,
    clip: Rect,
) {
    struct Column {
        x: i64,
        first: i64,
        last: i64,
        min: i64,
        max: i64,
    }
    let mut prev: Option<Column> = None;
    let flush = |img: &mut RgbImage, col: &Column| {
        line(img, (col.x, col.min), (col.x, col.max), c, Some(clip));
    };
    for &(x, y) in points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
    {
        let (px, py) = (sx.map(x), sy.map(y));
        match &mut prev {
            Some(col) if col.x == px => {
                col.last = py;
                col.min = col.min.min(py);
                col.max = col.max.max(py);
            }
            _ => {
                if let Some(col) = prev.take() {
                    flush(img, &col);
                    line(img, (col.x, col.last), (px, py), c, Some(clip));
                }
                prev = Some(Column {
                    x: px,
                    first: py,
                    last: py,
                    min: py,
                    max: py,
                });
            }
        }
    }
    if let Some(col) = prev {
        flush(img, &col);
        // A lone point would be a single pixel: make it a small cross so it can be seen.
        if col.first == col.last
            && points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .count()
                == 1
        {
            line(
                img,
                (col.x - 2, col.first),
                (col.x + 2, col.first),
                c,
                Some(clip),
            );
            line(
                img,
                (col.x, col.first - 2),
                (col.x, col.first + 2),
                c,
                Some(clip),
            );
        }
    }
}

/// The legend: a white box in the plot area's top-right corner with a colour swatch and the
/// name of each curve.
fn draw_legend(img: &mut RgbImage, panel: &Panel, (_, top, right, _): Rect) {
    if panel.curves.is_empty() {
        return;
    }
    const SWATCH: i64 = 16;
    const ROW: i64 = 12;
    let names: Vec<String> = panel
        .curves
        .iter()
        .map(|c| clip_text(&c.name, 32))
        .collect();
    let w = SWATCH + 6 + names.iter().map(|n| text_width(n)).max().unwrap_or(0) + 10;
    let h = names.len() as i64 * ROW + 6;
    let (x0, y0) = (right - 6 - w, top + 6);
    fill(img, (x0, y0, x0 + w, y0 + h), WHITE);
    rectangle(img, (x0, y0, x0 + w, y0 + h), LEGEND_FRAME);
    for (k, name) in names.iter().enumerate() {
        let y = y0 + 4 + k as i64 * ROW;
        let c = color(k);
        for dy in 3..=4 {
            line(img, (x0 + 5, y + dy), (x0 + 5 + SWATCH, y + dy), c, None);
        }
        text(img, (x0 + 5 + SWATCH + 6, y), name, TEXT);
    }
}

fn color(k: usize) -> Rgb<u8> {
    Rgb(PALETTE[k % PALETTE.len()])
}

/// Both ends of a range with as few significant digits (4 to 12) as keep them apart.
fn format_pair(lo: f64, hi: f64) -> (String, String) {
    let mut pair = (format_num(lo, 4), format_num(hi, 4));
    for digits in 5..=12 {
        if pair.0 != pair.1 || lo == hi {
            break;
        }
        pair = (format_num(lo, digits), format_num(hi, digits));
    }
    pair
}

/// A number in few characters: integers as they are (steps), otherwise `digits` significant
/// digits, in scientific notation when very large or small.
fn format_num(v: f64, digits: usize) -> String {
    let a = v.abs();
    if v == 0.0 {
        return "0".into();
    }
    if v.fract() == 0.0 && a < 1e9 {
        return format!("{v:.0}");
    }
    if !(1e-3..1e6).contains(&a) {
        return format!("{:.*e}", digits - 1, v);
    }
    let decimals = (digits as i64 - 1 - a.log10().floor() as i64).clamp(0, 12) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn clip_text(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max_chars.saturating_sub(2)).collect();
        t.push_str("..");
        t
    }
}

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * GLYPH
}

/// ASCII text in font8x8's basic glyphs (other characters as '?'), top-left corner at `at`.
fn text(img: &mut RgbImage, at: (i64, i64), s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let x0 = at.0 + i as i64 * GLYPH;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                // Bit 0 is the leftmost pixel.
                if bits >> col & 1 == 1 {
                    put(img, x0 + col, at.1 + row as i64, c);
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn rectangle(img: &mut RgbImage, (l, t, r, b): Rect, c: Rgb<u8>) {
    line(img, (l, t), (r, t), c, None);
    line(img, (l, b), (r, b), c, None);
    line(img, (l, t), (l, b), c, None);
    line(img, (r, t), (r, b), c, None);
}

fn fill(img: &mut RgbImage, (l, t, r, b): Rect, c: Rgb<u8>) {
    for y in t..=b {
        for x in l..=r {
            put(img, x, y, c);
        }
    }
}

/// A straight line (Bresenham), drawn only inside `clip` (if any) and the canvas.
fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>, clip: Option<Rect>) {
    let inside =
        |x: i64, y: i64| clip.is_none_or(|(l, t, r, bt)| x >= l && x <= r && y >= t && y <= bt);
    let (mut x, mut y) = a;
    let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
    let (stx, sty) = ((b.0 - a.0).signum(), (b.1 - a.1).signum());
    let mut err = dx + dy;
    loop {
        if inside(x, y) {
            put(img, x, y, c);
        }
        if (x, y) == b {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += stx;
        }
        if e2 <= dx {
            err += dx;
            y += sty;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    fn count(img: &RgbImage, rgb: [u8; 3], region: Rect) -> usize {
        let (l, t, r, b) = region;
        img.enumerate_pixels()
            .filter(|(x, y, p)| {
                let (x, y) = (*x as i64, *y as i64);
                x >= l && x <= r && y >= t && y <= b && p.0 == rgb
            })
            .count()
    }

    fn dark(img: &RgbImage, region: Rect) -> usize {
        let (l, t, r, b) = region;
        img.enumerate_pixels()
            .filter(|(x, y, p)| {
                let (x, y) = (*x as i64, *y as i64);
                x >= l && x <= r && y >= t && y <= b && p.0.iter().all(|&v| v < 80)
            })
            .count()
    }

    fn wave(n: usize, phase: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| (i as f64, (i as f64 * 0.05 + phase).sin() + i as f64 * 0.001))
            .collect()
    }

    /// Region of panel `i` (two columns).
    fn panel_rect(i: u32) -> Rect {
        let (x, y) = ((i % 2 * PANEL_WIDTH) as i64, (i / 2 * PANEL_HEIGHT) as i64);
        (
            x,
            y,
            x + PANEL_WIDTH as i64 - 1,
            y + PANEL_HEIGHT as i64 - 1,
        )
    }

    #[test]
    fn panels_png_has_grid_size_curve_colours_and_titles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let panels = vec![
            Panel::new(
                "loss",
                (0..5)
                    .map(|k| Curve::new(format!("c{k}"), wave(400, k as f64)))
                    .collect(),
            ),
            Panel::new("", vec![Curve::new("lr", wave(50, 0.0))]),
            Panel::new("third", vec![Curve::new("x", vec![(1.0, 2.0), (2.0, 3.0)])]),
        ];
        write_panels_png(&path, &panels).unwrap();
        assert!(!dir.path().join("m.png.tmp").exists());
        let img = read(&path);
        assert_eq!(img.dimensions(), (2 * PANEL_WIDTH, 2 * PANEL_HEIGHT));

        // Each curve's colour, well beyond its legend swatch (2 x 17 pixels).
        for (k, &rgb) in PALETTE.iter().enumerate().take(5) {
            let n = count(&img, rgb, panel_rect(0));
            assert!(n > 200, "colour of curve {k}: {n} pixels");
        }
        // Colours are per panel: the second panel's only curve is the first colour.
        assert!(count(&img, PALETTE[0], panel_rect(1)) > 100);
        assert_eq!(count(&img, PALETTE[1], panel_rect(1)), 0);

        // The title drew dark pixels in the title band; the untitled panel has none there.
        let band = |i: u32| {
            let (l, t, r, _) = panel_rect(i);
            (l, t + TITLE_Y, r, t + TITLE_Y + GLYPH - 1)
        };
        assert!(dark(&img, band(0)) > 20, "title 'loss'");
        assert_eq!(dark(&img, band(1)), 0, "no title");
        assert!(dark(&img, band(2)) > 20, "title 'third'");
        // The fourth cell is empty.
        let (l, t, r, b) = panel_rect(3);
        assert_eq!(dark(&img, (l + 2, t + 2, r, b)), 0);

        // Axis numbers: dark pixels left of the plot area (y range) and below it (x range).
        let (l, t, _, _) = panel_rect(0);
        assert!(dark(&img, (l, t + PLOT_TOP, l + PLOT_LEFT - 6, t + PLOT_BOTTOM)) > 20);
        assert!(
            dark(
                &img,
                (
                    l,
                    t + PLOT_BOTTOM + 5,
                    l + PANEL_WIDTH as i64 - 1,
                    t + PLOT_BOTTOM + 16
                )
            ) > 20
        );
    }

    #[test]
    fn a_single_panel_is_one_column() {
        let img = render_panels(&[Panel::new("one", vec![Curve::new("a", wave(10, 0.0))])]);
        assert_eq!(img.dimensions(), (PANEL_WIDTH, PANEL_HEIGHT));
        let img = render_panels(&[]);
        assert_eq!(img.dimensions(), (PANEL_WIDTH, PANEL_HEIGHT));
    }

    #[test]
    fn empty_and_nan_panels_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.png");
        let nan_mixed: Vec<(f64, f64)> = (0..100)
            .map(|i| {
                let v = if i % 7 == 0 {
                    f64::NAN
                } else if i % 11 == 0 {
                    f64::INFINITY
                } else {
                    i as f64
                };
                (i as f64, v)
            })
            .collect();
        let panels = vec![
            Panel::new("empty", vec![]),
            Panel::new("no points", vec![Curve::new("a", vec![])]),
            Panel::new(
                "all nan",
                vec![Curve::new("a", vec![(1.0, f64::NAN), (f64::NAN, 2.0)])],
            ),
            Panel::new("some nan", vec![Curve::new("a", nan_mixed)]),
            Panel::new("one point", vec![Curve::new("a", vec![(3.0, 4.0)])]),
            Panel::new("flat", vec![Curve::new("a", vec![(0.0, 1.0), (10.0, 1.0)])]),
            Panel::new(
                "huge",
                vec![Curve::new("a", vec![(0.0, -f64::MAX), (1.0, f64::MAX)])],
            ),
        ];
        write_panels_png(&path, &panels).unwrap();
        let img = read(&path);
        assert_eq!(img.dimensions(), (2 * PANEL_WIDTH, 4 * PANEL_HEIGHT));
        // "no data" in the middle of the panels without finite points.
        for i in 0..3 {
            let (l, t, _, _) = panel_rect(i);
            let mid = t + (PLOT_TOP + PLOT_BOTTOM) / 2;
            let cx = l + (PLOT_LEFT + PLOT_RIGHT) / 2;
            assert!(
                dark(&img, (cx - 30, mid - 5, cx + 30, mid + 5)) > 20,
                "panel {i}"
            );
        }
        // The NaN panel still drew its finite points.
        assert!(count(&img, PALETTE[0], panel_rect(3)) > 100);
    }

    #[test]
    fn a_hundred_thousand_points_render() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.png");
        let points: Vec<(f64, f64)> = (0..100_000)
            .map(|i| (i as f64, ((i * 7919) % 1000) as f64))
            .collect();
        let mean = running_mean(&points, 5000);
        write_panels_png(
            &path,
            &[Panel::new(
                "big",
                vec![Curve::new("v", points), Curve::new("mean", mean)],
            )],
        )
        .unwrap();
        let img = read(&path);
        assert!(count(&img, PALETTE[0], panel_rect(0)) > 1000);
        assert!(count(&img, PALETTE[1], panel_rect(0)) > 50);
    }

    #[test]
    fn running_mean_is_the_trailing_window_mean() {
        let pts = [
            (0.0, 1.0),
            (1.0, 3.0),
            (2.0, f64::NAN),
            (3.0, 5.0),
            (4.0, 7.0),
        ];
        let m = running_mean(&pts, 2);
        assert_eq!(m, [(0.0, 1.0), (1.0, 2.0), (3.0, 4.0), (4.0, 6.0)]);
        assert_eq!(running_mean(&pts, 0).len(), 4);
    }

    #[test]
    fn numbers_are_short_and_ranges_distinct() {
        assert_eq!(format_num(1200.0, 4), "1200");
        assert_eq!(format_num(2.5, 4), "2.5");
        assert_eq!(format_num(-0.012345, 4), "-0.01235");
        assert_eq!(format_num(1e-4, 4), "1.000e-4");
        assert_eq!(format_num(3.5e7, 4), "35000000");
        assert_eq!(format_num(3.5e9, 4), "3.500e9");
        assert_eq!(format_num(1234567.8, 4), "1.235e6");
        assert_eq!(
            format_pair(2.50001, 2.50002),
            ("2.50001".into(), "2.50002".into())
        );
        assert_eq!(format_pair(1.0, 1.0), ("1".into(), "1".into()));
    }

    #[test]
    fn metrics_png_draws_the_step_and_eval_panels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.png");
        let logs: Vec<StepLog> = (1..=30)
            .map(|s| StepLog {
                step: s,
                loss: 5.0 / s as f64,
                contrastive_gt: 1.0,
                distill_syn: f64::NAN,
                lr: 1e-3 * s as f64,
                grad_norm: 2.0,
                epoch: 0,
                contrastive_syn: 0.5,
                distill_gt: 0.25,
                logit_scale: 100.0,
                skipped: Default::default(),
                samples_per_s: 1.0,
                data_seconds: 0.0,
                forward_seconds: 0.0,
                backward_seconds: 0.0,
                optimizer_seconds: 0.0,
                time: 0.0,
                eval: if s % 10 == 0 {
                    [("pets/acc1".to_string(), s as f64 / 40.0)].into()
                } else {
                    Default::default()
                },
            })
            .collect();
        write_metrics_png(&path, &logs).unwrap();
        // Six step panels and one for the evaluated dataset: four rows of two.
        assert_eq!(
            read(&path).dimensions(),
            (2 * PANEL_WIDTH, 4 * PANEL_HEIGHT)
        );
        let panels = step_panels(&logs);
        assert_eq!(panels.len(), 7);
        assert_eq!(panels[6].title, "eval: pets");
        assert_eq!(
            panels[6].curves[0].points,
            [(10.0, 0.25), (20.0, 0.5), (30.0, 0.75)]
        );
        write_metrics_png(&path, &[]).unwrap();
    }
}
