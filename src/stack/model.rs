//! The typed model of stack.kdl. Serde names are the format's names; schemars derives the
//! JSON Schema committed as `schema/stack.schema.json` from these types.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Names of stacks, sidecars and devices: they become parts of container and file names.
pub const NAME_PATTERN: &str = r"^[a-z][a-z0-9-]{0,31}$";

/// Whether `s` is a name by [`NAME_PATTERN`]: the one check for names that come from
/// anywhere but stack.kdl (a relay's file, a pairing code), so that what becomes part of a
/// file or container name is always what the format allows.
pub fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `label` is one DNS label as soul makes them: 1 to 63 lowercase letters, digits and
/// dashes, neither first nor last a dash.
pub fn is_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Whether the Tailscale CLI takes `name` as a node's hostname (its `dnsname.ValidHostname` for
/// one label): 1–63 letters, digits and `-`, not starting or ending with `-`. Letters may be
/// upper case (MagicDNS lowers them).
pub fn is_tailnet_hostname(name: &str) -> bool {
    is_dns_label(&name.to_ascii_lowercase())
}

/// Why `tailscale up --advertise-tags=<tags>` would refuse `tags`, as containerboot passes it
/// (`TS_EXTRA_ARGS` split on whitespace, the flag's value split on commas, each checked as the
/// CLI checks a tag: `tag:` and a name of letters, digits and `-` starting with a letter).
pub fn tailscale_tags_problem(tags: &str) -> Option<String> {
    if tags.chars().any(char::is_whitespace) {
        let joined = tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        return Some(format!(
            "tags hold a space, which splits the flag containerboot passes to `tailscale up`: write `{joined}`"
        ));
    }
    for tag in tags.split(',') {
        let Some(name) = tag.strip_prefix("tag:") else {
            return Some(format!("`{tag}` does not start with `tag:`"));
        };
        if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Some(format!(
                "`{tag}`: a tag's name starts with a letter after `tag:`"
            ));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Some(format!(
                "`{tag}`: a tag's name holds only letters, digits and `-`"
            ));
        }
    }
    None
}

/// The tailnet hostname a sidecar's node asks for when `hostname` is not set: `<stack>-<sidecar>`
/// when that is a valid one ([`is_tailnet_hostname`]); else (longer than 63 characters, or a
/// sidecar name ending in `-`) its first 54 characters without trailing `-`, then `-` and a
/// hash of the whole, so that it is valid and two sidecars' names stay apart.
pub fn default_tailnet_hostname(stack: &str, sidecar: &str) -> String {
    use sha2::Digest as _;
    let whole = format!("{stack}-{sidecar}");
    if is_tailnet_hostname(&whole) {
        return whole;
    }
    let hash = hex::encode(&sha2::Sha256::digest(whole.as_bytes())[..4]);
    let head = &whole[..whole.len().min(54)];
    format!("{}-{hash}", head.trim_end_matches('-'))
}

/// Whether `domain` is a DNS name of labels ([`is_dns_label`]), at least two of them.
pub fn is_domain(domain: &str) -> bool {
    domain.len() <= 200 && domain.split('.').count() >= 2 && domain.split('.').all(is_dns_label)
}

/// A TLS key's pin: `sha256//` and the base64 of 32 bytes (curl's `--pinnedpubkey` form).
pub const PIN_PATTERN: &str = r"^sha256//[A-Za-z0-9+/]{43}=$";
/// Durations such as `"500ms"`, `"10s"`, `"5m"`, `"2h"`, `"90d"`.
pub const DURATION_PATTERN: &str = r"^[0-9]+(ms|s|m|h|d)$";
/// The gate's port inside the pod when `gate port=` is absent.
pub const DEFAULT_GATE_PORT: u16 = 8443;

/// A whole stack.kdl: one stack, its sidecars, how they are reached and who may get in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[schemars(title = "soul stack.kdl (format v1)")]
pub struct Stack {
    /// `stack "home"`: the stack's name.
    #[schemars(pattern(NAME_PATTERN))]
    pub stack: String,
    /// `sidecar "name" { … }`: one pod each.
    #[schemars(length(min = 1))]
    pub sidecars: Vec<Sidecar>,
    /// `gate port=8443`.
    #[serde(default)]
    pub gate: Gate,
    /// `transport { … }`: absent means the LAN alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Transport")]
    pub transport: Option<Transport>,
    /// `relay "host:port" pin="sha256//…"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Relay")]
    pub relay: Option<Relay>,
    /// `acme directory="…" ca-file="…"`: the CA of the public names (`relay … public=#true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Acme")]
    pub acme: Option<Acme>,
    /// `secret-generation 1`: bump to rotate the stack key.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub secret_generation: u64,
    /// `device "name"`: the devices allowed in.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Where this stack's `stack.lock` is (beside the file it was loaded from); not part of
    /// the format.
    #[serde(skip)]
    #[schemars(skip)]
    pub lock_file: Option<std::path::PathBuf>,
}

