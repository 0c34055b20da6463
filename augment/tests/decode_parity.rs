//! Decoding parity with PIL, and decoding robustness.
//!
//! The goldens come from `tests/fixtures/decode_goldens.py` (run it with the reference
//! Python environment to regenerate): for every demo image and every small input under
//! `tests/fixtures/decode/synthetic/` (made by PIL) and `crafted/` (JPEG layouts PIL cannot
//! write), the RGB output of `Image.open(b).convert("RGBA").convert("RGB")`, whole for the
//! small inputs and as 64x64 windows plus a sha256 and per-channel mean of the full buffer
//! for the demo photos; and, for the small inputs, which truncated prefixes PIL still
//! decodes.
//!
//! Run with `-- --nocapture` to see the per-image table (share exact, share within one grey
//! level, largest difference).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use dfndr_augment::decode::{decode_rgb, decode_rgb_part, DecodeError, Rect, DEFAULT_MAX_PIXELS};
use dfndr_augment::params::{crops_region, AugConfig};
use dfndr_augment::rng::AugRng;
use dfndr_augment::RgbImage;
use sha2::{Digest, Sha256};

/// Cases whose output is not bit-exact with PIL, with the reason. Every other case must
/// match exactly (same sha256 of the full buffer); these only have to meet the parity bar
/// of the augmentation chain.
const NOT_EXACT: &[(&str, &str)] = &[];

/// The parity bar for cases that are not exact: share of values within one grey level, and
/// the largest difference allowed anywhere.
const MIN_WITHIN_ONE: f64 = 0.99;
const MAX_DIFF: u8 = 8;

// ---------------------------------------------------------------------------------------
// Allocation tracking, to show the pixel limit acts before any pixel buffer exists.

struct Tracking;

thread_local! {
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // try_with: the thread-local may already be gone while a thread shuts down.
    let _ = LARGEST_ALLOC.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Runs `f`, returning its result and the largest single allocation it made on this thread.
fn largest_alloc_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST_ALLOC.with(|l| l.set(0));
    let out = f();
    (out, LARGEST_ALLOC.with(|l| l.get()))
}

// ---------------------------------------------------------------------------------------
// Fixtures

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/decode")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Members of a POSIX tar archive (the demo shards), without a tar dependency: 512-byte
/// headers with the name at 0..100 and the octal size at 124..136, data padded to 512.
fn tar_member(tar: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut off = 0;
    while off + 512 <= tar.len() {
        let header = &tar[off..off + 512];
        if header.iter().all(|&b| b == 0) {
            return None;
        }
        let end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let member = std::str::from_utf8(&header[..end]).ok()?;
        let size_field = std::str::from_utf8(&header[124..136]).ok()?;
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .ok()?;
        let data = off + 512;
        if member == name {
            return tar.get(data..data + size).map(<[u8]>::to_vec);
        }
        off = data + size.div_ceil(512) * 512;
    }
    None
}

/// The encoded bytes of a manifest `input`: a path relative to the fixtures folder, or
/// `TAR#MEMBER` for an image inside a demo shard.
fn load_input(input: &str) -> Vec<u8> {
    match input.split_once('#') {
        Some((tar, member)) => {
            let tar = std::fs::read(fixtures().join(tar)).expect("demo shard");
            tar_member(&tar, member).unwrap_or_else(|| panic!("{member} not in {input}"))
        }
        None => std::fs::read(fixtures().join(input)).expect("synthetic input"),
    }
}

fn load_expected_png(rel: &str) -> RgbImage {
    let bytes = std::fs::read(fixtures().join(rel)).expect("expected png");
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(
        img.color(),
        image::ColorType::Rgb8,
        "{rel} must be 8-bit RGB"
    );
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    RgbImage::from_raw(w, h, rgb.into_raw()).unwrap()
}

fn crop(img: &RgbImage, x: u32, y: u32, w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for row in y..y + h {
        let start = ((row * img.width + x) * 3) as usize;
        out.extend_from_slice(&img.data[start..start + (w * 3) as usize]);
    }
    out
}

struct Diff {
    exact: f64,
    within_one: f64,
    max: u8,
}

