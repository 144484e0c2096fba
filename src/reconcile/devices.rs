//! `soul devices` as a report: each declared device, its registry entry, whether the token in
//! the state dir is the one its current entry would issue (verified with the stack's one
//! verifier), and its pairing files. Reads the state dir; never prints a token, only its path.

use serde::Serialize;

use crate::stack::Stack;
use crate::state::{StateDir, layout};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicesReport {
    pub stack: String,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub generation: u64,
    pub issued_at: Option<u64>,
    pub expires_at: Option<u64>,
    /// Where its token is, when apply has written one.
    pub token: Option<String>,
    /// Whether that token verifies against the stack's key and the device's current entry.
    pub token_current: bool,
    /// Its pairing files (`.uri`, `.png`, `.svg`, `.txt` per sidecar) that exist.
    pub artifacts: Vec<String>,
}

/// The pairing files a device has per sidecar, by extension.
const ARTIFACTS: [&str; 5] = ["uri", "code", "png", "svg", "txt"];

pub fn report(stack: &Stack, state: &StateDir, now: u64) -> DevicesReport {
    let key = state.read_key().ok();
    let registry = state.read_registry().unwrap_or_default();
    let devices = stack
        .devices
        .iter()
        .map(|d| {
            let entry = registry.devices.get(&d.name);
            let token_path = state.path().join(layout::token(&d.name));
            let token = std::fs::read_to_string(&token_path).ok();
            let token_current = match (&key, &token) {
                (Some(k), Some(t)) => {
                    crate::pairing::verify(t.trim(), &k.public_key(), &stack.stack, &registry, now)
                        .is_ok_and(|c| c.jti == format!("{}.{}", d.name, d.generation))
                }
                _ => false,
            };
            let artifacts = stack
                .sidecars
                .iter()
                .flat_map(|s| {
                    ARTIFACTS.map(|ext| {
                        state
                            .path()
                            .join(format!("{}.{ext}", layout::pairing(&d.name, &s.name)))
                    })
                })
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect();
            DeviceStatus {
                name: d.name.clone(),
                generation: d.generation,
                issued_at: entry.map(|e| e.issued_at),
                expires_at: entry.and_then(|e| e.expires_at),
                token: token_path
                    .exists()
                    .then(|| token_path.display().to_string()),
                token_current,
                artifacts,
            }
        })
        .collect();
    DevicesReport {
        stack: stack.stack.clone(),
        devices,
    }
}
