//! Bounded image decoding to 8-bit RGB, pixel for pixel as PIL decodes.
//!
//! Apple's generator turns encoded bytes into pixels with
//! `Image.open(BytesIO(bytes)).convert("RGBA").convert("RGB")`; [`decode_rgb`] reproduces
//! that expression. What it implies, format by format:
//!
//! - JPEG: PIL decodes with libjpeg-turbo (accurate integer IDCT, "fancy" triangle-filter
//!   chroma upsampling, libjpeg's fixed-point YCbCr->RGB). Pure-Rust decoders round
//!   differently in all three places (up to 7 levels on the demo photos), so JPEGs go through
//!   libjpeg-turbo's decoder, built from source by the `mozjpeg-sys` crate and driven by
//!   `jpeg.rs`: the output is the same bytes PIL gets. Four-channel JPEGs are CMYK to PIL,
//!   which always assumes Adobe's inverted polarity and converts with its own
//!   `cmyk2rgb` (see [`cmyk_to_rgb`]). A JPEG whose data ends before its last scanline is
//!   decoded is an error, as in PIL ("image file is truncated"), although libjpeg itself
//!   would pad it with grey.
//! - PNG: 16-bit RGB and RGBA keep the high byte of each sample (PIL unpacks them with
//!   `RGB;16B`/`RGBA;16B`), 16-bit grey with alpha likewise (`LA;16B`), but 16-bit grey
//!   without alpha is PIL's mode `I;16`, whose conversion to RGBA clips at 255 instead of
//!   scaling. Palettes, low bit depths and tRNS only matter through the colour they expand
//!   to: the alpha they produce is dropped without compositing. (One known difference: PIL
//!   stops reading after the last row, so it accepts a PNG cut within its last ~20 bytes,
//!   where the checksums and IEND are; the `png` crate refuses it.)
//! - WebP: PIL's plugin hands the whole file to libwebp's `WebPAnimDecoder` (default
//!   options: non-premultiplied RGBA, fancy upsampling) for stills and animations alike and
//!   takes its first frame, drawn on a transparent canvas. The `libwebp-sys` crate builds
//!   that same libwebp (1.6.0) from source, so WebP goes through the same calls (see
//!   [`decode_webp`]); alpha is dropped. libwebp's demuxer refuses a file shorter than its
//!   RIFF header says, as in PIL.
//! - GIF: the first frame, decoded here, because PIL's rendering of it differs from the
//!   `gif` crate's compositing (see [`decode_gif`]).
//!
//! No EXIF orientation is applied anywhere: `Image.open` applies none.
//!
//! Web data contains decompression bombs: a few hundred bytes can declare a 100000x100000
//! image. The size is therefore read from the header and checked against a pixel limit
//! before any pixel buffer is allocated, and the decoders run under allocation limits
//! derived from it.

use std::io::Cursor;

use image::{ImageDecoder, ImageReader, Limits};

pub use crate::jpeg::Rect;
use crate::jpeg::{self, JpegOut};
pub use crate::rgb::RgbImage;
/// The format [`probe`] reports.
pub use image::ImageFormat;

/// PIL's `Image.MAX_IMAGE_PIXELS`, the threshold Python pipelines are used to.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Empty input.
    #[error("empty image")]
    Empty,
    /// Not an image in a supported format, or corrupt.
    #[error("undecodable image: {0}")]
    Undecodable(String),
    /// The header declares more pixels than allowed.
    #[error("image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit in force.
        max_pixels: u64,
    },
}

/// Format and size of an encoded image, from its header alone.
///
/// For a GIF this is the logical screen; [`decode_rgb`] returns a larger image when the
/// first frame reaches past it, as PIL does.
pub fn probe(bytes: &[u8]) -> Result<(ImageFormat, u32, u32), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    let format = reader
        .format()
        .ok_or_else(|| DecodeError::Undecodable("unrecognised image format".into()))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    Ok((format, w, h))
}

/// Decodes `bytes` (JPEG, PNG, WebP or GIF, recognised by content, not by name) to the RGB
/// pixels PIL's `Image.open(...).convert("RGBA").convert("RGB")` gives, refusing images with
/// more than `max_pixels` pixels before allocating them. Alpha is dropped without
/// compositing; no EXIF rotation is applied (PIL applies none).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_rgb_part(bytes, max_pixels, |_, _| None).map(|part| part.image)
}

