//! The relay's own key: 32 random bytes made once in its state dir (the directory 0700, the
//! file `relay.key` 0600) and kept across restarts. Its TLS identity ([`crate::tls::relay_identity`])
//! is what the agents' control channels end at, and its pin is what a stack writes in
//! stack.kdl (`relay "host:port" pin="sha256//…"`): `soul relay serve` logs it at start and
//! `soul relay status` shows it.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::tls::Identity;

/// The key's file in the state dir: hex of the seed.
pub const KEY_FILE: &str = "relay.key";

/// Why the relay's key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot make the relay's state dir {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the relay's key {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} is not a relay key (64 hex digits): restore it from a backup, or move it aside to make a new one (every stack's `pin=` must then be updated)"
    )]
    Damaged(PathBuf),
    #[error("cannot write the relay's key {file}: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The state dir when none is given: systemd's `$STATE_DIRECTORY` (a unit with
/// `StateDirectory=`), else `/var/lib/soul-relay` as root, else
/// `$XDG_STATE_HOME/soul-relay` (or `~/.local/state/soul-relay`).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several, separated by colons: the first is the relay's.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from);
        if let Some(first) = first {
            return first;
        }
    }
    if is_root() {
        return PathBuf::from("/var/lib/soul-relay");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("soul-relay")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The relay's identity from the key in `dir`, made there first if there is none.
pub fn load_or_make(dir: &Path) -> Result<Identity, KeyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
    let file = dir.join(KEY_FILE);
    match crate::files::read_text_bounded(&file, 1024) {
        Ok(text) => {
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| KeyError::Damaged(file.clone()))?;
            Ok(crate::tls::relay_identity(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).expect("the operating system's random generator works");
            let write = |source| KeyError::Write {
                file: file.clone(),
                source,
            };
            // create_new: two relays starting at once never overwrite each other's key.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(write)?;
            f.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(write)?;
            tracing::info!("relay: made its key in {}", file.display());
            Ok(crate::tls::relay_identity(&seed))
        }
        Err(source) => Err(KeyError::Read { file, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_relays_key_is_made_once_private_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = load_or_make(&dir).unwrap();
        assert_eq!(
            load_or_make(&dir).unwrap().pin,
            first.pin,
            "kept across starts"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        std::fs::write(dir.join(KEY_FILE), "not hex").unwrap();
        assert!(matches!(load_or_make(&dir), Err(KeyError::Damaged(_))));
    }
}
