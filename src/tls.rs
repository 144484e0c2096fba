//! The gate's TLS identity, one per stack and sidecar: a P-256 key derived one way from the stack
//! key, and a self-signed certificate for it. Both are a pure function of the stack key and the
//! sidecar's name (the key by HMAC, the certificate signed with RFC 6979's deterministic ECDSA),
//! so `soul apply` computes the same files on every pass, the gate's pin survives restarts, and
//! both change exactly when the stack key does (`secret-generation`, `soul rotate`).
//!
//! Clients do not trust the certificate through a CA: they pin its public key. The pin is
//! `sha256//<base64 of SHA-256 over the SubjectPublicKeyInfo>`, the form `curl --pinnedpubkey`
//! takes, and travels in the pairing payload.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::{DerSignature, SigningKey, signature::Signer as _};
use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use sha2::{Digest, Sha256};

use crate::state::StackKey;

/// Domain separation for the key derivation: no other key soul derives uses these bytes.
const KEY_LABEL: &[u8] = b"soul gate tls key v1";

/// A gate's key and certificate, as the PEM files the gate reads.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// `-----BEGIN CERTIFICATE-----`.
    pub cert_pem: String,
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8).
    pub key_pem: String,
    /// What clients pin: `sha256//<base64>`.
    pub pin: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("pin", &self.pin)
            .field("key_pem", &crate::secret::Secret::default())
            .finish_non_exhaustive()
    }
}

/// The TLS identity of `sidecar`'s gate in `stack`.
pub fn identity(key: &StackKey, stack: &str, sidecar: &str) -> Identity {
    let signing = signing_key(|label, counter| {
        key.derive(label, &[sidecar.as_bytes(), &counter.to_be_bytes()])
    });
    identity_of(&signing, &format!("soul gate {sidecar}.{stack}"))
}

/// The TLS identity of a `soul relay` whose key file holds `seed`: what the agents of the
/// stacks it carries pin (stack.kdl's `relay … pin=`).
pub fn relay_identity(seed: &[u8; 32]) -> Identity {
    use hmac::Mac as _;
    let signing = signing_key(|label, counter| {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(seed).expect("HMAC takes any key");
        mac.update(RELAY_KEY_LABEL);
        mac.update(&[0]);
        mac.update(label);
        mac.update(&counter.to_be_bytes());
        mac.finalize().into_bytes().into()
    });
    identity_of(&signing, "soul relay")
}

/// Domain separation for a relay's key, derived from its own random seed.
const RELAY_KEY_LABEL: &[u8] = b"soul relay tls key v1";

fn identity_of(signing: &SigningKey, common_name: &str) -> Identity {
    let spki = signing
        .verifying_key()
        .to_public_key_der()
        .expect("a P-256 public key always encodes");
    let cert = certificate(signing, common_name);
    let key_der = signing
        .to_pkcs8_der()
        .expect("a P-256 private key always encodes");
    Identity {
        cert_pem: pem("CERTIFICATE", &cert),
        key_pem: pem("PRIVATE KEY", key_der.as_bytes()),
        pin: pin_of_spki(spki.as_bytes()),
    }
}

/// `sha256//<base64>` of a DER SubjectPublicKeyInfo.
pub fn pin_of_spki(spki_der: &[u8]) -> String {
    format!("sha256//{}", B64.encode(Sha256::digest(spki_der)))
}

/// A scalar from `derive(label, counter)`: the first of the counters whose output is a valid
/// P-256 scalar (all but about one in 2³² are).
fn signing_key(derive: impl Fn(&[u8], u32) -> [u8; 32]) -> SigningKey {
    (0u32..)
        .find_map(|counter| SigningKey::from_slice(&derive(KEY_LABEL, counter)).ok())
        .expect("some counter gives a valid scalar")
}

/// The signer rcgen asks for: the p256 key, whose ECDSA signatures are deterministic.
struct Signer<'a> {
    key: &'a SigningKey,
    point: Vec<u8>,
}

impl rcgen::PublicKeyData for Signer<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for Signer<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let signature: DerSignature = self.key.sign(msg);
        Ok(signature.as_bytes().to_vec())
    }
}

