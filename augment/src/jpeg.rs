//! JPEG decoding with libjpeg-turbo (the library PIL links), whole or only a region.
//!
//! The decoder is libjpeg-turbo's C code as built by `mozjpeg-sys` (see the module comment of
//! [`crate::decode`] for why it has to be this library). It is driven here through its C API
//! because the region decode needs two calls no safe wrapper exposes:
//! `jpeg_crop_scanline` (only the iMCU columns that cover the region are inverse-transformed,
//! upsampled and colour-converted) and `jpeg_skip_scanlines` (rows above the region are
//! entropy-decoded and dropped; rows below it are never read). A training loader that
//! replays a RandomResizedCrop needs only the crop, on average about half of the image.
//!
//! The region is widened by one iMCU column on the left and on the right before it is
//! handed to libjpeg: the fancy upsampler treats the first and last column of a cropped
//! output as an image edge, so the columns next to a crop boundary differ from a
//! whole-image decode (by up to a few levels where chroma is subsampled). With the margin,
//! every pixel inside the requested region is the pixel the whole-image decode gives, and
//! the margin's own outer columns are the only ones that may differ (tests/decode_parity.rs
//! checks this on every JPEG variant it has; it fails without the margin).
//!
//! libjpeg reports fatal errors through `error_exit`, which must not return; here it unwinds
//! (mozjpeg-sys compiles the C code with `-fexceptions` for that), and the caller turns the
//! unwind into an error. Every libjpeg object is owned by a guard that destroys it during
//! that unwind, so a corrupt image leaks nothing.

use std::os::raw::{c_int, c_long};

use mozjpeg_sys as ffi;

use crate::decode::DecodeError;

/// How libjpeg is asked to deliver the pixels, following PIL's choice of mode by the number
/// of components (1: `L`, 3: `RGB`, 4: `CMYK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JpegOut {
    Grey,
    Rgb,
    Cmyk,
}

impl JpegOut {
    fn channels(self) -> usize {
        match self {
            JpegOut::Grey => 1,
            JpegOut::Rgb => 3,
            JpegOut::Cmyk => 4,
        }
    }
}

/// A rectangle of an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// Decoded samples of a region (or all) of a JPEG, `channels()` bytes per pixel.
pub(crate) struct JpegPixels {
    /// What the samples are.
    pub out: JpegOut,
    /// Size of the whole image.
    pub image_width: u32,
    /// Size of the whole image.
    pub image_height: u32,
    /// The part of the image `data` holds: contains the requested region.
    pub rect: Rect,
    /// Row-major samples of `rect`.
    pub data: Vec<u8>,
}