fn diff(got: &[u8], want: &[u8]) -> Diff {
    assert_eq!(got.len(), want.len());
    let (mut exact, mut within_one, mut max) = (0usize, 0usize, 0u8);
    for (a, b) in got.iter().zip(want) {
        let d = a.abs_diff(*b);
        exact += usize::from(d == 0);
        within_one += usize::from(d <= 1);
        max = max.max(d);
    }
    let n = got.len().max(1) as f64;
    Diff {
        exact: exact as f64 / n,
        within_one: within_one as f64 / n,
        max,
    }
}

fn mean(img: &RgbImage) -> [f64; 3] {
    let mut sum = [0u64; 3];
    for p in img.data.chunks_exact(3) {
        for c in 0..3 {
            sum[c] += u64::from(p[c]);
        }
    }
    let n = (img.data.len() / 3).max(1) as f64;
    sum.map(|s| s as f64 / n)
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

#[test]
fn parity_with_pil() {
    let manifest = manifest();
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() >= 80, "manifest lists {} cases", cases.len());
    let mut failures = Vec::new();
    let mut exact_cases = 0;
    println!(
        "{:44} {:10} {:>9} {:>9} {:>4}  full buffer",
        "case", "PIL", "exact", "within 1", "max"
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let pil = case["pil"].as_str().unwrap();
        let bytes = load_input(case["input"].as_str().unwrap());
        let got = match decode_rgb(&bytes, DEFAULT_MAX_PIXELS) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let (w, h) = (
            case["width"].as_u64().unwrap(),
            case["height"].as_u64().unwrap(),
        );
        if (u64::from(got.width), u64::from(got.height)) != (w, h) {
            failures.push(format!(
                "{name}: {}x{} instead of {w}x{h}",
                got.width, got.height
            ));
            continue;
        }
        let expected = load_expected_png(case["expected"].as_str().unwrap());
        // Compare what the goldens hold: the whole image, or the stacked windows.
        let (got_px, want_px) = match case["windows"].as_object() {
            None => (got.data.clone(), expected.data.clone()),
            Some(win) => {
                let size = win["size"].as_array().unwrap();
                let (ww, wh) = (
                    size[0].as_u64().unwrap() as u32,
                    size[1].as_u64().unwrap() as u32,
                );
                let mut stacked = Vec::new();
                for o in win["origins"].as_array().unwrap() {
                    let (x, y) = (o[0].as_u64().unwrap() as u32, o[1].as_u64().unwrap() as u32);
                    stacked.extend(crop(&got, x, y, ww, wh));
                }
                (stacked, expected.data.clone())
            }
        };
        let d = diff(&got_px, &want_px);
        let sha = format!("{:x}", Sha256::digest(&got.data));
        let full_exact = sha == case["sha256"].as_str().unwrap();
        let want_mean: Vec<f64> = case["mean"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got_mean = mean(&got);
        let mean_err = (0..3)
            .map(|c| (got_mean[c] - want_mean[c]).abs())
            .fold(0.0, f64::max);
        println!(
            "{:44} {:10} {:8.3}% {:8.3}% {:>4}  {}",
            name,
            pil,
            d.exact * 100.0,
            d.within_one * 100.0,
            d.max,
            if full_exact {
                "sha256 equal".to_string()
            } else {
                format!("sha256 differs, mean off by {mean_err:.3}")
            }
        );
        match NOT_EXACT.iter().find(|(n, _)| *n == name) {
            None => {
                if full_exact && d.max == 0 {
                    exact_cases += 1;
                } else {
                    failures.push(format!(
                        "{name}: expected bit-exact, got exact {:.3}%, max diff {}, sha256 {}",
                        d.exact * 100.0,
                        d.max,
                        if full_exact { "equal" } else { "differs" }
                    ));
                }
            }
            Some(_) => {
                if d.within_one < MIN_WITHIN_ONE || d.max > MAX_DIFF || mean_err > 0.5 {
                    failures.push(format!(
                        "{name}: within 1 {:.3}% (need {}%), max {} (limit {MAX_DIFF}), mean off by {mean_err:.3}",
                        d.within_one * 100.0,
                        MIN_WITHIN_ONE * 100.0,
                        d.max
                    ));
                }
            }
        }
    }
    println!("{exact_cases} of {} cases bit-exact", cases.len());
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

/// Every listed non-exact case still exists, so the list cannot rot.
#[test]
fn not_exact_list_names_real_cases() {
    let manifest = manifest();
    let names: Vec<&str> = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for (name, why) in NOT_EXACT {
        assert!(!why.is_empty());
        assert!(names.contains(name), "{name} is not a case");
    }
}

// ---------------------------------------------------------------------------------------
// Robustness

/// The small committed inputs: PIL-made synthetic images and the crafted JPEG layouts.
fn synthetic_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = ["synthetic", "crafted"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(fixtures().join(dir)).expect("fixture dir"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 50, "only {} synthetic files", files.len());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).unwrap();
            (name, bytes)
        })
        .collect()
}

