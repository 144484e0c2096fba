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

/// Why a picture gave no QR code's text.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a PNG: {0}")]
    NotPng(String),
    #[error(
        "a {width}×{height} image is larger than a QR code ever needs ({} megapixels at most): crop it",
        MAX_CODE_PIXELS >> 20
    )]
    TooLarge { width: u32, height: u32 },
    #[error("no QR code found in the image")]
    NoCode,
    #[error("the QR code does not decode: {0}")]
    Undecodable(String),
}

/// The most pixels a PNG of a code may have, checked before it is decoded: a QR code never
/// needs more than a few megapixels, and a 30000×30000 image would take gigabytes.
pub const MAX_CODE_PIXELS: u64 = 16 << 20;

/// The text of the (first) QR code in a PNG: a code soul wrote, or a photo of one.
pub fn decode_png(png: &[u8]) -> Result<String, DecodeError> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| DecodeError::NotPng(e.to_string()))?;
    let (width, height) = (reader.info().width, reader.info().height);
    if u64::from(width) * u64::from(height) > MAX_CODE_PIXELS {
        return Err(DecodeError::TooLarge { width, height });
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DecodeError::NotPng("its size overflows".into()))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| DecodeError::NotPng(e.to_string()))?;
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let luma = |x: usize, y: usize| buf[(y * w + x) * channels];
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(w, h, luma);
    let grid = image
        .detect_grids()
        .into_iter()
        .next()
        .ok_or(DecodeError::NoCode)?;
    let (_, text) = grid
        .decode()
        .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    Ok(text)
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
        assert_eq!(decode_png(&bytes).unwrap(), data);
        assert!(svg(&code).starts_with("<?xml"));
        assert!(terminal(&code).contains('█'));
    }

    /// The terminal rendering read back: each character is two modules, one above the other.
    fn modules_of_terminal(text: &str) -> (usize, Vec<bool>) {
        let rows: Vec<Vec<char>> = text
            .lines()
            .map(|l| {
                l.trim_start_matches("\x1b[30;107m")
                    .trim_end_matches("\x1b[0m")
                    .chars()
                    .collect()
            })
            .collect();
        let width = rows[0].len();
        let mut m = vec![false; width * width];
        for (r, row) in rows.iter().enumerate() {
            for (x, c) in row.iter().enumerate() {
                let (top, bottom) = match c {
                    '█' => (true, true),
                    '▀' => (true, false),
                    '▄' => (false, true),
                    _ => (false, false),
                };
                m[2 * r * width + x] = top;
                if 2 * r + 1 < width {
                    m[(2 * r + 1) * width + x] = bottom;
                }
            }
        }
        (width, m)
    }

    fn decode_modules(width: usize, m: &[bool]) -> String {
        // Four pixels a module, as a camera would see it.
        let px = width * 4;
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(px, px, |x, y| {
            if m[(y / 4) * width + x / 4] { 0 } else { 255 }
        });
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1);
        grids[0].decode().unwrap().1
    }

    /// The link of a stack with a LAN address, one overlay, a relay and the pin (issue: the
    /// terminal code was 81 columns wide and wrapped in an 80-column terminal).
    fn link(with_tor: bool) -> String {
        use crate::pairing::{Address, CodeFields, PairingLink};
        use crate::stack::TransportKind;
        let mut addresses = vec![
            Address::new(TransportKind::Lan, "192.168.178.120", 8443),
            Address::new(TransportKind::Tailscale, "100.101.102.103", 443),
            Address::new(TransportKind::Relay, "relay.example.com", 7000),
        ];
        if with_tor {
            addresses.push(Address {
                transport: TransportKind::Tor,
                host: format!("{}.onion", "a".repeat(56)),
                port: 80,
            });
        }
        PairingLink {
            fields: CodeFields {
                stack: "homelab",
                sidecar: "photos",
                device: "alice-phone",
                addresses: &addresses,
                pin: "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=",
            },
            ticket: "alice-phone.1.Yc3uQ0b0m9QeS6nU6C4KXg",
            public: None,
            browser: None,
        }
        .to_string()
    }

    #[test]
    fn the_terminal_code_fits_80_columns_and_decodes() {
        let data = link(false);
        let text = terminal(&encode(&data).unwrap());
        let (width, m) = modules_of_terminal(&text);
        println!("link of {} bytes: {width} terminal columns", data.len());
        assert!(width <= 80, "{width} columns for {} bytes", data.len());
        assert!(
            text.lines().all(|l| l.contains("\x1b[0m")),
            "every line ends the colours"
        );
        assert_eq!(decode_modules(width, &m), data);
    }

    #[test]
    fn with_a_tor_address_too_the_code_is_at_most_version_20_at_level_m() {
        let data = link(true);
        let code = encode(&data).unwrap();
        assert_eq!(code.error_correction_level(), EcLevel::M);
        println!("with tor, {} bytes: version {}", data.len(), version(&code));
        assert!(
            version(&code) <= 20,
            "version {} for {} bytes",
            version(&code),
            data.len()
        );
    }
}
