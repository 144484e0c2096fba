//! QR renderings of a pairing URI: PNG, SVG and a terminal rendering that reads on dark and
//! light terminals alike (it paints its own black-on-white).

use qrcode::{EcLevel, QrCode, Version};

/// Pixels per module in the PNG.
const PNG_SCALE: usize = 8;
/// Quiet zone around the code, in modules (the standard asks for 4).
const QUIET: usize = 4;

/// Why a QR code could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("the pairing URI is too long for a QR code: {0}")]
    TooLong(String),
    #[error("PNG encoding failed: {0}")]
    Png(String),
}

/// The QR code of `data`, byte mode, error correction M, the smallest version that fits.
pub fn encode(data: &str) -> Result<QrCode, QrError> {
    QrCode::with_error_correction_level(data.as_bytes(), EcLevel::M)
        .map_err(|e| QrError::TooLong(e.to_string()))
}

/// The version number of a code (1–40).
pub fn version(code: &QrCode) -> i16 {
    match code.version() {
        Version::Normal(v) | Version::Micro(v) => v,
    }
}

/// Dark modules as booleans, row by row, with the quiet zone.
fn modules(code: &QrCode) -> (usize, Vec<bool>) {
    let w = code.width();
    let size = w + 2 * QUIET;
    let colors = code.to_colors();
    let mut m = vec![false; size * size];
    for y in 0..w {
        for x in 0..w {
            m[(y + QUIET) * size + x + QUIET] = colors[y * w + x] == qrcode::Color::Dark;
        }
    }
    (size, m)
}

/// A greyscale PNG.
pub fn png(code: &QrCode) -> Result<Vec<u8>, QrError> {
    let (size, m) = modules(code);
    let px = size * PNG_SCALE;
    let mut pixels = vec![255u8; px * px];
    for y in 0..px {
        for x in 0..px {
            if m[(y / PNG_SCALE) * size + x / PNG_SCALE] {
                pixels[y * px + x] = 0;
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, px as u32, px as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut w = enc
            .write_header()
            .map_err(|e| QrError::Png(e.to_string()))?;
        w.write_image_data(&pixels)
            .map_err(|e| QrError::Png(e.to_string()))?;
    }
    Ok(out)
}

/// An SVG document.
pub fn svg(code: &QrCode) -> String {
    code.render::<qrcode::render::svg::Color<'_>>()
        .quiet_zone(true)
        .min_dimensions(256, 256)
        .build()
}

/// Two module rows per text row with half blocks, in explicit black on white, so the code
/// scans whatever the terminal's own colours are.
pub fn terminal(code: &QrCode) -> String {
    let (size, m) = modules(code);
    let dark = |x: usize, y: usize| y < size && m[y * size + x];
    let mut out = String::new();
    for y in (0..size).step_by(2) {
        out.push_str("\x1b[30;107m");
        for x in 0..size {
            out.push(match (dark(x, y), dark(x, y + 1)) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push_str("\x1b[0m\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_decodes_back_to_the_data() {
        let data = "soul://pair?v=1&stack=home&sidecar=notes&device=a&token=x.y.z";
        let code = encode(data).unwrap();
        let bytes = png(&code).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let (w, h) = (info.width as usize, info.height as usize);
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| buf[y * w + x]);
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1);
        let (_, content) = grids[0].decode().unwrap();
        assert_eq!(content, data);
        assert!(svg(&code).starts_with("<?xml"));
        assert!(terminal(&code).contains('█'));
    }
}