fn one() -> u64 {
    1
}

/// One service: becomes one pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Sidecar {
    #[schemars(pattern(NAME_PATTERN))]
    pub name: String,
    /// The app's image reference.
    #[schemars(length(min = 1))]
    pub image: String,
    /// The app's port inside the pod.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Replaces the image's CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Health")]
    pub health: Option<Health>,
    /// This sidecar's host port on the LAN (otherwise derived from `lan port=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub lan_port: Option<u16>,
}

/// `env "NAME" "value"`, `env "NAME" file="/path"` or `env "NAME" from-env="VAR"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EnvVar {
    #[schemars(pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
}

/// Where an environment variable's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource<'a> {
    Literal(&'a str),
    File(&'a str),
    FromEnv(&'a str),
}

impl EnvVar {
    /// The value's source; validation guarantees exactly one is set.
    pub fn source(&self) -> EnvSource<'_> {
        match (&self.value, &self.file, &self.from_env) {
            (_, Some(f), _) => EnvSource::File(f),
            (_, _, Some(v)) => EnvSource::FromEnv(v),
            (v, _, _) => EnvSource::Literal(v.as_deref().unwrap_or("")),
        }
    }
}

/// `volume "name" "/target"` (named volume) or `volume "/host/path" "/target"` (bind mount).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Volume {
    #[schemars(length(min = 1))]
    pub source: String,
    #[schemars(pattern(r"^/"))]
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
    /// `external=#true`: the source is an existing Docker volume that soul did not make (from
    /// Compose, say). soul mounts it under exactly that name and never creates, labels or
    /// removes it.
    #[serde(default)]
    pub external: bool,
}

impl Volume {
    /// A host path when the source starts with `/`, a named volume otherwise.
    pub fn is_bind(&self) -> bool {
        self.source.starts_with('/')
    }
}

/// `health "http://…"` or `health cmd="…"`, with timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://"))]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub retries: Option<u32>,
}

/// `gate port=…`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Gate {
    #[serde(default = "default_gate_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Serve TLS only: plain HTTP on the gate port is refused (browsers on the LAN then need
    /// `https://` and accept the self-signed certificate; soul clients pin it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_only: bool,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            port: DEFAULT_GATE_PORT,
            tls_only: false,
        }
    }
}

fn default_gate_port() -> u16 {
    DEFAULT_GATE_PORT
}

/// `transport { … }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Transport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Vec<TransportKind>")]
    pub order: Option<Vec<TransportKind>>,
    /// The transport whose address the QR code's link opens in a browser, when the stack has no
    /// public name (default: the first a browser reaches in `order`, the LAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<TransportKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Lan")]
    pub lan: Option<Lan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Tailscale")]
    pub tailscale: Option<Tailscale>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Headscale")]
    pub headscale: Option<Headscale>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Nebula")]
    pub nebula: Option<Nebula>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Tor")]
    pub tor: Option<Tor>,
}

/// The transports a client can try, in the names `order` uses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    Lan,
    Tailscale,
    Headscale,
    Nebula,
    Tor,
    Relay,
}

impl TransportKind {
    pub const ALL: [TransportKind; 6] = [
        TransportKind::Lan,
        TransportKind::Tailscale,
        TransportKind::Headscale,
        TransportKind::Nebula,
        TransportKind::Tor,
        TransportKind::Relay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Lan => "lan",
            TransportKind::Tailscale => "tailscale",
            TransportKind::Headscale => "headscale",
            TransportKind::Nebula => "nebula",
            TransportKind::Tor => "tor",
            TransportKind::Relay => "relay",
        }
    }
}

/// `lan port=8443 address="192.168.1.20"`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Lan {
    /// Host port of the first sidecar; the rest follow (port+1, …) unless they set `lan-port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Overrides the discovered LAN address in pairing codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// `tailscale authkey-file="…" tags="tag:soul" { userspace #false }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Tailscale {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authkey_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub userspace: bool,
}

/// `headscale url="https://…" authkey-file="…"`.
// A `tailscale` node that joins a Headscale server. serde's `deny_unknown_fields` does not combine
// with `flatten`: unknown properties are refused when stack.kdl is lowered, and by the schema.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(extend("additionalProperties" = false))]
pub struct Headscale {
    #[schemars(pattern(r"^https?://"))]
    pub url: String,
    /// The node's settings, as `tailscale` has them.
    #[serde(flatten)]
    pub node: Tailscale,
}