/// A self-signed certificate valid from 1975 to 4096 (rcgen's defaults: the pin, not the
/// dates, is what a client checks), named `common_name`.
fn certificate(key: &SigningKey, common_name: &str) -> Vec<u8> {
    let signer = Signer {
        key,
        point: key
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
    };
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    // Serial and key identifier from the public key: the same key, the same certificate.
    let id = Sha256::digest(&signer.point);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&id[..16]));
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(id[..20].to_vec());
    params
        .self_signed(&signer)
        .expect("a certificate of a name and a P-256 key always serializes")
        .der()
        .to_vec()
}

/// PEM armour (RFC 7468: base64 in lines of 64), with `\n` line ends as soul has always
/// written these files.
fn pem(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files are written as they always were: a changed byte would rewrite every state
    /// dir's certificate files on upgrade.
    #[test]
    fn pem_files_keep_their_lines_of_64_and_their_newlines() {
        let der = (0u8..100).collect::<Vec<u8>>();
        let text = pem("CERTIFICATE", &der);
        let b64 = B64.encode(&der);
        let lines: String = b64
            .as_bytes()
            .chunks(64)
            .map(|l| format!("{}\n", std::str::from_utf8(l).unwrap()))
            .collect();
        assert_eq!(
            text,
            format!("-----BEGIN CERTIFICATE-----\n{lines}-----END CERTIFICATE-----\n")
        );
        assert_eq!(text.lines().count(), 5);
    }

    #[test]
    fn the_identity_is_a_function_of_the_stack_key_and_the_sidecar() {
        let key = StackKey::from_seed(1, [7; 32]);
        let a = identity(&key, "home", "notes");
        assert_eq!(
            a,
            identity(&key, "home", "notes"),
            "the same inputs, the same bytes"
        );
        let other_sidecar = identity(&key, "home", "photos");
        assert_ne!(a.pin, other_sidecar.pin);
        let rotated = identity(&StackKey::from_seed(2, [8; 32]), "home", "notes");
        assert_ne!(a.pin, rotated.pin);
        assert!(
            a.pin.starts_with("sha256//") && a.pin.len() == 8 + 44,
            "{}",
            a.pin
        );
        assert!(a.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(!format!("{a:?}").contains("PRIVATE"), "Debug shows no key");
    }

    #[test]
    fn a_relays_identity_is_a_function_of_its_seed_alone() {
        let a = relay_identity(&[1; 32]);
        assert_eq!(a, relay_identity(&[1; 32]));
        assert_ne!(a.pin, relay_identity(&[2; 32]).pin);
        assert_ne!(
            a.pin,
            identity(&StackKey::from_seed(1, [1; 32]), "home", "notes").pin
        );
    }

    #[test]
    fn rustls_serves_the_identity_and_the_pin_is_the_certificates_spki() {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let id = identity(&StackKey::from_seed(1, [9; 32]), "home", "notes");
        let cert = CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("rustls takes the key and certificate");
        // The SPKI as a certificate parser finds it, hashed, is the pin.
        let spki = spki_of(cert.as_ref());
        assert_eq!(pin_of_spki(spki), id.pin);
    }

    /// The SubjectPublicKeyInfo of a DER certificate, found by walking its first fields.
    fn spki_of(cert: &[u8]) -> &[u8] {
        // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version, serial, signature
        // algorithm, issuer, validity, subject, subjectPublicKeyInfo, … } … }
        fn header(d: &[u8]) -> (usize, usize) {
            match d[1] {
                n if n < 0x80 => (2, n as usize),
                0x81 => (3, d[2] as usize),
                0x82 => (4, (d[2] as usize) << 8 | d[3] as usize),
                _ => panic!("unexpected length"),
            }
        }
        let (h, _) = header(cert);
        let tbs = &cert[h..];
        let (h, _) = header(tbs);
        let mut at = &tbs[h..];
        for _ in 0..6 {
            let (h, len) = header(at);
            at = &at[h + len..];
        }
        let (h, len) = header(at);
        &at[..h + len]
    }
}
