//! The state bundle (`soul state export` / `import`): what of a state dir cannot be derived —
//! the stack key, the device registry and the record of spent pairing tickets — in one file,
//! encrypted with a passphrase in the age format (scrypt), which `age` and `rage` open too.
//! Everything else (tokens, pairing codes, the gates' keys and certificates, the relay agent's
//! key) is derived from these by the next `soul apply`, byte for byte.
//!
//! Inside the encryption: JSON `{"format":"soul-state-bundle/1","stack":…,"exported_at":…,
//! "files":{<path in the state dir>: <base64>}}`. An import checks everything before it writes
//! anything, and writes each file atomically (0600 in 0700 directories).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};

use age::secrecy::SecretString;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::{KEY_FILE, REGISTRY_FILE, ROTATION_FILE, Registry, StackKey, StateDir, layout};

/// What a bundle says it is.
pub const FORMAT: &str = "soul-state-bundle/1";
/// The largest bundle an import reads (a registry of thousands of devices fits many times).
pub const MAX_BUNDLE: u64 = 4 << 20;
/// In the state dir: when it was last exported, for `soul status`.
pub const EXPORTED_FILE: &str = "exported.json";
/// The scrypt work factor an import accepts at most (age's own default is calibrated to about
/// a second; this bounds a hostile file's cost).
const MAX_WORK_FACTOR: u8 = 22;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    format: String,
    stack: String,
    exported_at: u64,
    files: BTreeMap<String, String>,
}

/// What an import would write, checked.
#[derive(Debug)]
pub struct Bundle {
    pub stack: String,
    pub exported_at: u64,
    pub devices: usize,
    files: BTreeMap<String, Vec<u8>>,
}

/// Why a bundle could not be made or used. Nothing is written when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the state dir has no stack key to export: run `soul apply` first")]
    NoKey,
    #[error(
        "a key rotation is half done in this state dir: run `soul apply` to finish it, then export"
    )]
    Rotating,
    #[error("cannot read {path} from the state dir: {why}")]
    Read { path: String, why: String },
    #[error("cannot encrypt the bundle: {0}")]
    Encrypt(String),
    #[error("not a soul state bundle (not in the age format): {0}")]
    NotAge(String),
    #[error("the passphrase does not open this bundle (wrong passphrase, or the file was changed)")]
    Passphrase,
    #[error("the bundle is damaged or cut short: {0}")]
    Damaged(String),
    #[error("the bundle is larger than {MAX_BUNDLE} bytes: not a soul state bundle")]
    TooLarge,
    #[error("the bundle is {found}, which this soul does not read (it reads {FORMAT})")]
    Format { found: String },
    #[error(
        "the bundle holds stack `{found}`, but stack.kdl is stack `{expected}`: import it with that stack's stack.kdl"
    )]
    OtherStack { found: String, expected: String },
    #[error("the bundle's {path} is not valid: {why}")]
    Invalid { path: String, why: String },
    #[error(
        "this state dir already holds a stack key ({dir}): importing would replace the identity every paired device trusts. To replace it, add --replace (the old key and registry are moved aside, never deleted)"
    )]
    KeyExists { dir: String },
    #[error("cannot write the state dir: {0}")]
    Write(String),
}

/// A spent record's name: a sidecar's, one plain file name that stays in its directory.
fn is_plain_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The files of `state` a bundle carries, read and checked.
fn collect(state: &StateDir) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    if state.path().join(ROTATION_FILE).exists() {
        return Err(BundleError::Rotating);
    }
    let read = |rel: &str| {
        state.read(rel).map_err(|e| BundleError::Read {
            path: rel.to_string(),
            why: e.to_string(),
        })
    };
    let mut files = BTreeMap::new();
    let key = match state.read(KEY_FILE) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BundleError::NoKey),
        _ => read(KEY_FILE)?,
    };
    files.insert(KEY_FILE.to_string(), key);
    files.insert(REGISTRY_FILE.to_string(), read(REGISTRY_FILE)?);
    let spent = state.path().join(layout::SPENT_DIR);
    if let Ok(entries) = std::fs::read_dir(&spent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if is_plain_name(&name) && entry.path().is_file() {
                let rel = format!("{}/{name}", layout::SPENT_DIR);
                let bytes = read(&rel)?;
                files.insert(rel, bytes);
            }
        }
    }
    check_files(&files)?;
    Ok(files)
}

