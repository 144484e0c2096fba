//! One whole pass, shared by `apply`, `plan` and `watch`: resolve the stack (containers and
//! state-dir files), observe the engine and the state dir, plan; and executing that plan.

use crate::runtime::{Docker, RuntimeError};
use crate::stack::{Stack, TransportKind};
use crate::state::{ADDRESSES_FILE, KEY_FILE, StackKey, StateDir};
use crate::transport::{self, AddressSource, Discovered, PodContext};

use super::artifacts::{KeyChange, Pairing, PairingInputs, desired_files};
use super::execute::{ExecuteError, execute};
use super::plan::{Conflict, Desired, DesiredFile, Observed, Plan, Step, plan};
use super::resolve::{ResolveError, resolve};
use crate::machine::Machine;

/// Why a pass could not be planned or carried out.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Execute(#[from] ExecuteError),
    #[error(transparent)]
    Pairing(#[from] super::artifacts::PairingError),
    /// The machine could not give soul a random key.
    #[error("cannot generate a key: {0}")]
    Key(std::io::Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Names the plan needs are held by objects soul did not make for this stack, or an
    /// external volume is missing. Found before anything was changed.
    #[error("nothing was changed: {}", conflicts_text(.0))]
    Conflicts(Vec<Conflict>),
    /// The stack's containers (or its claim) were made from another state dir, still there.
    #[error(
        "the containers of stack `{stack}` were made from the state dir {owner}, which is still there: run soul with `--state-dir {owner}`; or, for this state dir to take over, move that one away first (two state dirs of one stack would issue two keys and fight over the pods)"
    )]
    OtherOwner { stack: String, owner: String },
    /// An image stack.kdl newly names could not be locked (resolved to its digest).
    #[error(
        "cannot lock image {image} (used by `{used_by}`): {why}; nothing that was running has been changed: check the name and tag, and that its registry is reachable (a private one: `docker login <registry>`)"
    )]
    Lock {
        image: String,
        used_by: String,
        why: String,
    },
    /// The stack was not read from a file, so it has no stack.lock beside it.
    #[error("this stack was not read from a stack.kdl, so it has no stack.lock to update")]
    NoLockFile,
    /// stack.lock could not be written.
    #[error("cannot write {}: {why}", path.display())]
    LockWrite {
        path: std::path::PathBuf,
        why: String,
    },
    /// A bug in soul (a task panicked, a lock was poisoned).
    #[error("internal error: {0}")]
    Internal(String),
}

impl PassError {
    /// Whether the engine is simply not there (retry later, exit code 3).
    pub fn is_unreachable(&self) -> bool {
        match self {
            PassError::Runtime(e) => e.is_unreachable(),
            PassError::Execute(e) => e
                .source
                .downcast_ref::<RuntimeError>()
                .is_some_and(RuntimeError::is_unreachable),
            _ => false,
        }
    }
}

/// A planned pass.
pub struct Planned {
    pub desired: Desired,
    pub plan: Plan,
    /// stack.lock as this pass leaves it, when that differs from the file: `apply` and `watch`
    /// write it before anything else changes, `plan` only says so.
    pub lock: Option<LockChange>,
}

/// stack.lock gaining the images stack.kdl newly names and losing those it no longer names.
#[derive(Debug, Clone)]
pub struct LockChange {
    pub path: std::path::PathBuf,
    pub lock: super::lock::Lock,
    pub added: Vec<String>,
    pub dropped: Vec<String>,
}

impl LockChange {
    /// Writes the lock file (atomically).
    pub fn write(&self) -> Result<(), PassError> {
        crate::files::write_atomically(
            &self.path,
            self.lock.render().as_bytes(),
            crate::files::Access::AsBefore,
        )
        .map_err(|e| PassError::LockWrite {
            path: self.path.clone(),
            why: e.to_string(),
        })
    }
}

