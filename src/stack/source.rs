//! stack.kdl's text, read and written safely. Read: only a regular file, at most
//! [`MAX_FILE_BYTES`], valid UTF-8 (or an error at the first bad byte's line and column), and
//! nesting no deeper than [`MAX_NESTING`] before the KDL parser, which recurses, ever sees it.
//! These bounds are far above any real stack and keep `soul watch` alive whatever an edit
//! leaves in the file. Written (by soul's own edits): atomically, with the file's permissions.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::StackError;
use super::diagnostic::{Diagnostics, Problem, Span};

/// The largest stack file soul reads. A real one is a few KiB.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// How deeply `{ … }` blocks, and separately `/* … */` comments, may nest. A real stack
/// nests two blocks deep. Kept low because the KDL parser's error recovery doubles its work
/// with each level of an unclosed slashdashed block (`/-{ x` repeated: 15 levels took a
/// second, 20 would take a minute).
pub const MAX_NESTING: usize = 8;

/// Reads a stack file within the bounds above.
pub fn read(path: &Path) -> Result<String, StackError> {
    let err = |source: std::io::Error| StackError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Look before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(StackError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let too_large = || StackError::TooLarge {
        path: path.to_path_buf(),
        limit: MAX_FILE_BYTES,
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let file = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the look and the read: never read more than the limit.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    text(&path.display().to_string(), bytes).map_err(StackError::Invalid)
}

/// Replaces the file at `path` with `text` atomically: written beside it, flushed, given the
/// old file's permissions, then renamed over it, so an interrupted edit (`bridge init`,
/// `rotate`) leaves either the old file or the new one, never half of it, and a running
/// `soul watch` never reads a torn file.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    crate::files::write_atomically(path, text.as_bytes(), crate::files::Access::AsBefore)
}

/// The bytes as text, or a diagnostic at the first byte that is not UTF-8.
pub fn text(path: &str, bytes: Vec<u8>) -> Result<String, Diagnostics> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            // Lossy conversion keeps every offset before the first bad byte, so the
            // diagnostic's line and column are those of the file.
            let source = String::from_utf8_lossy(e.as_bytes()).into_owned();
            Err(Diagnostics {
                path: path.to_string(),
                source: Arc::new(source),
                problems: vec![
                    Problem::new(Span::new(at, 1), "this byte is not UTF-8")
                        .label("not UTF-8")
                        .help("save stack.kdl as UTF-8"),
                ],
            })
        }
    }
}

/// Finds the first place where `{ … }` blocks or `/* … */` comments nest deeper than
/// [`MAX_NESTING`]. Strings and line comments are skipped the way KDL 2 lexes them, so braces
/// inside them do not count. Linear in the source's length.
pub fn too_deep(source: &str) -> Option<Problem> {
    let b = source.as_bytes();
    let (mut i, mut blocks, mut comments) = (0, 0usize, 0usize);
    let deep = |at: usize, what: &str| {
        Some(
            Problem::new(
                Span::new(at, 1),
                format!("{what} nest more than {MAX_NESTING} deep"),
            )
            .help("a stack.kdl nests two blocks deep (sidecar { … }, transport { … }); look for an unclosed `{` or `/*`"),
        )
    };
    while i < b.len() {
        if comments > 0 {
            if b[i..].starts_with(b"/*") {
                comments += 1;
                if comments > MAX_NESTING {
                    return deep(i, "comments");
                }
                i += 2;
            } else if b[i..].starts_with(b"*/") {
                comments -= 1;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        match b[i] {
            b'{' => {
                blocks += 1;
                if blocks > MAX_NESTING {
                    return deep(i, "blocks `{ … }`");
                }
                i += 1;
            }
            b'}' => {
                blocks = blocks.saturating_sub(1);
                i += 1;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                comments = 1;
                i += 2;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n);
            }
            b'"' => i = skip_string(b, i, 0),
            b'#' => {
                let hashes = b[i..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + hashes) == Some(&b'"') {
                    i = skip_string(b, i + hashes, hashes);
                } else {
                    i += hashes;
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The offset just past the string starting with the `"` at `start`: a raw string when
/// `hashes > 0` (no escapes; ends at `"` followed by as many `#`), else a quoted one (with
/// `\` escapes). A multi-line string opens with `"""` and a newline, as KDL 2 requires, and
/// ends at `"""` (and its hashes); `"""` without the newline is `""` and another string.
fn skip_string(b: &[u8], start: usize, hashes: usize) -> usize {
    let triple =
        b[start..].starts_with(b"\"\"\"") && matches!(b.get(start + 3), Some(b'\n' | b'\r'));
    let quote: &[u8] = if triple { b"\"\"\"" } else { b"\"" };
    let mut i = start + quote.len();
    while i < b.len() {
        if hashes == 0 && b[i] == b'\\' {
            i += 2;
            continue;
        }
        let end = i + quote.len() + hashes;
        if b[i..].starts_with(quote)
            && end <= b.len()
            && b[i + quote.len()..end].iter().all(|&c| c == b'#')
        {
            return end;
        }
        i += 1;
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_replaces_the_file_at_once_and_keeps_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack.kdl");
        std::fs::write(&path, "stack \"a\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write(&path, "stack \"b\"\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "stack \"b\"\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["stack.kdl"], "no temporary file left");
    }

    #[test]
    fn nesting_is_counted_outside_strings_and_comments_only() {
        let ok = "a { b { c \"{{{{\" #\"{{\"}\"# } } // {{{{{\n";
        assert!(too_deep(ok).is_none());
        let n = MAX_NESTING + 1;
        assert!(too_deep(&"a{".repeat(n)).is_some());
        assert!(too_deep(&"a{".repeat(MAX_NESTING)).is_none());
        assert!(too_deep(&"/*".repeat(n)).is_some());
        assert!(too_deep(&format!("{}x{}", "/*".repeat(n - 1), "*/".repeat(n - 1))).is_none());
        let p = too_deep(&format!("x {}", "{ n ".repeat(n))).unwrap();
        assert_eq!(p.span.offset, 2 + 4 * MAX_NESTING);
    }

    #[test]
    fn invalid_utf8_is_located() {
        let d = text("s.kdl", b"stack \"a\"\nx \xff\n".to_vec()).unwrap_err();
        assert_eq!(d.line_col(d.problems[0].span.offset), (2, 3));
    }
}
