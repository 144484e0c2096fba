//! The pure planner: `plan(&Desired, &Observed) -> Plan`. No tokio, no bollard, no file I/O:
//! every decision about what to create, recreate, start or remove is made here, and a
//! converged system plans to zero steps.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::pod::{ContainerSpec, MountKind, NamedVolume, ObjectKind, PodSpec, Role};

/// What the stack asks for on this machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Desired {
    pub stack: String,
    pub pods: Vec<PodSpec>,
    /// Named volumes soul makes for the stack and the pods mount.
    pub volumes: Vec<NamedVolume>,
    /// Volumes the pods mount that soul did not make (`external=#true`): never created or
    /// removed, and they must exist.
    pub external_volumes: Vec<String>,
    /// Every image the pods use, each once.
    pub images: Vec<ImageNeed>,
    /// The state dir's files: key, registry, tokens, pairing artifacts.
    pub files: Vec<DesiredFile>,
    /// Sidecars stopped on purpose (`soul stop`): their pods are left as they are, neither
    /// started, created nor recreated, until `soul start`.
    pub stopped: BTreeSet<String>,
}

/// A file the state dir should hold, relative to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredFile {
    pub path: String,
    /// For people: "token for alice-phone". Never the content.
    pub what: String,
    #[serde(skip)]
    pub content: FileContent,
    /// SHA-256 of the content when known without rendering it.
    #[serde(skip)]
    pub hash: Option<[u8; 32]>,
}

impl DesiredFile {
    pub fn bytes(path: &str, what: String, bytes: Vec<u8>) -> DesiredFile {
        DesiredFile {
            path: path.to_string(),
            what,
            hash: Some(Sha256::digest(&bytes).into()),
            content: FileContent::Bytes(bytes),
        }
    }
}

/// A file's content: bytes, or a QR rendering made only when the file must be written.
#[derive(Clone, PartialEq, Eq)]
pub enum FileContent {
    Bytes(Vec<u8>),
    /// `text`: what the code holds (the pairing link, or the pairing URI).
    Qr {
        text: String,
        format: QrFormat,
    },
}

impl fmt::Debug for FileContent {
    /// Contents carry secrets (keys, tokens): never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileContent::Bytes(b) => write!(f, "Bytes({} bytes, MASKED)", b.len()),
            FileContent::Qr { format, .. } => write!(f, "Qr({format:?}, MASKED)"),
        }
    }
}

/// The renderings of a pairing QR code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QrFormat {
    Png,
    Svg,
    Text,
}

impl QrFormat {
    pub fn extension(self) -> &'static str {
        match self {
            QrFormat::Png => "png",
            QrFormat::Svg => "svg",
            QrFormat::Text => "txt",
        }
    }
}

/// An image a pod needs and how to get it when missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageNeed {
    pub reference: String,
    pub source: ImageSource,
    /// The sidecars that use it, for error messages.
    pub used_by: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageSource {
    /// soul builds it from its own binary, offline.
    Soul,
    /// Pulled from its registry.
    Registry,
}

/// What is on the engine now, as far as this stack is concerned.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Observed {
    /// Containers labelled with this stack.
    pub containers: Vec<ObservedContainer>,
    /// Networks labelled with this stack.
    pub networks: BTreeSet<String>,
    /// Each of those networks' ID.
    pub network_ids: BTreeMap<String, String>,
    /// (name, ID) of unused extra copies of a network name (see `runtime::Snapshot`).
    pub duplicate_networks: Vec<(String, String)>,
    /// Volumes labelled with this stack.
    pub volumes: BTreeSet<String>,
    /// The external volumes the stack names that exist.
    pub external_volumes: BTreeSet<String>,
    /// Objects that have a name this stack needs but are not this stack's.
    pub foreign: Vec<Foreign>,
    /// Host ports the pods publish that another program already holds.
    pub ports_in_use: BTreeSet<u16>,
    /// Desired image references present (and, for soul's image, current) → image ID.
    pub images: BTreeMap<String, String>,
    /// SHA-256 of the state dir's managed files, by path relative to it.
    pub files: BTreeMap<String, [u8; 32]>,
}

