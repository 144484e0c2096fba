//! The relay's configuration file (KDL, like stack.kdl), read by `soul relay serve`:
//!
//! ```kdl
//! listen "0.0.0.0:7000"            // devices and agents, one port
//! status "127.0.0.1:7001"          // `soul relay status` reads it (loopback by default)
//! allow "home" key="ed25519:…"     // one per stack: `soul relay allow` prints the line
//! limits sessions-per-stack=256 ready=4 idle-timeout="5m"
//! domain "relay.example.com"       // public names: <label>.relay.example.com (wildcard DNS)
//! ```
//!
//! With a `domain`, a stack's sidecars may claim public names under it (a browser reaches
//! them with a real certificate the gate holds); `allow … names="notes-home *-home"` limits
//! which labels a stack may claim (default: `*-<stack>`, a label ending in `-<stack>`).
//!
//! Only public keys live here: the file lets a stack's agents register and nothing else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kdl::{KdlNode, KdlValue};

use super::wire;
use crate::stack::{Diagnostics, Problem, Span, StackError, is_dns_label, is_domain, is_name};

/// What a relay serves and whom it lets in.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub status: Option<SocketAddr>,
    /// Stack name → the agent key allowed to register its sidecars.
    pub allow: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    /// Stack name → the labels of public names it may claim (`notes-home`, or `*-home` for
    /// any label ending so); a stack without an entry may claim `*-<stack>`.
    pub names: BTreeMap<String, Vec<String>>,
    /// The domain public names are under (`<label>.<domain>`), when the relay gives any.
    pub domain: Option<String>,
    pub limits: Limits,
}

impl RelayConfig {
    /// The stack that may claim the public name `name` for one of its sidecars, when `name`
    /// is `<label>.<domain>` and the label is one `stack` may claim.
    pub fn may_claim(&self, stack: &str, name: &str) -> bool {
        let Some(domain) = &self.domain else {
            return false;
        };
        let Some(label) = name
            .strip_suffix(domain.as_str())
            .and_then(|l| l.strip_suffix('.'))
        else {
            return false;
        };
        if !is_dns_label(label) {
            return false;
        }
        let default = [format!("*-{stack}")];
        let patterns = self.names.get(stack).map_or(&default[..], |v| &v[..]);
        patterns.iter().any(|p| match p.strip_prefix('*') {
            Some(suffix) => label.len() > suffix.len() && label.ends_with(suffix),
            None => p == label,
        })
    }
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
            names: BTreeMap::new(),
            domain: None,
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
                "domain" => {
                    let entry = node.entries().first().filter(|e| e.name().is_none());
                    match entry.and_then(|e| e.value().as_string()) {
                        Some(d) if is_domain(d) => cfg.domain = Some(d.to_string()),
                        _ => problems.push(
                            Problem::new(
                                entry.map_or(at, |e| Span::from(e.span())),
                                "`domain` takes a lowercase DNS name with at least two labels",
                            )
                            .help("for example `domain \"relay.example.com\"`, with a wildcard DNS record `*.relay.example.com` pointing at this machine"),
                        ),
                    }
                }
                "allow" => match allow(node, &is_name) {
                    Ok((stack, key, names)) => {
                        if let Some(names) = names {
                            cfg.names.insert(stack.clone(), names);
                        }
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
                other => {
                    problems.push(Problem::new(at, format!("unknown node `{other}`")).help(
                        "a relay file has `listen`, `status`, `allow`, `limits` and `domain`",
                    ))
                }
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

/// An `allow` line: the stack, its agent key, and the public-name labels it may claim.
type Allowed = (String, ed25519_dalek::VerifyingKey, Option<Vec<String>>);

fn allow(node: &KdlNode, is_name: &impl Fn(&str) -> bool) -> Result<Allowed, Problem> {
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
    let names = match node
        .entries()
        .iter()
        .find(|e| e.name().map(|n| n.value()) == Some("names"))
    {
        None => None,
        Some(entry) => {
            let list: Vec<String> = entry
                .value()
                .as_string()
                .unwrap_or_default()
                .split([' ', ','])
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            let valid = |l: &String| is_dns_label(l.strip_prefix('*').unwrap_or(l));
            if list.is_empty() || !list.iter().all(valid) {
                return Err(Problem::new(
                    Span::from(entry.span()),
                    format!("`names` of `allow \"{stack}\"` must list DNS labels, each maybe starting with `*`"),
                )
                .help(format!("for example names=\"notes-{stack} *-{stack}\"")));
            }
            Some(list)
        }
    };
    Ok((stack.to_string(), key, names))
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
    fn a_stack_claims_only_the_public_names_its_allow_line_gives_it() {
        let src = format!(
            "domain \"relay.test\"\nallow \"home\" key=\"{k}\"\nallow \"c\" key=\"{k}\"\nallow \"friend\" key=\"{k}\" names=\"blog-friend, cal\"\n",
            k = key_text()
        );
        let cfg = RelayConfig::parse("relay.kdl", &src).unwrap();
        assert!(cfg.may_claim("home", "notes-home.relay.test"));
        assert!(!cfg.may_claim("home", "notes-friend.relay.test"));
        assert!(!cfg.may_claim("home", "-home.relay.test"));
        assert!(!cfg.may_claim("home", "notes-home.other.test"));
        assert!(!cfg.may_claim("home", "a.notes-home.relay.test"));
        assert!(!cfg.may_claim("home", "notes-homerelay.test"));
        assert!(cfg.may_claim("friend", "blog-friend.relay.test"));
        assert!(cfg.may_claim("friend", "cal.relay.test"));
        assert!(!cfg.may_claim("friend", "notes-friend.relay.test"));
        let none = RelayConfig::parse("relay.kdl", "").unwrap();
        assert!(!none.may_claim("home", "notes-home.relay.test"));
        let bad = RelayConfig::parse(
            "relay.kdl",
            &format!(
                "domain \"Relay\"\nallow \"x\" key=\"{}\" names=\"a b.c\"\n",
                key_text()
            ),
        )
        .unwrap_err();
        assert_eq!(bad.problems.len(), 2, "{}", bad.render(false));
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
