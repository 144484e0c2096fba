//! Where `soul connect` keeps its pairings: one JSON file per (stack, sidecar, device) in the
//! user's config dir (`$XDG_CONFIG_HOME/soul/pairings`, else `~/.config/soul/pairings`), the
//! directory 0700 and each file 0600, written atomically. A file holds the device token: it is
//! a credential, like an SSH key.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Pairing;
use crate::pairing::Address;
use crate::secret::Secret;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    stack: String,
    sidecar: String,
    device: String,
    addresses: Vec<String>,
    pin: String,
    token: String,
}

/// The largest pairing file read: a few addresses, a pin and a token.
const MAX_PAIRING_FILE: u64 = 1 << 20;

/// The directory pairings live in.
pub fn dir() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("soul").join("pairings"))
}

/// The file of one pairing in `dir`.
pub fn file_of(dir: &Path, pairing: &Pairing) -> PathBuf {
    dir.join(format!(
        "{}.{}.{}.json",
        pairing.stack, pairing.sidecar, pairing.device
    ))
}

/// Writes `pairing` into `dir` (made 0700 if missing), 0600, atomically.
pub fn save(dir: &Path, pairing: &Pairing) -> std::io::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let stored = Stored {
        stack: pairing.stack.clone(),
        sidecar: pairing.sidecar.clone(),
        device: pairing.device.clone(),
        addresses: pairing.addresses.iter().map(|a| a.to_string()).collect(),
        pin: pairing.pin.clone(),
        token: pairing.token.expose().to_string(),
    };
    let path = file_of(dir, pairing);
    let bytes = serde_json::to_vec_pretty(&stored).map_err(std::io::Error::other)?;
    crate::files::write_atomically(&path, &bytes, crate::files::Access::Private)?;
    Ok(path)
}

/// Why a stored pairing cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a soul pairing: {why}")]
    NotAPairing { path: PathBuf, why: String },
}

/// Reads a pairing file.
pub fn load(path: &Path) -> Result<Pairing, StoreError> {
    let not_a_pairing = |why: String| StoreError::NotAPairing {
        path: path.to_path_buf(),
        why,
    };
    let bytes =
        crate::files::read_bounded(path, MAX_PAIRING_FILE).map_err(|source| StoreError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let s: Stored = serde_json::from_slice(&bytes).map_err(|e| not_a_pairing(e.to_string()))?;
    // Its names build the file it is saved back to: only names stack.kdl allows.
    if let Some(bad) = [&s.stack, &s.sidecar, &s.device]
        .into_iter()
        .find(|n| !crate::stack::is_name(n))
    {
        return Err(not_a_pairing(format!("`{bad}` is not a name soul makes")));
    }
    let addresses = s
        .addresses
        .iter()
        .map(|a| Address::parse(a).map_err(|e| not_a_pairing(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Pairing {
        stack: s.stack,
        sidecar: s.sidecar,
        device: s.device,
        addresses,
        pin: s.pin,
        token: Secret::new(s.token),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_saved_pairing_is_private_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("soul/pairings");
        let pairing = Pairing {
            stack: "home".into(),
            sidecar: "notes".into(),
            device: "laptop".into(),
            addresses: vec![Address::parse("lan:192.168.1.20:8443").unwrap()],
            pin: "sha256//abc".into(),
            token: Secret::new("eyJ.token"),
        };
        let path = save(&dir, &pairing).unwrap();
        assert_eq!(path.file_name().unwrap(), "home.notes.laptop.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let back = load(&path).unwrap();
        assert_eq!(back.addresses, pairing.addresses);
        assert_eq!(back.token.expose(), "eyJ.token");
    }
}
