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

/// Identifies this binary cheaply (size and modification time), so an image built from an
/// older soul is rebuilt without hashing a large file on every pass.
pub fn binary_id() -> io::Result<String> {
    let exe = std::env::current_exe()?;
    let meta = std::fs::metadata(&exe)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{}-{mtime}", meta.len()))
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
