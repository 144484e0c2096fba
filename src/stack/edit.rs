//! Format-preserving edits of stack.kdl: the file is changed only at the spans that must
//! change, so comments and layout survive and the diff is what the user would have typed.

use kdl::KdlDocument;

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
