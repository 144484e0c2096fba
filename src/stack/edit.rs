//! Format-preserving edits of stack.kdl: the file is changed only at the spans that must
//! change, so comments and layout survive and the diff is what the user would have typed.

use std::path::{Path, PathBuf};

use kdl::KdlDocument;

use super::{Stack, StackError};

/// What `bump_generation` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bumped {
    pub source: String,
    pub from: u64,
    pub to: u64,
}

/// Why an edit could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("stack.kdl does not parse; fix it first (`soul validate`)")]
    Parse,
    #[error("no device `{0}` in stack.kdl")]
    NoDevice(String),
}

/// Why `soul rotate` could not edit stack.kdl. The file is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The file cannot be read, or is not valid before or after the edit.
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Edit(#[from] EditError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `soul rotate`'s edit of the file at `path`: bumps `secret-generation`, or `device`'s
/// `generation=`. The file is validated before (a broken file is never edited) and after, and
/// written atomically with its permissions; returns the edited stack and what changed.
pub fn rotate_file(path: &Path, device: Option<&str>) -> Result<(Stack, Bumped), RotateError> {
    let name = path.display().to_string();
    let source = super::read_source(path)?;
    super::parse(&name, &source).map_err(StackError::Invalid)?;
    let bumped = bump_generation(&source, device)?;
    let stack = super::parse(&name, &bumped.source).map_err(StackError::Invalid)?;
    super::write_source(path, &bumped.source).map_err(|source| RotateError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((stack, bumped))
}

/// Bumps `secret-generation` (no device) or a device's `generation=` by one.
pub fn bump_generation(source: &str, device: Option<&str>) -> Result<Bumped, EditError> {
    let doc = KdlDocument::parse_v2(source).map_err(|_| EditError::Parse)?;
    match device {
        None => {
            let node = doc
                .nodes()
                .iter()
                .find(|n| n.name().value() == "secret-generation");
            match node.and_then(|n| n.entries().iter().find(|e| e.name().is_none())) {
                Some(entry) => {
                    let from = generation_of(entry);
                    Ok(replace_value(
                        source,
                        entry.span().offset(),
                        entry.span().len(),
                        from,
                    ))
                }
                None => {
                    let mut s = source.to_string();
                    if !s.ends_with('\n') && !s.is_empty() {
                        s.push('\n');
                    }
                    s.push_str("secret-generation 2\n");
                    Ok(Bumped {
                        source: s,
                        from: 1,
                        to: 2,
                    })
                }
            }
        }
        Some(name) => {
            let node = doc
                .nodes()
                .iter()
                .find(|n| {
                    n.name().value() == "device"
                        && n.entries()
                            .iter()
                            .find(|e| e.name().is_none())
                            .and_then(|e| e.value().as_string())
                            == Some(name)
                })
                .ok_or_else(|| EditError::NoDevice(name.to_string()))?;
            match node
                .entries()
                .iter()
                .find(|e| e.name().map(|n| n.value()) == Some("generation"))
            {
                Some(entry) => {
                    let from = generation_of(entry);
                    // The entry's span covers `generation=N`; replace the whole property.
                    let to = from + 1;
                    let (start, len) = (entry.span().offset(), entry.span().len());
                    let text = &source[start..start + len];
                    let lead = text.len() - text.trim_start().len();
                    let mut s = source.to_string();
                    s.replace_range(start + lead..start + len, &format!("generation={to}"));
                    Ok(Bumped {
                        source: s,
                        from,
                        to,
                    })
                }
                None => {
                    let name_entry = node
                        .entries()
                        .iter()
                        .filter(|e| e.name().is_none())
                        .chain(node.entries().iter())
                        .next()
                        .ok_or_else(|| EditError::NoDevice(name.to_string()))?;
                    let last = node.entries().last().unwrap_or(name_entry);
                    let end = last.span().offset() + last.span().len();
                    let end = source[..end].trim_end().len();
                    let mut s = source.to_string();
                    s.insert_str(end, " generation=2");
                    Ok(Bumped {
                        source: s,
                        from: 1,
                        to: 2,
                    })
                }
            }
        }
    }
}

/// The generation a node's entry holds (1 when it is not a positive integer).
fn generation_of(entry: &kdl::KdlEntry) -> u64 {
    entry
        .value()
        .as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .unwrap_or(1)
}

/// Replaces an argument's text (which may carry leading whitespace in its span) by from+1.
fn replace_value(source: &str, start: usize, len: usize, from: u64) -> Bumped {
    let text = &source[start..start + len];
    let lead = text.len() - text.trim_start().len();
    let trail = text.len() - text.trim_end().len();
    let mut s = source.to_string();
    s.replace_range(start + lead..start + len - trail, &(from + 1).to_string());
    Bumped {
        source: s,
        from,
        to: from + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "// my stack\nstack \"home\"   // name\nsidecar \"x\" { image \"i\"; port 80; }\n\nsecret-generation 4  // keep\ndevice \"alice\"      // phone\ndevice \"bob\" expires=\"90d\" generation=2 // laptop\n";

    #[test]
    fn bumps_secret_generation_in_place() {
        let b = bump_generation(SRC, None).unwrap();
        assert_eq!((b.from, b.to), (4, 5));
        assert_eq!(
            b.source,
            SRC.replace(
                "secret-generation 4  // keep",
                "secret-generation 5  // keep"
            )
        );
        let no_node = "stack \"a\"\nsidecar \"x\" { image \"i\"; port 80; }\n";
        let b = bump_generation(no_node, None).unwrap();
        assert!(b.source.ends_with("secret-generation 2\n"));
        assert!(crate::stack::parse("s", &b.source).is_ok());
    }

    #[test]
    fn bumps_one_device_and_keeps_everything_else() {
        let b = bump_generation(SRC, Some("bob")).unwrap();
        assert_eq!((b.from, b.to), (2, 3));
        assert_eq!(
            b.source,
            SRC.replace("generation=2 // laptop", "generation=3 // laptop")
        );
        let b = bump_generation(SRC, Some("alice")).unwrap();
        assert_eq!(
            b.source,
            SRC.replace(
                "device \"alice\"      // phone",
                "device \"alice\" generation=2      // phone"
            )
        );
        let parsed = crate::stack::parse("s", &b.source).unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(parsed.devices[0].generation, 2);
        assert!(matches!(
            bump_generation(SRC, Some("carol")),
            Err(EditError::NoDevice(_))
        ));
    }
}

/// Replaces the `transport { … }` node with `block` (or appends it when there is none),
/// leaving every other byte of the file as it was. Returns the new source.
pub fn replace_transport(source: &str, block: &str) -> Result<String, EditError> {
    let doc = KdlDocument::parse_v2(source).map_err(|_| EditError::Parse)?;
    let block = block.trim_end();
    match doc.nodes().iter().find(|n| n.name().value() == "transport") {
        Some(node) => {
            // The node's span may include its leading whitespace; keep that, replace the rest
            // up to the end of its line (a trailing comment on the closing brace goes too).
            let span = node.span();
            let (start, end) = (span.offset(), span.offset() + span.len());
            let text = &source[start..end];
            let start = start + (text.len() - text.trim_start().len());
            let end = start + source[start..end].trim_end().len();
            let mut s = String::with_capacity(source.len() + block.len());
            s.push_str(&source[..start]);
            s.push_str(block);
            s.push_str(&source[end..]);
            Ok(s)
        }
        None => {
            let mut s = source.trim_end().to_string();
            s.push_str("\n\n");
            s.push_str(block);
            s.push('\n');
            Ok(s)
        }
    }
}

/// The whole source line (trimmed, trailing comment included) of the child `child` of the
/// top-level node `parent`, so an edit can carry it over verbatim.
pub fn child_line(source: &str, parent: &str, child: &str) -> Option<String> {
    let doc = KdlDocument::parse_v2(source).ok()?;
    let node = doc
        .nodes()
        .iter()
        .find(|n| n.name().value() == parent)?
        .children()?
        .nodes()
        .iter()
        .find(|n| n.name().value() == child)?;
    let offset = node.name().span().offset();
    let start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = source[offset..]
        .find('\n')
        .map_or(source.len(), |i| offset + i);
    let line = source[start..end].trim();
    // Only when the child has the line to itself (not `transport { lan; tor }`).
    (line.starts_with(child) && !line.contains(['{', '}', ';'])).then(|| line.to_string())
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    #[test]
    fn only_the_transport_block_changes() {
        let src = "// home\nstack \"h\"   // name\nsidecar \"x\" { image \"i\"; port 80; }\n\n// how to reach it\ntransport {\n    lan port=9000   // LAN\n}\n\ndevice \"a\"  // phone\n";
        let out = replace_transport(src, "transport {\n    tor\n}").unwrap();
        assert_eq!(
            out,
            src.replace(
                "transport {\n    lan port=9000   // LAN\n}",
                "transport {\n    tor\n}"
            )
        );
        assert_eq!(
            child_line(src, "transport", "lan").as_deref(),
            Some("lan port=9000   // LAN")
        );
        assert_eq!(
            child_line("transport { lan port=1; tor; }", "transport", "lan"),
            None
        );
        let none = "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\n";
        let out = replace_transport(none, "transport {\n    tor\n}\n").unwrap();
        assert_eq!(out, format!("{none}\ntransport {{\n    tor\n}}\n"));
    }
}
