//! Tailscale, or Headscale (the same client with `--login-server`): containerboot in the pod's
//! namespace. The auth key goes in as a file (`TS_AUTHKEY=file:…`), never in the environment;
//! the node's state lives on a named volume (else every restart makes a new node), one per
//! identity (tags, control server) since a logged-in node keeps its first; a serve config soul
//! writes forwards the tailnet port over TCP to the pod.

use super::{AddressSource, Contribution, Driver, MachineError, PodContext};
use crate::machine::Machine;
use crate::pod::{ContainerSpec, HealthCheck, NamedVolume, Role};
use crate::stack::{Stack, Tailscale, TransportKind, default_tailnet_hostname};

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

    /// The volume of the node's state, named after what its control server knows it by. With
    /// `TS_AUTH_ONCE`, containerboot runs `tailscale up` (which takes the tags and the login
    /// server) only on a node's first start; later starts run `tailscale set`, which takes
    /// neither. So a node keeps its first tags and control server for as long as its state
    /// lives: a change of either must make a new node, with state of its own. The old volume is
    /// kept (and `plan` and `apply` say so), never removed but by `soul down --volumes`.
    pub fn node_volume(&self, stack: &str, sidecar: &str) -> NamedVolume {
        use sha2::Digest as _;
        let base = NamedVolume::state(stack, sidecar, self.kind.as_str());
        if self.tags.is_none() && self.login_server.is_none() {
            return base;
        }
        let mut tags: Vec<&str> = self.tags.iter().flat_map(|t| t.split(',')).collect();
        tags.sort_unstable();
        tags.dedup();
        let server = self
            .login_server
            .as_deref()
            .unwrap_or("")
            .trim_end_matches('/');
        let identity = sha2::Sha256::digest(format!("{server}\n{}", tags.join(",")));
        let name = format!("{}-{}", base.name, hex::encode(&identity[..4]));
        // No fallback to an older name: that volume holds a node of another identity.
        NamedVolume {
            legacy: name.clone(),
            name,
        }
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
        let volume = self.node_volume(stack, sidecar);
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
                    .unwrap_or_else(|| default_tailnet_hostname(stack, sidecar)),
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
            .volume(&volume.name, Self::STATE)
            // The directory, not the file: containerboot watches it and reloads a changed
            // serve config by itself (so its content is not part of the container's config
            // hash: a change does not restart the node), and soul's atomic renames stay
            // visible through a directory mount.
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

/// The login URL a tailnet node's log shows while it waits for someone to open it: the newest
/// that `tailscale up` printed ("To authenticate, visit:" and the URL on a line of its own),
/// unless the node started since (containerboot's "Startup complete").
pub fn login_url<'a>(log: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let (mut url, mut asked) = (None, false);
    for line in log {
        let line = line.trim();
        if line.contains("To authenticate, visit") {
            asked = true;
        } else if asked && let Some(at) = line.find("https://") {
            url = line[at..].split_whitespace().next().map(String::from);
            asked = false;
        } else if line.contains("Startup complete") {
            url = None;
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::ContainerSpec;

    fn stack(transport: &str) -> Stack {
        crate::stack::parse(
            "stack.kdl",
            &format!(
                "stack \"home\"\nsidecar \"tv-\" {{ image \"i\"; port 8096; }}\ntransport {{ {transport} }}\n"
            ),
        )
        .unwrap_or_else(|d| panic!("{d}"))
    }

    fn node(transport: &str, gate_port: u16) -> (ContainerSpec, String, String) {
        let stack = stack(transport);
        let driver = TailnetDriver::declared(&stack).pop().unwrap();
        let ctx = PodContext {
            gate_port,
            ..PodContext::of(&stack, &stack.sidecars[0], std::path::Path::new("/state"))
        };
        let mut c = driver.contribute(&ctx);
        let serve = String::from_utf8(c.files.pop().unwrap().1).unwrap();
        (
            c.containers.pop().unwrap(),
            c.volumes.pop().unwrap().name,
            serve,
        )
    }

    /// What containerboot and `tailscale up` print without an auth key, then after a login.
    #[test]
    fn the_login_url_is_the_newest_one_until_the_node_starts() {
        let waiting = [
            "boot: 2026/12/07 10:00:00 Starting tailscaled",
            "boot: 2026/12/07 10:00:01 Running 'tailscale up'",
            "To authenticate, visit:",
            "",
            "\thttps://login.tailscale.com/a/1f2e3d4c5b",
            "",
            "To authenticate, visit:",
            "",
            "\thttps://login.tailscale.com/a/9a8b7c6d5e",
        ];
        assert_eq!(
            login_url(waiting).as_deref(),
            Some("https://login.tailscale.com/a/9a8b7c6d5e")
        );
        let started = waiting.iter().copied().chain([
            "Success.",
            "boot: 2026/12/07 10:01:00 Startup complete, waiting for shutdown signal",
        ]);
        assert_eq!(login_url(started), None);
        assert_eq!(
            login_url(["boot: Startup complete", "serving https://x"]),
            None
        );
    }

    fn env(spec: &ContainerSpec, name: &str) -> Option<String> {
        spec.env.get(name).map(|v| v.value.clone())
    }

    #[test]
    fn the_default_hostname_of_a_sidecar_ending_in_a_dash_is_one_the_client_takes() {
        let (spec, _, _) = node("tailscale authkey-file=\"/k\"", 8443);
        let hostname = env(&spec, "TS_HOSTNAME").unwrap();
        assert!(crate::stack::is_tailnet_hostname(&hostname), "{hostname}");
        assert!(hostname.starts_with("home-tv-"), "{hostname}");
    }

    /// containerboot reloads TS_SERVE_CONFIG's file by itself: a changed serve config is
    /// rewritten, and the node is not restarted for it.
    #[test]
    fn a_changed_serve_config_does_not_restart_the_node() {
        let (a, _, serve_a) = node("tailscale authkey-file=\"/k\"", 8443);
        let (b, _, serve_b) = node("tailscale authkey-file=\"/k\"", 9443);
        assert_ne!(serve_a, serve_b);
        assert_eq!(a.config_hash(), b.config_hash());
    }

    /// With TS_AUTH_ONCE, a logged-in node never runs `tailscale up` again, which alone takes
    /// the tags and the login server: each identity gets a state of its own.
    #[test]
    fn a_change_of_tags_or_login_server_makes_a_new_node_state_and_the_same_identity_the_same() {
        let plain = node("tailscale authkey-file=\"/k\"", 8443).1;
        let tagged = node("tailscale authkey-file=\"/k\" tags=\"tag:a,tag:b\"", 8443).1;
        let reordered = node("tailscale authkey-file=\"/k\" tags=\"tag:b,tag:a\"", 8443).1;
        let retagged = node("tailscale authkey-file=\"/k\" tags=\"tag:a\"", 8443).1;
        let hs = node(
            "headscale url=\"https://hs.example.com\" authkey-file=\"/k\"",
            8443,
        )
        .1;
        let hs_slash = node(
            "headscale url=\"https://hs.example.com/\" authkey-file=\"/k\"",
            8443,
        )
        .1;
        let hs_other = node(
            "headscale url=\"https://hs2.example.com\" authkey-file=\"/k\"",
            8443,
        )
        .1;
        assert_eq!(
            plain, "soul-state_home_tv-_tailscale",
            "an untagged node keeps its volume"
        );
        assert_eq!(tagged, reordered);
        assert_eq!(hs, hs_slash);
        let all = [&plain, &tagged, &retagged, &hs, &hs_other];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
