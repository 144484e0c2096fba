//! Observe: what the Docker engine holds for a stack, in the planner's terms; and the Docker
//! runtime as the executor's [`Engine`].

use std::collections::BTreeSet;

use crate::pod::{ContainerSpec, ObjectKind, Role, label};
use crate::runtime::{self, Docker, RuntimeError, SOUL_BINARY_LABEL};
use crate::state::StateDir;

use super::execute::Engine;
use super::plan::{Desired, Foreign, ImageSource, Observed, ObservedContainer};
use super::resolve::SoulImage;

/// Reads the engine and the state dir: this stack's containers, networks and volumes, which of
/// the desired images are present, and the hashes of the state dir's files. soul's own image
/// counts as present only when it was built from this binary.
pub async fn observe(
    docker: &Docker,
    desired: &Desired,
    state: &StateDir,
) -> Result<Observed, RuntimeError> {
    let snapshot = docker.snapshot(&desired.stack).await?;
    let held: BTreeSet<u16> = snapshot
        .containers
        .iter()
        .flat_map(|c| c.host_ports.iter().copied())
        .collect();
    let mut observed = from_snapshot(snapshot);
    observed.ports_in_use = ports_taken_by_others(desired, &held);
    observed.files = state.file_hashes();
    observe_names(docker, desired, &mut observed).await?;
    let this_binary = runtime::binary_id().ok();
    for need in &desired.images {
        let found = match need.source {
            ImageSource::Registry => docker.image_id(&need.reference).await?,
            ImageSource::Soul => docker
                .image_labels(&need.reference)
                .await?
                .filter(|(_, labels)| labels.get(SOUL_BINARY_LABEL) == this_binary.as_ref())
                .map(|(id, _)| id),
        };
        if let Some(id) = found {
            observed.images.insert(need.reference.clone(), id);
        }
    }
    Ok(observed)
}

/// Looks up, by name, each object the plan would create (a name not among this stack's labelled
/// objects) and each external volume: a name held by anyone else is a conflict to report
/// before changing anything. A converged stack makes no call here.
async fn observe_names(
    docker: &Docker,
    desired: &Desired,
    observed: &mut Observed,
) -> Result<(), RuntimeError> {
    let mut wanted: Vec<(ObjectKind, &str)> = Vec::new();
    // The stack's network, even when it exists: a network of the same name that is not this
    // stack's makes the name ambiguous, and no pause container could join it.
    let networks: BTreeSet<&str> = desired.pods.iter().map(|p| p.network.as_str()).collect();
    for name in networks {
        for labels in docker.networks_named(name).await? {
            if labels.get(label::STACK) != Some(&desired.stack) {
                observed.foreign.push(Foreign {
                    kind: ObjectKind::Network,
                    name: name.to_string(),
                    owner: labels.get(label::STACK).cloned(),
                });
            }
        }
    }
    for pod in &desired.pods {
        for c in &pod.containers {
            if !observed.containers.iter().any(|o| o.name == c.name) {
                wanted.push((ObjectKind::Container, &c.name));
            }
        }
    }
    for v in &desired.volumes {
        if !observed.volumes.contains(&v.name) && !observed.volumes.contains(&v.legacy) {
            wanted.push((ObjectKind::Volume, &v.name));
        }
    }
    for (kind, name) in wanted {
        if let Some(labels) = docker.labels_of(kind, name).await?
            // Made for this stack since the snapshot (a create that was still finishing).
            && labels.get(label::STACK) != Some(&desired.stack)
        {
            observed.foreign.push(Foreign {
                kind,
                name: name.to_string(),
                owner: labels.get(label::STACK).cloned(),
            });
        }
    }
    for name in &desired.external_volumes {
        if docker.labels_of(ObjectKind::Volume, name).await?.is_some() {
            observed.external_volumes.insert(name.clone());
        }
    }
    Ok(())
}

/// The LAN ports the pods publish that another program on this machine already holds (Docker
/// would fail to start the pod half-way). Only a local engine publishes on this machine's
/// ports, so only then are they checked; ports this stack's containers hold are its own.
fn ports_taken_by_others(desired: &Desired, held: &BTreeSet<u16>) -> BTreeSet<u16> {
    let local = std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://"));
    if !local {
        return BTreeSet::new();
    }
    desired
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .flat_map(|c| &c.ports)
        .map(|p| p.host)
        .filter(|port| !held.contains(port))
        .filter(|port| listened_on(*port))
        .collect()
}

