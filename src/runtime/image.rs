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
                Ok(hex::encode(&sha2::Sha256::digest(&bytes)[..20]))
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

/// The GNU build ID note of the ELF file at `path`, as hex, if it has one. Reads the headers
/// and notes only, not the whole file.
fn gnu_build_id(path: &Path) -> io::Result<Option<String>> {
    use object::Object;
    let cache = object::ReadCache::new(std::fs::File::open(path)?);
    let Ok(elf) = object::File::parse(&cache) else {
        return Ok(None);
    };
    Ok(elf.build_id().ok().flatten().map(hex::encode))
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
    use object::read::elf::{ElfFile64, ProgramHeader};
    let cache = object::ReadCache::new(std::fs::File::open(path)?);
    let Ok(elf) = ElfFile64::<object::LittleEndian, _>::parse(&cache) else {
        return Ok(None);
    };
    let endian = elf.endian();
    let interp = elf
        .elf_program_headers()
        .iter()
        .find(|ph| ph.p_type(endian) == object::elf::PT_INTERP)
        .and_then(|ph| ph.data(endian, elf.data()).ok())
        .map(|raw| {
            String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_string()
        });
    Ok(interp.filter(|s| !s.is_empty()))
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

    /// What binutils' `readelf` (the linker's own toolchain, always beside cargo) says.
    fn readelf(flag: &str) -> String {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("readelf")
            .arg(flag)
            .arg(&exe)
            .output()
            .expect("readelf (binutils) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_binary_id_is_the_linkers_build_id() {
        let id = binary_id().unwrap();
        assert_eq!(id, binary_id().unwrap());
        let notes = readelf("-n");
        let expected = notes
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .map(str::to_string);
        match expected {
            Some(build_id) => assert_eq!(id, build_id),
            // Linked without a build ID: a SHA-256 of the file, cut to 20 bytes.
            None => assert_eq!(id.len(), 40, "{id}"),
        }
    }

    #[test]
    fn the_interpreter_is_the_one_readelf_names() {
        let exe = std::env::current_exe().unwrap();
        let headers = readelf("-l");
        let expected = headers.lines().find_map(|l| {
            l.trim()
                .strip_prefix("[Requesting program interpreter: ")
                .and_then(|rest| rest.strip_suffix(']'))
                .map(str::to_string)
        });
        assert_eq!(elf_interpreter(&exe).unwrap(), expected);
        let not_elf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_elf.path(), b"#!/bin/sh\n").unwrap();
        assert_eq!(elf_interpreter(not_elf.path()).unwrap(), None);
        assert_eq!(gnu_build_id(not_elf.path()).unwrap(), None);
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
