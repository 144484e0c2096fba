//! Reconcile: resolve stack.kdl into the Desired state, the pure planner, and the executor
//! that carries a plan out against an [`Engine`].

mod artifacts;
mod execute;
mod observe;
mod pass;
mod plan;
mod resolve;

pub use artifacts::{KeyChange, Pairing, PairingInputs, desired_files};
pub use execute::{Engine, ExecuteError, execute};
pub use observe::{from_snapshot, observe};
pub use pass::{PassError, Planned, pairing_of, prepare, run, unix_now};
pub use plan::{
    Desired, DesiredFile, FileContent, ImageNeed, ImageSource, Observed, ObservedContainer, Plan,
    QrFormat, Reason, Step, plan,
};
pub use resolve::{Host, Machine, RESTART_POLICY, ResolveError, SoulImage, resolve};
