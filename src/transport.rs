//! Transports: how a client reaches each pod. The LAN (this host's address, or
//! `lan address=`) and the relay endpoint need no container; overlay transports are drivers
//! that add containers to the pod, write the files they need into the state dir, and say
//! where their current address can be read: Tailscale and Headscale, Nebula and Tor. Every
//! transport leads to the pod's gate port, never to the app's.

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::pairing::Address;
use crate::pod::{ContainerSpec, Mount, MountKind, NamedVolume, NetworkMode, Role, container_name};
use crate::stack::{Sidecar, Stack, TransportKind};

/// The image the Tor transport runs when `tor image=` is not set.
pub const DEFAULT_TOR_IMAGE: &str = "osminogin/tor-simple:latest";
/// The image the Nebula transport runs when `nebula image=` is not set.
pub const DEFAULT_NEBULA_IMAGE: &str = "nebulaoss/nebula:latest";
/// The image the Tailscale and Headscale transports run when `image=` is not set.
pub const DEFAULT_TAILSCALE_IMAGE: &str = "tailscale/tailscale:stable";

/// What a driver needs to know about the pod it joins.
pub struct PodContext<'a> {
    pub stack: &'a Stack,
    pub sidecar: &'a Sidecar,
    /// Absolute path of the stack's state dir (files are bind-mounted from it).
    pub state_dir: &'a Path,
    /// The pod's gate port: what every transport forwards to inside the pod, and the port
    /// clients dial on overlays.
    pub gate_port: u16,
}

impl<'a> PodContext<'a> {
    /// The context of one sidecar's pod: transports lead to the gate, never to the app.
    pub fn of(stack: &'a Stack, sidecar: &'a Sidecar, state_dir: &'a Path) -> PodContext<'a> {
        PodContext {
            stack,
            sidecar,
            state_dir,
            gate_port: stack.gate.port,
        }
    }
}

/// Where a transport's current address can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressSource {
    /// A file inside one of the pod's containers, holding the host; clients use `port`.
    ContainerFile {
        container: String,
        path: String,
        port: u16,
    },
    /// A command run in one of the pod's containers that prints JSON; the host is the string
    /// at `pointer` (RFC 6901), e.g. `tailscale status --json` → `/Self/TailscaleIPs/0`.
    Exec {
        container: String,
        command: Vec<String>,
        pointer: String,
        port: u16,
    },
    /// Known from the stack itself (Nebula's certificate IP).
    Static { host: String, port: u16 },
}

impl AddressSource {
    /// The host in a command's JSON output.
    pub fn host_in_json(output: &str, pointer: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(output).ok()?;
        v.pointer(pointer)?.as_str().map(String::from)
    }
}

/// What one overlay transport adds to one pod.
#[derive(Debug, Clone, Default)]
pub struct Contribution {
    pub containers: Vec<ContainerSpec>,
    /// State-dir files: (path relative to the state dir, bytes).
    pub files: Vec<(String, Vec<u8>)>,
    /// Named volumes its containers mount; state that apply never removes.
    pub volumes: Vec<NamedVolume>,
    pub address: Option<AddressSource>,
}

/// One overlay transport.
pub trait Driver {
    fn kind(&self) -> TransportKind;
    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution;
}

