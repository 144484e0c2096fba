//! soul's own image, built offline from the running binary: the binary itself plus the shared
//! libraries it has loaded and its ELF interpreter, `FROM scratch`. No registry is involved.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, TagImageOptionsBuilder};
use futures_util::StreamExt;

use super::RuntimeError;

/// Image label holding [`binary_id`] of the binary an image was built from.
pub const SOUL_BINARY_LABEL: &str = "dev.soul.binary";

/// Identifies this binary by its content: the linker's GNU build ID (a hash of the output it
/// wrote), read from the ELF notes without reading the whole file; for a binary without one,
/// a SHA-256 of the file. Two copies of one build share it; two builds do not. Computed once
/// per process.
pub fn binary_id() -> io::Result<String> {
    static ID: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        match gnu_build_id(&exe) {
            Ok(Some(id)) => Ok(id),
            _ => {
                use sha2::Digest;
                let bytes = std::fs::read(&exe).map_err(|e| e.to_string())?;
                Ok(to_hex(&sha2::Sha256::digest(&bytes)[..20]))
            }
        }
    })
    .clone()
    .map_err(io::Error::other)
}

/// Whether `tag` is a content tag soul gives its image, `soul:<version>-<12 hex digits>`.
pub fn is_content_tag(tag: &str) -> bool {
    tag.strip_prefix("soul:")
        .and_then(|rest| rest.rsplit_once('-'))
        .is_some_and(|(_, build)| build.len() == 12 && build.chars().all(|c| c.is_ascii_hexdigit()))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The GNU build ID note of a 64-bit little-endian ELF file, as hex, if it has one.
fn gnu_build_id(path: &Path) -> io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let read = |offset: u64, len: usize| -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    let header = read(0, 64)?;
    if header.get(..4) != Some(b"\x7fELF") || header[4] != 2 || header[5] != 1 {
        return Ok(None);
    }
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (phoff, phentsize, phnum) = (
        le64(&header, 0x20),
        le16(&header, 0x36),
        le16(&header, 0x38),
    );
    let (phentsize, phnum) = (usize::from(phentsize), usize::from(phnum));
    if phentsize < 56 || phnum > 256 {
        return Ok(None);
    }
    let table = read(phoff, phentsize * phnum)?;
    for ph in table.chunks(phentsize) {
        // PT_NOTE: a list of (namesz, descsz, type, name, desc), each part 4-aligned.
        if le32(ph, 0) != 4 {
            continue;
        }
        let (offset, size) = (le64(ph, 8), le64(ph, 32));
        if size > 64 * 1024 {
            continue;
        }
        let notes = read(offset, size as usize)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let (namesz, descsz, kind) = (
                le32(&notes, at) as usize,
                le32(&notes, at + 4) as usize,
                le32(&notes, at + 8),
            );
            let name_at = at + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let end = desc_at + descsz.div_ceil(4) * 4;
            if end > notes.len() {
                break;
            }
            // NT_GNU_BUILD_ID, owner "GNU\0".
            if kind == 3 && notes[name_at..name_at + namesz] == *b"GNU\0" && descsz > 0 {
                return Ok(Some(to_hex(&notes[desc_at..desc_at + descsz])));
            }
            at = end;
        }
    }
    Ok(None)
}

/// The files of the image: (path on this host, path inside the image).
pub fn soul_rootfs() -> io::Result<Vec<(PathBuf, String)>> {
    let exe = std::env::current_exe()?;
    let mut files = vec![(exe.clone(), "soul".to_string())];
    let mut libs = BTreeSet::new();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let p = Path::new(path);
        let is_lib = path.starts_with('/')
            && p != exe
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(".so"));
        if is_lib {
            libs.insert(path.to_string());
        }
    }
    if let Some(interp) = elf_interpreter(&exe)? {
        files.push((
            PathBuf::from(&interp),
            interp.trim_start_matches('/').to_string(),
        ));
    }
    for lib in libs {
        files.push((PathBuf::from(&lib), lib.trim_start_matches('/').to_string()));
    }
    Ok(files)
}