/// Checks what each carried file must be: the key parses, the registry parses, spent records
/// are files of a sidecar's name.
fn check_files(files: &BTreeMap<String, Vec<u8>>) -> Result<usize, BundleError> {
    let invalid = |path: &str, why: &str| BundleError::Invalid {
        path: path.to_string(),
        why: why.to_string(),
    };
    let key = files
        .get(KEY_FILE)
        .ok_or_else(|| invalid(KEY_FILE, "missing"))?;
    StackKey::parse(key).ok_or_else(|| invalid(KEY_FILE, "not a soul stack key"))?;
    let registry = files
        .get(REGISTRY_FILE)
        .ok_or_else(|| invalid(REGISTRY_FILE, "missing"))?;
    let registry: Registry = serde_json::from_slice(registry)
        .map_err(|e| invalid(REGISTRY_FILE, &format!("not a device registry: {e}")))?;
    for path in files.keys() {
        let known = path == KEY_FILE
            || path == REGISTRY_FILE
            || path
                .strip_prefix(&format!("{}/", layout::SPENT_DIR))
                .is_some_and(is_plain_name);
        if !known {
            return Err(invalid(path, "not a file a state bundle carries"));
        }
    }
    Ok(registry.devices.len())
}

/// The bundle of `state` (stack `stack`), encrypted with `passphrase`.
pub fn export(
    state: &StateDir,
    stack: &str,
    passphrase: SecretString,
    now: u64,
) -> Result<Vec<u8>, BundleError> {
    let files = collect(state)?;
    let contents = Contents {
        format: FORMAT.to_string(),
        stack: stack.to_string(),
        exported_at: now,
        files: files
            .iter()
            .map(|(k, v)| (k.clone(), B64.encode(v)))
            .collect(),
    };
    let plain = serde_json::to_vec(&contents).map_err(|e| BundleError::Encrypt(e.to_string()))?;
    let encrypt = |e: std::io::Error| BundleError::Encrypt(e.to_string());
    let mut out = Vec::new();
    let mut writer = age::Encryptor::with_user_passphrase(passphrase)
        .wrap_output(&mut out)
        .map_err(encrypt)?;
    writer.write_all(&plain).map_err(encrypt)?;
    writer.finish().map_err(encrypt)?;
    Ok(out)
}

/// Records that `state` was exported at `now` (for `soul status`).
pub fn record_export(state: &StateDir, now: u64) -> std::io::Result<()> {
    state.write(
        EXPORTED_FILE,
        format!("{{\"exported_at\":{now}}}\n").as_bytes(),
    )
}

/// When `state` was last exported, if ever.
pub fn last_export(state: &StateDir) -> Option<u64> {
    #[derive(Deserialize)]
    struct Exported {
        exported_at: u64,
    }
    let bytes = state.read(EXPORTED_FILE).ok()?;
    serde_json::from_slice::<Exported>(&bytes)
        .ok()
        .map(|e| e.exported_at)
}

/// Decrypts and checks a bundle for stack `stack`: nothing is written.
pub fn open(bytes: &[u8], passphrase: SecretString, stack: &str) -> Result<Bundle, BundleError> {
    if bytes.len() as u64 > MAX_BUNDLE {
        return Err(BundleError::TooLarge);
    }
    let decryptor = age::Decryptor::new(bytes).map_err(|e| match e {
        age::DecryptError::Io(e) => BundleError::Damaged(e.to_string()),
        other => BundleError::NotAge(other.to_string()),
    })?;
    if !decryptor.is_scrypt() {
        return Err(BundleError::NotAge(
            "it is encrypted to a key, not with a passphrase".into(),
        ));
    }
    let mut identity = age::scrypt::Identity::new(passphrase);
    identity.set_max_work_factor(MAX_WORK_FACTOR);
    let mut reader = decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => {
                BundleError::Passphrase
            }
            other => BundleError::Damaged(other.to_string()),
        })?;
    let mut plain = Vec::new();
    (&mut reader)
        .take(MAX_BUNDLE)
        .read_to_end(&mut plain)
        .map_err(|e| BundleError::Damaged(e.to_string()))?;
    let contents: Contents = serde_json::from_slice(&plain).map_err(|e| {
        if plain.starts_with(b"{\"format\"") {
            BundleError::Damaged(e.to_string())
        } else {
            BundleError::Format {
                found: "not a soul state bundle".into(),
            }
        }
    })?;
    if contents.format != FORMAT {
        return Err(BundleError::Format {
            found: contents.format,
        });
    }
    if contents.stack != stack {
        return Err(BundleError::OtherStack {
            found: contents.stack,
            expected: stack.to_string(),
        });
    }
    let mut files = BTreeMap::new();
    for (path, b64) in &contents.files {
        let bytes = B64.decode(b64).map_err(|e| BundleError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
        files.insert(path.clone(), bytes);
    }
    let devices = check_files(&files)?;
    Ok(Bundle {
        stack: contents.stack,
        exported_at: contents.exported_at,
        devices,
        files,
    })
}