/// Decodes under `catch_unwind` so that a panic names the input that caused it.
fn decode_no_panic(what: &str, bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    std::panic::catch_unwind(|| decode_rgb(bytes, DEFAULT_MAX_PIXELS))
        .unwrap_or_else(|_| panic!("decode_rgb panicked on {what}"))
}

/// Truncation verdicts where this decoder knowingly differs from PIL: (file-name prefix,
/// how many bytes from the end the difference may reach, why). Only the safe direction is
/// allowed: PIL decodes the prefix and `decode_rgb` refuses it. Anywhere else, every prefix
/// of every synthetic file must be refused exactly when PIL refuses it.
const TRUNCATION_SLACK: &[(&str, usize, &str)] = &[(
    "png_",
    24,
    "PIL stops reading once the last row is inflated, so it accepts a PNG missing the end \
     of its deflate stream, the zlib checksum, the IDAT CRC and IEND; the png crate behind \
     image requires the checksums",
)];

fn pil_decodes(case: &serde_json::Value, cut: usize) -> bool {
    case["truncations_ok"].as_array().unwrap().iter().any(|iv| {
        let (a, b) = (
            iv[0].as_u64().unwrap() as usize,
            iv[1].as_u64().unwrap() as usize,
        );
        (a..=b).contains(&cut)
    })
}

#[test]
fn truncated_inputs_fail_exactly_where_pil_fails() {
    let manifest = manifest();
    let mut disagreements = Vec::new();
    let mut checked = 0;
    for case in manifest["cases"].as_array().unwrap() {
        let Some(verdicts) = case.get("truncations_ok") else {
            continue;
        };
        assert!(verdicts.is_array());
        let name = case["name"].as_str().unwrap();
        let file = name.rsplit('/').next().unwrap();
        let bytes = load_input(case["input"].as_str().unwrap());
        let slack = TRUNCATION_SLACK
            .iter()
            .find(|(prefix, _, _)| file.starts_with(prefix))
            .map_or(0, |(_, n, _)| *n);
        let mut differ = Vec::new();
        for cut in 0..bytes.len() {
            let ours = decode_no_panic(&format!("{name} cut to {cut}"), &bytes[..cut]);
            if cut == 0 {
                assert!(matches!(ours, Err(DecodeError::Empty)));
            }
            let pil_ok = pil_decodes(case, cut);
            let excused = pil_ok && ours.is_err() && cut + slack >= bytes.len();
            if ours.is_ok() != pil_ok && !excused {
                differ.push(cut);
            }
            checked += 1;
        }
        if !differ.is_empty() {
            disagreements.push(format!(
                "{name} ({} bytes): PIL and decode_rgb disagree at {} prefix lengths, {:?}..",
                bytes.len(),
                differ.len(),
                &differ[..differ.len().min(8)]
            ));
        }
    }
    println!("{checked} truncations checked");
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn corrupted_inputs_never_panic() {
    let mut checked = 0;
    for (name, bytes) in synthetic_files() {
        // Overwrite single bytes with values that upset parsers the most: marker bytes,
        // zero, all ones, and a length-like small value.
        for pos in (0..bytes.len()).step_by(3) {
            for val in [0x00, 0xff, 0xd9, 0x07] {
                let mut bad = bytes.clone();
                if bad[pos] == val {
                    continue;
                }
                bad[pos] = val;
                let what = format!("{name} with byte {pos} = {val:#x}");
                let _ = decode_no_panic(&what, &bad);
                // The region path too (cropped columns, skipped rows), on a region that
                // moves with the position.
                let region = |w: u32, h: u32| {
                    let p = pos as u32;
                    Some(Rect {
                        top: p % h,
                        left: (p * 7) % w,
                        height: 1 + p % 5,
                        width: 1 + p % 11,
                    })
                };
                std::panic::catch_unwind(|| decode_rgb_part(&bad, DEFAULT_MAX_PIXELS, region))
                    .unwrap_or_else(|_| panic!("decode_rgb_part panicked on {what}"))
                    .ok();
                checked += 1;
            }
        }
    }
    println!("{checked} corrupted inputs checked");
}

#[test]
fn garbage_after_a_valid_signature_is_an_error() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    };
    let signatures: [&[u8]; 5] = [
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\x00\x01\x00\x00WEBPVP8 ",
        b"RIFF\x00\x01\x00\x00WEBPVP8L",
    ];
    for sig in signatures {
        for len in [0, 1, 10, 100, 1000, 10000] {
            let mut bytes = sig.to_vec();
            bytes.extend(noise(len));
            let res = decode_no_panic(&format!("{sig:?} + {len} random bytes"), &bytes);
            assert!(res.is_err(), "{sig:?} + {len} random bytes decoded");
        }
    }
    assert!(matches!(
        decode_rgb(b"", DEFAULT_MAX_PIXELS),
        Err(DecodeError::Empty)
    ));
    assert!(decode_rgb(b"not an image at all", DEFAULT_MAX_PIXELS).is_err());
}