/// The overlay drivers a stack declares (and soul implements).
pub fn drivers(stack: &Stack) -> Vec<Box<dyn Driver>> {
    let mut out: Vec<Box<dyn Driver>> = Vec::new();
    let transport = stack.transport.as_ref();
    if let Some(ts) = transport.and_then(|t| t.tailscale.as_ref()) {
        out.push(Box::new(TailnetDriver {
            kind: TransportKind::Tailscale,
            image: ts
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_TAILSCALE_IMAGE.to_string()),
            authkey_file: ts.authkey_file.clone(),
            tags: ts.tags.clone(),
            hostname: ts.hostname.clone(),
            userspace: ts.userspace,
            login_server: None,
        }));
    }
    if let Some(hs) = transport.and_then(|t| t.headscale.as_ref()) {
        out.push(Box::new(TailnetDriver {
            kind: TransportKind::Headscale,
            image: hs
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_TAILSCALE_IMAGE.to_string()),
            authkey_file: hs.authkey_file.clone(),
            tags: hs.tags.clone(),
            hostname: hs.hostname.clone(),
            userspace: hs.userspace,
            login_server: Some(hs.url.clone()),
        }));
    }
    if let Some(n) = transport.and_then(|t| t.nebula.as_ref()) {
        out.push(Box::new(NebulaDriver {
            image: n
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_NEBULA_IMAGE.to_string()),
            node: n.clone(),
        }));
    }
    if let Some(tor) = transport.and_then(|t| t.tor.as_ref()) {
        out.push(Box::new(TorDriver {
            image: tor
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_TOR_IMAGE.to_string()),
        }));
    }
    out
}

/// Tor: an onion service in the pod's namespace, with a torrc soul writes and its keys on a
/// named volume (the onion address is state: never removed by apply).
pub struct TorDriver {
    pub image: String,
}

impl TorDriver {
    const STATE: &str = "/var/lib/tor";
    const HOSTNAME: &str = "/var/lib/tor/onion/hostname";
    const TORRC: &str = "/etc/soul/torrc";

    fn torrc(ctx: &PodContext<'_>) -> String {
        format!(
            "# Written by soul for stack `{}`, sidecar `{}`; soul rewrites it, edit stack.kdl instead.\n\
             DataDirectory /var/lib/tor/data\n\
             HiddenServiceDir /var/lib/tor/onion\n\
             HiddenServicePort {gate} 127.0.0.1:{gate}\n\
             SocksPort 0\n\
             Log notice stdout\n",
            ctx.stack.stack,
            ctx.sidecar.name,
            gate = ctx.gate_port
        )
    }
}

impl Driver for TorDriver {
    fn kind(&self) -> TransportKind {
        TransportKind::Tor
    }

    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution {
        let stack = &ctx.stack.stack;
        let sidecar = &ctx.sidecar.name;
        let torrc = Self::torrc(ctx);
        let torrc_path = format!("transports/{sidecar}/torrc");
        let volume = NamedVolume::state(stack, sidecar, "tor");
        let name = container_name(stack, sidecar, Role::Tor);
        let spec = ContainerSpec {
            name: name.clone(),
            stack: stack.clone(),
            sidecar: sidecar.clone(),
            role: Role::Tor,
            image: self.image.clone(),
            command: Some(vec!["tor".into(), "-f".into(), Self::TORRC.into()]),
            // The torrc is a bind mount: its content is not in the spec, so its hash is, and a
            // changed torrc recreates the container.
            env: [(
                "SOUL_TORRC_SHA256".to_string(),
                crate::pod::EnvValue {
                    value: crate::state::hex(&Sha256::digest(torrc.as_bytes())),
                    sensitive: false,
                },
            )]
            .into_iter()
            .collect(),
            mounts: vec![
                Mount {
                    kind: MountKind::Bind,
                    source: ctx.state_dir.join(&torrc_path).display().to_string(),
                    target: Self::TORRC.into(),
                    read_only: true,
                },
                Mount {
                    kind: MountKind::Volume,
                    source: volume.name.clone(),
                    target: Self::STATE.into(),
                    read_only: false,
                },
            ],
            network_mode: NetworkMode::Container(container_name(stack, sidecar, Role::Pause)),
            ports: vec![],
            health: None,
            restart: crate::reconcile::RESTART_POLICY.into(),
            cap_add: vec![],
            devices: vec![],
        };
        Contribution {
            containers: vec![spec],
            files: vec![(torrc_path, torrc.into_bytes())],
            volumes: vec![volume],
            address: Some(AddressSource::ContainerFile {
                container: name,
                path: Self::HOSTNAME.into(),
                port: ctx.gate_port,
            }),
        }
    }
}

