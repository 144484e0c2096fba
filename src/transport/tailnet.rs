//! Tailscale, or Headscale (the same client with `--login-server`): containerboot in the pod's
//! namespace. The auth key goes in as a file (`TS_AUTHKEY=file:…`), never in the environment;
//! the node's state lives on a named volume (else every restart makes a new node); a serve
//! config soul writes forwards the tailnet port over TCP to the pod.

use super::{AddressSource, Contribution, Driver, MachineError, PodContext};
use crate::machine::Machine;
use crate::pod::{ContainerSpec, HealthCheck, NamedVolume, Role};
use crate::stack::{Stack, Tailscale, TransportKind};

/// The image the Tailscale and Headscale transports run when `image=` is not set.
pub const DEFAULT_TAILSCALE_IMAGE: &str = "tailscale/tailscale:stable";

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

    /// The drivers of the stack's `tailscale` and `headscale` nodes, those it has.
    pub fn declared(stack: &Stack) -> Vec<TailnetDriver> {
        let Some(t) = stack.transport.as_ref() else {
            return Vec::new();
        };
        let tailscale = t
            .tailscale
            .as_ref()
            .map(|ts| Self::of(TransportKind::Tailscale, ts, None));
        let headscale = t
            .headscale
            .as_ref()
            .map(|hs| Self::of(TransportKind::Headscale, &hs.node, Some(hs.url.clone())));
        tailscale.into_iter().chain(headscale).collect()
    }

    fn of(kind: TransportKind, node: &Tailscale, login_server: Option<String>) -> TailnetDriver {
        TailnetDriver {
            kind,
            image: node
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_TAILSCALE_IMAGE.to_string()),
            authkey_file: node.authkey_file.clone(),
            tags: node.tags.clone(),
            hostname: node.hostname.clone(),
            userspace: node.userspace,
            login_server,
        }
    }

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

    fn role(&self) -> Role {
        Role::Tailscale
    }

    /// The auth key file it names, and `/dev/net/tun` in kernel mode on a local engine (a
    /// remote engine's machine is not this one).
    fn check_machine(&self, machine: &dyn Machine) -> Result<(), MachineError> {
        let node = self.kind.as_str();
        if let Some(path) = &self.authkey_file
            && !machine.exists(path)
        {
            return Err(MachineError::MissingFile {
                node: node.into(),
                property: "authkey-file".into(),
                path: path.into(),
            });
        }
        let local_engine = machine
            .env_var("DOCKER_HOST")
            .is_none_or(|h| h.starts_with("unix://"));
        if !self.userspace && local_engine && !machine.exists("/dev/net/tun") {
            return Err(MachineError::NoTun {
                node: node.into(),
                fix: format!(
                    "set `userspace #true` inside `{node} {{ … }}` in stack.kdl, or load the tun module (`modprobe tun`)"
                ),
            });
        }
        Ok(())
    }

    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution {
        let (stack, sidecar) = (&ctx.stack.stack, &ctx.sidecar.name);
        let kind = self.kind.as_str();
        let serve = Self::serve_config(ctx.gate_port, &self.shadowed_ports(ctx));
        let config_dir = crate::state::layout::transport(sidecar, kind);
        let volume = NamedVolume::state(stack, sidecar, kind);
        let mut extra = Vec::new();
        if let Some(url) = &self.login_server {
            extra.push(format!("--login-server={url}"));
        }
        if let Some(tags) = &self.tags {
            extra.push(format!("--advertise-tags={tags}"));
        }
        let mut spec = ContainerSpec::in_pod(stack, sidecar, Role::Tailscale, &self.image)
            .env(
                "TS_HOSTNAME",
                self.hostname
                    .clone()
                    .unwrap_or_else(|| format!("{stack}-{sidecar}")),
            )
            .env("TS_STATE_DIR", Self::STATE)
            .env("TS_AUTH_ONCE", "true")
            .env("TS_USERSPACE", self.userspace.to_string())
            .env("TS_ENABLE_HEALTH_CHECK", "true")
            .env(
                "TS_LOCAL_ADDR_PORT",
                format!("127.0.0.1:{}", Self::HEALTH_PORT),
            )
            .env(
                "TS_SERVE_CONFIG",
                format!("{}/serve.json", Self::CONFIG_DIR),
            )
            .file_hash("SOUL_SERVE_CONFIG_SHA256", serve.as_bytes())
            .volume(&volume.name, Self::STATE)
            // The directory, not the file: containerboot watches it, and soul's atomic
            // renames stay visible through a directory mount.
            .bind(
                ctx.state_dir.join(&config_dir).display().to_string(),
                Self::CONFIG_DIR,
                true,
            )
            .health(HealthCheck {
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
            });
        if !extra.is_empty() {
            spec = spec.env("TS_EXTRA_ARGS", extra.join(" "));
        }
        if let Some(file) = &self.authkey_file {
            spec = spec
                .env("TS_AUTHKEY", format!("file:{}", Self::AUTHKEY))
                .bind(file.clone(), Self::AUTHKEY, true);
        }
        if !self.userspace {
            spec = spec.privileges("NET_ADMIN", &["/dev/net/tun"]);
        }
        let address = AddressSource::Exec {
            container: spec.name.clone(),
            command: vec!["tailscale".into(), "status".into(), "--json".into()],
            pointer: "/Self/TailscaleIPs/0".into(),
            port: ctx.gate_port,
        };
        Contribution {
            containers: vec![spec],
            files: vec![(format!("{config_dir}/serve.json"), serve.into_bytes())],
            volumes: vec![volume],
            address: Some(address),
        }
    }
}
