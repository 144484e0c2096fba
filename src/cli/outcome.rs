//! How a command ends: its exit code, and the one place where errors become exit codes and
//! hints.

use super::*;

/// Exit codes, documented in README.md and `soul --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success; for `plan --detailed-exitcode`: no changes pending.
    Ok = 0,
    /// Invalid input (stack.kdl, flags, missing secret files) or a failed operation.
    Failure = 1,
    /// `plan --detailed-exitcode` only: the plan has changes (as Terraform).
    ChangesPending = 2,
    /// The Docker engine could not be reached (check DOCKER_HOST and the daemon).
    EngineUnreachable = 3,
}

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Edit(#[from] crate::stack::edit::EditError),
    #[error(transparent)]
    Watch(#[from] reconcile::WatchError),
    #[error(transparent)]
    Gate(#[from] crate::gate::GateError),
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    #[error(transparent)]
    Code(#[from] reconcile::CodeError),
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Bundle(#[from] crate::state::bundle::BundleError),
    /// `soul pause --check`: the pod's guard is not in place.
    #[error("the pod is not guarded: only the gate's port {gate_port} should answer from outside")]
    Unguarded { gate_port: u16 },
    /// One of soul's programs in a pod (pause, demo-app) stopped with an error.
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A file soul reads or writes for the user.
    #[error("{0}")]
    Io(String),
    /// The request cannot be met as asked; the message says what to do.
    #[error("{0}")]
    Usage(String),
}

impl From<stack::edit::RotateError> for CliError {
    fn from(e: stack::edit::RotateError) -> CliError {
        use stack::edit::RotateError;
        match e {
            RotateError::Stack(e) => CliError::Stack(e),
            RotateError::Edit(e) => CliError::Edit(e),
            write @ RotateError::Write { .. } => CliError::Io(write.to_string()),
        }
    }
}

impl CliError {
    /// The one place errors become exit codes.
    pub fn exit(&self) -> Exit {
        let unreachable = match self {
            CliError::Runtime(e) => e.is_unreachable(),
            CliError::Pass(e) => e.is_unreachable(),
            _ => false,
        };
        if unreachable {
            Exit::EngineUnreachable
        } else {
            Exit::Failure
        }
    }

    /// What the user reads on stderr.
    pub fn report(&self) -> String {
        match self {
            CliError::Stack(StackError::Invalid(d))
            | CliError::Watch(reconcile::WatchError::Stack(StackError::Invalid(d))) => {
                d.render(std::io::stderr().is_terminal())
            }
            other => {
                let mut s = format!("error: {other}");
                let mut source = std::error::Error::source(other);
                while let Some(e) = source {
                    let line = e.to_string();
                    if !s.contains(&line) {
                        s.push_str(&format!("\n  caused by: {line}"));
                    }
                    source = e.source();
                }
                if let Some(hint) = self.hint() {
                    s.push_str(&format!("\n  hint: {hint}"));
                }
                s.push('\n');
                s
            }
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            _ if self.exit() == Exit::EngineUnreachable && permission_denied(self) => Some(
                "the Docker socket refused this user: join the `docker` group (`sudo usermod -aG docker $USER`, then log in again), run soul as root, or use a rootless engine (DOCKER_HOST=unix://$XDG_RUNTIME_DIR/docker.sock)".into(),
            ),
            _ if self.exit() == Exit::EngineUnreachable => Some(
                "is the Docker daemon running? soul talks to DOCKER_HOST, or unix:///var/run/docker.sock when unset".into(),
            ),
            CliError::Pass(PassError::Pairing(reconcile::PairingError::RegistryLost {
                gate_copy: true,
                ..
            })) => Some(
                "soul will not re-issue every token by itself: every paired device would lose access. The gate's copy is intact: `cp <state dir>/gate/devices.json <state dir>/devices.json` restores the registry (or restore it from a backup); or start over deliberately with `soul rotate --new-key` (every device scans a new pairing code)".into(),
            ),
            CliError::Pass(PassError::Pairing(reconcile::PairingError::RegistryLost { .. })) => Some(
                "soul will not re-issue every token by itself: every paired device would lose access. Restore devices.json from a backup into the state dir, or start over deliberately with `soul rotate --new-key` (every device scans a new pairing code)".into(),
            ),
            CliError::Pass(PassError::Pairing(reconcile::PairingError::KeyMismatch { .. })) => Some(
                "this key would lock every paired device out. Put back the stack.key the devices were paired with (from a backup), or start over deliberately with `soul rotate --new-key` (every device scans a new pairing code)".into(),
            ),
            CliError::Pass(PassError::Pairing(reconcile::PairingError::KeyLost { .. })) => Some(
                "soul will not make a new key by itself: every paired device would lose access. Restore stack.key from a backup into the state dir (the devices' tokens then keep working), or start over deliberately with `soul rotate --new-key` (every device scans a new pairing code)".into(),
            ),
            CliError::Stack(StackError::Read { .. }) => {
                Some("pass the stack file with -f PATH (default ./stack.kdl)".into())
            }
            CliError::Pass(PassError::Execute(e)) if e.untouched => {
                Some("nothing that was running has been changed".into())
            }
            CliError::Pass(PassError::Execute(_)) => Some(
                "fix the cause and run `soul apply` again: it picks up where this one stopped".into(),
            ),
            _ => None,
        }
    }
}

/// Whether an error was caused by the OS refusing access (the Docker socket's permissions).
pub(super) fn permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            || e.to_string().contains("Permission denied")
        {
            return true;
        }
        cause = e.source();
    }
    false
}
