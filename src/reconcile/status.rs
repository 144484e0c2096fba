//! `soul status` as a report: each pod's containers as the engine has them, whether each
//! matches stack.kdl (compared as the planner compares), the containers that carry the stack's
//! label but are no longer declared, and what a running watch is doing. Pure: built from
//! what resolve and observe found; the CLI renders it.

use serde::Serialize;

use super::plan::{Desired, Observed};
use super::watch::WatchStatus;
use crate::pod::{Role, container_name, network_name};
use crate::stack::Stack;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    pub stack: String,
    /// The engine it was read from, and how soul found it.
    pub engine: Option<crate::runtime::endpoint::Endpoint>,
    /// Sidecars `soul stop` stopped (apply and watch leave them until `soul start`).
    pub stopped: Vec<String>,
    pub pods: Vec<PodStatus>,
    pub undeclared: Vec<UndeclaredContainer>,
    pub watch: Option<WatchStatus>,
    /// Each public name (`relay … public=#true`): its certificate and the last ACME error,
    /// as the gate last wrote them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub public: Vec<PublicName>,
    /// Two machines registering one stack at the relay, as this machine's gates saw it.
    #[serde(flatten)]
    pub relay: RelayConflicts,
    /// Whether the state dir holds a stack key, and when it was last exported
    /// (`soul state export`): a key never exported is lost with this machine's disk.
    pub backup: Backup,
    /// Images soul pulled for this stack that no container uses any longer (`soul prune`
    /// removes them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unused_images: Vec<super::UnusedImage>,
}

/// Two machines registering one stack at the relay, as this machine's gates recorded it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RelayConflicts {
    /// Sidecars whose registration a newer one replaced: another machine serves the stack
    /// there now.
    #[serde(rename = "relay_replaced", skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<RelayReplaced>,
    /// Sidecars whose registration replaced another machine's (`by` is that machine's
    /// address): it was told to stop.
    #[serde(rename = "relay_took_over", skip_serializing_if = "Vec::is_empty")]
    pub took_over: Vec<RelayReplaced>,
}

/// A gate's record of a registration at the relay that replaced another: `by` is the other
/// side's address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayReplaced {
    pub sidecar: String,
    /// The newer registration's address, as the relay saw it.
    pub by: String,
    /// Unix seconds.
    pub at: u64,
}

/// The state dir's backup, as far as soul knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Backup {
    pub has_key: bool,
    pub exported_at: Option<u64>,
}

impl Backup {
    pub fn of(state: &crate::state::StateDir) -> Backup {
        Backup {
            has_key: state.path().join(crate::state::KEY_FILE).exists(),
            exported_at: crate::state::bundle::last_export(state),
        }
    }
}

/// A sidecar's public name, as its gate's ACME status says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublicName {
    pub sidecar: String,
    pub name: String,
    /// The gate's `status.json`; absent until the gate has written one.
    pub acme: Option<crate::gate::acme::AcmeStatus>,
}

/// The public names of `stack`'s sidecars, with what their gates wrote into the state dir.
pub fn public_names(
    stack: &crate::stack::Stack,
    state: &crate::state::StateDir,
) -> Vec<PublicName> {
    stack
        .sidecars
        .iter()
        .filter_map(|s| {
            let name = stack.public_name(&s.name)?;
            let dir = state
                .path()
                .join(crate::state::layout::ACME_DIR)
                .join(&s.name);
            Some(PublicName {
                sidecar: s.name.clone(),
                name,
                acme: crate::gate::acme::read_status(&dir),
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodStatus {
    pub sidecar: String,
    pub network: String,
    pub containers: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerStatus {
    pub role: Role,
    pub name: String,
    /// The first 12 characters of its ID, when it exists.
    pub id: Option<String>,
    /// `running`, `exited`, …, or `missing`.
    pub state: String,
    pub health: Option<String>,
    pub image: Option<String>,
    /// Whether its config hash is stack.kdl's; unknown (`None`) when it is missing or the
    /// stack cannot be resolved on this machine.
    pub current: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UndeclaredContainer {
    pub name: String,
    pub state: String,
}

/// The roles every pod has, whatever its transports.
const BASE_ROLES: [Role; 3] = [Role::Pause, Role::App, Role::Gate];

/// The report for `stack`. `desired` is `None` when the stack cannot be resolved here (a
/// secret file missing, say): the base roles are listed, and whether they are current is not
/// known.
pub fn report(
    stack: &Stack,
    desired: Option<&Desired>,
    observed: &Observed,
    watch: Option<WatchStatus>,
) -> StatusReport {
    let desired_hash = |name: &str| {
        desired.and_then(|d| {
            d.pods
                .iter()
                .flat_map(|p| &p.containers)
                .find(|c| c.name == name)
                .map(|c| c.config_hash())
        })
    };
    let pods: Vec<PodStatus> = stack
        .sidecars
        .iter()
        .map(|sidecar| {
            let roles = desired
                .and_then(|d| d.pods.iter().find(|p| p.sidecar == sidecar.name))
                .map_or(BASE_ROLES.to_vec(), |p| {
                    p.containers.iter().map(|c| c.role).collect()
                });
            let containers = roles
                .into_iter()
                .map(|role| {
                    let name = container_name(&stack.stack, &sidecar.name, role);
                    let seen = observed.containers.iter().find(|c| c.name == name);
                    let current = match (seen, desired_hash(&name)) {
                        (Some(c), Some(h)) => Some(c.config_hash.as_deref() == Some(h.as_str())),
                        _ => None,
                    };
                    ContainerStatus {
                        role,
                        id: seen.map(|c| c.id.chars().take(12).collect()),
                        state: seen.map_or("missing".into(), |c| c.state.clone()),
                        health: seen.and_then(|c| c.health.clone()),
                        image: seen.map(|c| c.image.clone()),
                        current,
                        name,
                    }
                })
                .collect();
            PodStatus {
                sidecar: sidecar.name.clone(),
                network: network_name(&stack.stack),
                containers,
            }
        })
        .collect();
    let declared: Vec<&str> = pods
        .iter()
        .flat_map(|p| p.containers.iter().map(|c| c.name.as_str()))
        .collect();
    let undeclared = observed
        .containers
        .iter()
        .filter(|c| !declared.contains(&c.name.as_str()))
        .map(|c| UndeclaredContainer {
            name: c.name.clone(),
            state: c.state.clone(),
        })
        .collect();
    StatusReport {
        stack: stack.stack.clone(),
        engine: None,
        stopped: Vec::new(),
        pods,
        undeclared,
        watch,
        public: Vec::new(),
        relay: RelayConflicts::default(),
        backup: Backup::default(),
        unused_images: Vec::new(),
    }
}
