//! The pairing tickets this gate has redeemed: a browser link works once, so the copy that
//! stays in the browser's history is worth nothing. Kept in memory and, when the gate has a
//! directory for it (a volume in the pod), appended to a file there, so that neither a restart
//! nor a recreated gate makes a used link work again. Only a hash of each ticket is kept.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// The file, one hex SHA-256 per line.
pub const REDEEMED_FILE: &str = "redeemed";

#[derive(Debug, Default)]
pub struct Redeemed {
    file: Option<PathBuf>,
    seen: HashSet<[u8; 32]>,
}

impl Redeemed {
    /// Loads what `dir` records (nothing when `dir` is `None` or the file is new).
    pub fn open(dir: Option<PathBuf>) -> Redeemed {
        let file = dir.map(|d| d.join(REDEEMED_FILE));
        let seen = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| crate::state::unhex32(l.trim()))
            .collect();
        Redeemed { file, seen }
    }

    fn id(ticket: &str) -> [u8; 32] {
        Sha256::digest(ticket.as_bytes()).into()
    }

    pub fn contains(&self, ticket: &str) -> bool {
        self.seen.contains(&Self::id(ticket))
    }

    /// Records a redemption; it is durable (written and synced) before this returns `Ok`, so a
    /// link is never honoured twice across a crash.
    pub fn insert(&mut self, ticket: &str) -> std::io::Result<()> {
        let id = Self::id(ticket);
        if let Some(path) = &self.file {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(f, "{}", hex::encode(id))?;
            f.sync_data()?;
        }
        self.seen.insert(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redemption_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("soul-redeemed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redeemed::open(Some(dir.clone()));
        assert!(!r.contains("alice.1.abc"));
        r.insert("alice.1.abc").unwrap();
        assert!(r.contains("alice.1.abc"));
        let again = Redeemed::open(Some(dir.clone()));
        assert!(again.contains("alice.1.abc") && !again.contains("alice.1.abd"));
        let text = std::fs::read_to_string(dir.join(REDEEMED_FILE)).unwrap();
        assert!(!text.contains("abc"), "the file keeps hashes, not tickets");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
