//! The state dir of one stack (DESIGN §5): where it is, created 0700, and the lock that keeps
//! two soul processes from reconciling the same stack at once. Imports nothing of soul's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the state dir could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory could not be created or made private.
    #[error("cannot prepare the state dir {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The default state dir: `/var/lib/soul/<stack>` as root, `$XDG_STATE_HOME/soul/<stack>`
/// (or `~/.local/state/soul/<stack>`) otherwise.
pub fn default_dir(stack: &str) -> PathBuf {
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/soul").join(stack);
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from(".soul-state"));
    base.join("soul").join(stack)
}

/// One stack's state dir, created with mode 0700.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let err = |source| StateError::Dir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the stack's lock. When another process holds it, `on_wait` is told its pid and
    /// this call waits until the lock is released.
    pub fn lock(&self, on_wait: impl FnOnce(Option<u32>)) -> Result<Lock, StateError> {
        let path = self.path.join("lock");
        let err = |source| StateError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                on_wait(holder.trim().parse().ok());
                file.lock().map_err(err)?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        // Record who holds it, for the message a waiting process prints.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(Lock { _file: file })
    }
}

/// Held while a process reconciles a stack; released on drop (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("soul-state-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn dir_is_private() {
        let p = tempdir("private");
        let dir = StateDir::open(&p.join("home")).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn second_lock_waits_for_the_first() {
        let p = tempdir("lock");
        let dir = StateDir::open(&p).unwrap();
        let first = dir.lock(|_| panic!("nobody holds it yet")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir2 = dir.clone();
        let waiter = std::thread::spawn(move || {
            let _second = dir2.lock(|holder| tx.send(holder).unwrap()).unwrap();
        });
        let holder = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(holder, Some(std::process::id()));
        drop(first);
        waiter.join().unwrap();
        let _ = std::fs::remove_dir_all(&p);
    }
}
