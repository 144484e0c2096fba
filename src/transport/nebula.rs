//! Nebula: the node joins the overlay with the certificate the stack names; soul writes its
//! config (lighthouse, tun, and a firewall whose inbound rules admit only the pod's gate
//! port), and the pod's guard opens Nebula's UDP port for peers' handshakes.

use super::{AddressSource, Contribution, Driver, MachineError, PodContext};
use crate::machine::Machine;
use crate::pod::{ContainerSpec, Role};
use crate::stack::{Stack, TransportKind};

/// The image the Nebula transport runs when `nebula image=` is not set.
pub const DEFAULT_NEBULA_IMAGE: &str = "nebulaoss/nebula:latest";

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

    /// The driver of the stack's `nebula` node, when it has one.
    pub fn declared(stack: &Stack) -> Option<NebulaDriver> {
        let n = stack.transport.as_ref()?.nebula.as_ref()?;
        Some(NebulaDriver {
            image: n
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_NEBULA_IMAGE.to_string()),
            node: n.clone(),
        })
    }

    /// The overlay IP without its prefix.
    pub fn host(&self) -> &str {
        self.node.ip.split('/').next().unwrap_or(&self.node.ip)
    }

    /// Nebula's config.yml. The pod is behind the engine's NAT: it punches towards peers the
    /// lighthouse names and answers a punch with a handshake of its own (`punchy.respond`), so
    /// a peer that cannot reach the pod first still gets a tunnel. A template with the two
    /// values from stack.kdl quoted as JSON strings
    /// (which YAML reads as the same strings), kept byte-for-byte so the config hash, and with it
    /// the running nebula container, survives upgrades of soul; the test below reads it back
    /// with a YAML parser.
    pub fn config(&self, port: u16) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        format!(
            "# Written by soul; soul rewrites it, edit stack.kdl instead.\n\
             pki:\n  ca: {pki}/ca.crt\n  cert: {pki}/host.crt\n  key: {pki}/host.key\n\
             static_host_map:\n  {lh_ip}: [{lh}]\n\
             lighthouse:\n  am_lighthouse: false\n  interval: 60\n  hosts: [{lh_ip}]\n\
             listen:\n  host: 0.0.0.0\n  port: {listen}\n\
             punchy:\n  punch: true\n  respond: true\n\
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

    fn role(&self) -> Role {
        Role::Nebula
    }

    /// The certificate files it names, and `/dev/net/tun` (Nebula has no userspace mode).
    fn check_machine(&self, machine: &dyn Machine) -> Result<(), MachineError> {
        for (property, path) in [
            ("ca-file", &self.node.ca_file),
            ("cert-file", &self.node.cert_file),
            ("key-file", &self.node.key_file),
        ] {
            if !machine.exists(path) {
                return Err(MachineError::MissingFile {
                    node: "nebula".into(),
                    property: property.into(),
                    path: path.into(),
                });
            }
        }
        if !machine.exists("/dev/net/tun") {
            return Err(MachineError::NoTun {
                node: "nebula".into(),
                fix: "load the tun module (`modprobe tun`) on this machine".into(),
            });
        }
        Ok(())
    }

    fn guard_udp(&self) -> Vec<u16> {
        vec![Self::LISTEN_PORT]
    }

    fn contribute(&self, ctx: &PodContext<'_>) -> Contribution {
        let (stack, sidecar) = (&ctx.stack.stack, &ctx.sidecar.name);
        // Nebula has no port forwarding: clients dial the overlay IP at the gate port.
        let port = ctx.gate_port;
        let config = self.config(port);
        let config_dir = crate::state::layout::transport(sidecar, "nebula");
        let spec = ContainerSpec::in_pod(stack, sidecar, Role::Nebula, &self.image)
            .command([
                "nebula".to_string(),
                "-config".into(),
                format!("{}/config.yml", Self::CONFIG_DIR),
            ])
            .file_hash("SOUL_NEBULA_CONFIG_SHA256", config.as_bytes())
            .bind(
                ctx.state_dir.join(&config_dir).display().to_string(),
                Self::CONFIG_DIR,
                true,
            )
            .bind(
                self.node.ca_file.clone(),
                &format!("{}/ca.crt", Self::PKI),
                true,
            )
            .bind(
                self.node.cert_file.clone(),
                &format!("{}/host.crt", Self::PKI),
                true,
            )
            .bind(
                self.node.key_file.clone(),
                &format!("{}/host.key", Self::PKI),
                true,
            )
            .privileges("NET_ADMIN", &["/dev/net/tun"]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_template_is_yaml_that_admits_only_the_gate_port() {
        let driver = NebulaDriver {
            image: DEFAULT_NEBULA_IMAGE.into(),
            node: crate::stack::Nebula {
                lighthouse: "lh.example.com:4242".into(),
                lighthouse_ip: "192.168.100.1".into(),
                ip: "192.168.100.7/24".into(),
                ca_file: "/ca".into(),
                cert_file: "/cert".into(),
                key_file: "/key".into(),
                image: None,
            },
        };
        let config: serde_json::Value = serde_saphyr::from_str(&driver.config(8443)).unwrap();
        assert_eq!(
            config["static_host_map"]["192.168.100.1"][0].as_str(),
            Some("lh.example.com:4242")
        );
        assert_eq!(
            config["lighthouse"]["hosts"][0].as_str(),
            Some("192.168.100.1")
        );
        assert_eq!(
            config["pki"]["key"].as_str(),
            Some("/etc/soul/pki/host.key")
        );
        let inbound = config["firewall"]["inbound"].as_array().unwrap();
        assert_eq!(inbound.len(), 1);
        assert_eq!(inbound[0]["port"].as_u64(), Some(8443));
        assert_eq!(inbound[0]["proto"].as_str(), Some("tcp"));
    }
}
