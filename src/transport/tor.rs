//! Tor: an onion service in the pod's namespace, with a torrc soul writes and its keys on a
//! named volume (the onion address is state: never removed by apply). Needs nothing from the
//! machine, and nothing opened in the pod's guard: tor only dials out.

use super::{AddressSource, Contribution, Driver, PodContext};
use crate::pod::{ContainerSpec, NamedVolume, Role};
use crate::stack::{Stack, TransportKind};

/// The image the Tor transport runs when `tor image=` is not set.
pub const DEFAULT_TOR_IMAGE: &str = "osminogin/tor-simple:latest";

pub struct TorDriver {
    pub image: String,
}

impl TorDriver {
    const STATE: &str = "/var/lib/tor";
    const HOSTNAME: &str = "/var/lib/tor/onion/hostname";
    const TORRC: &str = "/etc/soul/torrc";

    /// The driver of the stack's `tor` node, when it has one.
    pub fn declared(stack: &Stack) -> Option<TorDriver> {
        let tor = stack.transport.as_ref()?.tor.as_ref()?;
        Some(TorDriver {
            image: tor
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_TOR_IMAGE.to_string()),
        })
    }

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

    fn role(&self) -> Role {
        Role::Tor
    }

    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution {
        let (stack, sidecar) = (&ctx.stack.stack, &ctx.sidecar.name);
        let torrc = Self::torrc(ctx);
        let torrc_path = crate::state::layout::transport(sidecar, "torrc");
        let volume = NamedVolume::state(stack, sidecar, "tor");
        let spec = ContainerSpec::in_pod(stack, sidecar, Role::Tor, &self.image)
            .command(["tor", "-f", Self::TORRC])
            .file_hash("SOUL_TORRC_SHA256", torrc.as_bytes())
            .bind(
                ctx.state_dir.join(&torrc_path).display().to_string(),
                Self::TORRC,
                true,
            )
            .volume(&volume.name, Self::STATE);
        let address = AddressSource::ContainerFile {
            container: spec.name.clone(),
            path: Self::HOSTNAME.into(),
            port: ctx.gate_port,
        };
        Contribution {
            containers: vec![spec],
            files: vec![(torrc_path, torrc.into_bytes())],
            volumes: vec![volume],
            address: Some(address),
        }
    }
}
