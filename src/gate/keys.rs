//! The gate's view of the state dir: the stack's public key, the device registry, the link
//! key, the sidecar's TLS certificate and its current addresses, as files soul writes into `gate/` (mounted read-only
//! into the pod), re-read when they change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::acme::PublicCert;
use super::tls::GateTls;
use crate::state::layout::{
    GATE_LINK_KEY_FILE, GATE_PUBLIC_KEY_FILE, GATE_REGISTRY_FILE, gate_addresses, gate_tls_cert,
    gate_tls_key,
};
use crate::state::{Registry, unhex32};

/// What the gate verifies tokens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub public_key: [u8; 32],
    pub registry: Registry,
    /// Absent in a state dir written before browser sessions existed: links then cannot pair.
    pub link_key: Option<[u8; 32]>,
    /// This sidecar's certificate and key; absent in a state dir written before the gate spoke
    /// TLS (then only plain HTTP is served).
    pub tls: Option<GateTls>,
    /// This sidecar's current addresses as its codes spell them (`gate/addresses-<sidecar>.json`),
    /// for `/.soul/addresses`; empty when soul has not written them.
    pub addresses: Vec<String>,
}

/// Reads the key and registry files from `dir`, and `sidecar`'s TLS files (served beside the
/// `public` name's certificate, when the gate has one).
pub fn load(
    dir: &Path,
    sidecar: Option<&str>,
    public: Option<&Arc<PublicCert>>,
) -> std::io::Result<Keys> {
    let not_a_key =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 32-byte hex key");
    // Bounded, regular files only: what apply wrote, never a FIFO to wait on.
    let read =
        |name: &str| crate::files::read_bounded(&dir.join(name), crate::state::MAX_STATE_FILE);
    let text = |name: &str| read(name).map(|b| String::from_utf8_lossy(&b).into_owned());
    let public_key = unhex32(&text(GATE_PUBLIC_KEY_FILE)?).ok_or_else(not_a_key)?;
    let registry = serde_json::from_slice(&read(GATE_REGISTRY_FILE)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let link_key = match text(GATE_LINK_KEY_FILE) {
        Ok(hex) => Some(unhex32(&hex).ok_or_else(not_a_key)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let tls = match sidecar {
        Some(sidecar) => match (read(&gate_tls_cert(sidecar)), read(&gate_tls_key(sidecar))) {
            (Ok(cert), Ok(key)) => Some(GateTls::from_pem(&cert, &key, public.cloned())?),
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            (Err(e), _) | (_, Err(e)) => return Err(e),
        },
        None => None,
    };
    #[derive(serde::Deserialize)]
    struct Addresses {
        addresses: Vec<String>,
    }
    let addresses = sidecar
        .and_then(|s| read(&gate_addresses(s)).ok())
        .and_then(|b| serde_json::from_slice::<Addresses>(&b).ok())
        .map(|a| a.addresses)
        .unwrap_or_default();
    Ok(Keys {
        public_key,
        registry,
        link_key,
        tls,
        addresses,
    })
}

/// Re-reads the files every `every` and publishes them when they change. Unreadable files
/// (mid-rename, or removed) keep the last good keys until readable again.
pub async fn follow(
    dir: PathBuf,
    sidecar: Option<String>,
    public: Option<Arc<PublicCert>>,
    every: Duration,
    tx: watch::Sender<Option<Arc<Keys>>>,
) {
    loop {
        tokio::time::sleep(every).await;
        if let Ok(k) = load(&dir, sidecar.as_deref(), public.as_ref()) {
            tx.send_if_modified(|current| {
                if current.as_deref() == Some(&k) {
                    false
                } else {
                    tracing::info!("gate: key, device registry or certificate changed");
                    *current = Some(Arc::new(k));
                    true
                }
            });
        }
    }
}
