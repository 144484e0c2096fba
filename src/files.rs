//! Reading and writing the files soul keeps. One bounded reader for every state file, key
//! file and record: it opens without waiting on a FIFO, reads regular files only and never more
//! than the caller's bound, so a state file replaced by `/dev/zero`, a FIFO or a directory is an
//! error naming the file, not a hang or a process that grows until the kernel kills it. One
//! atomic writer for everything soul writes (the state dir, stack.kdl's edits, exports, stored
//! pairings): a crash leaves the old file or the new one, never half of one. Imports nothing of
//! soul's.

use std::fs::OpenOptions;
use std::io::{Error, ErrorKind, Read, Write as _};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt as _};
use std::path::Path;

/// Who may read what [`write_atomically`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Its owner only (0600): secrets, state.
    Private,
    /// What the file it replaces allowed, or 0644 for a new one: files people commit.
    AsBefore,
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory, written,
/// synced, given its permissions, renamed over `path`, then the directory synced. The
/// directory must exist.
pub fn write_atomically(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mode = match access {
        Access::Private => 0o600,
        Access::AsBefore => std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode()),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".soul-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads `path`, a regular file (a symbolic link to one is followed) of at most `max` bytes.
/// Anything else — a FIFO, a device, a socket, a directory, a larger file — is an
/// `InvalidData` error that says what was found; a missing file is `NotFound` as usual.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. It
    // changes nothing for the regular files read below.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} is {what}, not a file soul wrote: move it aside",
                path.display()
            ),
        ));
    }
    if meta.len() > max {
        return Err(too_large(path, max));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(path, max));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, max)?).map_err(|_| {
        Error::new(
            ErrorKind::InvalidData,
            format!("{} is not UTF-8 text", path.display()),
        )
    })
}

fn too_large(path: &Path, max: u64) -> Error {
    Error::new(
        ErrorKind::InvalidData,
        format!(
            "{} is larger than {} bytes, more than soul ever writes there: move it aside",
            path.display(),
            max
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_whole_file_with_the_access_asked() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        write_atomically(&secret, b"one", Access::Private).unwrap();
        write_atomically(&secret, b"two", Access::Private).unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"two");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&secret), 0o600);
        let shared = dir.path().join("stack.kdl");
        write_atomically(&shared, b"a", Access::AsBefore).unwrap();
        assert_eq!(mode(&shared), 0o644);
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&shared, b"b", Access::AsBefore).unwrap();
        assert_eq!(mode(&shared), 0o640, "the old file's permissions are kept");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "no temporary file is left");
    }

    #[test]
    fn a_state_file_linked_to_dev_zero_a_fifo_or_a_directory_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        let started = std::time::Instant::now();
        for (path, said) in [
            (&zero, "a device"),
            (&fifo, "a FIFO"),
            (&sub, "a directory"),
            (&big, "larger than 1024 bytes"),
        ] {
            let e = read_bounded(path, 1024).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(said), "{e}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, b"1234").unwrap();
        assert_eq!(read_bounded(&ok, 4).unwrap(), b"1234");
        assert_eq!(
            read_bounded(&dir.path().join("missing"), 4)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
    }
}
