//! One whole pass, shared by `apply`, `plan` and `watch`: resolve the stack (containers and
//! state-dir files), observe the engine and the state dir, plan; and executing that plan.

use crate::runtime::{Docker, RuntimeError};
use crate::stack::Stack;
use crate::state::{StackKey, StateDir};
use crate::transport;

use super::artifacts::{KeyChange, Pairing, PairingInputs, desired_files};
use super::execute::{ExecuteError, execute};
use super::plan::{Desired, Plan, Step, plan};
use super::resolve::{Machine, ResolveError, resolve};

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
    Token(#[from] crate::pairing::TokenError),
    /// The machine could not give soul a random key.
    #[error("cannot generate a key: {0}")]
    Key(std::io::Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
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
}

/// Resolves, observes and plans, changing nothing.
pub async fn prepare(
    docker: &Docker,
    stack: &Stack,
    state: &StateDir,
    machine: &dyn Machine,
    now: u64,
) -> Result<Planned, PassError> {
    let mut desired = resolve(stack, machine)?;
    desired.files = pairing_of(stack, state, now)?.files;
    let observed = super::observe::observe(docker, &desired, state).await?;
    let plan = plan(&desired, &observed);
    Ok(Planned { desired, plan })
}

/// Carries out a plan; `on_step` hears of each step before it runs.
pub async fn run(
    docker: &Docker,
    state: &StateDir,
    stack: &Stack,
    plan: &Plan,
    on_step: impl FnMut(usize, &Step),
) -> Result<(), PassError> {
    execute(docker, state, &stack.stack, plan, on_step).await?;
    Ok(())
}

/// The state dir's desired files, logging why the stack key changes when it does.
pub fn pairing_of(stack: &Stack, state: &StateDir, now: u64) -> Result<Pairing, PassError> {
    let fresh_key = StackKey::generate(stack.secret_generation).map_err(PassError::Key)?;
    let lan = transport::lan_host(stack);
    let inputs = PairingInputs {
        key: state.read_key(),
        fresh_key,
        registry: state.read_registry(),
        renders: state.read_render_index(),
        addresses: transport::addresses(stack, lan.as_deref()),
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

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
