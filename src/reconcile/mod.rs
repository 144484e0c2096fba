//! Reconcile: resolve stack.kdl into the Desired state, the pure planner, the executor that
//! carries a plan out against an [`Engine`], and the watch loop.

mod apply;
mod artifacts;
mod codes;
mod devices;
mod down;
mod execute;
mod flaps;
pub mod lock;
mod observe;
mod pass;
mod plan;
mod prune;
mod resolve;
mod status;
mod transports;
mod triggers;
mod update;
mod watch;

pub use apply::{ADDRESS_WAIT, Applied, Progress, converge};
pub use artifacts::{KeyChange, Pairing, PairingError, PairingInputs, desired_files};
pub use codes::{CodeError, one_sidecar, pairing_code};
pub use devices::{DeviceStatus, DevicesReport, report as devices_report};
pub use down::plan_down;
pub use execute::{Engine, ExecuteError, execute};
pub use flaps::FlapTracker;
pub use observe::{from_snapshot, observe};
pub use pass::{
    LockChange, PassError, Planned, await_addresses, check_inputs, check_ownership, desired,
    discover, missing_addresses, pairing_of, prepare, record_stopped, relay_conflicts, run,
    stopped, unix_now,
};
pub use plan::{
    Desired, DesiredFile, FileContent, ImageNeed, ImageSource, Observed, ObservedContainer, Plan,
    QrFormat, Reason, Step, plan, with_legacy_volumes,
};
pub use prune::{UnusedImage, prune, unused_images};
pub use resolve::{ResolveError, SoulImage, read_lock, resolve};
pub use status::{
    Backup, ContainerStatus, PodStatus, PublicName, RelayConflicts, RelayReplaced, StatusReport,
    UndeclaredContainer, public_names, report as status_report,
};
pub use transports::{TransportStatus, TransportsReport, report as transports_report};
pub use update::{Moved, Update, update};
pub use watch::{
    AfterPass, LAST_GOOD_FILE, WATCH_STATUS_FILE, WatchError, WatchOptions, WatchStatus,
    declared_name, pull_once, watch,
};