/// Locks the images `desired` runs from a registry that stack.lock does not hold yet (a local
/// copy's registry digest, else the registry's, asked through the engine; an image built or
/// imported here is `local`), drops the entries stack.kdl no longer names, and pins `desired`
/// to the result. `None` when the lock file would not change.
async fn settle_lock(
    docker: &Docker,
    stack: &Stack,
    desired: &mut Desired,
) -> Result<Option<LockChange>, PassError> {
    use super::lock::{Locked, digest_of, lockable};
    let Some(path) = &stack.lock_file else {
        return Ok(None);
    };
    let current = super::resolve::read_lock(stack)?;
    let running: Vec<&str> = desired
        .images
        .iter()
        .map(|n| n.reference.as_str())
        .collect();
    let named: Vec<&str> = current
        .entries
        .keys()
        .filter(|r| running.contains(&current.pinned(r).as_str()))
        .map(String::as_str)
        .collect();
    let mut lock = current.keep_only(&named);
    let mut added = Vec::new();
    for need in desired.images.iter().filter(|n| lockable(n)) {
        if lock.entries.contains_key(&need.reference) {
            continue;
        }
        let reference = &need.reference;
        let locked = match docker.repo_digests(reference).await? {
            Some(digests) => digests
                .iter()
                .find_map(|d| digest_of(d, reference))
                .map_or(Locked::Local, |d| Locked::Digest(d.to_string())),
            None => Locked::Digest(docker.registry_digest(reference).await.map_err(|e| {
                PassError::Lock {
                    image: reference.clone(),
                    used_by: need.used_by.join("`, `"),
                    why: e.to_string(),
                }
            })?),
        };
        lock.entries.insert(reference.clone(), locked);
        added.push(reference.clone());
    }
    let dropped: Vec<String> = current
        .entries
        .keys()
        .filter(|r| !lock.entries.contains_key(*r))
        .cloned()
        .collect();
    super::lock::pin(desired, &lock);
    // No file for a stack that runs nothing from a registry (the demo): nothing to commit.
    let unchanged =
        added.is_empty() && dropped.is_empty() && (path.exists() || lock.entries.is_empty());
    Ok((!unchanged).then(|| LockChange {
        path: path.clone(),
        lock,
        added,
        dropped,
    }))
}

/// Checks what resolving reads from the machine (secret files, soul's environment, devices the
/// transports need), so that a missing secret is reported before any Docker call.
pub fn check_inputs(
    stack: &Stack,
    machine: &dyn Machine,
    state: &StateDir,
) -> Result<(), PassError> {
    resolve(stack, machine, state.path())?;
    Ok(())
}

/// The desired state, whole, built here and nowhere else: the pods and the transports' files
/// (`resolve`), the state dir's key, registry, tokens, TLS files and pairing codes, and the
/// addresses discovered on the engine.
pub fn desired(
    stack: &Stack,
    machine: &dyn Machine,
    state: &StateDir,
    discovered: &Discovered,
    now: u64,
) -> Result<Desired, PassError> {
    let mut desired = resolve(stack, machine, state.path())?;
    desired.stopped = stopped(state);
    desired
        .files
        .extend(pairing_of(stack, state, discovered, now)?.files);
    desired.files.push(DesiredFile::bytes(
        ADDRESSES_FILE,
        "discovered addresses".into(),
        addresses_file(discovered),
    ));
    Ok(desired)
}

