//! The state dir of one stack: where it is, created 0700; atomic 0600 writes; the stack key
//! and the device registry; and the lock that keeps two soul processes from reconciling the
//! same stack at once; the bundle that carries what cannot be derived to another machine
//! ([`bundle`]). What lives where inside it is [`layout`]'s. Imports nothing of soul's.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod bundle;
pub mod layout;
mod pulled;

pub use layout::{
    ADDRESSES_FILE, KEY_FILE, MANAGED_DIRS, REGISTRY_FILE, RENDER_INDEX_FILE, ROTATION_FILE,
    STATE_ID_FILE,
};

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
    /// The state dir's path names something that is not a directory.
    #[error(
        "the state dir {path} is a file, not a directory: move it aside, or pass another with --state-dir"
    )]
    NotADir { path: PathBuf },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another `soul watch` already keeps this stack.
    #[error(
        "soul watch already keeps the stack of state dir {path}{}: two watches would fight over it; stop that one first",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    WatchRunning { path: PathBuf, pid: Option<u32> },
}

/// Fault injection for tests: a write of exactly this state-dir path fails, as a full disk
/// would make it fail, so a test can cut an apply short at any of its writes.
pub const FAULT_WRITE_VAR: &str = "SOUL_FAULT_WRITE";

/// The most soul reads of any one file in a state dir: far more than it ever writes there (a
/// registry of thousands of devices is a few hundred KiB).
pub const MAX_STATE_FILE: u64 = 16 << 20;

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
    /// The state dir at `path`, without creating it (for commands that only read).
    pub fn at(path: &Path) -> StateDir {
        StateDir {
            path: path.to_path_buf(),
        }
    }

    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let err = |source| StateError::Dir {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::metadata(path)
            && !meta.is_dir()
        {
            return Err(StateError::NotADir {
                path: path.to_path_buf(),
            });
        }
        std::fs::create_dir_all(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        let state = StateDir {
            path: path.to_path_buf(),
        };
        // The directories gates bind-mount exist before any plan names them, so a first apply
        // plans the gate with the directory it will mount.
        for dir in [layout::SPENT_DIR, layout::GATE_DIR, layout::ACME_DIR] {
            create_private_dirs(path, &path.join(dir)).map_err(err)?;
        }
        if !path.join(STATE_ID_FILE).exists() {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| err(std::io::Error::other(e.to_string())))?;
            state
                .write(STATE_ID_FILE, format!("{}\n", hex::encode(id)).as_bytes())
                .map_err(err)?;
        }
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This state dir as the owner recorded on the containers it makes: its absolute path.
    pub fn owner(&self) -> String {
        std::path::absolute(&self.path)
            .unwrap_or_else(|_| self.path.clone())
            .to_string_lossy()
            .into_owned()
    }

    /// Writes `bytes` to `rel` atomically (temp file in the same directory, fsync, rename,
    /// fsync of the directory), mode 0600; parent directories are created 0700.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> std::io::Result<()> {
        if std::env::var_os(FAULT_WRITE_VAR).is_some_and(|p| p == rel) {
            return Err(std::io::Error::other(format!(
                "{FAULT_WRITE_VAR}: an injected failure writing {rel}"
            )));
        }
        let target = self.path.join(rel);
        let parent = target.parent().unwrap_or(&self.path).to_path_buf();
        create_private_dirs(&self.path, &parent)?;
        crate::files::write_atomically(&target, bytes, crate::files::Access::Private)
    }

    /// Removes temp files left by a write that was interrupted (`kill -9` mid-write).
    pub fn clean_temp_files(&self) {
        let mut dirs = vec![self.path.clone()];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if e.file_name().to_string_lossy().starts_with(".soul-") {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }

    /// Reads a file of the state dir: a regular file of at most [`MAX_STATE_FILE`] bytes
    /// ([`crate::files::read_bounded`]), so a file replaced by a FIFO, a device or a directory
    /// is an error at once, never a hang or an unbounded read.
    pub fn read(&self, rel: &str) -> std::io::Result<Vec<u8>> {
        crate::files::read_bounded(&self.path.join(rel), MAX_STATE_FILE)
    }

    /// Removes a file; a file that is already gone is fine. Empty managed directories go too.
    pub fn remove(&self, rel: &str) -> std::io::Result<()> {
        let target = self.path.join(rel);
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut dir = target.parent();
        while let Some(d) = dir {
            if d == self.path || std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }

    /// SHA-256 of every file soul manages here: the key, the registry, the addresses, and everything under
    /// [`MANAGED_DIRS`], by path relative to the state dir.
    pub fn file_hashes(&self) -> BTreeMap<String, [u8; 32]> {
        let mut out = BTreeMap::new();
        let mut visit = vec![];
        for f in [KEY_FILE, REGISTRY_FILE, ADDRESSES_FILE, ROTATION_FILE] {
            visit.push(self.path.join(f));
        }
        for d in MANAGED_DIRS {
            visit.push(self.path.join(d));
        }
        while let Some(p) = visit.pop() {
            if p.is_dir() {
                if let Ok(entries) = std::fs::read_dir(&p) {
                    visit.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
                }
            } else if let Ok(bytes) = crate::files::read_bounded(&p, MAX_STATE_FILE)
                && let Ok(rel) = p.strip_prefix(&self.path)
            {
                let name = rel.to_string_lossy().to_string();
                if !name.rsplit('/').next().unwrap_or("").starts_with(".soul-") {
                    out.insert(name, Sha256::digest(&bytes).into());
                }
            }
        }
        out
    }

    /// Starting over after the stack key or the registry was lost: moves what is left of the
    /// key, the device registry and the gate's copies of both aside (`<file>.lost-<unix
    /// time>` in the state dir, never deleted), so the next apply makes a first key and pairs
    /// every device anew. Returns the names moved.
    pub fn set_aside_lost_key(&self, now: u64) -> std::io::Result<Vec<String>> {
        let mut moved = Vec::new();
        let gate_key = layout::gate_file(layout::GATE_PUBLIC_KEY_FILE);
        let gate_registry = layout::gate_file(layout::GATE_REGISTRY_FILE);
        // The gate's copies too: they record the tokens issued under the lost key, which
        // starting over deliberately leaves behind.
        for f in [KEY_FILE, REGISTRY_FILE, &gate_key, &gate_registry] {
            let aside = format!("{}.lost-{now}", f.replace('/', "-"));
            match std::fs::rename(self.path.join(f), self.path.join(&aside)) {
                Ok(()) => moved.push(aside),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        File::open(&self.path)?.sync_all()?;
        Ok(moved)
    }

    /// The stack key, or why it cannot be used (missing or unreadable: both are drift).
    pub fn read_key(&self) -> Result<StackKey, KeyProblem> {
        match self.read(KEY_FILE) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KeyProblem::Missing),
            Err(e) => Err(KeyProblem::Unreadable(e.to_string())),
            Ok(bytes) => {
                StackKey::parse(&bytes).ok_or(KeyProblem::Unreadable("not a soul stack key".into()))
            }
        }
    }

    /// The render index; a missing or unreadable one is empty (everything is re-rendered).
    pub fn read_render_index(&self) -> RenderIndex {
        self.read(RENDER_INDEX_FILE)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn write_render_index(&self, index: &RenderIndex) -> std::io::Result<()> {
        let mut v = serde_json::to_vec_pretty(index).unwrap_or_default();
        v.push(b'\n');
        self.write(RENDER_INDEX_FILE, &v)
    }

    /// The device registry, or why it cannot be read (missing, or unreadable: what to do about
    /// either depends on whether tokens were issued from it, which [`StateDir::issued`] tells).
    pub fn read_registry(&self) -> Result<Registry, KeyProblem> {
        Self::registry_at(self, REGISTRY_FILE)
    }

    fn registry_at(&self, rel: &str) -> Result<Registry, KeyProblem> {
        match self.read(rel) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KeyProblem::Missing),
            Err(e) => Err(KeyProblem::Unreadable(e.to_string())),
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| KeyProblem::Unreadable(format!("not a device registry: {e}"))),
        }
    }

    /// What the gate's copies say about tokens issued before: the public key they verify
    /// with, and the devices they admit. Written by every apply beside the key and the
    /// registry, they outlive damage to those two.
    pub fn issued(&self) -> Issued {
        let gate_public_key = self
            .read(&layout::gate_file(layout::GATE_PUBLIC_KEY_FILE))
            .ok()
            .and_then(|b| unhex32(&String::from_utf8_lossy(&b)));
        let gate_registry = self
            .registry_at(&layout::gate_file(layout::GATE_REGISTRY_FILE))
            .ok();
        let rotating_to = self
            .read(layout::ROTATION_FILE)
            .ok()
            .and_then(|b| unhex32(&String::from_utf8_lossy(&b)));
        Issued {
            gate_public_key,
            gate_registry,
            rotating_to,
        }
    }

    /// Takes the stack's lock. When another process holds it, `on_wait` is told its pid and
    /// this call waits until the lock is released.
    pub fn lock(&self, on_wait: impl FnOnce(Option<u32>)) -> Result<Lock, StateError> {
        self.take_lock("lock", |file, holder, path| {
            on_wait(holder);
            file.lock().map_err(|source| StateError::Lock {
                path: path.to_path_buf(),
                source,
            })
        })
    }

    /// Takes the lock only one `soul watch` of the stack may hold, for as long as it runs; a
    /// second watch is refused, naming the first.
    pub fn watch_lock(&self) -> Result<Lock, StateError> {
        self.take_lock("watch.lock", |_, pid, _| {
            Err(StateError::WatchRunning {
                path: self.path.clone(),
                pid,
            })
        })
    }

    /// Opens lock file `name` and takes it; when another process holds it, `held` is given
    /// the file and the holder's pid and decides (wait for it, or fail).
    fn take_lock(
        &self,
        name: &str,
        held: impl FnOnce(&File, Option<u32>, &Path) -> Result<(), StateError>,
    ) -> Result<Lock, StateError> {
        let path = self.path.join(name);
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
                held(&file, holder.trim().parse().ok(), &path)?;
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

fn create_private_dirs(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != root
    {
        create_private_dirs(root, parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// What the state dir's gate copies say about tokens issued before (see [`StateDir::issued`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Issued {
    /// `gate/public.key`: the key the running gates verify tokens with.
    pub gate_public_key: Option<[u8; 32]>,
    /// `gate/devices.json`, when it reads: the devices the running gates admit.
    pub gate_registry: Option<Registry>,
    /// The public key a rotation that has begun is switching to ([`layout::ROTATION_FILE`]).
    pub rotating_to: Option<[u8; 32]>,
}

impl Issued {
    /// How many devices the gates admit tokens of.
    pub fn devices(&self) -> usize {
        self.gate_registry.as_ref().map_or(0, |r| r.devices.len())
    }
}

/// Why the stored stack key (or device registry) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    Missing,
    Unreadable(String),
}

/// The stack's Ed25519 signing key and the `secret-generation` it was made for. `Debug`
/// never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct StackKey {
    pub generation: u64,
    seed: [u8; 32],
}

impl fmt::Debug for StackKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StackKey(generation {}, MASKED)", self.generation)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct KeyFile {
    secret_generation: u64,
    ed25519_seed: String,
}

