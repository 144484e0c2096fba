//! The server name a TLS client asks for, read from its ClientHello without terminating TLS
//! (RFC 8446 §4.1.2, the `server_name` extension of RFC 6066 §3). The relay routes a connection
//! by it and then only splices bytes: it never holds a key that could read the traffic.

/// The most the relay reads before it must have seen the whole ClientHello.
pub const MAX_HELLO: usize = 16 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this host (lower-cased).
    Named(String),
    /// A complete ClientHello without a server name.
    Unnamed,
    /// Not yet enough bytes to tell: read more (up to [`MAX_HELLO`]).
    Incomplete,
    /// Not a TLS ClientHello.
    NotTls,
}

/// Reads the server name from the first bytes of a connection: one or more TLS handshake
/// records carrying a ClientHello.
pub fn server_name(bytes: &[u8]) -> Hello {
    // The handshake message may span records: join their payloads first.
    let mut handshake = Vec::new();
    let mut rest = bytes;
    while let Some(header) = rest.get(..5) {
        if header[0] != 0x16 || header[1] != 0x03 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_HELLO {
            return Hello::NotTls;
        }
        let Some(payload) = rest.get(5..5 + len) else {
            handshake.extend_from_slice(&rest[5..]);
            break;
        };
        handshake.extend_from_slice(payload);
        rest = &rest[5 + len..];
        if let Some(done) = client_hello(&handshake) {
            return done;
        }
    }
    match client_hello(&handshake) {
        Some(done) => done,
        None if bytes.len() >= MAX_HELLO => Hello::NotTls,
        None => Hello::Incomplete,
    }
}

/// The ClientHello in a handshake message; `None` while it is incomplete.
fn client_hello(msg: &[u8]) -> Option<Hello> {
    let mut r = Reader(msg);
    if r.u8()? != 1 {
        return Some(Hello::NotTls);
    }
    let len = r.u24()?;
    let Some(body) = r.take(len) else {
        return (len > MAX_HELLO).then_some(Hello::NotTls);
    };
    Some(parse_body(body).unwrap_or(Hello::NotTls))
}

/// A whole ClientHello body; `None` when it is malformed.
fn parse_body(body: &[u8]) -> Option<Hello> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let session = usize::from(r.u8()?);
    r.take(session)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    r.take(compression)?;
    if r.0.is_empty() {
        return Some(Hello::Unnamed);
    }
    let extensions = usize::from(r.u16()?);
    let mut ext = Reader(r.take(extensions)?);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let len = usize::from(ext.u16()?);
        let data = ext.take(len)?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); type 0 is host_name.
        let mut list = Reader(data);
        let list_len = usize::from(list.u16()?);
        let mut names = Reader(list.take(list_len)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name_len = usize::from(names.u16()?);
            let name = names.take(name_len)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                return valid.then(|| Hello::Named(name.to_ascii_lowercase()));
            }
        }
        return Some(Hello::Unnamed);
    }
    Some(Hello::Unnamed)
}

/// A cursor over bytes that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// The first flight of a real TLS client (rustls) asking for `name`.
    fn client_hello_of(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn the_name_a_real_client_asks_for_is_read_and_nothing_before_it_is_whole() {
        let hello = client_hello_of("notes.Home.relay.example");
        assert_eq!(
            server_name(&hello),
            Hello::Named("notes.home.relay.example".into())
        );
        for cut in [0, 1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(
                server_name(&hello[..cut]),
                Hello::Incomplete,
                "cut at {cut}"
            );
        }
        // An IP address is sent without a server name.
        assert_eq!(server_name(&client_hello_of("192.0.2.7")), Hello::Unnamed);
    }

    #[test]
    fn a_hello_split_across_records_is_joined() {
        let hello = client_hello_of("wiki.home.relay.example");
        let payload = &hello[5..];
        let (a, b) = payload.split_at(30);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            server_name(&split),
            Hello::Named("wiki.home.relay.example".into())
        );
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        assert_eq!(server_name(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        // A handshake record whose message is not a ClientHello.
        assert_eq!(
            server_name(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),
            Hello::NotTls
        );
    }

    proptest! {
        /// Whatever a stranger sends, the parser answers and never panics.
        #[test]
        fn any_bytes_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = server_name(&bytes);
            let mut tls = vec![0x16, 0x03, 0x01];
            tls.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            tls.extend_from_slice(&bytes);
            let _ = server_name(&tls);
        }
    }
}