// ---------------------------------------------------------------------------------------
// Decompression bombs: the size is refused from the header, before pixel allocation.

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(body);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    out
}

/// A PNG that declares `width` x `height` RGB pixels and carries a token IDAT.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    // zlib of the one filtered row of a 1x1 image: enough for a real decode when the size
    // is small, and all a bomb needs to carry otherwise.
    out.extend(png_chunk(
        b"IDAT",
        &[
            0x78, 0x9c, 0x63, 0x60, 0x60, 0x60, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01,
        ],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// A synthetic JPEG with its SOF frame size rewritten to `width` x `height`.
fn jpeg_bomb(width: u16, height: u16) -> Vec<u8> {
    let mut bytes =
        std::fs::read(fixtures().join("synthetic/jpeg_420_37x23.jpg")).expect("jpeg fixture");
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("baseline SOF");
    // SOF: marker (2), length (2), precision (1), height (2), width (2).
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bytes
}

/// A synthetic GIF with its logical screen and first image descriptor rewritten.
fn gif_bomb() -> Vec<u8> {
    let mut bytes = std::fs::read(fixtures().join("synthetic/gif_p.gif")).expect("gif fixture");
    bytes[6..10].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    bytes
}

/// A synthetic lossless WebP with its VP8L header rewritten to 16000 x 16000.
fn webp_bomb() -> Vec<u8> {
    let mut bytes =
        std::fs::read(fixtures().join("synthetic/webp_lossless_37x23.webp")).expect("webp fixture");
    assert_eq!(&bytes[12..16], b"VP8L");
    // After the signature byte 0x2f: 14 bits width - 1, 14 bits height - 1, alpha, version.
    let mut header = u32::from_le_bytes(bytes[21..25].try_into().unwrap());
    header = (header & !((1 << 28) - 1)) | 15_999 | (15_999 << 14);
    bytes[21..25].copy_from_slice(&header.to_le_bytes());
    bytes
}

#[test]
fn bombs_are_refused_before_allocating() {
    let png = png_bomb(100_000, 100_000);
    let (res, largest) = largest_alloc_during(|| decode_rgb(&png, DEFAULT_MAX_PIXELS));
    match res {
        Err(DecodeError::TooLarge {
            width: 100_000,
            height: 100_000,
            max_pixels: DEFAULT_MAX_PIXELS,
        }) => {}
        other => panic!("expected TooLarge for the PNG bomb, got {other:?}"),
    }
    // 100000 x 100000 RGB is 30 GB; anything near a row of it would show the check came late.
    assert!(largest < 1 << 20, "largest allocation {largest} bytes");

    println!("png bomb: largest allocation {largest} bytes");
    for (what, bytes, side) in [
        ("jpeg", jpeg_bomb(65_535, 65_535), 65_535),
        ("gif", gif_bomb(), 65_535),
        ("webp", webp_bomb(), 16_000),
    ] {
        let (res, largest) = largest_alloc_during(|| decode_rgb(&bytes, DEFAULT_MAX_PIXELS));
        println!("{what} bomb: largest allocation {largest} bytes");
        match res {
            Err(DecodeError::TooLarge { width, height, .. }) if width == side && height == side => {
            }
            other => panic!("{what}: expected TooLarge, got {other:?}"),
        }
        assert!(
            largest < 1 << 20,
            "{what}: largest allocation {largest} bytes"
        );
    }

    // Under the limit, a small declared size decodes from the same construction.
    assert!(decode_rgb(&png_bomb(1, 1), DEFAULT_MAX_PIXELS).is_ok());
    // A limit below the true size refuses a real image too, by its header.
    let jpeg = std::fs::read(fixtures().join("synthetic/jpeg_420_64x48.jpg")).unwrap();
    assert!(matches!(
        decode_rgb(&jpeg, 64 * 48 - 1),
        Err(DecodeError::TooLarge {
            width: 64,
            height: 48,
            ..
        })
    ));
    assert!(decode_rgb(&jpeg, 64 * 48).is_ok());
}

/// A lie in the JPEG header that the probe and libjpeg could disagree on is still caught by
/// libjpeg's own size check: a frame far larger than its data is refused or decoded at the
/// declared size, never at another.
#[test]
fn jpeg_with_inflated_frame_does_not_change_size() {
    let bytes = jpeg_bomb(300, 200);
    if let Ok(img) = decode_no_panic("inflated jpeg", &bytes) {
        assert_eq!((img.width, img.height), (300, 200));
    }
}

#[test]
fn demo_shards_are_found() {
    let tar = std::fs::read(repo_root().join("assets/demo/demo-00000.tar")).unwrap();
    assert!(tar_member(&tar, "000000000.jpg").is_some());
    assert!(tar_member(&tar, "nope.jpg").is_none());
}

// ---------------------------------------------------------------------------------------
// Region decoding

/// Every member of a tar archive whose name ends in `suffix`.
fn tar_members(tar: &[u8], suffix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 512 <= tar.len() && tar[off..off + 512].iter().any(|&b| b != 0) {
        let header = &tar[off..off + 512];
        let end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(&header[..end]).into_owned();
        let size_field = std::str::from_utf8(&header[124..136]).unwrap();
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .unwrap();
        if name.ends_with(suffix) {
            out.push((name, tar[off + 512..off + 512 + size].to_vec()));
        }
        off += 512 + size.div_ceil(512) * 512;
    }
    out
}

/// Every JPEG the tests have: the synthetic and crafted layouts (every subsampling,
/// progressive, restart markers, greyscale, CMYK, YCCK, odd sizes) and the demo photos.
fn all_jpegs() -> Vec<(String, Vec<u8>)> {
    let mut jpegs: Vec<_> = synthetic_files()
        .into_iter()
        .filter(|(name, _)| name.ends_with(".jpg"))
        .collect();
    for shard in ["demo-00000.tar", "demo-00001.tar"] {
        let tar = std::fs::read(repo_root().join("assets/demo").join(shard)).unwrap();
        jpegs.extend(tar_members(&tar, ".jpg"));
    }
    assert!(jpegs.len() >= 50, "only {} JPEGs", jpegs.len());
    jpegs
}

/// Regions of a `w` x `h` image: every corner and edge as 1-pixel and 1-row/column strips,
/// the whole image, and seeded random rectangles (some reaching past the image).
fn regions(name: &str, w: u32, h: u32, random: usize) -> Vec<Rect> {
    let r = |top, left, height, width| Rect {
        top,
        left,
        height,
        width,
    };
    let mut out = vec![
        r(0, 0, h, w),
        r(0, 0, 1, 1),
        r(0, w - 1, 1, 1),
        r(h - 1, 0, 1, 1),
        r(h - 1, w - 1, 1, 1),
        r(0, 0, 1, w),
        r(h - 1, 0, 1, w),
        r(0, 0, h, 1),
        r(0, w - 1, h, 1),
        r(h / 2, w / 2, h, w),
    ];
    let mut rng = AugRng::for_view(7, name, 0);
    for _ in 0..random {
        let top = rng.below(u64::from(h)) as u32;
        let left = rng.below(u64::from(w)) as u32;
        let height = 1 + rng.below(u64::from(h + 8)) as u32;
        let width = 1 + rng.below(u64::from(w + 8)) as u32;
        out.push(r(top, left, height, width));
    }
    out
}

#[test]
fn region_decodes_equal_the_whole_decode_inside_the_region() {
    let mut checked = 0usize;
    let mut saved = 0f64;
    for (name, bytes) in all_jpegs() {
        let full = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        let (w, h) = (full.width, full.height);
        let random = if w * h < 10_000 { 300 } else { 25 };
        for region in regions(&name, w, h, random) {
            let part = decode_rgb_part(&bytes, DEFAULT_MAX_PIXELS, |pw, ph| {
                assert_eq!((pw, ph), (w, h), "{name}: size passed to the region choice");
                Some(region)
            })
            .unwrap_or_else(|e| panic!("{name} {region:?}: {e}"));
            assert_eq!((part.width, part.height), (w, h), "{name}");
            let rect = part.rect;
            let (img, x0, y0) = (&part.image, rect.left, rect.top);
            assert_eq!((img.width, img.height), (rect.width, rect.height));
            // The clipped region lies inside the decoded rectangle, pixel for pixel equal.
            let bottom = (region.top + region.height).min(h);
            let right = (region.left + region.width).min(w);
            assert!(
                rect.top <= region.top && rect.left <= region.left,
                "{name} {region:?}"
            );
            assert!(rect.top + rect.height >= bottom && rect.left + rect.width >= right);
            for y in region.top..bottom {
                let want = &full.data
                    [((y * w + region.left) * 3) as usize..((y * w + right) * 3) as usize];
                let row = ((y - y0) * img.width + (region.left - x0)) as usize * 3;
                let got = &img.data[row..row + want.len()];
                assert!(got == want, "{name} {region:?}: row {y} differs");
            }
            saved += 1.0 - f64::from(rect.width * rect.height) / f64::from(w * h);
            checked += 1;
        }
    }
    println!(
        "{checked} regions exact; on average {:.0}% of the pixels not decoded",
        100.0 * saved / checked as f64
    );
}

#[test]
fn region_decodes_of_other_formats_are_whole_images() {
    for (name, bytes) in synthetic_files()
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".jpg"))
    {
        let full = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        let mut asked = None;
        let part = decode_rgb_part(&bytes, DEFAULT_MAX_PIXELS, |w, h| {
            asked = Some((w, h));
            Some(Rect {
                top: 0,
                left: 0,
                height: 1,
                width: 1,
            })
        })
        .unwrap();
        assert_eq!(
            asked,
            Some((full.width, full.height)),
            "{name}: region chosen from the size"
        );
        assert_eq!(part.image, full, "{name}");
        assert_eq!(
            (part.rect.width, part.rect.height),
            (full.width, full.height)
        );
    }
}

#[test]
fn replays_on_region_decodes_equal_replays_on_whole_images() {
    let config = AugConfig::default();
    let mut views = 0;
    for (name, bytes) in all_jpegs() {
        let full = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        // One view (a training step) and three (a generation job's union of crops).
        for (seed, count) in [(1u64, 1u32), (2, 3)] {
            let mut params = Vec::new();
            let part = decode_rgb_part(&bytes, DEFAULT_MAX_PIXELS, |w, h| {
                params = (0..count)
                    .map(|k| config.sample(seed, &name, k, w, h))
                    .collect();
                crops_region(&params, w, h)
            })
            .unwrap();
            for p in &params {
                let want = config.replay(&full, p, config.size);
                assert!(
                    config.replay_part(&part, p, config.size) == want,
                    "{name} {p:?}"
                );
                views += 1;
            }
        }
    }
    assert!(views >= 200, "{views} views");
}
