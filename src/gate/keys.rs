//! The gate's view of the state dir: the stack's public key and the device registry, as
//! files soul writes into `gate/` (mounted read-only into the pod), re-read when they change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::state::Registry;

/// The gate's directory inside the state dir.
pub const GATE_DIR: &str = "gate";
/// Hex of the stack's Ed25519 public key.
pub const PUBLIC_KEY_FILE: &str = "public.key";
/// A copy of the device registry.
pub const REGISTRY_FILE: &str = "devices.json";

/// What the gate verifies tokens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub public_key: [u8; 32],
    pub registry: Registry,
}

/// Reads the key and registry files from `dir`.
pub fn load(dir: &Path) -> std::io::Result<Keys> {
    let hex = std::fs::read_to_string(dir.join(PUBLIC_KEY_FILE))?;
    let bytes: Vec<u8> = (0..hex.trim().len())
        .step_by(2)
        .filter_map(|i| {
            hex.trim()
                .get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect();
    let public_key: [u8; 32] = bytes.try_into().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a 32-byte hex public key",
        )
    })?;
    let registry = serde_json::from_slice(&std::fs::read(dir.join(REGISTRY_FILE))?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Keys {
        public_key,
        registry,
    })
}

/// Re-reads the files every `every` and publishes them when they change. Unreadable files
/// (mid-rename, or removed) keep the last good keys until readable again.
pub async fn follow(dir: PathBuf, every: Duration, tx: watch::Sender<Option<Arc<Keys>>>) {
    loop {
        tokio::time::sleep(every).await;
        if let Ok(k) = load(&dir) {
            tx.send_if_modified(|current| {
                if current.as_deref() == Some(&k) {
                    false
                } else {
                    tracing::info!("gate: key or device registry changed");
                    *current = Some(Arc::new(k));
                    true
                }
            });
        }
    }
}
