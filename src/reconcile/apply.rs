//! `soul apply` after its plan: run it, then, when it started a container that carries an
//! overlay (or a gate whose agent registers with the relay), wait for the address that
//! transport publishes a moment later and converge once more, so the pairing codes it leaves
//! behind carry every address.

use std::time::Duration;

use super::pass::{PassError, await_addresses, prepare, run, unix_now};
use super::plan::{Desired, Plan, Step};
use crate::machine::Machine;
use crate::pod::Role;
use crate::runtime::Docker;
use crate::stack::Stack;
use crate::state::StateDir;

/// How long apply waits for an overlay it just started to publish its address.
pub const ADDRESS_WAIT: Duration = Duration::from_secs(30);
/// How long `apply` waits for freshly started gates to register with the stack's relay.
pub const RELAY_WAIT: Duration = Duration::from_secs(5);

/// What one apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Steps run, over both passes.
    pub changes: usize,
    /// Overlay addresses still unknown when it gave up waiting ("tor address of notes").
    pub missing_addresses: Vec<String>,
}

/// Which pass a step belongs to, and its place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// 0 for the planned pass, 1 for the one after the addresses.
    pub pass: usize,
    pub index: usize,
    pub of: usize,
}

/// Runs `plan` (made from `desired`), waits for new overlays' addresses, and runs the plan
/// that follows from them. `on_step` hears about each step before it runs.
pub async fn converge(
    docker: &Docker,
    stack: &Stack,
    state: &StateDir,
    machine: &dyn Machine,
    desired: &Desired,
    plan: &Plan,
    mut on_step: impl FnMut(Progress, &Step),
) -> Result<Applied, PassError> {
    let of = plan.steps.len();
    run(docker, state, stack, plan, |index, step| {
        on_step(Progress { pass: 0, index, of }, step)
    })
    .await?;
    let overlays: Vec<Role> = crate::transport::drivers(stack)
        .iter()
        .map(|d| d.role())
        .collect();
    // A relay agent (in the gate) registers in well under a second when its relay is up; a
    // relay that is down costs a shorter wait than an overlay's first login.
    let wait = if started_one_of(&overlays, desired, plan) {
        ADDRESS_WAIT
    } else if stack.relay.is_some() && started_one_of(&[Role::Gate], desired, plan) {
        RELAY_WAIT
    } else {
        Duration::ZERO
    };
    let missing_addresses = await_addresses(docker, stack, state, wait).await?;
    let again = prepare(docker, stack, machine, state, unix_now())
        .await?
        .plan;
    let more = again.steps.len();
    run(docker, state, stack, &again, |index, step| {
        on_step(
            Progress {
                pass: 1,
                index,
                of: more,
            },
            step,
        )
    })
    .await?;
    Ok(Applied {
        changes: of + more,
        missing_addresses,
    })
}

/// Whether `plan` starts a container that carries one of the stack's overlays.
/// Whether the plan starts a container of one of these roles.
fn started_one_of(carriers: &[Role], desired: &Desired, plan: &Plan) -> bool {
    let overlays: Vec<&str> = desired
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| carriers.contains(&c.role))
        .map(|c| c.name.as_str())
        .collect();
    plan.steps.iter().any(
        |s| matches!(s, Step::StartContainer { name, .. } if overlays.contains(&name.as_str())),
    )
}