/// Tailscale, or Headscale (the same client with `--login-server`): containerboot in the pod's
/// namespace. The auth key goes in as a file (`TS_AUTHKEY=file:…`), never in the environment;
/// the node's state lives on a named volume (else every restart makes a new node); a serve
/// config soul writes forwards the tailnet port over TCP to the pod.
pub struct TailnetDriver {
    pub kind: TransportKind,
    pub image: String,
    pub authkey_file: Option<String>,
    pub tags: Option<String>,
    pub hostname: Option<String>,
    pub userspace: bool,
    /// Headscale's URL.
    pub login_server: Option<String>,
}

impl TailnetDriver {
    pub const AUTHKEY: &str = "/run/secrets/soul/authkey";
    pub const STATE: &str = "/var/lib/tailscale";
    pub const CONFIG_DIR: &str = "/config";
    /// containerboot's health endpoint (`TS_LOCAL_ADDR_PORT`), on 127.0.0.1 in the pod.
    pub const HEALTH_PORT: u16 = 41234;

    /// The serve config: a TCP forward of the tailnet's gate port to the pod's gate, and of
    /// each of `shadowed` to the gate as well (see [`Self::shadowed_ports`]).
    pub fn serve_config(gate_port: u16, shadowed: &[u16]) -> String {
        let to_gate = serde_json::json!({ "TCPForward": format!("127.0.0.1:{gate_port}") });
        let mut tcp = serde_json::Map::new();
        for port in std::iter::once(gate_port).chain(shadowed.iter().copied()) {
            tcp.insert(port.to_string(), to_gate.clone());
        }
        let v = serde_json::json!({ "TCP": tcp });
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Ports of the pod a tailnet peer could otherwise reach around the gate. In userspace
    /// mode tailscaled forwards every tailnet connection that serve does not handle to
    /// `127.0.0.1:<same port>`, from inside the pod, where the pod's guard (which refuses only
    /// traffic from outside the namespace) cannot tell it from the pod's own: so the app's port
    /// and tailscaled's health port are served too, by the gate. Kernel mode needs none: its
    /// packets arrive on `tailscale0` and the guard refuses them.
    fn shadowed_ports(&self, ctx: &PodContext<'_>) -> Vec<u16> {
        if !self.userspace {
            return Vec::new();
        }
        [ctx.sidecar.port, Self::HEALTH_PORT]
            .into_iter()
            .filter(|p| *p != ctx.gate_port)
            .collect()
    }
}

impl Driver for TailnetDriver {
    fn kind(&self) -> TransportKind {
        self.kind
    }

    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution {
        let stack = &ctx.stack.stack;
        let sidecar = &ctx.sidecar.name;
        let kind = self.kind.as_str();
        let serve = Self::serve_config(ctx.gate_port, &self.shadowed_ports(ctx));
        let config_dir = format!("transports/{sidecar}/{kind}");
        let volume = NamedVolume::state(stack, sidecar, kind);
        let name = container_name(stack, sidecar, Role::Tailscale);
        let mut extra = Vec::new();
        if let Some(url) = &self.login_server {
            extra.push(format!("--login-server={url}"));
        }
        if let Some(tags) = &self.tags {
            extra.push(format!("--advertise-tags={tags}"));
        }
        let plain = |v: String| crate::pod::EnvValue {
            value: v,
            sensitive: false,
        };
        let mut env: std::collections::BTreeMap<String, crate::pod::EnvValue> = [
            (
                "TS_HOSTNAME",
                self.hostname
                    .clone()
                    .unwrap_or_else(|| format!("{stack}-{sidecar}")),
            ),
            ("TS_STATE_DIR", Self::STATE.to_string()),
            ("TS_AUTH_ONCE", "true".into()),
            ("TS_USERSPACE", self.userspace.to_string()),
            ("TS_ENABLE_HEALTH_CHECK", "true".into()),
            (
                "TS_LOCAL_ADDR_PORT",
                format!("127.0.0.1:{}", Self::HEALTH_PORT),
            ),
            (
                "TS_SERVE_CONFIG",
                format!("{}/serve.json", Self::CONFIG_DIR),
            ),
            (
                "SOUL_SERVE_CONFIG_SHA256",
                crate::state::hex(&Sha256::digest(serve.as_bytes())),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), plain(v)))
        .collect();
        if !extra.is_empty() {
            env.insert("TS_EXTRA_ARGS".into(), plain(extra.join(" ")));
        }
        let mut mounts = vec![
            Mount {
                kind: MountKind::Volume,
                source: volume.name.clone(),
                target: Self::STATE.into(),
                read_only: false,
            },
            // The directory, not the file: containerboot watches it, and soul's atomic
            // renames stay visible through a directory mount.
            Mount {
                kind: MountKind::Bind,
                source: ctx.state_dir.join(&config_dir).display().to_string(),
                target: Self::CONFIG_DIR.into(),
                read_only: true,
            },
        ];
        if let Some(file) = &self.authkey_file {
            env.insert(
                "TS_AUTHKEY".into(),
                plain(format!("file:{}", Self::AUTHKEY)),
            );
            mounts.push(Mount {
                kind: MountKind::Bind,
                source: file.clone(),
                target: Self::AUTHKEY.into(),
                read_only: true,
            });
        }
        let (cap_add, devices) = if self.userspace {
            (vec![], vec![])
        } else {
            (
                vec!["NET_ADMIN".to_string()],
                vec!["/dev/net/tun".to_string()],
            )
        };
        let spec = ContainerSpec {
            name: name.clone(),
            stack: stack.clone(),
            sidecar: sidecar.clone(),
            role: Role::Tailscale,
            image: self.image.clone(),
            command: None,
            env,
            mounts,
            network_mode: NetworkMode::Container(container_name(stack, sidecar, Role::Pause)),
            ports: vec![],
            health: Some(crate::pod::HealthCheck {
                test: vec![
                    "CMD".into(),
                    "wget".into(),
                    "-q".into(),
                    "--spider".into(),
                    format!("http://127.0.0.1:{}/healthz", Self::HEALTH_PORT),
                ],
                interval_ms: 30_000,
                timeout_ms: 10_000,
                retries: 3,
            }),
            restart: crate::reconcile::RESTART_POLICY.into(),
            cap_add,
            devices,
        };
        Contribution {
            containers: vec![spec],
            files: vec![(format!("{config_dir}/serve.json"), serve.into_bytes())],
            volumes: vec![volume],
            address: Some(AddressSource::Exec {
                container: name,
                command: vec!["tailscale".into(), "status".into(), "--json".into()],
                pointer: "/Self/TailscaleIPs/0".into(),
                port: ctx.gate_port,
            }),
        }
    }
}

