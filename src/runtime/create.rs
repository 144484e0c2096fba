//! A [`ContainerSpec`] as the engine's create request: the image, command, environment, the
//! labels that name its stack, role, config hash and owner, its mounts, ports, health check
//! and capabilities.

use super::*;

/// The engine's create request for a container spec.
pub(super) fn create_body(spec: &ContainerSpec, owner: &str) -> ContainerCreateBody {
    let (network_mode, port_bindings, exposed) = match &spec.network_mode {
        NetworkMode::Bridge(net) => {
            let bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
                .ports
                .iter()
                .map(|p| {
                    (
                        format!("{}/tcp", p.container),
                        Some(vec![PortBinding {
                            host_ip: None,
                            host_port: Some(p.host.to_string()),
                        }]),
                    )
                })
                .collect();
            let exposed = spec
                .ports
                .iter()
                .map(|p| format!("{}/tcp", p.container))
                .collect();
            (net.clone(), Some(bindings), Some(exposed))
        }
        NetworkMode::Container(owner) => (format!("container:{owner}"), None, None),
    };
    let mounts = spec
        .mounts
        .iter()
        .map(|m| DockerMount {
            target: Some(m.target.clone()),
            source: Some(m.source.clone()),
            typ: Some(match m.kind {
                MountKind::Volume => MountType::VOLUME,
                MountKind::Bind => MountType::BIND,
            }),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect();
    let healthcheck = spec.health.as_ref().map(|h| HealthConfig {
        test: Some(h.test.clone()),
        interval: Some((h.interval_ms * 1_000_000) as i64),
        timeout: Some((h.timeout_ms * 1_000_000) as i64),
        retries: Some(i64::from(h.retries)),
        ..Default::default()
    });
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.clone(),
        env: Some(
            spec.env
                .iter()
                .map(|(k, v)| format!("{k}={}", v.value))
                .collect(),
        ),
        labels: Some(
            spec.labels()
                .into_iter()
                .chain([(label::STATE_DIR.to_string(), owner.to_string())])
                .collect(),
        ),
        exposed_ports: exposed,
        healthcheck,
        host_config: Some(HostConfig {
            network_mode: Some(network_mode),
            port_bindings,
            mounts: Some(mounts),
            cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
            devices: (!spec.devices.is_empty()).then(|| {
                spec.devices
                    .iter()
                    .map(|d| bollard::models::DeviceMapping {
                        path_on_host: Some(d.clone()),
                        path_in_container: Some(d.clone()),
                        cgroup_permissions: Some("rwm".into()),
                    })
                    .collect()
            }),
            restart_policy: Some(RestartPolicy {
                name: Some(match spec.restart.as_str() {
                    "always" => RestartPolicyNameEnum::ALWAYS,
                    "no" => RestartPolicyNameEnum::NO,
                    _ => RestartPolicyNameEnum::UNLESS_STOPPED,
                }),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
