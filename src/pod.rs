//! The pod's value types: what each container of a pod should be, and the config hash that
//! decides whether an existing container still matches. Pure data; imports nothing of soul's.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Labels soul puts on everything it owns.
pub mod label {
    pub const STACK: &str = "dev.soul.stack";
    pub const SIDECAR: &str = "dev.soul.sidecar";
    pub const ROLE: &str = "dev.soul.role";
    pub const CONFIG_HASH: &str = "dev.soul.config-hash";
    /// The state dir (absolute path) of the run that made the container: its owner.
    pub const STATE_DIR: &str = "dev.soul.state-dir";
    /// On a stack's claim ([`super::claim_name`]): the stack it claims.
    pub const CLAIM: &str = "dev.soul.claim";
}

/// The name of the volume that claims `stack` for one state dir: the engine's one object whose
/// creation only one of two racing state dirs can win (a second create of a volume name returns
/// the first, labels and all). It carries no stack label, so it is no part of the pods.
pub fn claim_name(stack: &str) -> String {
    format!("soul-claim_{stack}")
}

/// What a container does in its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Owns the pod's network namespace and its LAN port mapping.
    Pause,
    /// The user's service.
    App,
    /// `soul gate`: the pod's front door on the gate port; checks device tokens, forwards to
    /// the app on 127.0.0.1.
    Gate,
    /// The Tor transport's onion service.
    Tor,
    /// The Tailscale (or Headscale) transport's node.
    Tailscale,
    /// The Nebula transport's node.
    Nebula,
}

impl Role {
    /// Every role, in the order people read them.
    pub const ALL: [Role; 6] = [
        Role::App,
        Role::Gate,
        Role::Pause,
        Role::Tailscale,
        Role::Nebula,
        Role::Tor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Pause => "pause",
            Role::App => "app",
            Role::Gate => "gate",
            Role::Tor => "tor",
            Role::Tailscale => "tailscale",
            Role::Nebula => "nebula",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pod: a bridge network and the containers sharing the pause container's namespace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodSpec {
    pub sidecar: String,
    pub network: String,
    /// The pause container first, then its dependents.
    pub containers: Vec<ContainerSpec>,
}

/// How a container is attached to the network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// On the pod's bridge network (the pause container).
    Bridge(String),
    /// In another container's namespace (`container:<name>`).
    Container(String),
}

/// A host port published to a port inside the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMap {
    pub host: u16,
    pub container: u16,
}

/// A mount: a named volume or a host path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Mount {
    pub kind: MountKind,
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountKind {
    Volume,
    Bind,
}

/// A Docker health check.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// `["CMD", …]` or `["CMD-SHELL", "…"]`.
    pub test: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
}

/// An environment value. Values read from files or soul's environment are sensitive: they
/// are passed to Docker and feed the config hash, but serialize and print as `MASKED`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EnvValue {
    pub value: String,
    pub sensitive: bool,
}

impl Serialize for EnvValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.sensitive {
            s.serialize_str("MASKED")
        } else {
            s.serialize_str(&self.value)
        }
    }
}

impl fmt::Debug for EnvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sensitive {
            f.write_str("MASKED")
        } else {
            write!(f, "{:?}", self.value)
        }
    }
}

/// Everything soul decides about one container. Its hash is the `dev.soul.config-hash` label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerSpec {
    pub name: String,
    pub stack: String,
    pub sidecar: String,
    pub role: Role,
    pub image: String,
    /// Replaces the image's CMD when set.
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, EnvValue>,
    pub mounts: Vec<Mount>,
    pub network_mode: NetworkMode,
    pub ports: Vec<PortMap>,
    pub health: Option<HealthCheck>,
    pub restart: String,
    /// Linux capabilities added (`NET_ADMIN` for kernel-mode overlays).
    pub cap_add: Vec<String>,
    /// Host devices passed in (`/dev/net/tun`).
    pub devices: Vec<String>,
}

/// How Docker restarts every container soul makes.
pub const RESTART_POLICY: &str = "unless-stopped";