/// `nebula lighthouse=… lighthouse-ip=… ip=… ca-file=… cert-file=… key-file=…`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Nebula {
    pub lighthouse: String,
    pub lighthouse_ip: String,
    pub ip: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `tor`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Tor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `relay "relay.example.com:7000" pin="sha256//…"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Relay {
    #[schemars(pattern(r"^[^\s:]+:[0-9]{1,5}$"))]
    pub endpoint: String,
    /// The pin of the relay's key (`soul relay status` on the relay shows it): the pods'
    /// agents send nothing to a relay with another key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(PIN_PATTERN))]
    pub pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// `public=#true`: each sidecar gets a public HTTPS name under the relay's domain,
    /// `<sidecar>-<stack>.<domain>`, with a certificate the gate obtains by ACME.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// The relay's domain (its file's `domain`); by default the endpoint's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `acme directory="https://…" ca-file="…"`: where gates with a public name get their
/// certificates (default: Let's Encrypt's production directory) and, for a CA whose directory
/// is not served with a publicly trusted certificate (a test CA), the root to trust for it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Acme {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https://"))]
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// An address the CA may write to about the certificates (`mailto:` is added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
}

/// Let's Encrypt's production ACME directory: where public names get certificates unless
/// `acme directory=` says otherwise.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

impl Relay {
    /// The endpoint's host and port.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let (host, port) = self.endpoint.rsplit_once(':')?;
        Some((host.to_string(), port.parse().ok()?))
    }
}

/// `device "alice-phone" expires="90d" generation=2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Device {
    #[schemars(pattern(NAME_PATTERN))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub expires: Option<String>,
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub generation: u64,
}

impl Stack {
    /// The public HTTPS name of `sidecar` (`<sidecar>-<stack>.<relay's domain>`), when the
    /// stack's relay gives public names (`relay … public=#true`).
    pub fn public_name(&self, sidecar: &str) -> Option<String> {
        let relay = self.relay.as_ref().filter(|r| r.public)?;
        let domain = match &relay.domain {
            Some(d) => d.clone(),
            None => relay.host_port()?.0,
        };
        Some(format!("{sidecar}-{}.{domain}", self.stack))
    }

    /// The transport whose address a browser's pairing link opens (`transport { browser … }`).
    pub fn browser_transport(&self) -> Option<TransportKind> {
        self.transport.as_ref().and_then(|t| t.browser)
    }

    /// The transports in the client's fallback order: `order` when given, else LAN first,
    /// then the overlays, then the relay.
    pub fn transport_order(&self) -> Vec<TransportKind> {
        if let Some(order) = self.transport.as_ref().and_then(|t| t.order.clone()) {
            return order;
        }
        TransportKind::ALL
            .into_iter()
            .filter(|k| self.declares(*k))
            .collect()
    }

    /// Whether a transport is declared (`lan` is implicit when `transport` is absent).
    pub fn declares(&self, kind: TransportKind) -> bool {
        let Some(t) = &self.transport else {
            return kind == TransportKind::Lan
                || (kind == TransportKind::Relay && self.relay.is_some());
        };
        match kind {
            TransportKind::Lan => t.lan.is_some(),
            TransportKind::Tailscale => t.tailscale.is_some(),
            TransportKind::Headscale => t.headscale.is_some(),
            TransportKind::Nebula => t.nebula.is_some(),
            TransportKind::Tor => t.tor.is_some(),
            TransportKind::Relay => self.relay.is_some(),
        }
    }

    /// The host port each sidecar publishes on the LAN, in sidecar order, or `None` for all
    /// when the LAN transport is not declared.
    pub fn lan_ports(&self) -> Option<Vec<u16>> {
        if !self.declares(TransportKind::Lan) {
            return None;
        }
        let base = self
            .transport
            .as_ref()
            .and_then(|t| t.lan.as_ref())
            .and_then(|l| l.port)
            .unwrap_or(self.gate.port);
        let mut next = base;
        Some(
            self.sidecars
                .iter()
                .map(|s| {
                    let port = s.lan_port.unwrap_or(next);
                    next = port.saturating_add(1);
                    port
                })
                .collect(),
        )
    }
}

/// Parses a duration such as `"500ms"`, `"10s"`, `"5m"`, `"2h"` or `"90d"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(
            parse_duration("90d"),
            Some(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("3w"), None);
    }
}