/// Part of a decoded image: the pixels of `rect` of a `width` x `height` image.
#[derive(Debug, Clone)]
pub struct RgbPart {
    /// The pixels of `rect`: inside the region that was asked for exactly those of
    /// [`decode_rgb`]; outside it (a few columns of decoding context) possibly not.
    pub image: RgbImage,
    /// Where `image` lies in the whole image; it contains the region that was asked for.
    pub rect: Rect,
    /// Width of the whole image.
    pub width: u32,
    /// Height of the whole image.
    pub height: u32,
}

/// [`decode_rgb`] for a caller that needs only a region of the image: `region` is called
/// once with the image's size (for every format, after the size check and before or after
/// the pixels are decoded) and returns the region (`None`: all of it). JPEGs are then decoded
/// only as far as the region needs (libjpeg-turbo's cropped and skipped scanlines): the work saved is roughly the
/// share of the image outside the region, which is what a training loader replaying a
/// RandomResizedCrop gains. Other formats are decoded whole, and `rect` is then the whole
/// image. Inside the region the pixels are those of [`decode_rgb`]; the one difference is
/// that a JPEG cut off below the region decodes here but not there.
pub fn decode_rgb_part(
    bytes: &[u8],
    max_pixels: u64,
    region: impl FnOnce(u32, u32) -> Option<Rect>,
) -> Result<RgbPart, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    // GIF is decoded here from its blocks (PIL's canvas rules differ from the gif crate's,
    // and can make the image larger than the screen its header declares), so it needs no
    // probe; it checks the pixel limit itself before allocating.
    if matches!(image::guess_format(bytes), Ok(ImageFormat::Gif)) {
        let image = decode_gif(bytes, max_pixels)?;
        region(image.width, image.height);
        return Ok(whole(image));
    }
    let (format, width, height) = probe(bytes)?;
    check_size(width, height, max_pixels)?;
    let pixels = u64::from(width) * u64::from(height);
    let part = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, max_pixels, region)?,
        other => {
            let image = match other {
                ImageFormat::Png => guarded(|| decode_png(bytes, width, height, pixels))?,
                ImageFormat::WebP => decode_webp(bytes, max_pixels)?,
                _ => guarded(|| decode_generic(bytes, width, height, pixels))?,
            };
            // Called all the same: callers sample what they need from the size there.
            region(image.width, image.height);
            whole(image)
        }
    };
    // A decoder that disagrees with its own header is broken input, not a smaller image.
    if (part.width, part.height) != (width, height) {
        return Err(DecodeError::Undecodable(format!(
            "header says {width}x{height}, decoder produced {}x{}",
            part.width, part.height
        )));
    }
    Ok(part)
}

/// A whole image as a part of itself.
fn whole(image: RgbImage) -> RgbPart {
    RgbPart {
        rect: Rect {
            top: 0,
            left: 0,
            height: image.height,
            width: image.width,
        },
        width: image.width,
        height: image.height,
        image,
    }
}

/// Refuses empty and over-limit sizes.
fn check_size(width: u32, height: u32, max_pixels: u64) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Undecodable(format!(
            "image declares a size of {width}x{height}"
        )));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    Ok(())
}

/// Allocation limits for the `image` crate's decoders, from the already checked size.
fn limits(width: u32, height: u32, pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 16-bit RGBA is the widest intermediate, plus decoder scratch space.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

fn image_error(e: image::ImageError) -> DecodeError {
    match e {
        image::ImageError::Limits(l) => DecodeError::Undecodable(format!("decoder limit: {l}")),
        other => DecodeError::Undecodable(other.to_string()),
    }
}

/// Wraps an RGB buffer whose length the caller computed from the same width and height.
fn rgb_image(width: u32, height: u32, data: Vec<u8>) -> Result<RgbImage, DecodeError> {
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| DecodeError::Undecodable("decoder returned a short pixel buffer".into()))
}

// ---------------------------------------------------------------------------------------
// JPEG

