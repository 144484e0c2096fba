//! The flags resolved once into a [`Context`] (file, stack, state dir), and what commands on a
//! stack share: the lock, a prepared pass.

use super::*;

/// The flags resolved once (ripgrep's second stage): the stack file, the stack it declares and
/// the state dir that stack uses. Commands that work on a stack take this, not the flags.
pub(super) struct Context {
    pub(super) file: PathBuf,
    pub(super) stack: Stack,
    pub(super) state: PathBuf,
}

impl Context {
    /// Reads and validates `--file`.
    pub(super) fn load(cli: &Cli) -> Result<Context, CliError> {
        Ok(Context::of(cli, stack::load(&cli.file)?))
    }

    /// `stack` as the flags place it: its state dir is `--state-dir`, else the stack's own.
    pub(super) fn of(cli: &Cli, stack: Stack) -> Context {
        let state = cli
            .state_dir
            .clone()
            .unwrap_or_else(|| state::default_dir(&stack.stack));
        Context {
            file: cli.file.clone(),
            stack,
            state,
        }
    }

    /// The state dir, for reading: nothing is created.
    pub(super) fn state(&self) -> StateDir {
        StateDir::at(&self.state)
    }

    /// The state dir, made (private) when it is missing.
    pub(super) fn open_state(&self) -> Result<StateDir, CliError> {
        Ok(StateDir::open(&self.state)?)
    }
}

/// Everything a pass knows before its first mutation.
pub(super) struct Pass {
    pub(super) desired: Desired,
    pub(super) docker: Docker,
    pub(super) plan: Plan,
    pub(super) lock: Option<reconcile::LockChange>,
}

/// Resolve, connect, observe and plan.
pub(super) async fn prepare(ctx: &Context, state: &StateDir) -> Result<Pass, CliError> {
    // A missing secret file is reported before the engine is touched.
    reconcile::check_inputs(&ctx.stack, &Host, state)?;
    let docker = Docker::connect().await?;
    let planned = reconcile::prepare(&docker, &ctx.stack, &Host, state, unix_now()).await?;
    Ok(Pass {
        desired: planned.desired,
        docker,
        plan: planned.plan,
        lock: planned.lock,
    })
}

/// Takes the stack's lock, saying on stderr what it waits for while another soul process
/// (`doing` the stack: "is applying", "holds") has it.
pub(super) fn lock(dir: &StateDir, stack: &Stack, doing: &str) -> Result<state::Lock, CliError> {
    Ok(dir.lock(|holder| {
        eprintln!(
            "waiting: another soul process{} {doing} stack `{}`…",
            holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            stack.stack
        );
    })?)
}
