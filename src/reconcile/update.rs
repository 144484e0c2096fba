//! Moving stack.lock to what the tags name now (`soul update`, and `soul watch --update`):
//! each locked image's tag asked at its registry through the engine, without pulling. An
//! image that cannot be asked keeps its entry; a `local` one is never asked.

use super::lock::{Lock, Locked, lockable};
use super::pass::{LockChange, PassError};
use crate::machine::Machine;
use crate::runtime::Docker;
use crate::stack::Stack;
use crate::state::StateDir;

/// One image whose lock entry moved (or was made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The sidecars that run it.
    pub used_by: Vec<String>,
    pub reference: String,
    /// What it was locked to, if it was.
    pub from: Option<String>,
    pub to: String,
}

impl std::fmt::Display for Moved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |d: &str| d.chars().take(19).collect::<String>() + "…";
        match &self.from {
            Some(from) => write!(
                f,
                "{}: {} {} → {}",
                self.used_by.join(", "),
                self.reference,
                short(from),
                short(&self.to)
            ),
            None => write!(
                f,
                "{}: {} locked at {}",
                self.used_by.join(", "),
                self.reference,
                short(&self.to)
            ),
        }
    }
}

/// What asking the registries found.
#[derive(Debug)]
pub struct Update {
    /// The lock as it should be now (write it with [`LockChange::write`]).
    pub change: LockChange,
    pub moved: Vec<Moved>,
    /// Images whose registry could not be asked, and why (their entries are kept).
    pub failed: Vec<(String, String)>,
}

/// Asks each registry what the locked tags name now; only the images of `sidecars` when
/// any are given. Changes nothing.
pub async fn update(
    docker: &Docker,
    stack: &Stack,
    machine: &dyn Machine,
    state: &StateDir,
    sidecars: &[String],
) -> Result<Update, PassError> {
    let path = stack.lock_file.clone().ok_or(PassError::NoLockFile)?;
    let current = super::read_lock(stack)?;
    // The references as stack.kdl names them, not as the lock pins them.
    let unpinned = Stack {
        lock_file: None,
        ..stack.clone()
    };
    let desired = super::resolve(&unpinned, machine, state.path())?;
    let mut lock = Lock::default();
    let (mut moved, mut failed) = (Vec::new(), Vec::new());
    for need in desired.images.iter().filter(|n| lockable(n)) {
        let chosen = sidecars.is_empty() || need.used_by.iter().any(|u| sidecars.contains(u));
        let old = current.entries.get(&need.reference).cloned();
        if !chosen || old == Some(Locked::Local) {
            if let Some(old) = old {
                lock.entries.insert(need.reference.clone(), old);
            }
            continue;
        }
        match docker.registry_digest(&need.reference).await {
            Ok(digest) => {
                let from = match &old {
                    Some(Locked::Digest(d)) => Some(d.clone()),
                    _ => None,
                };
                if from.as_deref() != Some(digest.as_str()) {
                    moved.push(Moved {
                        used_by: need.used_by.clone(),
                        reference: need.reference.clone(),
                        from,
                        to: digest.clone(),
                    });
                }
                lock.entries
                    .insert(need.reference.clone(), Locked::Digest(digest));
            }
            Err(e) => {
                failed.push((need.reference.clone(), e.to_string()));
                if let Some(old) = old {
                    lock.entries.insert(need.reference.clone(), old);
                }
            }
        }
    }
    Ok(Update {
        change: LockChange {
            path,
            lock,
            added: Vec::new(),
            dropped: Vec::new(),
        },
        moved,
        failed,
    })
}