impl Observed {
    /// The step that removes the stack's network `name`: by its ID when known.
    pub fn remove_network(&self, name: &str) -> Step {
        Step::RemoveNetwork {
            name: name.to_string(),
            id: self.network_ids.get(name).cloned(),
        }
    }
}

/// One container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedContainer {
    pub id: String,
    pub name: String,
    pub sidecar: Option<String>,
    pub role: Option<Role>,
    pub config_hash: Option<String>,
    /// The state dir that made it (`dev.soul.state-dir`); none on containers of soul 0.1.
    pub owner: Option<String>,
    pub running: bool,
    /// `running`, `exited`, `created`, …
    pub state: String,
    /// `healthy`, `unhealthy`, `starting`, when the container has a health check.
    pub health: Option<String>,
    pub image: String,
    pub image_id: String,
}

/// Why a step is in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Declared but absent.
    Missing,
    /// Its config hash differs from the declared spec.
    ConfigChanged,
    /// Its image reference now points at another image.
    ImageUpdated,
    /// Its pod's pause container is new or restarted: the old namespace is gone.
    PodRestarted,
    /// The pod's network is new: the pause container must join it.
    NetworkRecreated,
    /// Exists with the right spec but is not running.
    Stopped,
    /// Carries this stack's label but is no longer declared.
    Undeclared,
    /// `soul down`.
    TakenDown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Missing => "missing",
            Reason::ConfigChanged => "config changed",
            Reason::ImageUpdated => "image updated",
            Reason::PodRestarted => "pod's pause container is new",
            Reason::NetworkRecreated => "pod network is new",
            Reason::Stopped => "not running",
            Reason::Undeclared => "no longer declared",
            Reason::TakenDown => "the stack is taken down",
        })
    }
}

/// One thing `apply` does. The executor runs them in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// One build serves every missing reference to soul's own image.
    BuildSoulImage {
        tags: Vec<String>,
    },
    PullImage {
        image: String,
        used_by: Vec<String>,
    },
    CreateVolume {
        name: String,
    },
    CreateNetwork {
        name: String,
    },
    RemoveContainer {
        name: String,
        id: String,
        reason: Reason,
    },
    CreateContainer {
        spec: Box<ContainerSpec>,
        reason: Reason,
    },
    StartContainer {
        name: String,
        reason: Reason,
    },
    /// Removes a network of the stack: by its ID when it is known (a name can be ambiguous).
    RemoveNetwork {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Removes a named volume of the stack, and the data on it (only `soul down --volumes`).
    RemoveVolume {
        name: String,
    },
    /// Removes an unused copy of a network whose name another network of the stack has.
    RemoveDuplicateNetwork {
        name: String,
        id: String,
    },
    /// Writes a state-dir file atomically, 0600.
    WriteFile {
        path: String,
        what: String,
        #[serde(skip)]
        content: FileContent,
    },
    /// Removes a state-dir file that is no longer desired (a revoked device's artifacts).
    RemoveFile {
        path: String,
    },
}

impl Step {
    /// Steps that only fetch images change nothing that is running.
    pub fn is_image(&self) -> bool {
        matches!(self, Step::BuildSoulImage { .. } | Step::PullImage { .. })
    }
}

impl fmt::Display for Step {
    /// One line per step; never shows an environment value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::BuildSoulImage { tags } => {
                write!(f, "build soul's image {} from this binary", tags.join(", "))
            }
            Step::PullImage { image, used_by } => {
                write!(f, "pull image {image} (for {})", used_by.join(", "))
            }
            Step::CreateVolume { name } => write!(f, "create volume {name}"),
            Step::CreateNetwork { name, .. } => write!(f, "create network {name}"),
            Step::RemoveContainer { name, reason, .. } => {
                write!(f, "remove container {name} ({reason})")
            }
            Step::CreateContainer { spec, reason } => {
                write!(
                    f,
                    "create container {} from {} ({reason})",
                    spec.name, spec.image
                )
            }
            Step::StartContainer { name, reason } => write!(f, "start container {name} ({reason})"),
            Step::RemoveNetwork { name, .. } => write!(f, "remove network {name}"),
            Step::RemoveVolume { name } => write!(f, "remove volume {name} (its data is gone)"),
            Step::RemoveDuplicateNetwork { name, id } => {
                let short = id.get(..12).unwrap_or(id);
                write!(f, "remove network {short}, an unused duplicate of {name}")
            }
            Step::WriteFile { what, path, .. } => write!(f, "write {path}: {what}"),
            Step::RemoveFile { path } => write!(f, "remove {path}"),
        }
    }
}

