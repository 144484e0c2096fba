//! `soul bridge init`: chooses the transports of a stack and writes them into stack.kdl,
//! changing only the `transport { … }` block so comments and layout survive, and shows the
//! diff the user will commit. (`bridge status`/`address` report through `transport`.)

use crate::stack::{Diagnostics, Stack, edit::EditError};

/// Why stack.kdl could not take the chosen transports.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Edit(#[from] EditError),
    /// The edited file would not validate: soul never writes one.
    #[error("the edited stack.kdl would not validate:\n{0}")]
    Invalid(Diagnostics),
}

/// stack.kdl with its `transport { … }` block replaced by `choice`'s (the `lan` line kept as
/// it was), validated; and the unified diff against `source` (empty when nothing changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    pub text: String,
    pub diff: String,
}

/// Puts `choice` into the stack file at `path` (for messages), whose text is `source`.
pub fn edit(
    path: &str,
    source: &str,
    stack: &Stack,
    choice: &Choice,
) -> Result<Edited, BridgeError> {
    let lan_line = crate::stack::edit::child_line(source, "transport", "lan");
    let block = transport_block(stack, choice, lan_line.as_deref());
    let text = crate::stack::edit::replace_transport(source, &block)?;
    crate::stack::parse(path, &text).map_err(BridgeError::Invalid)?;
    let diff = diff(path, source, &text);
    Ok(Edited { text, diff })
}

/// The transport a user picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Tailscale {
        authkey_file: String,
        tags: Option<String>,
    },
    Headscale {
        url: String,
        authkey_file: String,
    },
    Nebula {
        lighthouse: String,
        lighthouse_ip: String,
        ip: String,
        ca_file: String,
        cert_file: String,
        key_file: String,
    },
    Tor,
    LanOnly,
}

/// Where auth keys are expected when the user does not say.
pub const DEFAULT_AUTHKEY_FILE: &str = "/run/secrets/tailscale-authkey";

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The new `transport` block: the stack's LAN settings kept (its line verbatim, comment and
/// all, when `lan_line` has it), plus the chosen overlay.
pub fn transport_block(stack: &Stack, choice: &Choice, lan_line: Option<&str>) -> String {
    let lan = stack.transport.as_ref().and_then(|t| t.lan.as_ref());
    let port = lan
        .and_then(|l| l.port)
        .or_else(|| stack.lan_ports().and_then(|p| p.first().copied()))
        .unwrap_or(stack.gate.port);
    let lan_line = match lan_line {
        Some(line) => format!("    {line}"),
        None => {
            let mut l = format!("    lan port={port}");
            if let Some(address) = lan.and_then(|l| l.address.as_deref()) {
                l.push_str(&format!(" address={}", quote(address)));
            }
            l
        }
    };
    let overlay = match choice {
        Choice::Tailscale { authkey_file, tags } => {
            let mut l = format!("    tailscale authkey-file={}", quote(authkey_file));
            if let Some(t) = tags {
                l.push_str(&format!(" tags={}", quote(t)));
            }
            Some(l)
        }
        Choice::Headscale { url, authkey_file } => Some(format!(
            "    headscale url={} authkey-file={}",
            quote(url),
            quote(authkey_file)
        )),
        Choice::Nebula {
            lighthouse,
            lighthouse_ip,
            ip,
            ca_file,
            cert_file,
            key_file,
        } => Some(format!(
            "    nebula lighthouse={} lighthouse-ip={} ip={} ca-file={} cert-file={} key-file={}",
            quote(lighthouse),
            quote(lighthouse_ip),
            quote(ip),
            quote(ca_file),
            quote(cert_file),
            quote(key_file)
        )),
        Choice::Tor => Some("    tor".to_string()),
        Choice::LanOnly => None,
    };
    let mut block = String::from("transport {\n");
    block.push_str(&lan_line);
    block.push('\n');
    if let Some(o) = overlay {
        block.push_str(&o);
        block.push('\n');
    }
    block.push('}');
    block
}

/// The changes between two versions of a file as a unified diff, with three lines of context
/// (what `diff -u` and `git diff` show); empty when nothing changes.
pub fn diff(path: &str, old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(path, path)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_the_lan_settings() {
        let s = crate::stack::parse("s", "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\ntransport { lan port=9000 address=\"10.0.0.2\"; }\n").unwrap();
        let b = transport_block(
            &s,
            &Choice::Headscale {
                url: "https://hs.example.com".into(),
                authkey_file: "/run/secrets/hs".into(),
            },
            None,
        );
        assert_eq!(
            b,
            "transport {\n    lan port=9000 address=\"10.0.0.2\"\n    headscale url=\"https://hs.example.com\" authkey-file=\"/run/secrets/hs\"\n}"
        );
        let implicit = crate::stack::parse(
            "s",
            "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\n",
        )
        .unwrap();
        assert_eq!(
            transport_block(&implicit, &Choice::LanOnly, None),
            "transport {\n    lan port=8443\n}"
        );
        assert_eq!(
            transport_block(&implicit, &Choice::Tor, Some("lan port=1 // mine")),
            "transport {\n    lan port=1 // mine\n    tor\n}"
        );
    }

    #[test]
    fn diff_shows_the_changed_lines_with_three_lines_of_context() {
        let old = "1\n2\n3\n4\n5\nb\nc\nd\n";
        let d = diff("stack.kdl", old, "1\n2\n3\n4\n5\nB\nB2\nd\n");
        assert_eq!(
            d,
            "--- stack.kdl\n+++ stack.kdl\n@@ -3,6 +3,6 @@\n 3\n 4\n 5\n-b\n-c\n+B\n+B2\n d\n"
        );
        assert_eq!(diff("f", "x\n", "x\n"), "");
    }
}