/// Decodes the pixels of the region `region` picks from the image size (clipped to the
/// image; the whole image when it picks `None`), after `check_size` accepted the size the
/// header declares.
///
/// A JPEG whose data ends before the last row this decode needs is an error, as in PIL
/// ("image file is truncated"): PIL feeds libjpeg through a suspending source, so a request
/// past the end leaves it waiting for data that never comes; libjpeg itself would pretend an
/// EOI followed and pad with grey. A whole-image decode accepts a file that ends after its
/// last scanline without an EOI marker, as PIL does. A region decode never reads past the
/// region's last row, so it can accept a file truncated below the region that a whole-image
/// decode refuses.
pub(crate) fn decode(
    bytes: &[u8],
    check_size: impl FnOnce(u32, u32) -> Result<(), DecodeError>,
    region: impl FnOnce(u32, u32) -> Option<Rect>,
) -> Result<JpegPixels, DecodeError> {
    let mut d = Decompress::new(bytes);
    // SAFETY (for every block below): `d.cinfo` was initialised by `jpeg_create_decompress`
    // with an error manager and a source that live in `d` as long as it does, and libjpeg's
    // state machine itself refuses calls made in the wrong state (with an error, which
    // unwinds).
    unsafe { ffi::jpeg_read_header(&mut d.cinfo, 1) };
    let width = d.cinfo.image_width;
    let height = d.cinfo.image_height;
    check_size(width, height)?;
    let out = match d.cinfo.num_components {
        1 => JpegOut::Grey,
        3 => JpegOut::Rgb,
        4 => JpegOut::Cmyk,
        n => {
            return Err(DecodeError::Undecodable(format!(
                "jpeg with {n} components (PIL reads 1, 3 or 4)"
            )))
        }
    };
    // Fancy upsampling and the accurate integer IDCT are libjpeg's defaults, and PIL keeps
    // them unless draft() is called; they are not set here so that the defaults stay the
    // single source of truth. YCCK is converted to CMYK by libjpeg, as in PIL.
    d.cinfo.out_color_space = match out {
        JpegOut::Grey => ffi::J_COLOR_SPACE::JCS_GRAYSCALE,
        JpegOut::Rgb => ffi::J_COLOR_SPACE::JCS_RGB,
        JpegOut::Cmyk => ffi::J_COLOR_SPACE::JCS_CMYK,
    };
    unsafe { ffi::jpeg_start_decompress(&mut d.cinfo) };
    if (d.cinfo.output_width, d.cinfo.output_height) != (width, height)
        || d.cinfo.output_components as usize != out.channels()
    {
        return Err(DecodeError::Undecodable(
            "jpeg output size differs from its header".into(),
        ));
    }
    let whole = Rect {
        top: 0,
        left: 0,
        height,
        width,
    };
    let wanted = match region(width, height) {
        Some(r) => clip(r, width, height),
        None => whole,
    };
    let rect = if wanted == whole {
        whole
    } else {
        widen(&d.cinfo, wanted, width)
    };
    if rect.width == 0 || rect.height == 0 {
        return Ok(JpegPixels {
            out,
            image_width: width,
            image_height: height,
            rect,
            data: Vec::new(),
        });
    }
    let mut left = rect.left;
    let mut cols = rect.width;
    if cols != width {
        unsafe { ffi::jpeg_crop_scanline(&mut d.cinfo, &mut left, &mut cols) };
        // libjpeg moves the left edge down to an iMCU boundary; `widen` already put it on one.
        if (left, cols) != (rect.left, rect.width) {
            return Err(DecodeError::Undecodable(format!(
                "jpeg: libjpeg cropped columns {left}+{cols}, expected {}+{}",
                rect.left, rect.width
            )));
        }
    }
    if rect.top > 0 {
        let skipped = unsafe { ffi::jpeg_skip_scanlines(&mut d.cinfo, rect.top) };
        if skipped != rect.top {
            return Err(DecodeError::Undecodable("jpeg: could not skip rows".into()));
        }
    }
    let row_bytes = cols as usize * out.channels();
    let mut data = vec![0u8; row_bytes * rect.height as usize];
    let mut rows_done = 0usize;
    let rows = rect.height as usize;
    while rows_done < rows {
        // One row per call: libjpeg returns at most one row group per call anyway, and an
        // array of row pointers would be as long as the image.
        let mut row_ptr = data[rows_done * row_bytes..].as_mut_ptr();
        let got = unsafe { ffi::jpeg_read_scanlines(&mut d.cinfo, &mut row_ptr, 1) };
        if got == 0 {
            return Err(DecodeError::Undecodable(
                "jpeg: decoder returned no rows".into(),
            ));
        }
        rows_done += got as usize;
    }
    if d.source.ran_out {
        return Err(DecodeError::Undecodable(
            "jpeg: image file is truncated".into(),
        ));
    }
    if rect.top + rect.height == height {
        // Like PIL, accept a file that ends after its last scanline without an EOI marker:
        // the fake EOI the source then hands out is harmless. A fatal libjpeg error here
        // still unwinds into an error, as PIL's error handler turns one into "broken data
        // stream".
        unsafe { ffi::jpeg_finish_decompress(&mut d.cinfo) };
    }
    Ok(JpegPixels {
        out,
        image_width: width,
        image_height: height,
        rect,
        data,
    })
}

/// `r` clipped to a `width` x `height` image.
fn clip(r: Rect, width: u32, height: u32) -> Rect {
    let left = r.left.min(width);
    let top = r.top.min(height);
    Rect {
        top,
        left,
        height: r.height.min(height - top),
        width: r.width.min(width - left),
    }
}

/// `wanted` grown by one iMCU column on the left and on the right (within the image), its
/// left edge on an iMCU boundary as `jpeg_crop_scanline` requires. Rows need no margin:
/// `jpeg_skip_scanlines` and stopping early keep the vertical upsampling context intact.
fn widen(cinfo: &ffi::jpeg_decompress_struct, wanted: Rect, width: u32) -> Rect {
    // libjpeg's alignment (jdapistd.c) is one iMCU column, 8 pixels per horizontal sample
    // of the most sampled component (unscaled output); a single-scan greyscale image needs
    // only 8, of which this is a multiple too.
    let across = 8 * cinfo.max_h_samp_factor.clamp(1, 4) as u32;
    let left = (wanted.left.saturating_sub(across) / across) * across;
    let right = (wanted.left + wanted.width)
        .saturating_add(across)
        .min(width);
    Rect {
        top: wanted.top,
        left,
        height: wanted.height,
        width: right - left,
    }
}

/// The input: the whole encoded image in memory, handed to libjpeg at once. `iface` comes
/// first so that libjpeg's `cinfo.src` pointer is also a pointer to this struct.
#[repr(C)]
struct Source {
    iface: ffi::jpeg_source_mgr,
    /// libjpeg asked for bytes after the end.
    ran_out: bool,
}