/// An object on the engine that holds a name this stack needs without this stack's label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Foreign {
    pub kind: ObjectKind,
    pub name: String,
    /// The stack its labels name, when another stack of soul's made it.
    pub owner: Option<String>,
}

/// Why a plan cannot be carried out: found before anything is changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "conflict", rename_all = "kebab-case")]
pub enum Conflict {
    /// soul would create an object whose name another owner already holds.
    Foreign(Foreign),
    /// An `external=#true` volume does not exist.
    MissingExternalVolume { name: String },
    /// A LAN port the pod publishes is held by another program on this machine.
    PortInUse { port: u16, sidecar: String },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Foreign(Foreign {
                kind,
                name,
                owner: Some(owner),
            }) => write!(
                f,
                "{kind} `{name}` belongs to soul stack `{owner}`, not this one: rename one of the stacks, or remove it from stack `{owner}` (`soul down` there)"
            ),
            Conflict::Foreign(Foreign {
                kind: ObjectKind::Volume,
                name,
                owner: None,
            }) => write!(
                f,
                "volume `{name}` exists but soul did not make it, so soul will not mount or remove it: to use its data, declare it with `external=#true` under its own name (`volume \"{name}\" \"/data\" external=#true`); otherwise rename or remove it (`docker volume rm {name}`)"
            ),
            Conflict::Foreign(Foreign {
                kind,
                name,
                owner: None,
            }) => write!(
                f,
                "{kind} `{name}` exists but soul did not make it: rename or remove it (`docker {kind} rm {name}`); soul never adopts or removes what it did not make"
            ),
            Conflict::PortInUse { port, sidecar } => write!(
                f,
                "LAN port {port} of sidecar `{sidecar}` is already in use on this machine by another program: stop it, or choose a free port with `lan port=` (or the sidecar's `lan-port`)"
            ),
            Conflict::MissingExternalVolume { name } => write!(
                f,
                "external volume `{name}` does not exist: create it (`docker volume create {name}`) or drop `external=#true` to let soul make one"
            ),
        }
    }
}

/// The ordered steps that take Observed to Desired.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// What stops the plan from being carried out; nothing is changed while there are any.
    pub conflicts: Vec<Conflict>,
    /// Volumes soul made for the stack that nothing it declares mounts any more (a volume
    /// dropped from stack.kdl, a tailnet node's state from before its tags or control server
    /// changed): kept with their data, never removed but by `soul down --volumes`; said so.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// What happens to one declared container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Keep,
    Start,
    Create(Reason),
    Recreate(Reason),
}