/// Runs a decoder, turning a panic into [`DecodeError::Undecodable`].
///
/// Web data reaches decoder code paths their authors never tested: image-webp 0.2.4 (which
/// decoded WebP here before libwebp), for one, indexes out of bounds on an animated lossy
/// WebP with a corrupted frame header (a case in the corruption test). Whatever a
/// dependency does with hostile input, one bad image must cost one sample, not the job.
/// Panics other than libjpeg's still print through the panic hook, which is how such bugs
/// get noticed.
fn guarded<T>(f: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "decoder panicked".into());
            Err(DecodeError::Undecodable(msg))
        }
    }
}

fn decode_jpeg(
    bytes: &[u8],
    max_pixels: u64,
    region: impl FnOnce(u32, u32) -> Option<Rect>,
) -> Result<RgbPart, DecodeError> {
    // libjpeg reports fatal errors by unwinding out of its callbacks; the guard turns them
    // into errors.
    let px = guarded(|| jpeg::decode(bytes, |w, h| check_size(w, h, max_pixels), region))?;
    let data = match px.out {
        JpegOut::Rgb => px.data,
        JpegOut::Grey => grey_to_rgb(&px.data),
        JpegOut::Cmyk => map_pixels(&px.data, 4, |p| cmyk_to_rgb([p[0], p[1], p[2], p[3]])),
    };
    Ok(RgbPart {
        image: rgb_image(px.rect.width, px.rect.height, data)?,
        rect: px.rect,
        width: px.image_width,
        height: px.image_height,
    })
}

/// Grey levels replicated into RGB.
fn grey_to_rgb(grey: &[u8]) -> Vec<u8> {
    // Sixteen pixels at a time through a fixed-size block (which the compiler turns into
    // byte shuffles), appended without zero-filling the output first.
    let mut out = Vec::with_capacity(grey.len() * 3);
    let mut blocks = grey.chunks_exact(16);
    for g in &mut blocks {
        let mut rgb = [0u8; 48];
        for (d, &v) in rgb.chunks_exact_mut(3).zip(g) {
            d.copy_from_slice(&[v, v, v]);
        }
        out.extend_from_slice(&rgb);
    }
    for &v in blocks.remainder() {
        out.extend_from_slice(&[v, v, v]);
    }
    out
}

/// Each `step`-byte pixel of `src` mapped to RGB by `f`, in one preallocated buffer.
#[inline(always)]
fn map_pixels(src: &[u8], step: usize, f: impl Fn(&[u8]) -> [u8; 3]) -> Vec<u8> {
    let mut out = vec![0u8; src.len() / step * 3];
    for (d, p) in out.chunks_exact_mut(3).zip(src.chunks_exact(step)) {
        d.copy_from_slice(&f(p));
    }
    out
}

/// PIL's rendering of one CMYK pixel as libjpeg delivers it from a JPEG.
///
/// PIL unpacks every 4-channel JPEG with rawmode `CMYK;I`, inverting each channel (it
/// assumes Adobe's convention, where 0 means full ink), then converts CMYK to RGB without
/// colour management: each channel scaled by the inverted black, with PIL's rounding
/// division by 255 (`(t + (t >> 8)) >> 8` with `t = a * b + 128`).
pub fn cmyk_to_rgb(stored: [u8; 4]) -> [u8; 3] {
    // After PIL's inversion, black is 255 - stored[3], so the remaining brightness
    // (255 - black) is the stored value itself.
    let nk = u32::from(stored[3]);
    let channel = |stored_c: u8| {
        let c = 255 - u32::from(stored_c);
        let t = c * nk + 128;
        let scaled = ((t >> 8) + t) >> 8;
        // nk >= scaled always holds (c <= 255), so this never wraps.
        (nk - scaled.min(nk)) as u8
    };
    [channel(stored[0]), channel(stored[1]), channel(stored[2])]
}

// ---------------------------------------------------------------------------------------
// PNG

/// PNG colour type 0 (greyscale) at 16 bits: PIL's `I;16`.
fn png_is_grey16(bytes: &[u8]) -> bool {
    // The signature (8 bytes) is followed by IHDR, which the PNG specification requires
    // first: length (4), type (4), width (4), height (4), bit depth, colour type.
    bytes.get(12..16) == Some(b"IHDR".as_slice())
        && bytes.get(24) == Some(&16)
        && bytes.get(25) == Some(&0)
}