impl StackKey {
    pub fn from_seed(generation: u64, seed: [u8; 32]) -> StackKey {
        StackKey { generation, seed }
    }

    /// The same key material, marked for another `secret-generation`.
    pub fn with_generation(self, generation: u64) -> StackKey {
        StackKey { generation, ..self }
    }

    /// A new random key from the operating system's generator.
    pub fn generate(generation: u64) -> std::io::Result<StackKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(StackKey { generation, seed })
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&self.seed)
            .verifying_key()
            .to_bytes()
    }

    /// The key that signs pairing tickets and the gate's browser sessions: derived one way
    /// from the stack key, so the gates can hold it without being able to issue device tokens,
    /// and it rotates with the stack key. Its message predates [`Self::derive`]'s shape and is
    /// kept byte for byte: every ticket and browser session in use is signed with it.
    pub fn link_key(&self) -> [u8; 32] {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.seed)
            .expect("HMAC takes a key of any length");
        mac.update(b"soul link key v1");
        mac.finalize().into_bytes().into()
    }

    /// A 32-byte key derived one way from the stack key for `label` and `parts` (HMAC-SHA256,
    /// each piece followed by a NUL): it rotates with the stack key and reveals nothing of it.
    /// HMAC-SHA256 with a fixed key is a PRF, all HKDF-Expand does with one block; HKDF proper
    /// (Extract, then Expand) would give other bytes, and these are the gates' pins and the
    /// relay's `allow` lines that devices and relays hold: changing them would re-pair everyone.
    pub fn derive(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.seed)
            .expect("HMAC takes a key of any length");
        mac.update(label);
        mac.update(&[0]);
        for part in parts {
            mac.update(part);
            mac.update(&[0]);
        }
        mac.finalize().into_bytes().into()
    }

    /// The seed of the key the stack's relay agents register with
    /// ([`crate::relay::wire::AgentKey`]): derived one way from the stack key, so it rotates
    /// with it (the relay's `allow` line must then be updated: `soul relay allow` prints it).
    pub fn relay_agent_seed(&self) -> [u8; 32] {
        self.derive(b"soul relay agent key v1", &[])
    }

    /// The private key as PKCS#8 DER (what JWT libraries take).
    pub fn pkcs8_der(&self) -> Vec<u8> {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        ed25519_dalek::SigningKey::from_bytes(&self.seed)
            .to_pkcs8_der()
            .map(|der| der.as_bytes().to_vec())
            .expect("an Ed25519 key always encodes as PKCS#8")
    }

    /// The key file's bytes.
    pub fn to_file(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&KeyFile {
            secret_generation: self.generation,
            ed25519_seed: B64.encode(self.seed),
        })
        .unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn parse(bytes: &[u8]) -> Option<StackKey> {
        let f: KeyFile = serde_json::from_slice(bytes).ok()?;
        let seed: [u8; 32] = B64.decode(f.ed25519_seed).ok()?.try_into().ok()?;
        Some(StackKey {
            generation: f.secret_generation,
            seed,
        })
    }
}

