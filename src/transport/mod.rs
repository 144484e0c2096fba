//! Transports: how a client reaches each pod. Every transport leads to the pod's gate port,
//! never to the app's. The LAN ([`lan`]) and the relay endpoint need no container; each
//! overlay is a [`Driver`] in a file of its own that owns its whole transport: the containers
//! it adds to a pod, the files it writes into the state dir, what it needs from the machine,
//! the UDP ports the pod's guard opens for it, and where its current address can be read.
//! Tailscale and Headscale share one driver ([`tailnet`]); Nebula and Tor have theirs.
//!
//! A new transport is a file here, its node in the stack model (`stack::model`, which the
//! schema is generated from), a line in [`drivers`], and its tests.

mod lan;
mod nebula;
mod tailnet;
mod tor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::machine::Machine;
use crate::pairing::Address;
use crate::pod::{ContainerSpec, NamedVolume, Role};
use crate::stack::{Sidecar, Stack, TransportKind};

pub use lan::{discover_lan_address, lan_host};
pub use nebula::{DEFAULT_NEBULA_IMAGE, NebulaDriver};
pub use tailnet::{DEFAULT_TAILSCALE_IMAGE, TailnetDriver, login_url};
pub use tor::{DEFAULT_TOR_IMAGE, TorDriver};

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

/// What a transport needs from this machine and does not find there; checked before apply
/// changes anything (not at validate time, so a stack validates on a laptop that lacks the
/// server's secrets).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A `*-file=` names a file this machine does not have.
    #[error(
        "transport `{node}`: {property} {path} does not exist on this machine; put the secret there (mode 0600) or fix the path in stack.kdl"
    )]
    MissingFile {
        node: String,
        property: String,
        path: PathBuf,
    },
    /// A kernel-mode overlay needs /dev/net/tun, which the machine lacks.
    #[error("transport `{node}` needs /dev/net/tun, and this machine has none; {fix}")]
    NoTun { node: String, fix: String },
}

/// One overlay transport.
pub trait Driver {
    fn kind(&self) -> TransportKind;
    /// The role of the container that carries it in each pod.
    fn role(&self) -> Role;
    /// What it needs from the machine: the files it names, a tun device.
    fn check_machine(&self, _machine: &dyn Machine) -> Result<(), MachineError> {
        Ok(())
    }
    /// UDP ports the pod's guard lets in from outside for it (the gate's TCP port always is).
    fn guard_udp(&self) -> Vec<u16> {
        Vec::new()
    }
    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution;
}

/// The overlay drivers a stack declares (and soul implements).
pub fn drivers(stack: &Stack) -> Vec<Box<dyn Driver>> {
    let mut out: Vec<Box<dyn Driver>> = Vec::new();
    for tailnet in TailnetDriver::declared(stack) {
        out.push(Box::new(tailnet));
    }
    if let Some(n) = NebulaDriver::declared(stack) {
        out.push(Box::new(n));
    }
    if let Some(tor) = TorDriver::declared(stack) {
        out.push(Box::new(tor));
    }
    out
}

/// The role of the container that carries `kind` in each pod: the pause container publishes
/// the LAN port, an overlay has its driver's container, and the gate runs the relay's agent.
pub fn carrier(stack: &Stack, kind: TransportKind) -> Option<Role> {
    match kind {
        TransportKind::Lan => Some(Role::Pause),
        TransportKind::Relay => Some(Role::Gate),
        overlay => drivers(stack)
            .iter()
            .find(|d| d.kind() == overlay)
            .map(|d| d.role()),
    }
}

/// Overlay addresses read from the pods: (sidecar, transport) → (host, port).
pub type Discovered = BTreeMap<(String, TransportKind), (String, u16)>;

/// Every sidecar's known addresses, in the stack's transport order. Transports whose address
/// is not known (yet) are left out.
pub fn addresses(
    stack: &Stack,
    lan_host: Option<&str>,
    discovered: &Discovered,
) -> Vec<Vec<Address>> {
    let lan_ports = stack.lan_ports();
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
                        // Overlays and the relay: only what the pods say now.
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
    use crate::pod::NetworkMode;

    #[test]
    fn addresses_follow_the_order_and_the_lan_ports_and_the_relay_only_while_registered() {
        let stack = crate::stack::parse(
            "s",
            "stack \"h\"\nsidecar \"a\" { image \"i\"; port 1; }\nsidecar \"b\" { image \"i\"; port 1; }\ntransport { order \"relay\" \"tor\" \"lan\"; lan port=9000 address=\"10.0.0.5\"; tor; }\nrelay \"r.example:7000\" pin=\"sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=\"\n",
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let host = lan_host(&stack);
        assert_eq!(host.as_deref(), Some("10.0.0.5"));
        let mut found = Discovered::new();
        found.insert(("b".into(), TransportKind::Tor), ("x.onion".into(), 8443));
        // Only b's agent is registered at the relay: a's codes do not advertise it.
        found.insert(
            ("b".into(), TransportKind::Relay),
            ("r.example".into(), 7000),
        );
        let a = addresses(&stack, host.as_deref(), &found);
        let text: Vec<Vec<String>> = a
            .iter()
            .map(|v| v.iter().map(|x| x.to_string()).collect())
            .collect();
        assert_eq!(
            text,
            vec![
                vec!["lan:10.0.0.5:9000".to_string()],
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
