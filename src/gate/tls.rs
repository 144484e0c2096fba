//! TLS at the gate: the sidecar's certificate and key as soul wrote them into the gate's
//! directory (see [`crate::tls`]), made into a rustls server config (ring as the provider;
//! HTTP/2 and HTTP/1.1 by ALPN), and the answer to plain HTTP when the stack is TLS-only.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// The gate's TLS identity, ready to serve; compared by its files, so a rewrite with the same
/// bytes is no change.
#[derive(Clone)]
pub struct GateTls {
    files: (Vec<u8>, crate::secret::Secret),
    pub config: Arc<ServerConfig>,
}

impl GateTls {
    /// A server config from PEM files: one certificate, one PKCS#8 private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> std::io::Result<GateTls> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
        };
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| invalid("the gate's certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid("the gate's TLS key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS versions", &e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| invalid("the gate's certificate and key", &e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