/// Computes the steps from `observed` to `desired`.
///
/// Order: images first (so an image that cannot be had stops the plan before anything running
/// is touched), then removal of undeclared containers (freeing their ports), volumes, then pod
/// by pod: network, pause, dependents; undeclared networks last.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let desired = &*with_legacy_volumes(desired, observed);
    let mut steps = Vec::new();

    let missing: Vec<&ImageNeed> = desired
        .images
        .iter()
        .filter(|n| !observed.images.contains_key(&n.reference))
        .collect();
    let refreshed: BTreeSet<&str> = missing.iter().map(|n| n.reference.as_str()).collect();
    let soul_tags: Vec<String> = missing
        .iter()
        .filter(|n| n.source == ImageSource::Soul)
        .map(|n| n.reference.clone())
        .collect();
    if !soul_tags.is_empty() {
        steps.push(Step::BuildSoulImage { tags: soul_tags });
    }
    for need in missing.iter().filter(|n| n.source == ImageSource::Registry) {
        steps.push(Step::PullImage {
            image: need.reference.clone(),
            used_by: need.used_by.clone(),
        });
    }

    plan_files(desired, observed, &mut steps);

    // An ambiguous network name stops every container that joins it: clear it first.
    for (name, id) in &observed.duplicate_networks {
        steps.push(Step::RemoveDuplicateNetwork {
            name: name.clone(),
            id: id.clone(),
        });
    }

    let declared: BTreeSet<&str> = desired
        .pods
        .iter()
        .flat_map(|p| p.containers.iter().map(|c| c.name.as_str()))
        .collect();
    let mut by_name: BTreeMap<&str, &ObservedContainer> = BTreeMap::new();
    for c in &observed.containers {
        let keep = declared.contains(c.name.as_str()) && !by_name.contains_key(c.name.as_str());
        if keep {
            by_name.insert(&c.name, c);
        } else {
            steps.push(Step::RemoveContainer {
                name: c.name.clone(),
                id: c.id.clone(),
                reason: Reason::Undeclared,
            });
        }
    }

    for v in &desired.volumes {
        if !observed.volumes.contains(&v.name) {
            steps.push(Step::CreateVolume {
                name: v.name.clone(),
            });
        }
    }

    let mut new_networks = BTreeSet::new();
    for pod in desired
        .pods
        .iter()
        .filter(|p| !desired.stopped.contains(&p.sidecar))
    {
        plan_pod(
            pod,
            observed,
            &by_name,
            &refreshed,
            &mut new_networks,
            &mut steps,
        );
    }

    let networks: BTreeSet<&str> = desired.pods.iter().map(|p| p.network.as_str()).collect();
    for n in &observed.networks {
        if !networks.contains(n.as_str()) {
            steps.push(observed.remove_network(n));
        }
    }
    let used: BTreeSet<&str> = desired.volumes.iter().map(|v| v.name.as_str()).collect();
    let kept = observed
        .volumes
        .iter()
        .filter(|v| !used.contains(v.as_str()))
        .cloned()
        .collect();
    Plan {
        steps,
        conflicts: conflicts(observed, desired),
        kept,
    }
}

/// `desired` with each volume that soul 0.1 made under its old name, and that has no
/// new-named copy, mounted under the old name: the data it holds stays the stack's.
pub fn with_legacy_volumes<'a>(desired: &'a Desired, observed: &Observed) -> Cow<'a, Desired> {
    let legacy: BTreeMap<&str, &str> = desired
        .volumes
        .iter()
        .filter(|v| !observed.volumes.contains(&v.name) && observed.volumes.contains(&v.legacy))
        .map(|v| (v.name.as_str(), v.legacy.as_str()))
        .collect();
    if legacy.is_empty() {
        return Cow::Borrowed(desired);
    }
    let mut d = desired.clone();
    for v in &mut d.volumes {
        if let Some(old) = legacy.get(v.name.as_str()) {
            v.name = old.to_string();
        }
    }
    for m in d
        .pods
        .iter_mut()
        .flat_map(|p| &mut p.containers)
        .flat_map(|c| &mut c.mounts)
        .filter(|m| m.kind == MountKind::Volume)
    {
        if let Some(old) = legacy.get(m.source.as_str()) {
            m.source = old.to_string();
        }
    }
    Cow::Owned(d)
}

/// The names the plan would create that another owner holds, and missing external volumes.
fn conflicts(observed: &Observed, desired: &Desired) -> Vec<Conflict> {
    let needed: BTreeSet<(ObjectKind, &str)> = desired
        .pods
        .iter()
        .flat_map(|p| {
            p.containers
                .iter()
                .map(|c| (ObjectKind::Container, c.name.as_str()))
                .chain([(ObjectKind::Network, p.network.as_str())])
        })
        .chain(
            desired
                .volumes
                .iter()
                .map(|v| (ObjectKind::Volume, v.name.as_str())),
        )
        .collect();
    let foreign = observed
        .foreign
        .iter()
        .filter(|f| needed.contains(&(f.kind, f.name.as_str())))
        .map(|f| Conflict::Foreign(f.clone()));
    let missing = desired
        .external_volumes
        .iter()
        .filter(|v| !observed.external_volumes.contains(*v))
        .map(|v| Conflict::MissingExternalVolume { name: v.clone() });
    let ports = desired.pods.iter().flat_map(|p| {
        p.containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter(|port| observed.ports_in_use.contains(&port.host))
            .map(|port| Conflict::PortInUse {
                port: port.host,
                sidecar: p.sidecar.clone(),
            })
    });
    foreign.chain(missing).chain(ports).collect()
}

