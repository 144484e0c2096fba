//! `stack.lock`, beside stack.kdl: each image the stack runs from a registry, as the digest
//! its tag named when it was locked, so that one commit runs the same bytes on every machine.
//! `soul apply` adds the images stack.kdl newly names (and drops those it no longer names),
//! never moves a locked one; `soul update` re-resolves the tags. An image built or imported
//! here (no registry digest) is recorded `local`; soul's own image and a reference pinned in
//! stack.kdl itself (`…@sha256:…`) are not recorded.
//!
//! The format, one image a line, sorted: `<reference> sha256:<hex>` or `<reference> local`;
//! `#` starts a comment.

use std::collections::BTreeMap;

use super::plan::{Desired, ImageNeed, ImageSource};

/// The first line of every lock soul writes.
pub const HEADER: &str = "# stack.lock: written by soul (`soul apply` adds the images stack.kdl newly names; `soul update` moves tags). Commit it with stack.kdl.\n";

/// What a reference is locked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locked {
    /// `sha256:<hex>`: the registry's digest (a multi-platform image's index).
    Digest(String),
    /// Built or imported on this machine: run as named, never pulled.
    Local,
}

/// A lock file's entries, by image reference as stack.kdl spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lock {
    pub entries: BTreeMap<String, Locked>,
}

impl Lock {
    /// Reads a lock file's text; a line that is neither is an error naming it.
    pub fn parse(text: &str) -> Result<Lock, String> {
        let mut entries = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                format!(
                    "line {}: `{line}` is not `<image> sha256:<hex>` or `<image> local`",
                    n + 1
                )
            };
            let (reference, what) = line.split_once(' ').ok_or_else(bad)?;
            let locked = match what.trim() {
                "local" => Locked::Local,
                d if is_digest(d) => Locked::Digest(d.to_string()),
                _ => return Err(bad()),
            };
            entries.insert(reference.to_string(), locked);
        }
        Ok(Lock { entries })
    }

    /// The file's text: the header, then one line per image, sorted.
    pub fn render(&self) -> String {
        let mut out = HEADER.to_string();
        for (reference, locked) in &self.entries {
            match locked {
                Locked::Digest(d) => out.push_str(&format!("{reference} {d}\n")),
                Locked::Local => out.push_str(&format!("{reference} local\n")),
            }
        }
        out
    }

    /// What runs for `reference`: `<repository>@sha256:…` when it is locked to a digest, else
    /// the reference itself.
    pub fn pinned(&self, reference: &str) -> String {
        match self.entries.get(reference) {
            Some(Locked::Digest(d)) => format!("{}@{d}", repository(reference)),
            _ => reference.to_string(),
        }
    }

    /// Only the entries of `needed` (an image stack.kdl no longer names is dropped).
    pub fn keep_only(&self, needed: &[&str]) -> Lock {
        Lock {
            entries: self
                .entries
                .iter()
                .filter(|(r, _)| needed.contains(&r.as_str()))
                .map(|(r, l)| (r.clone(), l.clone()))
                .collect(),
        }
    }
}

/// `sha256:` and 64 lower-case hex digits.
fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The references a lock covers: images pulled from a registry, not pinned in stack.kdl.
pub fn lockable(need: &ImageNeed) -> bool {
    need.source == ImageSource::Registry && !need.reference.contains('@')
}

/// `reference` without its tag (and digest): `ghcr.io/org/notes:1.4` → `ghcr.io/org/notes`,
/// `127.0.0.1:5000/notes:1` → `127.0.0.1:5000/notes`.
pub fn repository(reference: &str) -> &str {
    let reference = reference.split('@').next().unwrap_or(reference);
    let last = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last..].rfind(':') {
        Some(i) => &reference[..last + i],
        None => reference,
    }
}

/// Whether a `RepoDigests` entry (`repo@sha256:…`) is of `reference`'s repository, however
/// Docker Hub's names are spelled (`nginx`, `library/nginx`, `docker.io/library/nginx`).
pub fn digest_of<'a>(repo_digest: &'a str, reference: &str) -> Option<&'a str> {
    let (repo, digest) = repo_digest.split_once('@')?;
    let canonical = |r: &str| -> String {
        let r = r.strip_prefix("docker.io/").unwrap_or(r);
        r.strip_prefix("library/").unwrap_or(r).to_string()
    };
    (canonical(repo) == canonical(repository(reference)) && is_digest(digest)).then_some(digest)
}

/// `desired` with every image the lock holds a digest for run by that digest.
pub fn pin(desired: &mut Desired, lock: &Lock) {
    for need in &mut desired.images {
        need.reference = lock.pinned(&need.reference);
    }
    for c in desired.pods.iter_mut().flat_map(|p| &mut p.containers) {
        c.image = lock.pinned(&c.image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn a_lock_reads_back_what_it_writes_sorted_and_refuses_a_line_it_does_not_know() {
        let mut lock = Lock::default();
        lock.entries
            .insert("nginx:1.27".into(), Locked::Digest(D1.into()));
        lock.entries
            .insert("soul-test/nginx:1".into(), Locked::Local);
        lock.entries
            .insert("127.0.0.1:5000/notes:1".into(), Locked::Digest(D1.into()));
        let text = lock.render();
        assert!(text.starts_with(HEADER));
        assert_eq!(
            text.lines().skip(1).collect::<Vec<_>>(),
            vec![
                format!("127.0.0.1:5000/notes:1 {D1}"),
                format!("nginx:1.27 {D1}"),
                "soul-test/nginx:1 local".to_string()
            ]
        );
        assert_eq!(Lock::parse(&text).unwrap(), lock);
        assert!(
            Lock::parse("nginx:1 sha256:abc\n")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(Lock::parse("nginx:1\n").is_err());
    }

    #[test]
    fn a_locked_reference_runs_by_its_repositorys_digest() {
        let mut lock = Lock::default();
        lock.entries
            .insert("127.0.0.1:5000/notes:1".into(), Locked::Digest(D1.into()));
        lock.entries.insert("local/x:2".into(), Locked::Local);
        assert_eq!(
            lock.pinned("127.0.0.1:5000/notes:1"),
            format!("127.0.0.1:5000/notes@{D1}")
        );
        assert_eq!(lock.pinned("local/x:2"), "local/x:2");
        assert_eq!(lock.pinned("other:1"), "other:1");
        assert_eq!(repository("ghcr.io/org/notes:1.4"), "ghcr.io/org/notes");
        assert_eq!(repository("127.0.0.1:5000/notes"), "127.0.0.1:5000/notes");
        assert_eq!(
            digest_of(&format!("nginx@{D1}"), "docker.io/library/nginx:1.27"),
            Some(D1)
        );
        assert_eq!(digest_of(&format!("other@{D1}"), "nginx:1.27"), None);
    }
}
