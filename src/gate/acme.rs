//! A public name's certificate, obtained and renewed at the gate: ACME (RFC 8555, through
//! `instant-acme`) with the TLS-ALPN-01 challenge (RFC 8737). The CA connects to the name on
//! 443; the relay routes that ClientHello here like a device's, blind; the gate answers the
//! `acme-tls/1` handshake with the challenge certificate ([`PublicCert`], which the TLS
//! resolver in [`super::tls`] consults). The account key and the certificate's key are made
//! here and kept in the gate's ACME directory (the state dir's `acme/<sidecar>`, 0600), never
//! anywhere else. Renewal starts at two-thirds of the certificate's lifetime, failures back
//! off, and a new certificate is served from the next handshake on, without a restart; open
//! connections keep theirs. What happened is written to `status.json` there, which `soul
//! status` shows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::backoff::{Backoff, jitter};
use crate::pairing::unix_now;

/// The ALPN protocol of the TLS-ALPN-01 challenge (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// In the ACME directory: the account (its key and URL, for the directory it was made at).
pub const ACCOUNT_FILE: &str = "account.json";
/// In the ACME directory: the certificate chain, then its private key (one file, so a
/// certificate and its key are always replaced together).
pub const CERT_FILE: &str = "public.pem";
/// In the ACME directory: what `soul status` shows ([`AcmeStatus`]).
pub const STATUS_FILE: &str = "status.json";

/// How a gate gets its public name's certificate.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The public name (`notes-home.relay.example.com`).
    pub name: String,
    /// The ACME directory URL.
    pub directory: String,
    /// PEM roots to trust for the directory's HTTPS instead of the public ones (a test CA).
    pub ca_file: Option<PathBuf>,
    /// Where the account, the certificate and the status live (writable, 0700).
    pub dir: PathBuf,
    /// An e-mail address for the CA's notices.
    pub contact: Option<String>,
    /// The first wait after a failure (doubling to an hour).
    pub retry: Duration,
}

/// What the gate serves for its public name: the certificate, once there is one, and the
/// challenge certificate while a validation is under way.
pub struct PublicCert {
    pub name: String,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    challenge: RwLock<Option<Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for PublicCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicCert")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PublicCert {
    pub fn new(name: &str) -> Arc<PublicCert> {
        Arc::new(PublicCert {
            name: name.to_ascii_lowercase(),
            current: RwLock::default(),
            challenge: RwLock::default(),
        })
    }

    /// The certificate for a ClientHello naming `server_name` and offering `alpn`: `None` when
    /// the hello is not for the public name (the pinned certificate answers it); inside, the
    /// public certificate, or for `acme-tls/1` the challenge's (none when no validation runs,
    /// and the handshake fails).
    pub fn for_hello(
        &self,
        server_name: Option<&str>,
        acme: bool,
    ) -> Option<Option<Arc<CertifiedKey>>> {
        if !server_name.is_some_and(|n| n.eq_ignore_ascii_case(&self.name)) {
            return None;
        }
        let slot = if acme { &self.challenge } else { &self.current };
        let cert = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
        match (acme, cert) {
            // No public certificate yet: the pinned one, as for any other name.
            (false, None) => None,
            (_, cert) => Some(cert),
        }
    }

    fn set_current(&self, cert: Option<Arc<CertifiedKey>>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cert;
    }

    fn set_challenge(&self, cert: Option<Arc<CertifiedKey>>) {
        *self.challenge.write().unwrap_or_else(|e| e.into_inner()) = cert;
    }
}

/// What `status.json` says: the name, its certificate's dates, and the last error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AcmeStatus {
    pub name: String,
    /// Unix seconds; absent until a certificate was obtained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<u64>,
    /// The last attempt's error, cleared by a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is, after an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// Certificates obtained by this gate since it started.
    #[serde(default)]
    pub obtained: u64,
    /// Attempts that failed in a row (each after a longer wait).
    #[serde(default)]
    pub failures: u64,
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA at {directory}: {source}")]
    Ca {
        directory: String,
        source: instant_acme::Error,
    },
    #[error("the CA offers no tls-alpn-01 challenge for {0}")]
    NoTlsAlpn(String),
    #[error(
        "the CA could not validate {name} ({status}): does its DNS name point at the relay, and is the relay's port 443?"
    )]
    NotValidated { name: String, status: String },
    #[error("the CA root file {path}: {why}")]
    Roots { path: PathBuf, why: String },
    #[error("the ACME file {path}: {why}")]
    Files { path: PathBuf, why: String },
}