/// Writes every desired file whose bytes differ (or are unknown until rendered), then removes
/// managed files no longer desired.
fn plan_files(desired: &Desired, observed: &Observed, steps: &mut Vec<Step>) {
    for f in &desired.files {
        let current = observed.files.get(&f.path);
        if f.hash.is_none() || current != f.hash.as_ref() {
            steps.push(Step::WriteFile {
                path: f.path.clone(),
                what: f.what.clone(),
                content: f.content.clone(),
            });
        }
    }
    let wanted: BTreeSet<&str> = desired.files.iter().map(|f| f.path.as_str()).collect();
    for path in observed.files.keys() {
        if !wanted.contains(path.as_str()) {
            steps.push(Step::RemoveFile { path: path.clone() });
        }
    }
}

fn plan_pod(
    pod: &PodSpec,
    observed: &Observed,
    by_name: &BTreeMap<&str, &ObservedContainer>,
    refreshed: &BTreeSet<&str>,
    new_networks: &mut BTreeSet<String>,
    steps: &mut Vec<Step>,
) {
    // Pods share the stack's network: the first pod that needs it makes it.
    let network_new = !observed.networks.contains(&pod.network);
    if network_new && new_networks.insert(pod.network.clone()) {
        steps.push(Step::CreateNetwork {
            name: pod.network.clone(),
        });
    }

    let mut pod_restarted = false;
    let actions: Vec<(&ContainerSpec, Option<&ObservedContainer>, Action)> = pod
        .containers
        .iter()
        .map(|spec| {
            let seen = by_name.get(spec.name.as_str()).copied();
            let action = match seen {
                None => Action::Create(Reason::Missing),
                Some(_) if spec.role != Role::Pause && pod_restarted => {
                    Action::Recreate(Reason::PodRestarted)
                }
                Some(_) if spec.role == Role::Pause && network_new => {
                    Action::Recreate(Reason::NetworkRecreated)
                }
                Some(o) => container_action(spec, o, observed, refreshed),
            };
            if spec.role == Role::Pause && action != Action::Keep {
                pod_restarted = true;
            }
            (spec, seen, action)
        })
        .collect();

    // Dependents go before the pause container they joined; then everything comes up in
    // pod order (pause first).
    for (spec, seen, action) in actions.iter().rev() {
        if let (Action::Recreate(reason), Some(o)) = (action, seen) {
            steps.push(Step::RemoveContainer {
                name: spec.name.clone(),
                id: o.id.clone(),
                reason: *reason,
            });
        }
    }
    for (spec, _, action) in &actions {
        match action {
            Action::Keep => {}
            Action::Start => steps.push(Step::StartContainer {
                name: spec.name.clone(),
                reason: Reason::Stopped,
            }),
            Action::Create(reason) | Action::Recreate(reason) => {
                steps.push(Step::CreateContainer {
                    spec: Box::new((*spec).clone()),
                    reason: *reason,
                });
                steps.push(Step::StartContainer {
                    name: spec.name.clone(),
                    reason: *reason,
                });
            }
        }
    }
}

fn container_action(
    spec: &ContainerSpec,
    seen: &ObservedContainer,
    observed: &Observed,
    refreshed: &BTreeSet<&str>,
) -> Action {
    if seen.config_hash.as_deref() != Some(spec.config_hash().as_str()) {
        return Action::Recreate(Reason::ConfigChanged);
    }
    // The pause container only sleeps: a newer soul image is no reason to disturb the pod.
    if spec.role != Role::Pause {
        let image_moved = match observed.images.get(&spec.image) {
            Some(id) => *id != seen.image_id,
            None => refreshed.contains(spec.image.as_str()),
        };
        if image_moved {
            return Action::Recreate(Reason::ImageUpdated);
        }
    }
    if seen.running {
        Action::Keep
    } else {
        Action::Start
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
