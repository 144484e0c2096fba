//! The lane's reading of the app's answer: its head checked and cleaned for the client
//! (hop-by-hop headers dropped, the framing kept), and where its body ends (RFC 9112 §6.3), a
//! chunked one followed to its last chunk without being decoded.

use super::*;

/// How a response's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// What the lane makes of the bytes the app has sent so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Response {
    Partial,
    /// Not a response the lane can pass on safely (malformed, an upgrade it never asked for,
    /// conflicting lengths): the client gets 502.
    Bad,
    /// A head of `head` bytes, cleaned for the client into `out`.
    Ready {
        head: usize,
        framing: Framing,
        /// A 1xx: another head follows.
        interim: bool,
        /// The app's connection can carry the next request.
        reusable: bool,
    },
}

/// Reads a response head from `buf` (to a request that was `HEAD` when `no_body`), and writes
/// it for the client to `out`: hop-by-hop headers dropped but the framing kept, and
/// `Connection: close` added when the body ends with the app's connection.
pub(super) fn response(buf: &[u8], no_body: bool, out: &mut Vec<u8>) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Response::Partial,
        _ => return Response::Bad,
    };
    let (Some(version), Some(code)) = (resp.version, resp.code) else {
        return Response::Bad;
    };
    if code == 101 {
        return Response::Bad;
    }
    let interim = (100..200).contains(&code);
    let mut named: Vec<&[u8]> = Vec::new();
    let mut close = version == 0;
    let (mut length, mut chunked, mut encoded) = (None, false, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for option in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if option.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if option.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                    close = false;
                } else {
                    named.push(option);
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // The last coding decides (RFC 9112 §6.3): chunked, or the body runs to the close.
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = decimal(h.value) else {
                return Response::Bad;
            };
            if length.replace(n).is_some_and(|m| m != n) {
                return Response::Bad;
            }
        }
    }
    let framing = if no_body || interim || code == 204 || code == 304 {
        Framing::Empty
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    // The status line as the app sent it from its code on, as HTTP/1.1 (the client's version).
    out.extend_from_slice(b"HTTP/1.1");
    let line_end = buf.iter().position(|b| *b == b'\n').unwrap_or(0);
    let status = &buf[..line_end];
    let status = status.strip_suffix(b"\r").unwrap_or(status);
    out.extend_from_slice(&status[8.min(status.len())..]);
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name;
        // Hop-by-hop, but `Transfer-Encoding`: the body is passed on in the coding the app
        // chose.
        let hop = super::super::policy::HOP_BY_HOP
            .iter()
            .filter(|n| **n != "transfer-encoding" && **n != "proxy-authorization")
            .any(|n| name.eq_ignore_ascii_case(n))
            || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            // A length the chunked coding overrides (RFC 9112 §6.3) is not passed on.
            || (encoded && name.eq_ignore_ascii_case("content-length"));
        if !hop {
            header(out, name.as_bytes(), h.value);
        }
    }
    if framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Response::Ready {
        head,
        framing,
        interim,
        reusable: !close && framing != Framing::UntilClose,
    }
}

/// Where a chunked body stands (RFC 9112 §7.1), read only to find its end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    #[default]
    Size,
    Extension,
    SizeEnd,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Default)]
pub(super) struct Chunked {
    at: Chunk,
    size: u64,
    digits: u8,
}

impl Chunked {
    /// How many bytes of `bytes` belong to the body, up to its end; `None` when they are not
    /// chunked coding.
    pub(super) fn advance(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() && self.at != Chunk::Done {
            let b = bytes[i];
            match self.at {
                Chunk::Size => match (b as char).to_digit(16) {
                    Some(d) if self.digits < 15 => {
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    None if self.digits > 0 && matches!(b, b';' | b' ' | b'\t') => {
                        self.at = Chunk::Extension;
                    }
                    None if self.digits > 0 && b == b'\r' => self.at = Chunk::SizeEnd,
                    _ => return None,
                },
                Chunk::Extension => {
                    if b == b'\r' {
                        self.at = Chunk::SizeEnd;
                    } else if b == b'\n' {
                        return None;
                    }
                }
                Chunk::SizeEnd => {
                    if b != b'\n' {
                        return None;
                    }
                    self.at = if self.size == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    };
                }
                Chunk::Data => {
                    let n = (self.size as usize).min(bytes.len() - i);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.at = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr => {
                    if b != b'\r' {
                        return None;
                    }
                    self.at = Chunk::DataLf;
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return None;
                    }
                    (self.at, self.digits) = (Chunk::Size, 0);
                }
                Chunk::TrailerStart => {
                    self.at = if b == b'\r' {
                        Chunk::EndLf
                    } else {
                        Chunk::Trailer
                    };
                }
                Chunk::Trailer => {
                    if b == b'\r' {
                        self.at = Chunk::TrailerLf;
                    }
                }
                Chunk::TrailerLf | Chunk::EndLf => {
                    if b != b'\n' {
                        return None;
                    }
                    self.at = if self.at == Chunk::EndLf {
                        Chunk::Done
                    } else {
                        Chunk::TrailerStart
                    };
                }
                Chunk::Done => break,
            }
            i += 1;
        }
        Some(i)
    }

    pub(super) fn done(&self) -> bool {
        self.at == Chunk::Done
    }
}