/// Nebula: the node joins the overlay with the certificate the stack names; soul writes its
/// config (lighthouse, tun, and a firewall whose inbound rules admit only the pod's port).
pub struct NebulaDriver {
    pub image: String,
    /// The `nebula` node as declared (lighthouse, overlay IP with prefix, pki files).
    pub node: crate::stack::Nebula,
}

impl NebulaDriver {
    pub const CONFIG_DIR: &str = "/etc/soul/nebula";
    pub const PKI: &str = "/etc/soul/pki";
    /// Nebula's UDP port in the pod (nebula's default): fixed, so that the pod's guard can
    /// admit peers' handshakes to it and nothing else.
    pub const LISTEN_PORT: u16 = 4242;

    /// The overlay IP without its prefix.
    pub fn host(&self) -> &str {
        self.node.ip.split('/').next().unwrap_or(&self.node.ip)
    }

    pub fn config(&self, port: u16) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        format!(
            "# Written by soul; soul rewrites it, edit stack.kdl instead.\n\
             pki:\n  ca: {pki}/ca.crt\n  cert: {pki}/host.crt\n  key: {pki}/host.key\n\
             static_host_map:\n  {lh_ip}: [{lh}]\n\
             lighthouse:\n  am_lighthouse: false\n  interval: 60\n  hosts: [{lh_ip}]\n\
             listen:\n  host: 0.0.0.0\n  port: {listen}\n\
             punchy:\n  punch: true\n\
             tun:\n  dev: nebula1\n  mtu: 1300\n\
             logging:\n  level: info\n\
             firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n\
             \x20 inbound:\n    # Only the pod's gate port: nothing else in the pod is reachable over Nebula.\n\
             \x20   - port: {port}\n      proto: tcp\n      host: any\n",
            pki = Self::PKI,
            listen = Self::LISTEN_PORT,
            lh_ip = q(&self.node.lighthouse_ip),
            lh = q(&self.node.lighthouse),
        )
    }
}