/// Whether a program listens on TCP `port` of this machine. The probe binds without listening
/// and with `SO_REUSEADDR`: a listener refuses it, but another probe of the same port does not,
/// so two soul runs planning one stack at the same instant do not each see the other's probe
/// as "another program" (CI saw the loser of an ownership race report its own port so).
fn listened_on(port: u16) -> bool {
    use rustix::net::{AddressFamily, SocketType, bind, ipproto, socket, sockopt};
    let Ok(fd) = socket(AddressFamily::INET, SocketType::STREAM, Some(ipproto::TCP)) else {
        return false;
    };
    if sockopt::set_socket_reuseaddr(&fd, true).is_err() {
        return false;
    }
    let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
    matches!(bind(&fd, &any), Err(rustix::io::Errno::ADDRINUSE))
}

/// The containers (but those being removed), networks and volumes of a snapshot, without
/// images.
pub fn from_snapshot(snapshot: runtime::Snapshot) -> Observed {
    Observed {
        containers: snapshot
            .containers
            .into_iter()
            // A container the engine is removing (a removal a killed run asked for) is gone
            // already: planning to start it would meet "no such container"; a create of its
            // name waits for the removal to finish.
            .filter(|c| c.state != "removing")
            .map(|c| ObservedContainer {
                running: c.state == "running" || c.state == "restarting",
                sidecar: c.labels.get(label::SIDECAR).cloned(),
                role: c.labels.get(label::ROLE).and_then(|r| Role::parse(r)),
                config_hash: c.labels.get(label::CONFIG_HASH).cloned(),
                owner: c.labels.get(label::STATE_DIR).cloned(),
                id: c.id,
                name: c.name,
                state: c.state,
                health: c.health,
                image: c.image,
                image_id: c.image_id,
            })
            .collect(),
        networks: snapshot.networks.into_iter().collect(),
        network_ids: snapshot.network_ids.into_iter().collect(),
        duplicate_networks: snapshot.duplicate_networks,
        volumes: snapshot.volumes.into_iter().collect::<BTreeSet<_>>(),
        external_volumes: Default::default(),
        foreign: Vec::new(),
        ports_in_use: BTreeSet::new(),
        images: Default::default(),
        files: Default::default(),
    }
}

impl Engine for Docker {
    type Error = RuntimeError;

    async fn build_soul_image(&self, tags: &[String]) -> Result<(), RuntimeError> {
        Docker::build_soul_image(self, tags).await?;
        // Images of earlier builds that no container runs any more: an hour's grace leaves
        // alone one that another soul has just built and not yet started containers from.
        Docker::remove_unused_soul_images(self, &SoulImage::current().reference).await
    }
    async fn pull_image(&self, image: &str) -> Result<(), RuntimeError> {
        Docker::pull_image(self, image).await
    }
    async fn create_volume(&self, name: &str, stack: &str) -> Result<(), RuntimeError> {
        Docker::create_volume(self, name, stack).await
    }
    async fn create_network(&self, name: &str, stack: &str) -> Result<(), RuntimeError> {
        Docker::create_network(self, name, stack).await
    }
    async fn create_container(
        &self,
        spec: &ContainerSpec,
        owner: &str,
    ) -> Result<(), RuntimeError> {
        Docker::create_container(self, spec, owner).await
    }
    async fn start_container(&self, name: &str) -> Result<(), RuntimeError> {
        Docker::start_container(self, name).await
    }
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        Docker::remove_container(self, id).await
    }
    async fn remove_network(&self, name_or_id: &str) -> Result<(), RuntimeError> {
        Docker::remove_network(self, name_or_id).await
    }
    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        Docker::remove_volume(self, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::listened_on;

    #[test]
    fn two_runs_probing_one_port_at_once_do_not_take_each_other_for_another_program() {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listened_on(port), "a listener on loopback holds the port");
        drop(listener);
        // Hold a probe-like socket (bound, not listening) while probing again.
        use rustix::net::{AddressFamily, SocketType, bind, ipproto, socket, sockopt};
        let held = socket(AddressFamily::INET, SocketType::STREAM, Some(ipproto::TCP)).unwrap();
        sockopt::set_socket_reuseaddr(&held, true).unwrap();
        let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
        bind(&held, &any).unwrap();
        assert!(
            !listened_on(port),
            "two runs probing one port at once see no program on it"
        );
    }
}