/// Builds the [`ContainerSpec`]s of a pod, one call per thing a container needs. Field values
/// (and the order of mounts) are what the spec, and so its config hash, is made of: a builder
/// call that changes them recreates the containers it builds.
impl ContainerSpec {
    /// A container of `role` in `sidecar`'s pod: named by [`container_name`], joined to the
    /// pause container's namespace, restarted unless stopped, and nothing else yet.
    pub fn in_pod(stack: &str, sidecar: &str, role: Role, image: impl Into<String>) -> Self {
        ContainerSpec {
            name: container_name(stack, sidecar, role),
            stack: stack.to_string(),
            sidecar: sidecar.to_string(),
            role,
            image: image.into(),
            command: None,
            env: BTreeMap::new(),
            mounts: Vec::new(),
            network_mode: NetworkMode::Container(container_name(stack, sidecar, Role::Pause)),
            ports: Vec::new(),
            health: None,
            restart: RESTART_POLICY.into(),
            cap_add: Vec::new(),
            devices: Vec::new(),
        }
    }

    /// On the bridge network `network` instead (the pause container), publishing `ports`.
    pub fn on_network(mut self, network: &str, ports: Vec<PortMap>) -> Self {
        self.network_mode = NetworkMode::Bridge(network.to_string());
        self.ports = ports;
        self
    }

    /// Replaces the image's CMD.
    pub fn command<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.command = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// A plain (not sensitive) environment variable.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.insert(
            name.to_string(),
            EnvValue {
                value: value.into(),
                sensitive: false,
            },
        );
        self
    }

    /// The SHA-256 of a file the container reads through a bind mount, in the variable `name`:
    /// the file's content is not in the spec, so its hash is, and a changed file recreates
    /// the container.
    pub fn file_hash(self, name: &str, content: &[u8]) -> Self {
        let hash = hex::encode(Sha256::digest(content));
        self.env(name, hash)
    }

    /// A host path bind-mounted at `target`.
    pub fn bind(mut self, source: impl Into<String>, target: &str, read_only: bool) -> Self {
        self.mounts.push(Mount {
            kind: MountKind::Bind,
            source: source.into(),
            target: target.to_string(),
            read_only,
        });
        self
    }

    /// The named volume `name` mounted read-write at `target`.
    pub fn volume(mut self, name: &str, target: &str) -> Self {
        self.mounts.push(Mount {
            kind: MountKind::Volume,
            source: name.to_string(),
            target: target.to_string(),
            read_only: false,
        });
        self
    }

    pub fn health(mut self, check: HealthCheck) -> Self {
        self.health = Some(check);
        self
    }

    /// A Linux capability and the host devices a kernel-mode overlay needs with it.
    pub fn privileges(mut self, capability: &str, devices: &[&str]) -> Self {
        self.cap_add.push(capability.to_string());
        self.devices.extend(devices.iter().map(|d| d.to_string()));
        self
    }
}

impl ContainerSpec {
    /// SHA-256 over the whole spec (image reference, command, env, mounts, network mode,
    /// ports, health check, restart policy), hex-encoded and cut to 16 bytes. Sensitive env
    /// values serialize masked, so they are fed to the hash separately: a changed secret
    /// recreates the container.
    pub fn config_hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(serde_json::to_vec(self).unwrap_or_default());
        for (name, v) in self.env.iter().filter(|(_, v)| v.sensitive) {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(v.value.as_bytes());
            hasher.update([0]);
        }
        let digest = hasher.finalize();
        hex::encode(&digest[..16])
    }

    /// The labels soul sets on this container, the config hash among them.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (label::STACK.into(), self.stack.clone()),
            (label::SIDECAR.into(), self.sidecar.clone()),
            (label::ROLE.into(), self.role.as_str().into()),
            (label::CONFIG_HASH.into(), self.config_hash()),
        ])
    }
}

/// The kinds of object soul names on the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    Container,
    Network,
    Volume,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Container => "container",
            ObjectKind::Network => "network",
            ObjectKind::Volume => "volume",
        })
    }
}

// Names on the engine. Stack and sidecar names hold only `[a-z0-9-]`, so `_` cannot occur in
// them and separates the parts unambiguously: no two (stack, sidecar, role) share a name, and no
// two stacks share a volume (soul 0.1 joined them with `-`, so stack `a` sidecar `b-c` and stack
// `a-b` sidecar `c` collided).

/// `soul_<stack>_<sidecar>_<role>`.
pub fn container_name(stack: &str, sidecar: &str, role: Role) -> String {
    format!("soul_{stack}_{sidecar}_{role}")
}

/// The role a [`container_name`] names (`_` occurs in no stack or sidecar name, so the last
/// part is the role).
pub fn role_in_name(name: &str) -> Option<Role> {
    let (_, role) = name.strip_prefix("soul_")?.rsplit_once('_')?;
    Role::parse(role)
}

