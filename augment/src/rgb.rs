//! The in-memory image every stage works on: 8-bit RGB, row-major, interleaved.

/// An 8-bit RGB image: `width * height * 3` bytes, row-major, RGB interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB bytes, `width * height * 3` of them.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A `width` x `height` image filled with `fill`.
    pub fn filled(width: u32, height: u32, fill: [u8; 3]) -> RgbImage {
        let n = width as usize * height as usize;
        let mut data = Vec::with_capacity(n * 3);
        for _ in 0..n {
            data.extend_from_slice(&fill);
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// Wraps `data`; `None` when its length is not `width * height * 3`.
    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Option<RgbImage> {
        (data.len() == width as usize * height as usize * 3).then_some(RgbImage {
            width,
            height,
            data,
        })
    }

    /// The pixel at (`x`, `y`); panics when out of bounds (callers index within the image).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

impl RgbImage {
    /// The image encoded as PNG.
    pub fn encode_png(&self) -> std::io::Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::write_buffer_with_format(
            &mut out,
            &self.data,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(std::io::Error::other)?;
        Ok(out.into_inner())
    }

    /// Writes the image as a PNG file.
    pub fn write_png(&self, path: &std::path::Path) -> std::io::Result<()> {
        image::save_buffer(
            path,
            &self.data,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| match e {
            image::ImageError::IoError(io) => io,
            other => std::io::Error::other(other),
        })
    }
}