/// Keeps `public` holding a valid certificate for its name, for as long as it runs.
pub async fn run(cfg: AcmeConfig, public: Arc<PublicCert>) {
    if let Err(e) = make_private_dir(&cfg.dir) {
        tracing::warn!(
            "acme: cannot make {}: {e}; the public name gets no certificate",
            cfg.dir.display()
        );
    }
    let mut backoff = Backoff::new(cfg.retry, Duration::from_secs(3600));
    let mut status = AcmeStatus {
        name: cfg.name.clone(),
        ..AcmeStatus::default()
    };
    loop {
        let held = read_cert(&cfg.dir.join(CERT_FILE)).ok();
        if let Some(held) = &held {
            public.set_current(Some(held.key.clone()));
            status.not_after = Some(held.not_after);
            status.renew_at = Some(held.renew_at());
        }
        let now = unix_now();
        let due = held.as_ref().is_none_or(|h| now >= h.renew_at());
        if !due {
            write_status(&cfg.dir, &status);
            let until = status.renew_at.unwrap_or(now).saturating_sub(now);
            // Wake at least hourly: a certificate replaced on disk is picked up.
            tokio::time::sleep(Duration::from_secs(until.clamp(1, 3600))).await;
            continue;
        }
        match obtain(&cfg, &public).await {
            Ok(()) => {
                tracing::info!("acme: a certificate for {} was issued", cfg.name);
                backoff.reset();
                status.obtained += 1;
                status.failures = 0;
                status.last_error = None;
                status.retry_at = None;
            }
            Err(e) => {
                let wait = backoff.next_delay(jitter());
                tracing::warn!(
                    "acme: no certificate for {} yet: {e}; trying again in {}s",
                    cfg.name,
                    wait.as_secs()
                );
                status.failures += 1;
                status.last_error = Some(e.to_string());
                status.retry_at = Some(unix_now() + wait.as_secs());
                write_status(&cfg.dir, &status);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One order: the account, the challenge answered, the certificate and its key written.
async fn obtain(cfg: &AcmeConfig, public: &PublicCert) -> Result<(), AcmeError> {
    let ca = |source| AcmeError::Ca {
        directory: cfg.directory.clone(),
        source,
    };
    let account = account(cfg).await?;
    let identifiers = [Identifier::Dns(cfg.name.clone())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(ca)?;
    // The challenge certificate is served only while this order runs.
    struct Clear<'a>(&'a PublicCert);
    impl Drop for Clear<'_> {
        fn drop(&mut self) {
            self.0.set_challenge(None);
        }
    }
    let _clear = Clear(public);
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(ca)?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(AcmeError::NotValidated {
                    name: cfg.name.clone(),
                    status: format!("authorization {other:?}"),
                });
            }
        }
        let mut challenge = authorization
            .challenge(ChallengeType::TlsAlpn01)
            .ok_or_else(|| AcmeError::NoTlsAlpn(cfg.name.clone()))?;
        let digest = challenge.key_authorization().digest();
        let answer =
            challenge_cert(&cfg.name, digest.as_ref()).map_err(|why| AcmeError::Files {
                path: cfg.dir.clone(),
                why,
            })?;
        public.set_challenge(Some(Arc::new(answer)));
        challenge.set_ready().await.map_err(ca)?;
    }
    let patience = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(90));
    let status = order.poll_ready(&patience).await.map_err(ca)?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::NotValidated {
            name: cfg.name.clone(),
            status: format!("order {status:?}"),
        });
    }
    let key_pem = order.finalize().await.map_err(ca)?;
    let chain_pem = order.poll_certificate(&patience).await.map_err(ca)?;
    let path = cfg.dir.join(CERT_FILE);
    let both = format!("{}\n{}", chain_pem.trim_end(), key_pem);
    let files = |why: String| AcmeError::Files {
        path: path.clone(),
        why,
    };
    // Checked before it replaces the one being served.
    let held = parse_cert(both.as_bytes()).map_err(files)?;
    crate::files::write_atomically(&path, both.as_bytes(), crate::files::Access::Private)
        .map_err(|e| files(e.to_string()))?;
    public.set_current(Some(held.key));
    Ok(())
}

