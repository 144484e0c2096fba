//! The pairing tickets this gate has redeemed: a browser link works once, so the copy that
//! stays in the browser's history is worth nothing. Kept in memory and, when the gate has a
//! file for it (in the state dir's `spent/`, which outlives the pod and its volumes), appended
//! there, so that neither a restart, a recreated gate nor `soul down --volumes` makes a used
//! link work again. Each ticket is recorded as issued ([`crate::pairing::Ticket::issued`]),
//! and only as a hash.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// The file in the gate's volume where versions before `spent/` kept the record, one hex
/// SHA-256 per line (the format of the record wherever it is).
pub const REDEEMED_FILE: &str = "redeemed";
/// The most a record is read: 64 MiB, a million spent tickets.
const MAX_FILE: u64 = 64 << 20;

#[derive(Debug, Default)]
pub struct Redeemed {
    file: Option<PathBuf>,
    seen: HashSet<[u8; 32]>,
}

impl Redeemed {
    /// Loads what `file` records, and what the files in `earlier` recorded (where earlier
    /// versions kept the record: the gate's volume); new redemptions go to `file` only
    /// (memory only when it is `None`).
    pub fn open(file: Option<PathBuf>, earlier: &[PathBuf]) -> Redeemed {
        let seen = file
            .iter()
            .chain(earlier)
            .flat_map(|f| {
                crate::files::read_bounded(f, MAX_FILE)
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| crate::state::unhex32(l.trim()))
                    .collect::<Vec<_>>()
            })
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
        let file = dir.join("notes");
        let mut r = Redeemed::open(Some(file.clone()), &[]);
        assert!(!r.contains("alice.1.abc"));
        r.insert("alice.1.abc").unwrap();
        assert!(r.contains("alice.1.abc"));
        let again = Redeemed::open(Some(file.clone()), &[]);
        assert!(again.contains("alice.1.abc") && !again.contains("alice.1.abd"));
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("abc"), "the file keeps hashes, not tickets");
        // A record where an earlier version kept it still counts.
        let moved = Redeemed::open(Some(dir.join("elsewhere")), &[file]);
        assert!(moved.contains("alice.1.abc"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
