//! The relay's configuration file (KDL, like stack.kdl), read by `soul relay serve`:
//!
//! ```kdl
//! listen "0.0.0.0:7000"            // devices and agents, one port
//! status "127.0.0.1:7001"          // `soul relay status` reads it (loopback by default)
//! allow "home" key="ed25519:…"     // one per stack: `soul relay allow` prints the line
//! limits sessions-per-stack=256 ready=4 idle-timeout="5m"
//! ```
//!
//! Only public keys live here: the file lets a stack's agents register and nothing else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kdl::{KdlNode, KdlValue};

use super::wire;
use crate::stack::{Diagnostics, Problem, Span, StackError, is_name};

/// What a relay serves and whom it lets in.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub status: Option<SocketAddr>,
    /// Stack name → the agent key allowed to register its sidecars.
    pub allow: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    pub limits: Limits,
}

/// What one stack or one client may hold, so that none starves the others.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Registered sidecars per stack.
    pub sidecars_per_stack: usize,
    /// Spliced device connections open per stack.
    pub sessions_per_stack: usize,
    /// Spliced device connections open per stack from one source address, so that one
    /// client cannot take a stack's whole share.
    pub sessions_per_source: usize,
    /// Ready data channels an agent is asked to keep (and twice that, the most kept per
    /// sidecar); 0 keeps none, and each session waits for the agent to open one.
    pub ready: usize,
    /// Device connections waiting for a data channel, per sidecar.
    pub waiting_per_sidecar: usize,
    /// Connections from one source address that have not yet said where they go.
    pub pending_per_source: usize,
    /// Connections, all sources together, that have not yet said where they go.
    pub pending_total: usize,
    /// A session with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long a connection may take to say where it goes (its ClientHello or agent hello).
    pub hello_timeout: Duration,
    /// How long a device waits for a data channel.
    pub open_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            sidecars_per_stack: 32,
            sessions_per_stack: 256,
            sessions_per_source: 64,
            ready: 4,
            waiting_per_sidecar: 64,
            pending_per_source: 64,
            pending_total: 2048,
            idle_timeout: Duration::from_secs(300),
            hello_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
        }
    }
}

/// The default port, for devices and agents.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7000";
/// The default status address: loopback only.
pub const DEFAULT_STATUS: &str = "127.0.0.1:7001";

impl RelayConfig {
    /// Reads and checks the file at `path`; every problem is reported with its line and column.
    pub fn load(path: &Path) -> Result<RelayConfig, StackError> {
        let source = crate::stack::read_source(path)?;
        RelayConfig::parse(&path.display().to_string(), &source).map_err(StackError::Invalid)
    }

    pub fn parse(path: &str, source: &str) -> Result<RelayConfig, Diagnostics> {
        let invalid = |problems: Vec<Problem>| Diagnostics {
            path: path.to_string(),
            source: Arc::new(source.to_string()),
            problems,
        };
        let doc = crate::stack::document(source).map_err(invalid)?;
        let mut problems = Vec::new();
        let mut cfg = RelayConfig {
            listen: DEFAULT_LISTEN.parse().expect("a socket address"),
            status: Some(DEFAULT_STATUS.parse().expect("a socket address")),
            allow: BTreeMap::new(),
            limits: Limits::default(),
        };
        for node in doc.nodes() {
            let at = Span::from(node.name().span());
            match node.name().value() {
                "listen" => match address_arg(node) {
                    Ok(a) => cfg.listen = a,
                    Err(p) => problems.push(p),
                },
                "status" => match node.entries().first().map(|e| e.value()) {
                    Some(KdlValue::Bool(false)) => cfg.status = None,
                    _ => match address_arg(node) {
                        Ok(a) => cfg.status = Some(a),
                        Err(p) => problems.push(p),
                    },
                },
                "allow" => match allow(node, &is_name) {
                    Ok((stack, key)) => {
                        if cfg.allow.insert(stack.clone(), key).is_some() {
                            problems.push(
                                Problem::new(at, format!("stack `{stack}` is allowed twice"))
                                    .help("a stack registers with one agent key: keep one `allow` line per stack"),
                            );
                        }
                    }
                    Err(p) => problems.push(p),
                },
                "limits" => limits(node, &mut cfg.limits, &mut problems),
                other => problems.push(
                    Problem::new(at, format!("unknown node `{other}`"))
                        .help("a relay file has `listen`, `status`, `allow` and `limits`"),
                ),
            }
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(invalid(problems))
        }
    }
}

fn node_span(node: &KdlNode) -> Span {
    Span::from(node.span())
}

fn address_arg(node: &KdlNode) -> Result<SocketAddr, Problem> {
    let name = node.name().value();
    let entry = node.entries().first().filter(|e| e.name().is_none());
    let text = entry.and_then(|e| e.value().as_string());
    let span = entry.map_or_else(|| node_span(node), |e| Span::from(e.span()));
    text.and_then(|t| t.parse().ok()).ok_or_else(|| {
        Problem::new(span, format!("`{name}` takes an address and port"))
            .help(format!("for example `{name} \"0.0.0.0:7000\"`"))
    })
}

