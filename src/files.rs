//! Reading the files soul keeps: one bounded reader for every state file, key file and
//! record. It opens without waiting on a FIFO, reads regular files only and never more than
//! the caller's bound, so a state file replaced by `/dev/zero`, a FIFO or a directory is an
//! error naming the file, not a hang or a process that grows until the kernel kills it.
//! Imports nothing of soul's.

use std::fs::OpenOptions;
use std::io::{Error, ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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
