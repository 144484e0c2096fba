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
    let first = run(docker, state, stack, plan, |index, step| {
        on_step(Progress { pass: 0, index, of }, step)
    })
    .await;
    match first {
        Err(e) if vanished_under_the_plan(&e, plan) => {
            // The pass below plans again from what is there now.
            tracing::warn!(
                "{e}: a container went away after it was observed (a request of a killed soul finishing in the engine); planning again"
            );
        }
        other => other?,
    }
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

/// Whether a run failed because a container it was to start was gone (the engine's 404): the
/// engine changed after it was observed (a killed soul's create rolled back, say), so the
/// plan, not the engine, is wrong, and planning again converges.
fn vanished_under_the_plan(e: &PassError, plan: &Plan) -> bool {
    let PassError::Execute(e) = e else {
        return false;
    };
    matches!(plan.steps.get(e.done), Some(Step::StartContainer { .. }))
        && e.source
            .downcast_ref::<crate::runtime::RuntimeError>()
            .is_some_and(|r| {
                matches!(
                    r,
                    crate::runtime::RuntimeError::Engine(
                        bollard::errors::Error::DockerResponseServerError {
                            status_code: 404,
                            ..
                        }
                    )
                )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::ExecuteError;
    use crate::reconcile::plan::Reason;
    use crate::runtime::RuntimeError;

    fn failed_at_0(source: RuntimeError) -> PassError {
        PassError::Execute(ExecuteError {
            what: "cannot start container soul_s_web_app".into(),
            done: 0,
            untouched: false,
            source: Box::new(source),
        })
    }

    /// CI once saw the apply after a killed one fail: a container it observed (the killed
    /// apply's create, still rolling back in the engine) was gone when it started it (404).
    #[test]
    fn a_container_gone_between_observation_and_start_means_planning_again() {
        let start = Plan {
            steps: vec![Step::StartContainer {
                name: "soul_s_web_app".into(),
                reason: Reason::Stopped,
            }],
            ..Plan::default()
        };
        let gone = || {
            RuntimeError::Engine(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message: "No such container: soul_s_web_app".into(),
            })
        };
        assert!(vanished_under_the_plan(&failed_at_0(gone()), &start));
        let refused = RuntimeError::Engine(bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: "port is already allocated".into(),
        });
        assert!(!vanished_under_the_plan(&failed_at_0(refused), &start));
        let remove = Plan {
            steps: vec![Step::RemoveNetwork {
                name: "soul_s".into(),
                id: None,
            }],
            ..Plan::default()
        };
        assert!(!vanished_under_the_plan(&failed_at_0(gone()), &remove));
    }
}