/// The sidecars `soul stop` stopped, as recorded in the state dir.
pub fn stopped(state: &StateDir) -> std::collections::BTreeSet<String> {
    state
        .read(crate::state::layout::STOPPED_FILE)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Records the sidecars stopped on purpose (none: the record goes).
pub fn record_stopped(
    state: &StateDir,
    stopped: &std::collections::BTreeSet<String>,
) -> std::io::Result<()> {
    let file = crate::state::layout::STOPPED_FILE;
    if stopped.is_empty() {
        state.remove(file)
    } else {
        let mut bytes = serde_json::to_vec_pretty(stopped).unwrap_or_default();
        bytes.push(b'\n');
        state.write(file, &bytes)
    }
}

/// Discovers addresses, then builds the desired state, observes and plans, changing nothing.
pub async fn prepare(
    docker: &Docker,
    stack: &Stack,
    machine: &dyn Machine,
    state: &StateDir,
    now: u64,
) -> Result<Planned, PassError> {
    let discovered = discover(docker, stack, state).await?;
    let mut desired = desired(stack, machine, state, &discovered, now)?;
    let lock = settle_lock(docker, stack, &mut desired).await?;
    let observed = super::observe::observe(docker, &desired, state).await?;
    let claim = docker.claim_owner(&stack.stack).await?;
    check_owner(stack, state, &observed, claim.as_deref())?;
    let plan = plan(&desired, &observed);
    if !plan.conflicts.is_empty() {
        return Err(PassError::Conflicts(plan.conflicts));
    }
    Ok(Planned {
        desired,
        plan,
        lock,
    })
}

/// One state dir owns a stack's pods: the stack's claim on the engine, or a container, made
/// from another state dir that is still there stops the pass. A state dir that is gone (moved
/// away), or this one made anew, is no other owner; containers of soul 0.1 record none.
fn check_owner(
    stack: &Stack,
    state: &StateDir,
    observed: &Observed,
    claim: Option<&str>,
) -> Result<(), PassError> {
    let ours = state.owner();
    let other = claim
        .into_iter()
        .chain(
            observed
                .containers
                .iter()
                .filter_map(|c| c.owner.as_deref()),
        )
        .find(|o| *o != ours && still_owns(o));
    match other {
        Some(owner) => Err(PassError::OtherOwner {
            stack: stack.stack.clone(),
            owner: owner.to_string(),
        }),
        None => Ok(()),
    }
}

/// Whether the state dir at `owner` is still there: it holds a stack key, or is one being
/// made (its id is written first, its key by its first apply, after it claimed the stack).
fn still_owns(owner: &str) -> bool {
    let dir = std::path::Path::new(owner);
    dir.join(KEY_FILE).exists() || dir.join(crate::state::STATE_ID_FILE).exists()
}

/// Whether this state dir may change the stack's objects: refused, in apply's words, when
/// another state dir that is still there owns them. What `down`, `stop` and `restart`
/// ask before they touch anything.
pub async fn check_ownership(
    docker: &Docker,
    stack: &Stack,
    state: &StateDir,
) -> Result<(), PassError> {
    let observed = super::observe::from_snapshot(docker.snapshot(&stack.stack).await?);
    let claim = docker.claim_owner(&stack.stack).await?;
    check_owner(stack, state, &observed, claim.as_deref())
}

/// Claims the stack on the engine for this state dir before the first change: of two state
/// dirs applying one stack at the same instant, exactly one wins, and the other stops here,
/// having changed nothing. A claim left by a state dir that is gone is taken over.
async fn claim(docker: &Docker, stack: &Stack, state: &StateDir) -> Result<(), PassError> {
    let ours = state.owner();
    for _ in 0..2 {
        let owner = docker.claim(&stack.stack, &ours).await?;
        if owner == ours {
            return Ok(());
        }
        if still_owns(&owner) {
            return Err(PassError::OtherOwner {
                stack: stack.stack.clone(),
                owner,
            });
        }
        tracing::info!(
            "stack `{}` was claimed by {owner}, which is gone: taking it over",
            stack.stack
        );
        docker.release_claim(&stack.stack).await?;
    }
    Err(PassError::OtherOwner {
        stack: stack.stack.clone(),
        owner: "another state dir (the claim changed hands while taking it over)".into(),
    })
}

fn conflicts_text(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(|c| format!("\n  - {c}"))
        .collect::<String>()
}

/// Carries out a plan; `on_step` hears of each step before it runs.
pub async fn run(
    docker: &Docker,
    state: &StateDir,
    stack: &Stack,
    plan: &Plan,
    on_step: impl FnMut(usize, &Step),
) -> Result<(), PassError> {
    if !plan.steps.is_empty() {
        claim(docker, stack, state).await?;
    }
    execute(docker, state, &stack.stack, plan, on_step).await?;
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KnownAddress {
    sidecar: String,
    transport: TransportKind,
    host: String,
    port: u16,
}

fn addresses_file(found: &Discovered) -> Vec<u8> {
    let list: Vec<KnownAddress> = found
        .iter()
        .map(|((sidecar, transport), (host, port))| KnownAddress {
            sidecar: sidecar.clone(),
            transport: *transport,
            host: host.clone(),
            port: *port,
        })
        .collect();
    let mut v = serde_json::to_vec_pretty(&list).unwrap_or_default();
    v.push(b'\n');
    v
}

fn stored_addresses(state: &StateDir) -> Discovered {
    let list: Vec<KnownAddress> = state
        .read(ADDRESSES_FILE)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    list.into_iter()
        .map(|a| ((a.sidecar, a.transport), (a.host, a.port)))
        .collect()
}

/// The sidecars whose relay address the last pass put into the pairing codes.
pub fn recorded_relay(state: &StateDir) -> std::collections::BTreeSet<String> {
    stored_addresses(state)
        .into_keys()
        .filter(|(_, kind)| *kind == TransportKind::Relay)
        .map(|(sidecar, _)| sidecar)
        .collect()
}

/// Every overlay transport's current address, read from the pods. While a transport's
/// container is being replaced its address is the one last read (the onion key, say, lives
/// on a volume), so pairing codes do not flap; a transport never seen has none yet.
pub async fn discover(
    docker: &Docker,
    stack: &Stack,
    state: &StateDir,
) -> Result<Discovered, PassError> {
    let stored = stored_addresses(state);
    let mut found = Discovered::new();
    let state_dir =
        std::path::absolute(state.path()).unwrap_or_else(|_| state.path().to_path_buf());
    for driver in transport::drivers(stack) {
        for sidecar in &stack.sidecars {
            let ctx = PodContext::of(stack, sidecar, &state_dir);
            let key = (sidecar.name.clone(), driver.kind());
            let (live, port) = match driver.contribute(&ctx).address {
                Some(AddressSource::ContainerFile {
                    container,
                    path,
                    port,
                }) => (docker.read_file(&container, &path).await?, port),
                Some(AddressSource::Exec {
                    container,
                    command,
                    pointer,
                    port,
                }) => (
                    docker
                        .exec_output(&container, &command)
                        .await?
                        .and_then(|out| AddressSource::host_in_json(&out, &pointer)),
                    port,
                ),
                Some(AddressSource::Static { host, port }) => (Some(host), port),
                None => continue,
            };
            let live = live.map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
            if let Some(address) = live
                .map(|h| (h, port))
                .or_else(|| stored.get(&key).cloned())
            {
                found.insert(key, address);
            }
        }
    }
    // The relay's address counts only while the pod's agent is registered there: never a
    // remembered one.
    if let Some((host, port)) = stack.relay.as_ref().and_then(|r| r.host_port()) {
        for sidecar in relay_registered(docker, stack).await? {
            found.insert((sidecar, TransportKind::Relay), (host.clone(), port));
        }
    }
    Ok(found)
}

/// The sidecars whose gate's agent is registered with the stack's relay now (each gate keeps a
/// file saying so while it is).
pub async fn relay_registered(
    docker: &Docker,
    stack: &Stack,
) -> Result<std::collections::BTreeSet<String>, PassError> {
    let mut registered = std::collections::BTreeSet::new();
    if stack.relay.is_none() {
        return Ok(registered);
    }
    for sidecar in &stack.sidecars {
        let gate = crate::pod::container_name(&stack.stack, &sidecar.name, crate::pod::Role::Gate);
        if docker
            .read_file(&gate, &super::resolve::gate_relay_state())
            .await?
            .is_some_and(|h| !h.trim().is_empty())
        {
            registered.insert(sidecar.name.clone());
        }
    }
    Ok(registered)
}

/// What the gates recorded of two machines registering one stack at the relay: the sidecars
/// whose registration a newer one replaced (another machine serves the stack there now), and
/// those whose registration replaced another (this machine took over), with who and when.
pub async fn relay_conflicts(
    docker: &Docker,
    stack: &Stack,
) -> Result<super::status::RelayConflicts, PassError> {
    let mut found = super::status::RelayConflicts::default();
    if stack.relay.is_none() {
        return Ok(found);
    }
    for sidecar in &stack.sidecars {
        let gate = crate::pod::container_name(&stack.stack, &sidecar.name, crate::pod::Role::Gate);
        for (file, into) in [
            (super::resolve::gate_relay_replaced(), &mut found.replaced),
            (super::resolve::gate_relay_took_over(), &mut found.took_over),
        ] {
            let Some(text) = docker.read_file(&gate, &file).await? else {
                continue;
            };
            let mut words = text.split_whitespace();
            if let (Some(by), Some(at)) = (words.next(), words.next().and_then(|t| t.parse().ok()))
            {
                into.push(super::status::RelayReplaced {
                    sidecar: sidecar.name.clone(),
                    by: by.to_string(),
                    at,
                });
            }
        }
    }
    Ok(found)
}

/// The overlay addresses the stack declares but that no pod has published yet, and the relay
/// while a pod's agent is not registered there.
pub fn missing_addresses(stack: &Stack, discovered: &Discovered) -> Vec<String> {
    let mut kinds: Vec<TransportKind> =
        transport::drivers(stack).iter().map(|d| d.kind()).collect();
    if stack.relay.is_some() {
        kinds.push(TransportKind::Relay);
    }
    kinds
        .into_iter()
        .flat_map(|kind| {
            stack
                .sidecars
                .iter()
                .filter(move |s| !discovered.contains_key(&(s.name.clone(), kind)))
                .map(move |s| format!("{} address of {}", kind.as_str(), s.name))
        })
        .collect()
}

/// Waits (up to `timeout`) for the overlay addresses of freshly started transports, so one
/// `apply` ends with pairing codes that carry every address.
pub async fn await_addresses(
    docker: &Docker,
    stack: &Stack,
    state: &StateDir,
    timeout: std::time::Duration,
) -> Result<Vec<String>, PassError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let missing = missing_addresses(stack, &discover(docker, stack, state).await?);
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(missing);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The state dir's desired files, logging why the stack key changes when it does.
pub fn pairing_of(
    stack: &Stack,
    state: &StateDir,
    discovered: &Discovered,
    now: u64,
) -> Result<Pairing, PassError> {
    let fresh_key = StackKey::generate(stack.secret_generation).map_err(PassError::Key)?;
    let lan = transport::lan_host(stack);
    let inputs = PairingInputs {
        key: state.read_key(),
        fresh_key,
        registry: state.read_registry(),
        issued: state.issued(),
        renders: state.read_render_index(),
        addresses: transport::addresses(stack, lan.as_deref(), discovered),
        now,
    };
    let pairing = desired_files(stack, inputs)?;
    match &pairing.key_change {
        Some(KeyChange::Replaced(why)) => tracing::warn!(
            "stack key of `{}` is being replaced: {why}; every token and pairing code is re-issued",
            stack.stack
        ),
        Some(KeyChange::Rotated { from, to }) => tracing::info!(
            "rotating the stack key of `{}` (secret-generation {from} → {to})",
            stack.stack
        ),
        Some(KeyChange::First) => tracing::info!("generating the stack key of `{}`", stack.stack),
        None => {}
    }
    Ok(pairing)
}

pub use crate::pairing::unix_now;