impl Driver for NebulaDriver {
    fn kind(&self) -> TransportKind {
        TransportKind::Nebula
    }

    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution {
        let stack = &ctx.stack.stack;
        let sidecar = &ctx.sidecar.name;
        // Nebula has no port forwarding: clients dial the overlay IP at the gate port.
        let port = ctx.gate_port;
        let config = self.config(port);
        let config_dir = format!("transports/{sidecar}/nebula");
        let name = container_name(stack, sidecar, Role::Nebula);
        let bind = |source: &str, target: String| Mount {
            kind: MountKind::Bind,
            source: source.to_string(),
            target,
            read_only: true,
        };
        let spec = ContainerSpec {
            name,
            stack: stack.clone(),
            sidecar: sidecar.clone(),
            role: Role::Nebula,
            image: self.image.clone(),
            command: Some(vec![
                "nebula".into(),
                "-config".into(),
                format!("{}/config.yml", Self::CONFIG_DIR),
            ]),
            env: [(
                "SOUL_NEBULA_CONFIG_SHA256".to_string(),
                crate::pod::EnvValue {
                    value: crate::state::hex(&Sha256::digest(config.as_bytes())),
                    sensitive: false,
                },
            )]
            .into_iter()
            .collect(),
            mounts: vec![
                bind(
                    &ctx.state_dir.join(&config_dir).display().to_string(),
                    Self::CONFIG_DIR.into(),
                ),
                bind(&self.node.ca_file, format!("{}/ca.crt", Self::PKI)),
                bind(&self.node.cert_file, format!("{}/host.crt", Self::PKI)),
                bind(&self.node.key_file, format!("{}/host.key", Self::PKI)),
            ],
            network_mode: NetworkMode::Container(container_name(stack, sidecar, Role::Pause)),
            ports: vec![],
            health: None,
            restart: crate::reconcile::RESTART_POLICY.into(),
            cap_add: vec!["NET_ADMIN".into()],
            devices: vec!["/dev/net/tun".into()],
        };
        Contribution {
            containers: vec![spec],
            files: vec![(format!("{config_dir}/config.yml"), config.into_bytes())],
            volumes: vec![],
            address: Some(AddressSource::Static {
                host: self.host().to_string(),
                port,
            }),
        }
    }
}

/// Overlay addresses read from the pods: (sidecar, transport) → (host, port).
pub type Discovered = BTreeMap<(String, TransportKind), (String, u16)>;

/// This host's primary non-loopback address: the source address the kernel would use for
/// the default route. A UDP `connect` only consults the routing table; no packet is sent.
pub fn discover_lan_address() -> Option<IpAddr> {
    let probe = |bind: &str, target: &str| {
        let s = UdpSocket::bind(bind).ok()?;
        s.connect(target).ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    };
    // Documentation prefixes (RFC 5737, RFC 3849): a route lookup, never a destination.
    probe("0.0.0.0:0", "198.51.100.1:9").or_else(|| probe("[::]:0", "[2001:db8::1]:9"))
}

/// The LAN host to advertise: `lan address=` when set, else the discovered address.
pub fn lan_host(stack: &Stack) -> Option<String> {
    stack
        .transport
        .as_ref()
        .and_then(|t| t.lan.as_ref())
        .and_then(|l| l.address.clone())
        .or_else(|| discover_lan_address().map(|ip| ip.to_string()))
}

