//! The machine soul runs on, as resolving a stack sees it: host files named by `file=` and by
//! transports, soul's own environment, and whether a path exists. [`Host`] is the real one;
//! unit tests and `soul export` (which must not read secrets) bring their own.

use std::path::Path;

/// What resolving needs from the machine: read by the real CLI, faked in unit tests.
pub trait Machine {
    /// The contents of a host file named by `file=`.
    fn read_file(&self, path: &str) -> std::io::Result<String>;
    /// A variable of soul's own environment named by `from-env=`.
    fn env_var(&self, name: &str) -> Option<String>;
    /// Whether a host path exists (secret files named by transports, `/dev/net/tun`).
    fn exists(&self, path: &str) -> bool;
}

/// The real machine.
pub struct Host;

/// The largest file an `env … file=` may name: a secret, not a data set (a process's
/// environment could not carry much more; mount large files as a volume).
pub const MAX_ENV_FILE_BYTES: u64 = 64 * 1024;

impl Machine for Host {
    fn read_file(&self, path: &str) -> std::io::Result<String> {
        use std::io::Read;
        let file = std::fs::File::open(path)?;
        let mut bytes = Vec::new();
        file.take(MAX_ENV_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_ENV_FILE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "larger than {} KiB: an environment variable carries a secret, not a file (mount large files with `volume`)",
                    MAX_ENV_FILE_BYTES / 1024
                ),
            ));
        }
        String::from_utf8(bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
    }
    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn exists(&self, path: &str) -> bool {
        Path::new(path).exists()
    }
}

/// A machine that has every file and variable, all empty: resolving a stack against it (for
/// `soul export`) reads no secret and needs none.
pub struct NoSecrets;

impl Machine for NoSecrets {
    fn read_file(&self, _: &str) -> std::io::Result<String> {
        Ok(String::new())
    }
    fn env_var(&self, _: &str) -> Option<String> {
        Some(String::new())
    }
    fn exists(&self, _: &str) -> bool {
        true
    }
}