/// The account at the configured directory: the one saved, or a new one (saved, 0600).
async fn account(cfg: &AcmeConfig) -> Result<Account, AcmeError> {
    let ca = |source| AcmeError::Ca {
        directory: cfg.directory.clone(),
        source,
    };
    let path = cfg.dir.join(ACCOUNT_FILE);
    let saved: Option<SavedAccount> = crate::files::read_bounded(&path, 64 * 1024)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|a: &SavedAccount| a.directory == cfg.directory);
    if let Some(saved) = saved {
        return builder(cfg)?
            .from_credentials(saved.credentials)
            .await
            .map_err(ca);
    }
    let contact = cfg.contact.as_ref().map(|c| format!("mailto:{c}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder(cfg)?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(ca)?;
    let saved = SavedAccount {
        directory: cfg.directory.clone(),
        credentials,
    };
    let bytes = serde_json::to_vec(&saved).map_err(|e| AcmeError::Files {
        path: path.clone(),
        why: e.to_string(),
    })?;
    crate::files::write_atomically(&path, &bytes, crate::files::Access::Private).map_err(|e| {
        AcmeError::Files {
            path: path.clone(),
            why: e.to_string(),
        }
    })?;
    Ok(account)
}

#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// An account builder whose HTTPS trusts the public roots, or only the configured CA file.
fn builder(cfg: &AcmeConfig) -> Result<instant_acme::AccountBuilder, AcmeError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let roots_error = |why: String| AcmeError::Roots {
                path: path.clone(),
                why,
            };
            let pem = crate::files::read_bounded(path, 1024 * 1024)
                .map_err(|e| roots_error(e.to_string()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| roots_error(e.to_string()))?;
                roots.add(cert).map_err(|e| roots_error(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(roots_error("no certificate in it".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Roots {
            path: PathBuf::new(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    Ok(Account::builder_with_http(Box::new(client)))
}

/// The TLS-ALPN-01 answer: a self-signed certificate for `name` carrying the critical
/// acmeIdentifier extension with the key authorization's digest (RFC 8737 §3).
fn challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    // Not `CertifiedKey::from_der`: its consistency check parses the certificate as a peer's,
    // and refuses the critical acmeIdentifier extension it does not know.
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// A certificate chain and its key, ready to serve, with the leaf's validity.
struct Held {
    key: Arc<CertifiedKey>,
    not_before: u64,
    not_after: u64,
}

impl Held {
    /// Two-thirds into the lifetime.
    fn renew_at(&self) -> u64 {
        self.not_before + (self.not_after.saturating_sub(self.not_before)) * 2 / 3
    }
}

fn read_cert(path: &Path) -> Result<Held, String> {
    let pem = crate::files::read_bounded(path, 1024 * 1024).map_err(|e| e.to_string())?;
    parse_cert(&pem)
}

/// The chain and key of a [`CERT_FILE`].
fn parse_cert(pem: &[u8]) -> Result<Held, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let leaf = chain.first().ok_or("no certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| e.to_string())?;
    let (not_before, not_after) = validity(leaf)?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| e.to_string())?;
    Ok(Held {
        key: Arc::new(key),
        not_before,
        not_after,
    })
}

/// The leaf's notBefore and notAfter, in Unix seconds.
fn validity(der: &CertificateDer<'_>) -> Result<(u64, u64), String> {
    use x509_cert::der::Decode as _;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let v = &cert.tbs_certificate.validity;
    Ok((
        v.not_before.to_unix_duration().as_secs(),
        v.not_after.to_unix_duration().as_secs(),
    ))
}

/// The gate's own directory under the mounted `acme/`, 0700.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn write_status(dir: &Path, status: &AcmeStatus) {
    if let Ok(mut bytes) = serde_json::to_vec_pretty(status) {
        bytes.push(b'\n');
        let _ = crate::files::write_atomically(
            &dir.join(STATUS_FILE),
            &bytes,
            crate::files::Access::Private,
        );
    }
}

/// Reads a gate's `status.json` (what `soul status` shows).
pub fn read_status(dir: &Path) -> Option<AcmeStatus> {
    let bytes = crate::files::read_bounded(&dir.join(STATUS_FILE), 64 * 1024).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_certificate_names_the_host_and_carries_the_digest_critically() {
        let digest = [7u8; 32];
        let cert = challenge_cert("notes-home.relay.test", &digest).unwrap();
        let der = cert.cert[0].as_ref();
        // The acmeIdentifier OID 1.3.6.1.5.5.7.1.31, marked critical, then the digest as an
        // OCTET STRING inside the extension's OCTET STRING.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        let at = der
            .windows(oid.len())
            .position(|w| w == oid)
            .expect("the acmeIdentifier extension");
        let rest = &der[at + oid.len()..];
        assert_eq!(&rest[..3], &[0x01, 0x01, 0xff], "critical");
        assert_eq!(&rest[3..7], &[0x04, 34, 0x04, 32]);
        assert_eq!(&rest[7..39], &digest);
        assert!(
            der.windows(21).any(|w| w == b"notes-home.relay.test"),
            "the name is in the certificate"
        );
    }

    #[test]
    fn a_public_certificate_is_served_only_for_its_name_and_a_challenge_only_for_acme() {
        let public = PublicCert::new("Notes-Home.relay.test");
        assert!(
            public
                .for_hello(Some("notes-home.relay.test"), false)
                .is_none()
        );
        assert_eq!(
            public
                .for_hello(Some("notes-home.relay.test"), true)
                .map(|c| c.is_none()),
            Some(true),
            "no challenge under way: the acme handshake fails"
        );
        let cert = Arc::new(challenge_cert("notes-home.relay.test", &[1; 32]).unwrap());
        public.set_current(Some(cert.clone()));
        assert!(
            public
                .for_hello(Some("NOTES-HOME.relay.test"), false)
                .flatten()
                .is_some()
        );
        assert!(public.for_hello(Some("notes.home.soul"), false).is_none());
        assert!(public.for_hello(None, false).is_none());
        assert!(public.for_hello(Some("other.relay.test"), true).is_none());
    }

    /// A CA that is down must not make the gate retry in a busy loop: each failure is said in
    /// the status file, and the next attempt waits longer.
    #[tokio::test]
    async fn a_ca_that_is_down_gives_a_status_line_and_a_backoff_not_a_busy_loop() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let dir = tempfile::tempdir().unwrap();
        let cfg = AcmeConfig {
            name: "notes-home.relay.test".into(),
            directory: format!("https://127.0.0.1:{port}/dir"),
            ca_file: None,
            dir: dir.path().to_path_buf(),
            contact: None,
            retry: Duration::from_secs(1),
        };
        let public = PublicCert::new(&cfg.name);
        let task = tokio::spawn(run(cfg, public.clone()));
        tokio::time::sleep(Duration::from_secs(4)).await;
        task.abort();
        let status = read_status(dir.path()).expect("a status file");
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
        assert!(
            (2..=4).contains(&status.failures),
            "{} attempts in 4 s",
            status.failures
        );
        assert!(status.retry_at.is_some());
        assert!(
            public
                .for_hello(Some("notes-home.relay.test"), false)
                .is_none()
        );
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let cert = Arc::new(challenge_cert("x.test", &[1; 32]).unwrap());
        let held = Held {
            key: cert,
            not_before: 1_000,
            not_after: 1_000 + 90 * 86_400,
        };
        assert_eq!(held.renew_at(), 1_000 + 60 * 86_400);
    }
}
