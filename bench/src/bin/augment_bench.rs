//! decode + RandomResizedCrop + RandAugment + normalise, images/s on one core and on all
//! cores, over the demo images repeated. Run through `bench/augment.sh`, which runs the
//! Python reference on the same images in the same run and prints the ratios.
//!
//! The main figures decode only the rows and columns the crop needs (as a training loader
//! replaying stored parameters does); `one_core_whole_decode_images_per_s` is the same work
//! with every image decoded whole (as a generation job that also captions must).
//!
//! Usage: augment_bench DEMO_DIR IMAGES

use std::time::Instant;

use anyhow::{bail, Context, Result};
use dfndr_augment::decode::{decode_rgb, decode_rgb_part, DEFAULT_MAX_PIXELS};
use dfndr_augment::params::{crops_region, normalize_chw, AugConfig, AugParams};
use rayon::prelude::*;

/// The whole per-image work, decoding only the crop: returns a checksum so nothing is
/// optimised away.
fn one(config: &AugConfig, key: &str, bytes: &[u8], index: u32) -> Result<f64> {
    let mut params = None;
    let part = decode_rgb_part(bytes, DEFAULT_MAX_PIXELS, |w, h| {
        let p = config.sample(0, key, index, w, h);
        let region = crops_region(std::slice::from_ref(&p), w, h);
        params = Some(p);
        region
    })?;
    let params: AugParams = params.context("no parameters sampled")?;
    let view = config.replay_part(&part, &params, config.size);
    let tensor = normalize_chw(&view, config.mean, config.std);
    Ok(f64::from(tensor[tensor.len() / 2]))
}

/// [`one`] with the image decoded whole.
fn one_whole(config: &AugConfig, key: &str, bytes: &[u8], index: u32) -> Result<f64> {
    let img = decode_rgb(bytes, DEFAULT_MAX_PIXELS)?;
    let params = config.sample(0, key, index, img.width, img.height);
    let view = config.replay(&img, &params, config.size);
    let tensor = normalize_chw(&view, config.mean, config.std);
    Ok(f64::from(tensor[tensor.len() / 2]))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        bail!("usage: augment_bench DEMO_DIR IMAGES");
    }
    let images = dfndr_bench::load_images(std::path::Path::new(&args[1]))?;
    let n: usize = args[2].parse().context("IMAGES must be a number")?;
    if images.is_empty() {
        bail!("no images in {}", args[1]);
    }
    let work: Vec<(usize, &(String, Vec<u8>))> =
        (0..n).map(|i| (i, &images[i % images.len()])).collect();
    let config = AugConfig::default();

    // Warm-up: page in the code and the allocator.
    for (i, (key, bytes)) in work.iter().take(images.len()) {
        one(&config, key, bytes, *i as u32)?;
    }
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    // Images/s of `f` over the work on one thread, and its checksum.
    type PerImage = fn(&AugConfig, &str, &[u8], u32) -> Result<f64>;
    let on_one_core = |f: PerImage| -> Result<(f64, f64)> {
        let t = Instant::now();
        let sum = single.install(|| {
            work.iter()
                .map(|(i, (key, bytes))| f(&config, key, bytes, *i as u32))
                .sum::<Result<f64>>()
        })?;
        Ok((n as f64 / t.elapsed().as_secs_f64(), sum))
    };
    let (one_core, sum1) = on_one_core(one)?;
    let (one_core_whole, sum_whole) = on_one_core(one_whole)?;
    if sum1 != sum_whole {
        bail!("crop-only and whole decodes disagree: {sum1} vs {sum_whole}");
    }

    let t = Instant::now();
    let sum_all: f64 = work
        .par_iter()
        .map(|(i, (key, bytes))| one(&config, key, bytes, *i as u32))
        .sum::<Result<f64>>()?;
    let all_cores = n as f64 / t.elapsed().as_secs_f64();
    if (sum1 - sum_all).abs() > 1e-3 * sum1.abs().max(1.0) {
        bail!("parallel and serial runs disagree: {sum1} vs {sum_all}");
    }

    // Where one core's time goes, stage by stage.
    let mut stage = [0f64; 4];
    for (i, (key, bytes)) in &work {
        let t0 = Instant::now();
        let mut sampled = None;
        let part = decode_rgb_part(bytes, DEFAULT_MAX_PIXELS, |w, h| {
            let p = config.sample(0, key, *i as u32, w, h);
            let region = crops_region(std::slice::from_ref(&p), w, h);
            sampled = Some(p);
            region
        })?;
        let params = sampled.context("no parameters sampled")?;
        let t1 = Instant::now();
        let mut view = dfndr_augment::resize::resized_crop(
            &part.image,
            params.crop.top - part.rect.top as i32,
            params.crop.left - part.rect.left as i32,
            params.crop.height.max(0) as u32,
            params.crop.width.max(0) as u32,
            config.size,
            config.size,
            config.interpolation.filter(),
        );
        let t2 = Instant::now();
        for &(op, m) in &params.ops {
            view = dfndr_augment::ops::apply_op(&view, op, m, config.rand_augment.fill);
        }
        let t3 = Instant::now();
        let tensor = normalize_chw(&view, config.mean, config.std);
        let t4 = Instant::now();
        std::hint::black_box(tensor);
        for (s, d) in stage.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
            *s += d.as_secs_f64() * 1e3 / n as f64;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "dfndr",
            "images": n,
            "threads": rayon::current_num_threads(),
            "one_core_images_per_s": one_core,
            "all_cores_images_per_s": all_cores,
            "one_core_whole_decode_images_per_s": one_core_whole,
            "ms_per_image": {
                "decode": stage[0],
                "crop_resize": stage[1],
                "rand_augment": stage[2],
                "normalize": stage[3],
            },
        })
    );
    Ok(())
}
