//! `dfndr show-aug`: renders the stored augmentation views of one sample, so a user can see
//! what the teachers saw.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use dfndr_augment::decode::{decode_rgb, DEFAULT_MAX_PIXELS};
use dfndr_augment::params::AugParams;
use dfndr_augment::resize::{resize, Filter};
use dfndr_augment::RgbImage;
use dfndr_dataset::paug::{describe, from_stored};
use dfndr_dataset::views::{augmentation_of, check_original};
use dfndr_shards::format::ShardReader;
use dfndr_shards::originals::OriginalsCursor;
use dfndr_shards::spool::Spool;
use dfndr_shards::wds::ReaderLimits;

/// Colours of the crop boxes drawn on the original, one per view (cycled).
const BOX_COLOURS: [[u8; 3]; 6] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
];

/// Renders the views of sample `key` of `shard` into `out`; returns the contact sheet path.
pub fn run(shard: &Path, key: &str, out: &Path, size: Option<u32>) -> Result<PathBuf> {
    let reader = ShardReader::open_path(shard)
        .with_context(|| format!("cannot open {} as a DFNDR shard", shard.display()))?;
    if !reader.layout().paug {
        bail!(
            "{} has no paug column: the job that wrote it had no augmentation stage (augment.num_augmentations = 0)",
            shard.display()
        );
    }
    let config = augmentation_of(reader.meta())?;
    let mut found = None;
    // Rows are checked as they are read (crop boxes inside the recorded size, op indices,
    // magnitudes); a bad one stops here with its key and field.
    for row in reader.rows()? {
        let row = row.with_context(|| format!("shard {}", shard.display()))?;
        if row.key == key {
            found = Some(row);
            break;
        }
    }
    let Some(row) = found else {
        bail!("no row with key {key:?} in {}", shard.display());
    };
    let spool = Spool::on_demand();
    let bytes = OriginalsCursor::new(&spool, ReaderLimits::default())
        .original(&row)
        .with_context(|| {
            format!(
                "the shard does not embed images and its source {} cannot be opened",
                row.source
            )
        })?
        .map_err(|missing| {
            anyhow!(
                "key {key:?}: no original image in the source shard {} ({missing:?})",
                row.source
            )
        })?;
    let original = decode_rgb(&bytes, DEFAULT_MAX_PIXELS)
        .with_context(|| format!("cannot decode the original image of {key}"))?;
    check_original(row.width, row.height, &original)
        .with_context(|| format!("shard {}, key {key}", shard.display()))?;
    let size = size.unwrap_or(config.size);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let mut views = Vec::with_capacity(row.paug.len());
    for (k, stored) in row.paug.iter().enumerate() {
        let params = from_stored(stored)?;
        let view = config.replay(&original, &params, size);
        let path = out.join(format!("view-{k}.png"));
        save_png(&view, &path)?;
        println!("view {k}: {}  -> {}", describe(stored), path.display());
        views.push((params, view));
    }
    let original_path = out.join("original.png");
    save_png(&original, &original_path)?;
    let sheet = contact_sheet(&original, &views, size);
    let sheet_path = out.join("contact.png");
    save_png(&sheet, &sheet_path)?;
    println!(
        "original {}x{} -> {}",
        original.width,
        original.height,
        original_path.display()
    );
    println!("contact sheet -> {}", sheet_path.display());
    Ok(sheet_path)
}

fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.write_png(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The original (scaled to `size` rows, crop boxes drawn in each view's colour) followed by
/// the views, each framed by its colour, on one row.
fn contact_sheet(original: &RgbImage, views: &[(AugParams, RgbImage)], size: u32) -> RgbImage {
    let scale = f64::from(size) / f64::from(original.height.max(1));
    let thumb_w = ((f64::from(original.width) * scale).round() as u32).clamp(1, 4 * size);
    let mut thumb = resize(original, thumb_w, size, Filter::Bilinear);
    for (k, (params, _)) in views.iter().enumerate() {
        let c = params.crop;
        let colour = BOX_COLOURS[k % BOX_COLOURS.len()];
        let x0 = (f64::from(c.left) * scale).round() as i64;
        let y0 = (f64::from(c.top) * scale).round() as i64;
        let x1 = (f64::from(c.left + c.width) * scale).round() as i64 - 1;
        let y1 = (f64::from(c.top + c.height) * scale).round() as i64 - 1;
        draw_rect(&mut thumb, x0, y0, x1, y1, colour, 2);
    }
    let gap = 8u32;
    let frame = 3u32;
    let width = thumb.width + views.len() as u32 * (size + 2 * frame + gap) + gap * 2;
    let height = size + 2 * frame + 2 * gap;
    let mut sheet = RgbImage::filled(width, height, [32, 32, 32]);
    blit(&mut sheet, &thumb, gap, gap + frame);
    let mut x = gap + thumb.width + gap;
    for (k, (_, view)) in views.iter().enumerate() {
        let colour = BOX_COLOURS[k % BOX_COLOURS.len()];
        let framed = RgbImage::filled(view.width + 2 * frame, view.height + 2 * frame, colour);
        blit(&mut sheet, &framed, x, gap);
        blit(&mut sheet, view, x + frame, gap + frame);
        x += size + 2 * frame + gap;
    }
    sheet
}

/// Copies `src` into `dst` at (`x`, `y`), clipped to `dst`.
fn blit(dst: &mut RgbImage, src: &RgbImage, x: u32, y: u32) {
    for row in 0..src.height {
        let dy = y + row;
        if dy >= dst.height || x >= dst.width {
            continue;
        }
        let n = src.width.min(dst.width - x) as usize * 3;
        let s = (row as usize * src.width as usize) * 3;
        let d = (dy as usize * dst.width as usize + x as usize) * 3;
        dst.data[d..d + n].copy_from_slice(&src.data[s..s + n]);
    }
}

/// Draws a `thickness`-pixel rectangle outline, clipped to the image.
fn draw_rect(
    img: &mut RgbImage,
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    colour: [u8; 3],
    thickness: i64,
) {
    let (w, h) = (i64::from(img.width), i64::from(img.height));
    let mut put = |x: i64, y: i64| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            let i = ((y * w + x) * 3) as usize;
            img.data[i..i + 3].copy_from_slice(&colour);
        }
    };
    for t in 0..thickness {
        for x in x0..=x1 {
            put(x, y0 + t);
            put(x, y1 - t);
        }
        for y in y0..=y1 {
            put(x0 + t, y);
            put(x1 - t, y);
        }
    }
}
