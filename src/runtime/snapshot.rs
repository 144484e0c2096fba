//! What the engine holds for one stack: its containers (with the ports they publish or will),
//! its networks (and any copies of one name) and its volumes, read in one snapshot.

use super::*;

/// A container carrying this stack's label, as listed by the engine.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    pub state: String,
    /// `healthy`, `unhealthy` or `starting`, parsed from the engine's status line.
    pub health: Option<String>,
    pub image: String,
    pub image_id: String,
    /// The host ports it publishes, or will when it starts.
    pub host_ports: Vec<u16>,
}

/// Everything on the engine that carries one stack's label.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub containers: Vec<ContainerInfo>,
    pub networks: Vec<String>,
    /// (name, ID) of networks that repeat another network's name and that no container uses.
    /// The engine does not refuse a second network of the same name (API < 1.44) when two
    /// creates race, e.g. a run killed mid-create and the next run; the name is then ambiguous
    /// and nothing can join it until the extra copies are removed.
    pub duplicate_networks: Vec<(String, String)>,
    /// (name, ID) of every other labelled network: what `down` removes, by ID, since a
    /// network of the same name that is not this stack's would make the name ambiguous.
    pub network_ids: Vec<(String, String)>,
    pub volumes: Vec<String>,
}

impl Docker {
    /// Lists this stack's containers (running or not), networks and volumes.
    pub async fn snapshot(&self, stack: &str) -> Result<Snapshot, RuntimeError> {
        let filters = Self::stack_filter(stack);
        let mut containers: Vec<ContainerInfo> = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?
            .into_iter()
            .map(|c| {
                let status = c.status.unwrap_or_default();
                ContainerInfo {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_string())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                    health: health_of_status(&status),
                    image: c.image.unwrap_or_default(),
                    image_id: c.image_id.unwrap_or_default(),
                    host_ports: c
                        .ports
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|p| p.public_port)
                        .collect(),
                }
            })
            .collect();
        // The list shows published ports only while a container runs; one that is created,
        // starting or stopped may hold its ports all the same (Docker's proxy binds them at
        // start): its own bindings say which.
        for c in containers.iter_mut().filter(|c| c.state != "running") {
            if let Ok(inspected) = self.docker.inspect_container(&c.id, None).await {
                c.host_ports.extend(
                    inspected
                        .host_config
                        .and_then(|h| h.port_bindings)
                        .into_iter()
                        .flat_map(|b| b.into_values())
                        .flatten()
                        .flatten()
                        .filter_map(|b| b.host_port.and_then(|p| p.parse::<u16>().ok())),
                );
            }
        }
        let listed = self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        let mut by_name: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for n in listed {
            if let (Some(name), Some(id)) = (n.name, n.id) {
                by_name
                    .entry(name)
                    .or_default()
                    .push((n.created.unwrap_or_default(), id));
            }
        }
        let mut duplicate_networks = Vec::new();
        for (name, copies) in &by_name {
            if copies.len() > 1 {
                duplicate_networks.extend(
                    self.unused_copies(copies)
                        .await?
                        .into_iter()
                        .map(|id| (name.clone(), id)),
                );
            }
        }
        let network_ids = by_name
            .iter()
            .flat_map(|(name, copies)| copies.iter().map(move |(_, id)| (name.clone(), id.clone())))
            .filter(|(_, id)| !duplicate_networks.iter().any(|(_, d)| d == id))
            .collect();
        let networks = by_name.into_keys().collect();
        let volumes = self
            .docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await?
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect();
        Ok(Snapshot {
            containers,
            networks,
            duplicate_networks,
            network_ids,
            volumes,
        })
    }

    /// Of several networks sharing a name, (created, ID), the IDs to remove: every copy no
    /// container uses, except the oldest when none is used.
    async fn unused_copies(
        &self,
        copies: &[(String, String)],
    ) -> Result<Vec<String>, RuntimeError> {
        let mut used = Vec::new();
        for (_, id) in copies {
            let n = self.docker.inspect_network(id, None).await?;
            used.push(n.containers.is_some_and(|c| !c.is_empty()));
        }
        let keep = if used.contains(&true) {
            None
        } else {
            (0..copies.len()).min_by_key(|&i| &copies[i])
        };
        Ok(copies
            .iter()
            .enumerate()
            .filter(|(i, _)| !used[*i] && Some(*i) != keep)
            .map(|(_, (_, id))| id.clone())
            .collect())
    }
}

/// `Up 3 minutes (healthy)` → `healthy`; `(health: starting)` → `starting`.
fn health_of_status(status: &str) -> Option<String> {
    let inner = status.rsplit_once('(')?.1.strip_suffix(')')?;
    let h = inner.strip_prefix("health: ").unwrap_or(inner);
    matches!(h, "healthy" | "unhealthy" | "starting").then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_from_status_line() {
        assert_eq!(
            health_of_status("Up 3 minutes (healthy)").as_deref(),
            Some("healthy")
        );
        assert_eq!(
            health_of_status("Up 1 second (health: starting)").as_deref(),
            Some("starting")
        );
        assert_eq!(health_of_status("Up 3 minutes"), None);
        assert_eq!(health_of_status("Exited (0) 3 seconds ago"), None);
    }
}