/// A PNG through the `image` crate's decoder (palettes and low bit depths expanded, tRNS
/// turned into alpha), then mapped to 8-bit RGB the way PIL's modes convert.
fn decode_png(bytes: &[u8], width: u32, height: u32, pixels: u64) -> Result<RgbImage, DecodeError> {
    let decoder = image::codecs::png::PngDecoder::with_limits(
        Cursor::new(bytes),
        limits(width, height, pixels),
    )
    .map_err(image_error)?;
    let color = decoder.color_type();
    let (w, h) = decoder.dimensions();
    if (w, h) != (width, height) {
        return Err(DecodeError::Undecodable(
            "png size changed after probe".into(),
        ));
    }
    let len = usize::try_from(decoder.total_bytes())
        .map_err(|_| DecodeError::Undecodable("png too large for memory".into()))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| DecodeError::Undecodable("png: out of memory".into()))?;
    buf.resize(len, 0);
    decoder.read_image(&mut buf).map_err(image_error)?;

    // 16-bit samples arrive in native byte order.
    fn sample16(s: &[u8]) -> u16 {
        u16::from_ne_bytes([s[0], s[1]])
    }
    fn high(s: &[u8]) -> u8 {
        (sample16(s) >> 8) as u8
    }
    // I;16 -> RGBA in PIL clips instead of scaling: 300 becomes 255, 200 stays 200.
    fn clip(s: &[u8]) -> u8 {
        sample16(s).min(255) as u8
    }
    let grey16 = png_is_grey16(bytes);
    use image::ColorType as C;
    let data: Vec<u8> = match color {
        C::Rgb8 => buf,
        C::Rgba8 => map_pixels(&buf, 4, |p| [p[0], p[1], p[2]]),
        C::L8 => grey_to_rgb(&buf),
        C::La8 => map_pixels(&buf, 2, |p| [p[0], p[0], p[0]]),
        C::Rgb16 => map_pixels(&buf, 6, |p| {
            [high(&p[0..2]), high(&p[2..4]), high(&p[4..6])]
        }),
        C::Rgba16 => map_pixels(&buf, 8, |p| {
            [high(&p[0..2]), high(&p[2..4]), high(&p[4..6])]
        }),
        // Grey16 with a tRNS chunk is expanded to grey+alpha, but to PIL it is still I;16.
        C::L16 | C::La16 => {
            let step = if color == C::L16 { 2 } else { 4 };
            let map: fn(&[u8]) -> u8 = if grey16 { clip } else { high };
            map_pixels(&buf, step, |p| {
                let v = map(&p[0..2]);
                [v, v, v]
            })
        }
        other => {
            return Err(DecodeError::Undecodable(format!(
                "png decoded to unexpected {other:?}"
            )))
        }
    };
    rgb_image(width, height, data)
}

// ---------------------------------------------------------------------------------------
// WebP, GIF

/// Owns a libwebp demuxer or animation decoder and deletes it on every path out.
struct WebpHandle<T> {
    ptr: *mut T,
    delete: unsafe extern "C" fn(*mut T),
}

impl<T> Drop for WebpHandle<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came non-null from the matching libwebp constructor and is deleted
        // exactly once, here.
        unsafe { (self.delete)(self.ptr) }
    }
}