/// Two EOI markers: what a source hands out after the end of the data, as libjpeg's own
/// sources do (libjpeg then finishes with what it has).
static FAKE_EOI: [u8; 4] = [0xFF, 0xD9, 0xFF, 0xD9];

unsafe extern "C-unwind" fn init_source(_cinfo: &mut ffi::jpeg_decompress_struct) {}

unsafe extern "C-unwind" fn fill_input_buffer(
    cinfo: &mut ffi::jpeg_decompress_struct,
) -> ffi::boolean {
    // SAFETY: `cinfo.src` points at the `iface` field of a live `Source` (see `Decompress`).
    let source = unsafe { &mut *cinfo.src.cast::<Source>() };
    source.ran_out = true;
    source.iface.next_input_byte = FAKE_EOI.as_ptr();
    source.iface.bytes_in_buffer = FAKE_EOI.len();
    1
}

unsafe extern "C-unwind" fn skip_input_data(
    cinfo: &mut ffi::jpeg_decompress_struct,
    num_bytes: c_long,
) {
    let Ok(mut n) = usize::try_from(num_bytes) else {
        return;
    };
    // SAFETY: as in `fill_input_buffer`.
    let source = unsafe { &mut *cinfo.src.cast::<Source>() };
    while n > source.iface.bytes_in_buffer {
        n -= source.iface.bytes_in_buffer;
        // SAFETY: as above; refilling hands out the fake EOI.
        unsafe { fill_input_buffer(cinfo) };
    }
    let source = unsafe { &mut *cinfo.src.cast::<Source>() };
    // SAFETY: `n` is within the current buffer.
    source.iface.next_input_byte = unsafe { source.iface.next_input_byte.add(n) };
    source.iface.bytes_in_buffer -= n;
}

unsafe extern "C-unwind" fn term_source(_cinfo: &mut ffi::jpeg_decompress_struct) {}

/// Fatal libjpeg errors unwind with libjpeg's message (caught by the caller).
unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let buffer = [0u8; 80];
    // SAFETY: `cinfo.err` is the error manager `Decompress` installed; `format_message`
    // writes a NUL-terminated message of at most 80 bytes into the buffer (the binding
    // declares the buffer shared, but libjpeg writes it, hence the pointer cast).
    let message = unsafe {
        match (*cinfo.err).format_message {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8) =
                    std::mem::transmute(format);
                format(cinfo, buffer.as_ptr().cast_mut());
                let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
                String::from_utf8_lossy(&buffer[..end]).into_owned()
            }
            None => format!("libjpeg error {}", (*cinfo.err).msg_code),
        }
    };
    // resume_unwind does not run the panic hook: a corrupt image prints nothing.
    std::panic::resume_unwind(Box::new(format!("jpeg: {message}")));
}

/// Warnings (corrupt data libjpeg recovers from, as PIL does) are not errors.
unsafe extern "C-unwind" fn emit_message(_cinfo: &mut ffi::jpeg_common_struct, _level: c_int) {}

/// A libjpeg decompressor with its error manager and source, destroyed on drop (also while
/// unwinding from a libjpeg error). Boxed parts do not move while libjpeg points at them.
/// It borrows the encoded bytes the source points into.
struct Decompress<'a> {
    cinfo: Box<ffi::jpeg_decompress_struct>,
    _err: Box<ffi::jpeg_error_mgr>,
    source: Box<Source>,
    _bytes: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> Decompress<'a> {
    fn new(bytes: &'a [u8]) -> Decompress<'a> {
        // SAFETY: both structs are plain C data for which all-zero is the state libjpeg
        // expects before `jpeg_std_error` / `jpeg_create_decompress` fill them in.
        let mut err: Box<ffi::jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
        unsafe { ffi::jpeg_std_error(&mut err) };
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        let mut source = Box::new(Source {
            iface: ffi::jpeg_source_mgr {
                next_input_byte: bytes.as_ptr(),
                bytes_in_buffer: bytes.len(),
                init_source: Some(init_source),
                fill_input_buffer: Some(fill_input_buffer),
                skip_input_data: Some(skip_input_data),
                resync_to_restart: Some(ffi::jpeg_resync_to_restart),
                term_source: Some(term_source),
            },
            ran_out: false,
        });
        let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
        cinfo.common.err = &mut *err;
        // SAFETY: `cinfo` is zeroed with a valid error manager, as jpeg_CreateDecompress
        // requires; it allocates only small fixed structures.
        unsafe { ffi::jpeg_create_decompress(&mut *cinfo) };
        cinfo.src = &mut source.iface;
        Decompress {
            cinfo,
            _err: err,
            source,
            _bytes: std::marker::PhantomData,
        }
    }
}

impl Drop for Decompress<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `new`; destroying releases every pool, in any state.
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}
