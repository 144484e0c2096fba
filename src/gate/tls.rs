//! TLS at the gate: the sidecar's certificate and key as soul wrote them into the gate's
//! directory (see [`crate::tls`]), made into a rustls server config (ring as the provider;
//! HTTP/2 and HTTP/1.1 by ALPN), and the answer to plain HTTP when the stack is TLS-only.
//! With a public name, a ClientHello naming it gets the CA-issued certificate
//! ([`super::acme`]) and everything else the pinned one, so soul's clients pin unchanged.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::acme::{ACME_TLS_ALPN, PublicCert};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// The gate's TLS identity, ready to serve; compared by its files, so a rewrite with the same
/// bytes is no change.
#[derive(Clone)]
pub struct GateTls {
    files: (Vec<u8>, crate::secret::Secret),
    pub config: Arc<ServerConfig>,
}

/// Which certificate a ClientHello gets: the public one for the public name (the challenge's
/// for `acme-tls/1`), the pinned one for everything else.
#[derive(Debug)]
struct Resolver {
    pinned: Arc<CertifiedKey>,
    public: Option<Arc<PublicCert>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
        match self
            .public
            .as_ref()
            .and_then(|p| p.for_hello(hello.server_name(), acme))
        {
            Some(answer) => answer,
            // An `acme-tls/1` hello for another name is not answered.
            None if acme => None,
            None => Some(self.pinned.clone()),
        }
    }
}

impl GateTls {
    /// A server config from PEM files: one certificate, one PKCS#8 private key; and the public
    /// name's certificate when the gate has one.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        public: Option<Arc<PublicCert>>,
    ) -> std::io::Result<GateTls> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
        };
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| invalid("the gate's certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid("the gate's TLS key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = CertifiedKey::from_der(vec![cert], key, &provider)
            .map_err(|e| invalid("the gate's certificate and key", &e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS versions", &e))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver {
                pinned: Arc::new(pinned),
                public: public.clone(),
            }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if public.is_some() {
            // Chosen only when a client offers it alone: the CA's validation.
            config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        let key_text = String::from_utf8_lossy(key_pem).into_owned();
        Ok(GateTls {
            files: (cert_pem.to_vec(), crate::secret::Secret::new(key_text)),
            config: Arc::new(config),
        })
    }
}

impl PartialEq for GateTls {
    fn eq(&self, other: &GateTls) -> bool {
        self.files == other.files
    }
}

impl Eq for GateTls {}

impl std::fmt::Debug for GateTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GateTls { .. }")
    }
}

/// What a plain-HTTP client of a TLS-only gate reads before the connection closes.
const PLAIN_REFUSED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 62\r\nConnection: close\r\n\r\nthis gate speaks HTTPS only: open the same address with https\n";

/// The answer to Docker's health check, which probes the gate over plain HTTP from inside the
/// pod: the health endpoint says nothing but "ok", so it stays open on a TLS-only gate.
const HEALTHY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";

/// Answers a plain-HTTP connection to a TLS-only gate: the health check is answered, anything
/// else refused, reading no more than the request line.
pub async fn refuse_plain(mut stream: TcpStream, peer: SocketAddr, health_path: &str) {
    use tokio::io::AsyncReadExt as _;
    let probe = format!("GET {health_path} ");
    let mut head = vec![0u8; probe.len()];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        stream.read_exact(&mut head),
    )
    .await;
    let answer = if matches!(read, Ok(Ok(_))) && head == probe.as_bytes() {
        HEALTHY
    } else {
        tracing::info!(source = %peer, "refused plain HTTP: this gate is TLS-only");
        PLAIN_REFUSED
    };
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_answers_say_their_own_length() {
        for answer in [PLAIN_REFUSED, HEALTHY] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("Content-Length: {}", body.len())),
                "{text}"
            );
        }
    }
}