/// Decodes a WebP as PIL's `WebPImagePlugin` does: `WebPAnimDecoderNew(data, NULL)` (RGBA,
/// not premultiplied, libwebp's default decoder options, so fancy upsampling), then the
/// first `WebPAnimDecoderGetNext`, whose canvas is the image (for a still, the picture; for
/// an animation, the first frame over a transparent canvas). PIL reads that canvas as
/// `RGBA`, or `RGBX` when `WebPGetFeatures` reports no alpha; either way
/// `convert("RGBA").convert("RGB")` keeps the first three bytes of each pixel.
///
/// The animation decoder allocates its canvases when it is created, so the canvas size is
/// first read with libwebp's demuxer alone and checked against the pixel limit. Every
/// libwebp call's result is checked; a failure is an error, never a panic.
fn decode_webp(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    use libwebp_sys as webp;

    let fail = |what: &str| DecodeError::Undecodable(format!("webp: {what}"));
    let data = webp::WebPData {
        bytes: bytes.as_ptr(),
        size: bytes.len(),
    };
    // SAFETY: `data` points at `bytes`, which outlives every libwebp object made from it
    // (all are dropped before this function returns). A null result is an error; non-null
    // results are owned by `WebpHandle`s and deleted with their own destructors.
    unsafe {
        // Not partial (0): a truncated file fails here, as in PIL's WebPAnimDecoderNew.
        let demux = webp::WebPDemuxInternal(
            &data,
            0,
            std::ptr::null_mut(),
            webp::WebPGetDemuxABIVersion(),
        );
        if demux.is_null() {
            return Err(fail(
                "libwebp could not parse the file (corrupt or truncated)",
            ));
        }
        let demux = WebpHandle {
            ptr: demux,
            delete: webp::WebPDemuxDelete,
        };
        let width = webp::WebPDemuxGetI(demux.ptr, webp::WebPFormatFeature::WEBP_FF_CANVAS_WIDTH);
        let height = webp::WebPDemuxGetI(demux.ptr, webp::WebPFormatFeature::WEBP_FF_CANVAS_HEIGHT);
        drop(demux);
        check_size(width, height, max_pixels)?;

        // Null options: libwebp's defaults (MODE_RGBA, no threads), as PIL passes.
        let dec = webp::WebPAnimDecoderNewInternal(
            &data,
            std::ptr::null(),
            webp::WebPGetDemuxABIVersion(),
        );
        if dec.is_null() {
            return Err(fail("could not create decoder object"));
        }
        let dec = WebpHandle {
            ptr: dec,
            delete: webp::WebPAnimDecoderDelete,
        };
        let mut info: webp::WebPAnimInfo = std::mem::zeroed();
        if webp::WebPAnimDecoderGetInfo(dec.ptr, &mut info) == 0 {
            return Err(fail("could not read the animation info"));
        }
        if (info.canvas_width, info.canvas_height) != (width, height) {
            return Err(fail("decoder and demuxer disagree on the canvas size"));
        }
        let mut buf: *mut u8 = std::ptr::null_mut();
        let mut timestamp = 0;
        if webp::WebPAnimDecoderGetNext(dec.ptr, &mut buf, &mut timestamp) == 0 || buf.is_null() {
            return Err(fail("failed to read next frame"));
        }
        let pixels = width as usize * height as usize;
        // The canvas is `canvas_width * 4 * canvas_height` bytes of RGBA, owned by `dec`.
        let rgba = std::slice::from_raw_parts(buf, pixels * 4);
        let mut rgb = vec![0; pixels * 3];
        for (out, px) in rgb.chunks_exact_mut(3).zip(rgba.chunks_exact(4)) {
            out.copy_from_slice(&px[..3]);
        }
        drop(dec);
        rgb_image(width, height, rgb)
    }
}

/// GIF's identity greyscale palette test, as PIL's `_is_palette_needed`: a palette whose
/// entry `i` is `(i, i, i)` is dropped and the frame read as mode `L`, where an index is
/// its own grey level, even beyond the palette's end.
fn gif_palette(table: &[u8]) -> Option<&[u8]> {
    let identity = table
        .chunks_exact(3)
        .enumerate()
        .all(|(i, p)| p.iter().all(|&v| usize::from(v) == i));
    (!identity).then_some(table)
}

/// A byte cursor over the GIF that reports running out as PIL's truncation error.
struct GifCursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> GifCursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end =
            end.ok_or_else(|| DecodeError::Undecodable("gif: image file is truncated".into()))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A colour table of `3 << ((flags & 7) + 1)` bytes when `flags` has bit 7 set.
    fn color_table(&mut self, flags: u8) -> Result<Option<&'a [u8]>, DecodeError> {
        if flags & 0x80 == 0 {
            return Ok(None);
        }
        self.take(3usize << ((flags & 7) + 1)).map(Some)
    }

    /// One data sub-block; `None` for the zero-length terminator.
    fn sub_block(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        let n = usize::from(self.byte()?);
        if n == 0 {
            return Ok(None);
        }
        self.take(n).map(Some)
    }
}