/// Writes `bundle` into `state`. A state dir that holds a stack key is refused unless
/// `replace`, which first moves the key, the registry and the gate's copies aside
/// ([`StateDir::set_aside_lost_key`]). Returns what was moved aside.
pub fn import(
    state: &StateDir,
    bundle: &Bundle,
    replace: bool,
    now: u64,
) -> Result<Vec<String>, BundleError> {
    let write = |e: std::io::Error| BundleError::Write(e.to_string());
    let has_key = state.path().join(KEY_FILE).exists();
    if has_key && !replace {
        return Err(BundleError::KeyExists {
            dir: state.path().display().to_string(),
        });
    }
    let moved = if has_key {
        state.set_aside_lost_key(now).map_err(write)?
    } else {
        Vec::new()
    };
    // The registry first and the key last: a run cut short leaves no key, so the next import
    // (or apply, which refuses a registry without its key) says so instead of going on.
    let mut order: Vec<(&String, &Vec<u8>)> = bundle
        .files
        .iter()
        .filter(|(p, _)| *p != KEY_FILE)
        .collect();
    order.extend(bundle.files.get_key_value(KEY_FILE));
    for (path, bytes) in order {
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            super::create_private_dirs(state.path(), &state.path().join(dir)).map_err(write)?;
        }
        state.write(path, bytes).map_err(write)?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_key(dir: &std::path::Path) -> StateDir {
        let state = StateDir::open(dir).unwrap();
        state
            .write(KEY_FILE, &StackKey::from_seed(3, [7; 32]).to_file())
            .unwrap();
        state
            .write(
                REGISTRY_FILE,
                b"{\"devices\":{\"phone\":{\"generation\":2,\"issued-at\":1800000000}}}\n",
            )
            .unwrap();
        state.write("spent/notes", b"abc\n").unwrap();
        state
    }

    fn pass(p: &str) -> SecretString {
        SecretString::from(p.to_string())
    }

    /// Every file of the state dir, byte for byte.
    fn snapshot(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut visit = vec![dir.to_path_buf()];
        while let Some(p) = visit.pop() {
            if p.is_dir() {
                visit.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
        out
    }

    #[test]
    fn a_bundle_carries_the_key_the_registry_and_spent_tickets_into_a_fresh_state_dir() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let state = state_with_key(old.path());
        let bytes = export(&state, "home", pass("correct horse"), 1_800_000_100).unwrap();
        assert!(
            bytes.starts_with(b"age-encryption.org/v1\n"),
            "the age format"
        );
        for secret in [&b"ed25519"[..], b"phone", b"abc"] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret));
        }
        let bundle = open(&bytes, pass("correct horse"), "home").unwrap();
        assert_eq!((bundle.devices, bundle.exported_at), (1, 1_800_000_100));
        let fresh = StateDir::open(&new.path().join("state")).unwrap();
        assert!(import(&fresh, &bundle, false, 0).unwrap().is_empty());
        for f in [KEY_FILE, REGISTRY_FILE, "spent/notes"] {
            assert_eq!(fresh.read(f).unwrap(), state.read(f).unwrap(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(fresh.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_wrong_passphrase_a_flipped_byte_a_cut_another_stack_or_an_existing_key_writes_nothing() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let state = state_with_key(old.path());
        let bytes = export(&state, "home", pass("right"), 1).unwrap();
        assert!(matches!(
            open(&bytes, pass("wrong"), "home"),
            Err(BundleError::Passphrase)
        ));
        let mut flipped = bytes.clone();
        let at = flipped.len() - 20;
        flipped[at] ^= 1;
        assert!(open(&flipped, pass("right"), "home").is_err());
        assert!(open(&bytes[..bytes.len() - 30], pass("right"), "home").is_err());
        assert!(open(b"hello", pass("right"), "home").is_err());
        assert!(matches!(
            open(&bytes, pass("right"), "away"),
            Err(BundleError::OtherStack { .. })
        ));
        // An existing key without --replace: refused, the state dir untouched.
        let target = state_with_key(new.path());
        target
            .write(KEY_FILE, &StackKey::from_seed(1, [9; 32]).to_file())
            .unwrap();
        let before = snapshot(new.path());
        let bundle = open(&bytes, pass("right"), "home").unwrap();
        assert!(matches!(
            import(&target, &bundle, false, 5),
            Err(BundleError::KeyExists { .. })
        ));
        assert_eq!(snapshot(new.path()), before);
        // With --replace the old key is moved aside, never lost.
        let moved = import(&target, &bundle, true, 5).unwrap();
        assert!(moved.contains(&"stack.key.lost-5".to_string()), "{moved:?}");
        assert_eq!(
            target.read(KEY_FILE).unwrap(),
            state.read(KEY_FILE).unwrap()
        );
        assert_eq!(
            std::fs::read(new.path().join("stack.key.lost-5")).unwrap(),
            StackKey::from_seed(1, [9; 32]).to_file()
        );
    }
}