/// The device registry: who is paired, at which generation, since when, until when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub devices: BTreeMap<String, DeviceEntry>,
}

/// See [`RENDER_INDEX_FILE`]: path → the rendering's source and result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderIndex {
    pub files: BTreeMap<String, Rendered>,
}

/// Hex SHA-256 of what a file was rendered from, and of the file as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    pub source: String,
    pub sha256: String,
}

/// 32 bytes from 64 hex digits (surrounding whitespace ignored); `None` for anything else.
pub fn unhex32(text: &str) -> Option<[u8; 32]> {
    let mut bytes = [0; 32];
    hex::decode_to_slice(text.trim(), &mut bytes).ok()?;
    Some(bytes)
}

/// One paired device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceEntry {
    pub generation: u64,
    /// Unix seconds; the token's `iat`.
    pub issued_at: u64,
    /// Unix seconds; the token's `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Registry {
    /// Devices at these generations, each issued at `issued_at` (unix seconds), none expiring.
    pub fn of_generations(devices: &[(&str, u64)], issued_at: u64) -> Registry {
        Registry {
            devices: devices
                .iter()
                .map(|(name, generation)| {
                    let entry = DeviceEntry {
                        generation: *generation,
                        issued_at,
                        expires_at: None,
                    };
                    (name.to_string(), entry)
                })
                .collect(),
        }
    }

    pub fn to_file(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
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
    fn atomic_private_writes_and_removal() {
        let p = tempdir("write");
        let dir = StateDir::open(&p).unwrap();
        dir.write("pairing/alice/notes.uri", b"soul://x").unwrap();
        let file = p.join("pairing/alice/notes.uri");
        assert_eq!(std::fs::read(&file).unwrap(), b"soul://x");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(p.join("pairing/alice"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert!(dir.file_hashes().contains_key("pairing/alice/notes.uri"));
        dir.remove("pairing/alice/notes.uri").unwrap();
        assert!(
            !p.join("pairing").exists(),
            "empty managed dirs are removed"
        );
        dir.remove("pairing/alice/notes.uri").unwrap();
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn key_round_trip_and_redaction() {
        let k = StackKey::from_seed(3, [5u8; 32]);
        assert_eq!(StackKey::parse(&k.to_file()), Some(k.clone()));
        assert!(!format!("{k:?}").contains('5'));
        assert_eq!(StackKey::parse(b"garbage"), None);
        assert_ne!(
            StackKey::generate(1).unwrap(),
            StackKey::generate(1).unwrap()
        );
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