/// The first frame of a GIF as PIL renders it with `convert("RGBA").convert("RGB")`.
///
/// PIL (and so this function) reads the frame onto a canvas the size of the logical screen,
/// enlarged when the frame reaches past it; the canvas starts filled with the transparency
/// index when the frame has one and with index 0 otherwise (not with the background
/// colour), then every index maps through the frame's palette (local, else global; entries
/// past its end are black), or is its own grey level when there is no palette. Transparent
/// pixels keep their palette colour: convert("RGB") drops alpha without compositing.
///
/// Truncation follows PIL too: the image data may end where a sub-block length would be, or
/// with an early end code (the rest of the frame keeps the canvas fill), but not inside a
/// sub-block or before every pixel has been decoded.
fn decode_gif(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let broken = |what: &str| DecodeError::Undecodable(format!("gif: {what}"));
    let mut cur = GifCursor { bytes, pos: 0 };
    let signature = cur.take(6)?;
    if signature != b"GIF87a" && signature != b"GIF89a" {
        return Err(broken("not a GIF file"));
    }
    let (mut width, mut height) = (u32::from(cur.u16()?), u32::from(cur.u16()?));
    let screen_flags = cur.byte()?;
    cur.take(2)?; // background colour index, pixel aspect ratio: unused by PIL here
    let global = cur.color_table(screen_flags)?.and_then(gif_palette);

    let mut transparency = None;
    loop {
        match cur.take(1).ok().map(|b| b[0]) {
            None | Some(b';') => return Err(broken("image not found in GIF frame")),
            Some(b'!') => {
                let label = cur.byte()?;
                let first = cur.sub_block()?;
                if let (0xf9, Some(block)) = (label, first) {
                    // Graphic control: flags, delay (2 bytes), transparent index. PIL reads
                    // the delay unconditionally and the index when flagged.
                    if block.len() < 3 || (block[0] & 1 == 1 && block.len() < 4) {
                        return Err(broken("short graphic control extension"));
                    }
                    transparency = (block[0] & 1 == 1).then_some(block[3]);
                }
                if first.is_some() {
                    while cur.sub_block()?.is_some() {}
                }
            }
            Some(b',') => break,
            // PIL skips unknown bytes between blocks one at a time.
            Some(_) => {}
        }
    }

    let (x0, y0) = (u32::from(cur.u16()?), u32::from(cur.u16()?));
    let (fw, fh) = (u32::from(cur.u16()?), u32::from(cur.u16()?));
    let flags = cur.byte()?;
    let interlaced = flags & 0x40 != 0;
    let palette = match cur.color_table(flags)? {
        Some(local) => gif_palette(local),
        None => global,
    };
    width = width.max(x0 + fw);
    height = height.max(y0 + fh);
    check_size(width, height, max_pixels)?;
    let min_code_size = cur.byte()?;
    if !(1..=11).contains(&min_code_size) {
        return Err(broken("bad LZW code size"));
    }
    // The image data: sub-blocks up to the terminator, or up to the end of the file if it
    // ends exactly between sub-blocks.
    let mut data = Vec::new();
    while cur.pos < bytes.len() {
        match cur.sub_block()? {
            Some(block) => data.extend_from_slice(block),
            None => break,
        }
    }

    let (w, h) = (width as usize, height as usize);
    let fill = transparency.unwrap_or(0);
    let mut canvas = Vec::new();
    canvas
        .try_reserve_exact(w * h)
        .map_err(|_| broken("out of memory"))?;
    canvas.resize(w * h, fill);
    let frame_rows = gif_row_order(fh as usize, interlaced);
    let mut sink = |i: usize, index: u8| {
        let (fx, fy) = (i % fw as usize, frame_rows[i / fw as usize]);
        canvas[(y0 as usize + fy) * w + x0 as usize + fx] = index;
    };
    let total = fw as usize * fh as usize;
    let decoded = lzw_decode(&data, min_code_size, total, &mut sink)?;
    if decoded.produced < total && !decoded.ended {
        return Err(broken("image file is truncated"));
    }

    let colour = |index: u8| -> [u8; 3] {
        match palette {
            Some(p) => {
                let at = usize::from(index) * 3;
                p.get(at..at + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
            }
            None => [index; 3],
        }
    };
    let data = map_pixels(&canvas, 1, |p| colour(p[0]));
    rgb_image(width, height, data)
}

/// The frame row that each decoded row lands on: in order, or in GIF's four interlace
/// passes (every 8th row from 0, every 8th from 4, every 4th from 2, every 2nd from 1).
fn gif_row_order(rows: usize, interlaced: bool) -> Vec<usize> {
    if !interlaced {
        return (0..rows).collect();
    }
    [(0, 8), (4, 8), (2, 4), (1, 2)]
        .iter()
        .flat_map(|&(start, step)| (start..rows).step_by(step))
        .collect()
}

/// What [`lzw_decode`] got through.
struct LzwOutcome {
    /// Pixels written.
    produced: usize,
    /// Whether the stream said it was finished (end code) or filled the frame.
    ended: bool,
}

/// GIF's variable-width LZW, codes packed least significant bit first, feeding at most
/// `total` indices to `sink`. Codes past a full frame are ignored, as PIL ignores them.
fn lzw_decode(
    data: &[u8],
    min_code_size: u8,
    total: usize,
    sink: &mut dyn FnMut(usize, u8),
) -> Result<LzwOutcome, DecodeError> {
    const MAX_CODES: usize = 4096;
    let clear = 1usize << min_code_size;
    let end = clear + 1;
    // Each table entry is (prefix code, last byte, first byte, length).
    let mut prefix = vec![0u16; MAX_CODES];
    let mut suffix = vec![0u8; MAX_CODES];
    let mut first = vec![0u8; MAX_CODES];
    let mut length = vec![0u16; MAX_CODES];
    for code in 0..clear {
        suffix[code] = code as u8;
        first[code] = code as u8;
        length[code] = 1;
    }
    let mut next = clear + 2;
    let mut size = u32::from(min_code_size) + 1;
    let mut prev: Option<usize> = None;
    let mut produced = 0usize;
    let mut stack = vec![0u8; MAX_CODES];
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut bytes = data.iter();

    while produced < total {
        while bits < size {
            let Some(&b) = bytes.next() else {
                return Ok(LzwOutcome {
                    produced,
                    ended: false,
                });
            };
            acc |= u32::from(b) << bits;
            bits += 8;
        }
        let code = (acc & ((1 << size) - 1)) as usize;
        acc >>= size;
        bits -= size;

        if code == clear {
            next = clear + 2;
            size = u32::from(min_code_size) + 1;
            prev = None;
            continue;
        }
        if code == end {
            return Ok(LzwOutcome {
                produced,
                ended: true,
            });
        }
        let emit = match prev {
            None if code < clear => code,
            None => return Err(DecodeError::Undecodable("gif: bad LZW code".into())),
            Some(p) => {
                let head = if code < next {
                    first[code]
                } else if code == next {
                    first[p]
                } else {
                    return Err(DecodeError::Undecodable("gif: bad LZW code".into()));
                };
                if next < MAX_CODES {
                    prefix[next] = p as u16;
                    suffix[next] = head;
                    first[next] = first[p];
                    length[next] = length[p] + 1;
                    next += 1;
                    if next == 1 << size && size < 12 {
                        size += 1;
                    }
                }
                code
            }
        };
        // Spell the entry backwards into the stack, then emit it forwards.
        let len = usize::from(length[emit]);
        let mut c = emit;
        for slot in stack[..len].iter_mut().rev() {
            *slot = suffix[c];
            c = usize::from(prefix[c]);
        }
        for &index in &stack[..len] {
            if produced == total {
                break;
            }
            sink(produced, index);
            produced += 1;
        }
        prev = Some(emit);
    }
    Ok(LzwOutcome {
        produced,
        ended: true,
    })
}

/// Any other format the `image` crate recognises (none of the four PIL-parity formats):
/// first frame, alpha dropped.
fn decode_generic(
    bytes: &[u8],
    width: u32,
    height: u32,
    pixels: u64,
) -> Result<RgbImage, DecodeError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    reader.limits(limits(width, height, pixels));
    let img = reader.decode().map_err(image_error)?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    rgb_image(w, h, rgb.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, color: image::ColorType) -> Vec<u8> {
        let n = (width * height) as usize * color.bytes_per_pixel() as usize;
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = Cursor::new(Vec::new());
        image::write_buffer_with_format(&mut out, &data, width, height, color, ImageFormat::Png)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn rgba_drops_alpha() {
        let bytes = png(3, 2, image::ColorType::Rgba8);
        let img = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        let src: Vec<u8> = (0..24).map(|i| (i * 7 % 251) as u8).collect();
        let expect: Vec<u8> = src.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        assert_eq!(img.data, expect);
    }

    #[test]
    fn grey_is_replicated() {
        let bytes = png(2, 2, image::ColorType::L8);
        let img = decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(img.data[0..3], [0, 0, 0]);
        assert_eq!(img.data[3..6], [7, 7, 7]);
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let bytes = png(40, 30, image::ColorType::Rgb8);
        match decode_rgb(&bytes, 1000) {
            Err(DecodeError::TooLarge {
                width: 40,
                height: 30,
                max_pixels: 1000,
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(decode_rgb(&bytes, 1200).is_ok());
    }

    #[test]
    fn garbage_and_empty_are_errors() {
        assert!(matches!(decode_rgb(b"", 100), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_rgb(b"definitely not an image", 100),
            Err(DecodeError::Undecodable(_))
        ));
        let mut truncated = png(64, 64, image::ColorType::Rgb8);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(
            decode_rgb(&truncated, DEFAULT_MAX_PIXELS),
            Err(DecodeError::Undecodable(_))
        ));
    }

    #[test]
    fn cmyk_matches_pil_arithmetic() {
        // Stored (inverted) values: 255 everywhere is no ink at all: white.
        assert_eq!(cmyk_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        // Full black ink (stored 0) gives black whatever the colour inks.
        assert_eq!(cmyk_to_rgb([17, 200, 255, 0]), [0, 0, 0]);
        // Full cyan (stored 0), no black: red channel gone, others intact.
        assert_eq!(cmyk_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
        // A value worked by hand from PIL's cmyk2rgb: c=100 (stored 155), k=55 (stored 200):
        // nk=200, t=100*200+128=20128, (78+20128)>>8 = 78, 200-78 = 122.
        assert_eq!(cmyk_to_rgb([155, 255, 255, 200])[0], 122);
    }

    #[test]
    fn lzw_handles_the_code_that_is_not_yet_in_the_table() {
        // Minimum code size 2 (clear 4, end 5), 3-bit codes packed LSB first: clear, 1,
        // 6 (the entry being defined: "1" + its own first byte), end. The frame has room
        // for four pixels; the early end code leaves the fourth to the canvas.
        let data = [0x8c, 0x0b];
        let mut out = Vec::new();
        let got = lzw_decode(&data, 2, 4, &mut |i, v| out.push((i, v))).unwrap();
        assert_eq!(out, [(0, 1), (1, 1), (2, 1)]);
        assert_eq!((got.produced, got.ended), (3, true));
        // Without the end code the stream simply runs out: PIL calls that truncated.
        let got = lzw_decode(&data[..1], 2, 4, &mut |_, _| {}).unwrap();
        assert!(!got.ended);
    }

    #[test]
    fn gif_interlace_passes() {
        assert_eq!(gif_row_order(10, true), [0, 8, 4, 2, 6, 1, 3, 5, 7, 9]);
        assert_eq!(gif_row_order(3, false), [0, 1, 2]);
    }

    #[test]
    fn sixteen_bit_grey_is_recognised_from_ihdr() {
        let mut out = Cursor::new(Vec::new());
        let data = [0u8; 4];
        image::write_buffer_with_format(
            &mut out,
            &data,
            2,
            1,
            image::ColorType::L16,
            ImageFormat::Png,
        )
        .unwrap();
        assert!(png_is_grey16(out.get_ref()));
        assert!(!png_is_grey16(&png(2, 1, image::ColorType::L8)));
    }
}