/// The sidecar a [`container_name`] of `stack` names.
pub fn sidecar_in_name<'a>(stack: &str, name: &'a str) -> Option<&'a str> {
    let rest = name
        .strip_prefix("soul_")?
        .strip_prefix(stack)?
        .strip_prefix('_')?;
    rest.rsplit_once('_').map(|(sidecar, _)| sidecar)
}

/// `soul_<stack>`: the stack's bridge network, which every pause container joins. One per
/// stack, as Compose makes one per project: a network per pod would take one of the engine's
/// few address pools each (about 30 by default, shared by every project on the engine). Pods
/// still share nothing but the bridge, and each pod's guard admits only its gate port.
pub fn network_name(stack: &str) -> String {
    format!("soul_{stack}")
}

/// A named volume soul makes for a stack, and the name soul 0.1 gave it: a volume made under
/// that name keeps being used (it holds the user's data) until it is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedVolume {
    /// The Docker name.
    pub name: String,
    /// soul 0.1's name for the same volume.
    pub legacy: String,
}

impl NamedVolume {
    /// `soul_<stack>_<name>`: a volume stack.kdl names, shared by the sidecars that mount it.
    /// The name may hold `_` and `.`; the stack cannot, so the stack part is unambiguous.
    pub fn declared(stack: &str, name: &str) -> NamedVolume {
        NamedVolume {
            name: format!("soul_{stack}_{name}"),
            legacy: format!("soul-{stack}-{name}"),
        }
    }

    /// `soul-state_<stack>_<sidecar>_<what>`: a pod's own state (the gate's, an overlay's).
    /// The prefix keeps these apart from every declared volume's name.
    pub fn state(stack: &str, sidecar: &str, what: &str) -> NamedVolume {
        NamedVolume {
            name: format!("soul-state_{stack}_{sidecar}_{what}"),
            legacy: format!("soul-{stack}-{sidecar}-{what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: container_name("home", "notes", Role::App),
            stack: "home".into(),
            sidecar: "notes".into(),
            role: Role::App,
            image: "nginx:1".into(),
            command: None,
            env: BTreeMap::from([(
                "TZ".into(),
                EnvValue {
                    value: "UTC".into(),
                    sensitive: false,
                },
            )]),
            mounts: vec![],
            network_mode: NetworkMode::Container("soul_home_notes_pause".into()),
            ports: vec![],
            health: None,
            restart: "unless-stopped".into(),
            cap_add: vec![],
            devices: vec![],
        }
    }

    #[test]
    fn names_of_different_stacks_never_collide() {
        // soul 0.1: stack `rel7` sidecar `x-y` and stack `rel7-x` sidecar `y` shared names.
        assert_ne!(
            container_name("rel7", "x-y", Role::App),
            container_name("rel7-x", "y", Role::App)
        );
        assert_ne!(network_name("rel7"), network_name("rel7-x"));
        assert_ne!(
            NamedVolume::declared("rel7", "x-data").name,
            NamedVolume::declared("rel7-x", "data").name
        );
        assert_ne!(
            NamedVolume::declared("home", "notes_gate").name,
            NamedVolume::state("home", "notes", "gate").name
        );
        assert_eq!(
            NamedVolume::state("home", "notes", "gate").legacy,
            "soul-home-notes-gate"
        );
    }

    #[test]
    fn hash_is_stable_and_sensitive_to_every_field() {
        let a = spec();
        assert_eq!(a.config_hash(), spec().config_hash());
        assert_eq!(a.config_hash().len(), 32);
        let mut b = spec();
        if let Some(v) = b.env.get_mut("TZ") {
            v.value = "Europe/Berlin".into();
        }
        assert_ne!(a.config_hash(), b.config_hash());
        let mut c = spec();
        c.image = "nginx:2".into();
        assert_ne!(a.config_hash(), c.config_hash());
        let mut d = spec();
        d.ports.push(PortMap {
            host: 1,
            container: 2,
        });
        assert_ne!(a.config_hash(), d.config_hash());
    }

    #[test]
    fn sensitive_env_is_masked_but_hashed() {
        let v = EnvValue {
            value: "hunter2".into(),
            sensitive: true,
        };
        assert_eq!(format!("{v:?}"), "MASKED");
        let mut a = spec();
        a.env.insert("DB".into(), v);
        assert!(!serde_json::to_string(&a).unwrap().contains("hunter2"));
        let mut b = a.clone();
        if let Some(v) = b.env.get_mut("DB") {
            v.value = "hunter3".into();
        }
        assert_ne!(a.config_hash(), b.config_hash());
    }
}
