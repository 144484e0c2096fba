//! TLS to a gate, trusted by its pin and nothing else: the certificate's SubjectPublicKeyInfo
//! must hash (SHA-256) to the pairing's `pin`, and the handshake must be signed by that key.
//! No CA, no name, no dates: the pin came from the owner's own QR code. A gate that presents
//! any other key fails the handshake, before a byte of HTTP (let alone the token) is sent.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Checks a gate's certificate against one pin (`sha256//<base64>`).
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
}

/// A client configuration that trusts only the key `pin` names.
pub fn client_config(pin: &str) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedVerifier {
        pin: pin.to_string(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // The gate speaks HTTP/1.1 (and h2); the forwarder uses HTTP/1.1.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The pin of a DER certificate: `sha256//<base64 of SHA-256 over its SPKI>`.
pub fn pin_of_certificate(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(crate::tls::pin_of_spki(&parsed.subject_public_key_info()))
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match pin_of_certificate(end_entity) {
            Some(pin) if constant_time_eq(pin.as_bytes(), self.pin.as_bytes()) => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Pins are public, but compare them without an early exit anyway.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The provider this module's configurations use (for tests and servers in tests).
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StackKey;

    #[test]
    fn the_pin_of_soul_s_own_certificate_is_the_one_in_the_pairing_code() {
        let identity = crate::tls::identity(&StackKey::from_seed(1, [7; 32]), "home", "notes");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(identity.cert_pem.as_bytes())
            .map(|c: CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(pin_of_certificate(&der), Some(identity.pin));
        assert_eq!(
            pin_of_certificate(&CertificateDer::from(vec![1, 2, 3])),
            None
        );
    }
}