/// Every sidecar's known addresses, in the stack's transport order. Transports whose address
/// is not known (yet) are left out.
pub fn addresses(
    stack: &Stack,
    lan_host: Option<&str>,
    discovered: &Discovered,
) -> Vec<Vec<Address>> {
    let lan_ports = stack.lan_ports();
    let relay = stack.relay.as_ref().and_then(|r| {
        let (host, port) = r.endpoint.rsplit_once(':')?;
        Some((host.to_string(), port.parse::<u16>().ok()?))
    });
    stack
        .sidecars
        .iter()
        .enumerate()
        .map(|(i, sidecar)| {
            stack
                .transport_order()
                .into_iter()
                .filter_map(|kind| {
                    let (host, port) = match kind {
                        TransportKind::Lan => (lan_host?.to_string(), lan_ports.as_ref()?[i]),
                        TransportKind::Relay => relay.clone()?,
                        overlay => discovered.get(&(sidecar.name.clone(), overlay))?.clone(),
                    };
                    Some(Address {
                        transport: kind,
                        host,
                        port,
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_order_and_the_lan_ports() {
        let stack = crate::stack::parse(
            "s",
            "stack \"h\"\nsidecar \"a\" { image \"i\"; port 1; }\nsidecar \"b\" { image \"i\"; port 1; }\ntransport { order \"relay\" \"tor\" \"lan\"; lan port=9000 address=\"10.0.0.5\"; tor; }\nrelay \"r.example:7000\"\n",
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let host = lan_host(&stack);
        assert_eq!(host.as_deref(), Some("10.0.0.5"));
        let mut found = Discovered::new();
        found.insert(("b".into(), TransportKind::Tor), ("x.onion".into(), 8443));
        let a = addresses(&stack, host.as_deref(), &found);
        let text: Vec<Vec<String>> = a
            .iter()
            .map(|v| v.iter().map(|x| x.to_string()).collect())
            .collect();
        assert_eq!(
            text,
            vec![
                vec![
                    "relay:r.example:7000".to_string(),
                    "lan:10.0.0.5:9000".into()
                ],
                vec![
                    "relay:r.example:7000".to_string(),
                    "tor:x.onion:8443".into(),
                    "lan:10.0.0.5:9001".into()
                ],
            ]
        );
        assert!(
            addresses(&stack, None, &found)[0]
                .iter()
                .all(|x| x.transport != TransportKind::Lan)
        );
    }

    #[test]
    fn tor_joins_the_pod_with_its_torrc_and_a_state_volume() {
        let stack = crate::stack::parse(
            "s",
            "stack \"h\"\nsidecar \"notes\" { image \"i\"; port 8080; }\ntransport { tor image=\"my/tor:1\"; }\n",
        )
        .unwrap();
        let ctx = PodContext::of(&stack, &stack.sidecars[0], Path::new("/var/lib/soul/h"));
        let drivers = drivers(&stack);
        assert_eq!(drivers.len(), 1);
        let c = drivers[0].contribute(&ctx);
        let spec = &c.containers[0];
        assert_eq!(spec.name, "soul_h_notes_tor");
        assert_eq!(spec.image, "my/tor:1");
        assert_eq!(
            spec.network_mode,
            NetworkMode::Container("soul_h_notes_pause".into())
        );
        assert_eq!(
            spec.mounts[0].source,
            "/var/lib/soul/h/transports/notes/torrc"
        );
        assert_eq!(c.volumes, vec![NamedVolume::state("h", "notes", "tor")]);
        assert_eq!(c.volumes[0].name, "soul-state_h_notes_tor");
        let torrc = String::from_utf8(c.files[0].1.clone()).unwrap();
        assert!(
            torrc.contains("HiddenServicePort 8443 127.0.0.1:8443\n"),
            "{torrc}"
        );
        assert!(torrc.contains("HiddenServiceDir /var/lib/tor/onion\n"));
        assert_eq!(
            c.address,
            Some(AddressSource::ContainerFile {
                container: "soul_h_notes_tor".into(),
                path: "/var/lib/tor/onion/hostname".into(),
                port: 8443
            })
        );
    }
}