fn allow(
    node: &KdlNode,
    is_name: &impl Fn(&str) -> bool,
) -> Result<(String, ed25519_dalek::VerifyingKey), Problem> {
    let help = "`soul relay allow` on the stack's machine prints the line: allow \"home\" key=\"ed25519:…\"";
    let stack = node
        .entries()
        .iter()
        .find(|e| e.name().is_none())
        .and_then(|e| e.value().as_string())
        .filter(|s| is_name(s))
        .ok_or_else(|| {
            Problem::new(node_span(node), "`allow` needs the stack's name").help(help)
        })?;
    let key_entry = node
        .entries()
        .iter()
        .find(|e| e.name().map(|n| n.value()) == Some("key"));
    let key = key_entry
        .and_then(|e| e.value().as_string())
        .and_then(wire::parse_public)
        .ok_or_else(|| {
            let span = key_entry.map_or_else(|| node_span(node), |e| Span::from(e.span()));
            Problem::new(
                span,
                format!("`allow \"{stack}\"` needs key=\"ed25519:…\", the stack's agent key"),
            )
            .help(help)
        })?;
    Ok((stack.to_string(), key))
}

fn limits(node: &KdlNode, limits: &mut Limits, problems: &mut Vec<Problem>) {
    for entry in node.entries() {
        let span = Span::from(entry.span());
        let Some(name) = entry.name().map(|n| n.value()) else {
            problems.push(Problem::new(
                span,
                "`limits` takes only properties, like ready=4",
            ));
            continue;
        };
        let count = || {
            entry
                .value()
                .as_integer()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| (1..=1_000_000).contains(n))
        };
        let duration = || {
            entry
                .value()
                .as_string()
                .and_then(crate::stack::parse_duration)
                .filter(|d| !d.is_zero())
        };
        let ok = match name {
            "sidecars-per-stack" => count().map(|n| limits.sidecars_per_stack = n),
            "sessions-per-stack" => count().map(|n| limits.sessions_per_stack = n),
            "sessions-per-source" => count().map(|n| limits.sessions_per_source = n),
            // 0: no pool; every session waits for the agent to open a channel.
            "ready" => entry
                .value()
                .as_integer()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n <= 64)
                .map(|n| limits.ready = n),
            "waiting-per-sidecar" => count().map(|n| limits.waiting_per_sidecar = n),
            "pending-per-source" => count().map(|n| limits.pending_per_source = n),
            "pending-total" => count().map(|n| limits.pending_total = n),
            "idle-timeout" => duration().map(|d| limits.idle_timeout = d),
            "hello-timeout" => duration().map(|d| limits.hello_timeout = d),
            "open-timeout" => duration().map(|d| limits.open_timeout = d),
            other => {
                problems.push(Problem::new(span, format!("unknown limit `{other}`")).help(
                    "limits are sidecars-per-stack, sessions-per-stack, sessions-per-source, ready, waiting-per-sidecar, pending-per-source, pending-total (counts) and idle-timeout, hello-timeout, open-timeout (durations like \"30s\")",
                ));
                Some(())
            }
        };
        if ok.is_none() {
            problems.push(Problem::new(
                span,
                format!("`{name}` must be a count from 1 to 1000000 (`ready`: 0 to 64) or, for a timeout, a duration like \"30s\""),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_text() -> String {
        wire::AgentKey::from_seed([1; 32]).public()
    }

    #[test]
    fn a_relay_file_reads_with_defaults() {
        let src = format!(
            "listen \"127.0.0.1:7100\"\nallow \"home\" key=\"{}\"\nlimits ready=2 idle-timeout=\"30s\"\n",
            key_text()
        );
        let cfg = RelayConfig::parse("relay.kdl", &src).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(cfg.status, Some(DEFAULT_STATUS.parse().unwrap()));
        assert!(cfg.allow.contains_key("home"));
        assert_eq!(cfg.limits.ready, 2);
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(cfg.limits.sessions_per_stack, 256);
        let off = RelayConfig::parse("relay.kdl", "status #false\n").unwrap();
        assert_eq!(off.status, None);
    }

    #[test]
    fn every_problem_in_a_relay_file_is_reported_where_it_is() {
        let src = format!(
            "listen \"nowhere\"\nallow \"home\" key=\"ed25519:short\"\nallow \"Bad Name\" key=\"{k}\"\nallow \"w\" key=\"{k}\"\nallow \"w\" key=\"{k}\"\nlimits ready=65 bogus=1\nlisten2\n",
            k = key_text()
        );
        let err = RelayConfig::parse("relay.kdl", &src).unwrap_err();
        let lines: Vec<usize> = err
            .problems
            .iter()
            .map(|p| err.line_col(p.span.offset).0)
            .collect();
        assert_eq!(lines, vec![1, 2, 3, 5, 6, 6, 7], "{}", err.render(false));
        let text = err.render(false);
        assert!(text.contains("relay.kdl"), "{text}");
        assert!(text.contains("allowed twice"), "{text}");
        assert!(text.contains("soul relay allow"), "{text}");
    }
}
