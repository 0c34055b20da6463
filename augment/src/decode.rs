//! Bounded image decoding to 8-bit RGB.
//!
//! Web data contains decompression bombs: a few hundred bytes can declare a 100000x100000
//! image. The size is therefore read from the header and checked against a pixel limit
//! before any pixel buffer is allocated, and the decoder itself runs under an allocation
//! limit derived from it.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

pub use crate::rgb::RgbImage;

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

/// Decodes `bytes` (JPEG, PNG, WebP or GIF, recognised by content, not by name) to RGB,
/// refusing images with more than `max_pixels` pixels before allocating them. Alpha is
/// dropped, as PIL's `convert("RGB")` does; no EXIF rotation is applied (PIL applies none).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let (_, width, height) = probe(bytes)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels || width == 0 || height == 0 {
        if width == 0 || height == 0 {
            return Err(DecodeError::Undecodable(format!(
                "image declares a size of {width}x{height}"
            )));
        }
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 16-bit RGBA is the widest intermediate, plus decoder scratch space.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => DecodeError::Undecodable(format!("decoder limit: {l}")),
        other => DecodeError::Undecodable(other.to_string()),
    })?;
    let rgb = img.into_rgb8();
    let (width, height) = rgb.dimensions();
    Ok(RgbImage {
        width,
        height,
        data: rgb.into_raw(),
    })
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
}
