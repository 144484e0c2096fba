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
    /// What identifies a host directory itself, not its name: `<device>:<inode>`. A directory
    /// deleted and made anew under the same name has another, and a container that
    /// bind-mounts it must be recreated to see the new one. `None` where unknown.
    fn identity(&self, _path: &str) -> Option<String> {
        None
    }
}

/// The real machine.
pub struct Host;

/// The largest file an `env … file=` may name: a secret, not a data set (a process's
/// environment could not carry much more; mount large files as a volume).
pub const MAX_ENV_FILE_BYTES: u64 = 64 * 1024;

impl Machine for Host {
    fn read_file(&self, path: &str) -> std::io::Result<String> {
        let bytes = crate::files::read_bounded(Path::new(path), MAX_ENV_FILE_BYTES).map_err(
            |e| match e.kind() {
                std::io::ErrorKind::InvalidData if e.to_string().contains("larger than") => {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "larger than {} KiB: an environment variable carries a secret, not a file (mount large files with `volume`)",
                            MAX_ENV_FILE_BYTES / 1024
                        ),
                    )
                }
                _ => e,
            },
        )?;
        String::from_utf8(bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
    }
    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn exists(&self, path: &str) -> bool {
        Path::new(path).exists()
    }
    fn identity(&self, path: &str) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path)
            .ok()
            .map(|m| format!("{}:{}", m.dev(), m.ino()))
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