/// The program interpreter (`PT_INTERP`) of a 64-bit little-endian ELF file, if it has one.
fn elf_interpreter(path: &Path) -> io::Result<Option<String>> {
    let bytes = std::fs::read(path)?;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Ok(None);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(None);
    };
    for i in 0..usize::from(phnum) {
        let ph = phoff as usize + i * usize::from(phentsize);
        if u32_at(ph) == Some(3) {
            let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
                return Ok(None);
            };
            let raw = bytes
                .get(off as usize..(off + size) as usize)
                .unwrap_or(&[]);
            let s = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_string();
            return Ok((!s.is_empty()).then_some(s));
        }
    }
    Ok(None)
}

/// The build context: a Dockerfile and the rootfs, as a tar archive.
fn context() -> io::Result<Vec<u8>> {
    let id = binary_id()?;
    let files = soul_rootfs()?;
    let lib_dirs: BTreeSet<String> = files
        .iter()
        .skip(1)
        .filter_map(|(_, inside)| {
            Path::new(inside)
                .parent()
                .map(|d| format!("/{}", d.display()))
        })
        .collect();
    let dockerfile = format!(
        "FROM scratch\nCOPY rootfs/ /\nENV LD_LIBRARY_PATH={}\nLABEL {SOUL_BINARY_LABEL}=\"{id}\" org.opencontainers.image.title=\"soul\"\nENTRYPOINT [\"/soul\"]\nCMD [\"pause\"]\n",
        lib_dirs.into_iter().collect::<Vec<_>>().join(":")
    );
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(true);
    // The engine's tar reader does not take GNU sparse entries.
    tar.sparse(false);
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())?;
    for (host, inside) in files {
        tar.append_path_with_name(&host, format!("rootfs/{inside}"))?;
    }
    tar.into_inner()
}

/// Builds the image and tags it with every reference in `tags`.
pub async fn build(docker: &Docker, tags: &[String]) -> Result<(), RuntimeError> {
    let Some(first) = tags.first() else {
        return Ok(());
    };
    let body =
        context().map_err(|e| RuntimeError::Build(format!("cannot pack this binary: {e}")))?;
    let options = BuildImageOptionsBuilder::default()
        .t(first)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(body.into())));
    let mut log = String::new();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| RuntimeError::Build(e.to_string()))?;
        if let Some(msg) = info.error_detail.and_then(|d| d.message) {
            return Err(RuntimeError::Build(format!("{msg}\n{log}")));
        }
        if let Some(s) = info.stream {
            log.push_str(&s);
        }
    }

    for extra in &tags[1..] {
        let (r, tag) = extra.split_once(':').unwrap_or((extra, "latest"));
        let options = TagImageOptionsBuilder::default().repo(r).tag(tag).build();
        docker.tag_image(first, Some(options)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_content_tags_are_candidates_for_removal() {
        assert!(is_content_tag("soul:0.1.0-0c3536e2c45c"));
        assert!(!is_content_tag("soul:latest"));
        assert!(!is_content_tag("soul:0.1.0"));
        assert!(!is_content_tag("soul:0.1.0-rc1"));
        assert!(!is_content_tag("other:0.1.0-0c3536e2c45c"));
    }

    #[test]
    fn the_binary_id_is_the_linkers_build_id() {
        let exe = std::env::current_exe().unwrap();
        let id = binary_id().unwrap();
        assert_eq!(id, binary_id().unwrap());
        if let Some(build_id) = gnu_build_id(&exe).unwrap() {
            assert_eq!(id, build_id);
            // The same bytes `readelf -n` shows: 20 (sha1) or more hex pairs.
            assert!(
                id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
                "{id}"
            );
        }
    }

    #[test]
    fn rootfs_holds_the_binary_its_interpreter_and_libraries() {
        let files = soul_rootfs().expect("rootfs");
        assert_eq!(files[0].1, "soul");
        if let Some(interp) = elf_interpreter(&std::env::current_exe().unwrap()).unwrap() {
            assert!(
                files
                    .iter()
                    .any(|(_, inside)| format!("/{inside}") == interp)
            );
            assert!(
                files.iter().any(|(_, inside)| inside.contains("libc.so")),
                "{files:?}"
            );
        }
        for (host, _) in &files {
            assert!(host.exists(), "{host:?}");
        }
    }
}
