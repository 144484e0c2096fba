//! The command line: the dispatch to one library call per command, output formatting, and
//! the one place where errors become exit codes. The arguments are [`args`]'s.

mod args;
mod connect;
mod relay;

pub use args::*;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::machine::Host;
use crate::reconcile::{self, Desired, PassError, Plan, SoulImage, Step, unix_now};
use crate::runtime::{Docker, RuntimeError};
use crate::stack::{self, Stack, StackError};
use crate::state::{self, StateDir, StateError};

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
fn permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
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

/// Writes to stdout; a closed pipe (`soul plan | head`) ends the program quietly.
fn out(s: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<Exit, CliError> {
    match &cli.command {
        Command::Init(args) => init(&cli, args),
        Command::Validate => validate(&Context::load(&cli)?),
        Command::Schema => {
            out(&stack::schema_json());
            Ok(Exit::Ok)
        }
        Command::Plan(args) => plan(&Context::load(&cli)?, args).await,
        Command::Apply => apply(&Context::load(&cli)?).await,
        Command::Status(args) => status(&cli, args.output).await,
        Command::Watch(args) => watch(&cli, args).await,
        Command::Down(args) => down(&Context::load(&cli)?, args).await,
        Command::Logs(args) => logs(&Context::load(&cli)?, args).await,
        Command::Stop(args) => stop(&Context::load(&cli)?, args).await,
        Command::Start(args) => start(&Context::load(&cli)?, args).await,
        Command::Restart(args) => restart(&Context::load(&cli)?, args).await,
        Command::Image => image().await,
        Command::Completions { shell } => {
            out(&completions(*shell));
            Ok(Exit::Ok)
        }
        Command::Man { out: dir } => man(dir.as_deref()),
        Command::Devices(args) => devices(&Context::load(&cli)?, args.output),
        Command::Pair(args) if args.serve => pair_page(&Context::load(&cli)?, args.port).await,
        Command::Pair(args) => pair(&Context::load(&cli)?, args),
        Command::Rotate(args) => rotate(&cli, args).await,
        Command::Export(ExportCommand::Compose { out: path }) => {
            export_compose(&Context::load(&cli)?, path.as_deref())
        }
        Command::Export(ExportCommand::Kubernetes { out: path }) => {
            export_kubernetes(&Context::load(&cli)?, path.as_deref())
        }
        Command::Connect(args) => connect::run(args).await,
        Command::Relay(RelayCommand::Serve { config, state_dir }) => {
            relay::serve(config, state_dir.as_deref()).await
        }
        Command::Relay(RelayCommand::Status { status, output }) => {
            relay::status(status, *output).await
        }
        Command::Relay(RelayCommand::Allow) => relay::allow(&Context::load(&cli)?),
        Command::Bridge(BridgeCommand::Init(args)) => bridge_init(&cli, args),
        Command::Bridge(BridgeCommand::Status(args)) => {
            bridge_status(&Context::load(&cli)?, args.output).await
        }
        Command::Bridge(BridgeCommand::Address(args)) => {
            bridge_address(&Context::load(&cli)?, args).await
        }
        Command::Gate(args) => gate(args).await,
        Command::Pause(args) => pause(args).await,
        Command::DemoApp { port } => {
            crate::agent::demo_app(*port, async {
                let _ = crate::agent::pause().await;
            })
            .await
            .map_err(|source| CliError::Program {
                program: "demo-app",
                source,
            })?;
            Ok(Exit::Ok)
        }
        Command::Probe { url, timeout } => match crate::agent::probe(url, *timeout).await {
            Ok(()) => Ok(Exit::Ok),
            Err(e) => {
                eprintln!("probe {url}: {e}");
                Ok(Exit::Failure)
            }
        },
    }
}

async fn watch(cli: &Cli, args: &WatchArgs) -> Result<Exit, CliError> {
    let opts = reconcile::WatchOptions {
        file: cli.file.clone(),
        state_dir: cli.state_dir.clone(),
        resync: args.resync,
        pull: args.pull,
        flap_restarts: args.flap_restarts,
        flap_window: args.flap_window,
        address_poll: args.address_poll,
        debounce: Duration::from_millis(50),
        after_pass: args.export_kubernetes.clone().map(|path| {
            let state_dir = cli.state_dir.clone();
            reconcile::AfterPass(std::sync::Arc::new(move |stack: &Stack| {
                let state = state_dir
                    .clone()
                    .unwrap_or_else(|| state::default_dir(&stack.stack));
                keep_kubernetes_export(stack, &state, &path);
            }))
        }),
    };
    reconcile::watch(opts, terminated()).await?;
    Ok(Exit::Ok)
}

async fn gate(args: &GateArgs) -> Result<Exit, CliError> {
    let mut cfg = crate::gate::GateConfig::new(&args.stack, args.upstream, args.keys.clone());
    cfg.sidecar = args.sidecar.clone();
    let spent = args
        .spent
        .as_ref()
        .map(|d| d.join(args.sidecar.as_deref().unwrap_or("gate")));
    let volume = args
        .redeemed
        .as_ref()
        .map(|d| d.join(crate::gate::REDEEMED_FILE));
    cfg.earlier_spent = spent.iter().flat_map(|_| volume.clone()).collect();
    cfg.spent_file = spent.or(volume);
    cfg.header_timeout = args.header_timeout;
    cfg.slots = crate::gate::SlotLimits {
        max: args.max_connections as usize,
        per_source: args.per_source as usize,
        new_per_second: f64::from(args.per_source_rate),
        burst: 4.0 * f64::from(args.per_source_rate),
    };
    cfg.failures_per_minute = args.failures_per_minute;
    cfg.tls_only = args.tls_only;
    cfg.relay = match (&args.relay, &args.sidecar, &args.relay_pin) {
        (Some(relay), Some(sidecar), Some(pin)) => Some(crate::relay::agent::AgentConfig {
            relay: relay.clone(),
            pin: pin.clone(),
            stack: args.stack.clone(),
            sidecar: sidecar.clone(),
            key_file: args.keys.join(crate::state::layout::GATE_RELAY_KEY_FILE),
            state_file: args
                .redeemed
                .as_ref()
                .map(|d| d.join(crate::relay::agent::STATE_FILE)),
        }),
        _ => None,
    };
    let threads = args.threads.map(usize::from);
    crate::gate::run(cfg, args.listen, threads, terminated()).await?;
    Ok(Exit::Ok)
}

/// Holds the pod's namespace until stopped, after installing its guard (or, with `--check`,
/// only checks that the guard is in place).
async fn pause(args: &PauseArgs) -> Result<Exit, CliError> {
    let policy = args.gate_port.map(|gate_port| crate::guard::Policy {
        gate_port,
        open_udp: args.open_udp.clone(),
    });
    if let (Some(policy), true) = (&policy, args.check) {
        return match crate::guard::installed(policy)? {
            true => Ok(Exit::Ok),
            false => Err(CliError::Unguarded {
                gate_port: policy.gate_port,
            }),
        };
    }
    if let Some(policy) = policy {
        // Never stop holding the namespace over this: the pod stays up, and the pause
        // container's health check reports it as unguarded.
        let port = policy.gate_port;
        match crate::guard::install(&policy) {
            Ok(()) => tracing::info!("only the gate's port {port} answers from outside the pod"),
            Err(e) => tracing::error!("the pod's ports are NOT private: {e}"),
        }
    }
    crate::agent::pause()
        .await
        .map_err(|source| CliError::Program {
            program: "pause",
            source,
        })?;
    Ok(Exit::Ok)
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// The flags resolved once (ripgrep's second stage): the stack file, the stack it declares and
/// the state dir that stack uses. Commands that work on a stack take this, not the flags.
struct Context {
    file: PathBuf,
    stack: Stack,
    state: PathBuf,
}

impl Context {
    /// Reads and validates `--file`.
    fn load(cli: &Cli) -> Result<Context, CliError> {
        Ok(Context::of(cli, stack::load(&cli.file)?))
    }

    /// `stack` as the flags place it: its state dir is `--state-dir`, else the stack's own.
    fn of(cli: &Cli, stack: Stack) -> Context {
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
    fn state(&self) -> StateDir {
        StateDir::at(&self.state)
    }

    /// The state dir, made (private) when it is missing.
    fn open_state(&self) -> Result<StateDir, CliError> {
        Ok(StateDir::open(&self.state)?)
    }
}

fn validate(ctx: &Context) -> Result<Exit, CliError> {
    let s = &ctx.stack;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    out(&format!(
        "{} is valid: stack `{}`, {}, {}, transports: {}\n",
        ctx.file.display(),
        s.stack,
        plural(s.sidecars.len(), "sidecar"),
        plural(s.devices.len(), "device"),
        s.transport_order()
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(Exit::Ok)
}

/// Everything a pass knows before its first mutation.
struct Pass {
    desired: Desired,
    docker: Docker,
    plan: Plan,
}

/// Resolve, connect, observe and plan.
async fn prepare(ctx: &Context, state: &StateDir) -> Result<Pass, CliError> {
    // A missing secret file is reported before the engine is touched.
    reconcile::check_inputs(&ctx.stack, &Host, state)?;
    let docker = Docker::connect().await?;
    let planned = reconcile::prepare(&docker, &ctx.stack, &Host, state, unix_now()).await?;
    Ok(Pass {
        desired: planned.desired,
        docker,
        plan: planned.plan,
    })
}

/// Takes the stack's lock, saying on stderr what it waits for while another soul process
/// (`doing` the stack: "is applying", "holds") has it.
fn lock(dir: &StateDir, stack: &Stack, doing: &str) -> Result<state::Lock, CliError> {
    Ok(dir.lock(|holder| {
        eprintln!(
            "waiting: another soul process{} {doing} stack `{}`…",
            holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            stack.stack
        );
    })?)
}

async fn plan(ctx: &Context, args: &PlanArgs) -> Result<Exit, CliError> {
    let Pass { plan, .. } = prepare(ctx, &ctx.state()).await?;
    let stack = &ctx.stack;
    match args.output {
        Output::Json => out(&json_text(&json!({
            "stack": stack.stack,
            "file": ctx.file,
            "changes": plan.steps.len(),
            "steps": plan.steps,
        }))),
        Output::Human if plan.is_empty() => out(&format!(
            "stack `{}` is up to date: nothing to do\n",
            stack.stack
        )),
        Output::Human => {
            let mut s = format!(
                "soul apply would take {} step{} for stack `{}`:\n",
                plan.steps.len(),
                if plan.steps.len() == 1 { "" } else { "s" },
                stack.stack
            );
            for step in &plan.steps {
                s.push_str(&format!("  {} {step}\n", sigil(step)));
            }
            out(&s);
        }
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        Exit::ChangesPending
    } else {
        Exit::Ok
    })
}

fn sigil(step: &Step) -> char {
    match step {
        Step::RemoveContainer { .. }
        | Step::RemoveVolume { .. }
        | Step::RemoveNetwork { .. }
        | Step::RemoveDuplicateNetwork { .. } => '-',
        Step::StartContainer { .. } => '>',
        _ => '+',
    }
}

async fn apply(ctx: &Context) -> Result<Exit, CliError> {
    let started = Instant::now();
    let stack = &ctx.stack;
    for s in reconcile::stopped(&ctx.state()) {
        eprintln!("note: `{s}` is stopped (`soul stop`): left as it is until `soul start {s}`");
    }
    if let Some(file) = stack.relay.as_ref().and_then(|r| r.token_file.as_ref()) {
        eprintln!(
            "note: `relay token-file={file}` is not used: the relay admits this stack by its agent key (`soul relay allow` prints the line for the relay's file)"
        );
    }
    let state = ctx.open_state()?;
    let _lock = lock(&state, stack, "is applying")?;
    let Pass {
        desired,
        docker,
        plan,
    } = prepare(ctx, &state).await?;
    if plan.is_empty() {
        out(&format!(
            "stack `{}` is up to date: 0 changes ({} ms)\n",
            stack.stack,
            started.elapsed().as_millis()
        ));
        return Ok(Exit::Ok);
    }
    let applied = reconcile::converge(
        &docker,
        stack,
        &state,
        &Host,
        &desired,
        &plan,
        |at, step| {
            if at.pass == 0 {
                tracing::info!(step = %step, "applying");
            }
            out(&format!(
                "  [{}/{}] {} {step}\n",
                at.index + 1,
                at.of,
                sigil(step)
            ));
        },
    )
    .await?;
    for m in &applied.missing_addresses {
        eprintln!(
            "warning: the {m} is not known yet; `soul apply` again (or `soul watch`) adds it to the pairing codes"
        );
    }
    out(&render_applied(
        stack,
        &desired,
        applied.changes,
        started.elapsed(),
    ));
    Ok(Exit::Ok)
}

/// What apply says when it is done: how much it changed, the LAN ports, how to pair.
fn render_applied(stack: &Stack, desired: &Desired, total: usize, took: Duration) -> String {
    let mut summary = format!(
        "applied {total} change{} to stack `{}` in {:.2} s\n",
        if total == 1 { "" } else { "s" },
        stack.stack,
        took.as_secs_f64()
    );
    if let Some(ports) = stack.lan_ports() {
        for (pod, port) in desired.pods.iter().zip(ports) {
            summary.push_str(&format!("  {}: LAN port {port}\n", pod.sidecar));
        }
    }
    if let Some(d) = stack.devices.first() {
        summary.push_str(&format!(
            "  pairing codes: `soul pair {}` (and `soul devices` for all {})\n",
            d.name,
            stack.devices.len()
        ));
    }
    summary
}

async fn status(cli: &Cli, output: Output) -> Result<Exit, CliError> {
    let stack = match stack::load(&cli.file).map_err(CliError::from) {
        Ok(s) => s,
        // A running watch keeps the last good config; show what it runs, and why.
        Err(CliError::Stack(StackError::Invalid(d))) => {
            // The state dir: the one named by --state-dir, else the declared stack's.
            let state_dir = cli.state_dir.clone().or_else(|| {
                reconcile::declared_name(&cli.file).map(|name| state::default_dir(&name))
            });
            let last_good = state_dir.and_then(|dir| {
                let state = StateDir::at(&dir);
                let src = state.read(reconcile::LAST_GOOD_FILE).ok()?;
                stack::parse(reconcile::LAST_GOOD_FILE, &String::from_utf8_lossy(&src)).ok()
            });
            match last_good {
                Some(s) => {
                    eprintln!(
                        "warning: {} is invalid; showing the last good config that soul runs:\n{}",
                        cli.file.display(),
                        d.render(std::io::stderr().is_terminal())
                    );
                    s
                }
                None => return Err(StackError::Invalid(d).into()),
            }
        }
        Err(e) => return Err(e),
    };
    let ctx = Context::of(cli, stack);
    let stack = &ctx.stack;
    let desired = match reconcile::resolve(stack, &Host, &ctx.state) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("warning: cannot tell whether containers match stack.kdl: {e}");
            None
        }
    };
    let docker = Docker::connect().await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    // Compared as the planner compares: a soul 0.1 volume is mounted under its old name.
    let desired = desired.map(|d| reconcile::with_legacy_volumes(&d, &observed).into_owned());
    let watch = reconcile::WatchStatus::read(&ctx.state());
    let mut report = reconcile::status_report(stack, desired.as_ref(), &observed, watch);
    report.engine = Some(docker.endpoint().clone());
    report.stopped = reconcile::stopped(&ctx.state()).into_iter().collect();
    match output {
        Output::Json => out(&json_text(&report)),
        Output::Human => out(&render_status(&report, &cli.file)),
    }
    Ok(Exit::Ok)
}

/// A report as pretty JSON, with a final newline.
fn json_text(report: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string_pretty(report).unwrap_or_default();
    s.push('\n');
    s
}

fn render_status(report: &reconcile::StatusReport, file: &Path) -> String {
    let mut s = format!("stack `{}` ({})\n", report.stack, file.display());
    if let Some(engine) = &report.engine {
        s.push_str(&format!("  engine {engine}\n"));
    }
    for pod in &report.pods {
        let held = if report.stopped.contains(&pod.sidecar) {
            format!(
                " (stopped by `soul stop`; `soul start {}` starts it)",
                pod.sidecar
            )
        } else {
            String::new()
        };
        s.push_str(&format!("  pod {}{held}\n", pod.sidecar));
        for c in &pod.containers {
            let health = c
                .health
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            let current = match c.current {
                Some(true) => "up to date",
                Some(false) => "differs from stack.kdl: `soul apply` recreates it",
                None if c.state == "missing" => "`soul apply` creates it",
                None => "unknown",
            };
            s.push_str(&format!(
                "    {:<6} {:<22} {:<28} {current}\n",
                c.role.as_str(),
                format!("{}{health}", c.state),
                c.image.as_deref().unwrap_or("-"),
            ));
        }
    }
    s.push_str(&watch_lines(report.watch.as_ref()));
    for u in &report.undeclared {
        s.push_str(&format!(
            "  undeclared: {} ({}): `soul apply` removes it\n",
            u.name, u.state
        ));
    }
    s
}

async fn down(ctx: &Context, args: &DownArgs) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    let dir = ctx.open_state()?;
    let _lock = lock(&dir, stack, "holds")?;
    let docker = Docker::connect().await?;
    reconcile::check_ownership(&docker, stack, &dir).await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    let plan = reconcile::plan_down(&observed, args.volumes);
    let removed = plan.steps.len();
    reconcile::run(&docker, &dir, stack, &plan, |i, step| {
        out(&format!("  [{}/{removed}] - {step}\n", i + 1));
    })
    .await?;
    // Down: the stack is nobody's now (another state dir may take it up).
    docker.release_claim(&stack.stack).await?;
    if !args.volumes && !observed.volumes.is_empty() {
        let kept: Vec<&str> = observed.volumes.iter().map(String::as_str).collect();
        out(&format!(
            "  kept {} named volume{} ({}); `soul down --volumes` removes them\n",
            kept.len(),
            if kept.len() == 1 { "" } else { "s" },
            kept.join(", ")
        ));
    }
    out(&format!(
        "stack `{}` is down ({removed} removed)\n",
        stack.stack
    ));
    Ok(Exit::Ok)
}

async fn image() -> Result<Exit, CliError> {
    let docker = Docker::connect().await?;
    let tags = vec![
        SoulImage::current().reference,
        format!("{}:{}", SoulImage::REPOSITORY, env!("CARGO_PKG_VERSION")),
        format!("{}:latest", SoulImage::REPOSITORY),
    ];
    docker.build_soul_image(&tags).await?;
    let exe = std::env::current_exe().unwrap_or_default();
    out(&format!(
        "built {} from {}\n",
        tags.join(", "),
        display(&exe)
    ));
    Ok(Exit::Ok)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn devices(ctx: &Context, output: Output) -> Result<Exit, CliError> {
    let state = ctx.state();
    let now = unix_now();
    let report = reconcile::devices_report(&ctx.stack, &state, now);
    match output {
        Output::Json => out(&json_text(&report)),
        Output::Human => out(&render_devices(&report, &state, now)),
    }
    Ok(Exit::Ok)
}

fn render_devices(report: &reconcile::DevicesReport, state: &StateDir, now: u64) -> String {
    let mut s = format!(
        "devices of stack `{}` ({})\n",
        report.stack,
        state.path().display()
    );
    if report.devices.is_empty() {
        s.push_str("  none: add `device \"alice-phone\"` to stack.kdl and apply\n");
    }
    for d in &report.devices {
        let expiry = match d.expires_at {
            Some(t) if t <= now => "expired".to_string(),
            Some(t) => format!("expires in {}d", (t - now) / 86_400),
            None => "no expiry".into(),
        };
        let token = if d.token_current {
            "token current"
        } else {
            "token not issued yet: run `soul apply`"
        };
        s.push_str(&format!(
            "  {:<20} generation {:<3} {:<18} {token}; {} pairing files\n",
            d.name,
            d.generation,
            expiry,
            d.artifacts.len(),
        ));
    }
    s
}

/// Asks one question on the terminal; an empty answer takes the default.
fn ask(question: &str, default: &str) -> Result<String, CliError> {
    eprint!("{question} [{default}]: ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Io(format!("cannot read the answer: {e}")))?;
    let answer = line.trim();
    Ok(if answer.is_empty() {
        default.to_string()
    } else {
        answer.to_string()
    })
}

/// The transport `bridge init` writes: the flags' choice, else the user's answer on a
/// terminal, else Tailscale.
fn choose_transport(args: &InitArgs, interactive: bool) -> Result<crate::bridge::Choice, CliError> {
    use crate::bridge::{Choice, DEFAULT_AUTHKEY_FILE};
    let authkey = |default: &str| -> Result<String, CliError> {
        match &args.authkey_file {
            Some(p) => Ok(p.clone()),
            None if interactive => ask(
                "Auth-key file on this machine (soul never reads it into stack.kdl)",
                default,
            ),
            None => Ok(default.to_string()),
        }
    };
    let choice = if let Some(url) = &args.headscale {
        Choice::Headscale {
            url: url.clone(),
            authkey_file: authkey("/run/secrets/headscale-authkey")?,
        }
    } else if let Some(lighthouse) = &args.nebula {
        let need = |v: &Option<String>| v.clone().unwrap_or_default();
        Choice::Nebula {
            lighthouse: lighthouse.clone(),
            lighthouse_ip: need(&args.lighthouse_ip),
            ip: need(&args.nebula_ip),
            ca_file: need(&args.ca_file),
            cert_file: need(&args.cert_file),
            key_file: need(&args.key_file),
        }
    } else if args.tor {
        Choice::Tor
    } else if args.lan_only {
        Choice::LanOnly
    } else if args.tailscale || !interactive {
        Choice::Tailscale {
            authkey_file: authkey(DEFAULT_AUTHKEY_FILE)?,
            tags: args.tags.clone(),
        }
    } else {
        match ask(
            "Transport: tailscale, headscale, tor or lan-only",
            "tailscale",
        )?
        .as_str()
        {
            "tailscale" => Choice::Tailscale {
                authkey_file: authkey(DEFAULT_AUTHKEY_FILE)?,
                tags: args.tags.clone(),
            },
            "headscale" => Choice::Headscale {
                url: ask("Headscale URL", "https://headscale.example.com")?,
                authkey_file: authkey("/run/secrets/headscale-authkey")?,
            },
            "tor" => Choice::Tor,
            "lan-only" | "lan" => Choice::LanOnly,
            other => {
                return Err(CliError::Usage(format!(
                    "`{other}` is not a transport soul can set up here; pick tailscale, headscale, tor or lan-only (Nebula: --nebula …)"
                )));
            }
        }
    };
    Ok(choice)
}

fn bridge_init(cli: &Cli, args: &InitArgs) -> Result<Exit, CliError> {
    let source = stack::read_source(&cli.file)?;
    let path = cli.file.display().to_string();
    let stack = stack::parse(&path, &source).map_err(StackError::Invalid)?;
    let interactive = std::io::stdin().is_terminal() && !args.yes;
    let choice = choose_transport(args, interactive)?;
    let crate::bridge::Edited { text: new, diff } =
        crate::bridge::edit(&path, &source, &stack, &choice)?;
    if diff.is_empty() {
        out(&format!("{path} already says that; nothing to change\n"));
        return Ok(Exit::Ok);
    }
    out(&diff);
    if interactive
        && !matches!(
            ask(&format!("Write {path}?"), "Y")?.as_str(),
            "Y" | "y" | "yes"
        )
    {
        out("nothing written\n");
        return Ok(Exit::Ok);
    }
    stack::write_source(&cli.file, &new)
        .map_err(|e| CliError::Io(format!("cannot write {path}: {e}")))?;
    out(&format!(
        "wrote {path}; commit it, then `soul apply` (or let `soul watch` pick it up)\n"
    ));
    Ok(Exit::Ok)
}

fn export_compose(ctx: &Context, path: Option<&Path>) -> Result<Exit, CliError> {
    let export = crate::export::compose_of(&ctx.stack, &ctx.state).map_err(PassError::from)?;
    write_export(path, &export.text, &format!("{} services", export.services))
}

fn export_kubernetes(ctx: &Context, path: Option<&Path>) -> Result<Exit, CliError> {
    let m =
        crate::export::kubernetes::manifests_of(&ctx.stack, &ctx.state).map_err(PassError::from)?;
    let path = path.map(|p| export_file(p, &ctx.stack));
    write_export(path.as_deref(), &m.text, &format!("{} objects", m.objects))
}

/// `soul watch --export-kubernetes`: the export rewritten when it changed; a failure is logged,
/// never fatal to the watch.
fn keep_kubernetes_export(stack: &Stack, state: &Path, path: &Path) {
    let file = export_file(path, stack);
    match crate::export::kubernetes::manifests_of(stack, state) {
        Ok(m) if std::fs::read_to_string(&file).ok().as_deref() == Some(m.text.as_str()) => {}
        Ok(m) => match write_file_atomically(&file, &m.text) {
            Ok(()) => tracing::info!("wrote {} ({} objects)", file.display(), m.objects),
            Err(e) => tracing::warn!("cannot write {}: {e}", file.display()),
        },
        Err(e) => tracing::warn!("cannot export the stack for Kubernetes: {e}"),
    }
}

/// An export's file: `path` itself, or `<stack>.yaml` in it when it is a directory (or ends in
/// `/`).
fn export_file(path: &Path, stack: &Stack) -> PathBuf {
    if path.is_dir() || path.to_string_lossy().ends_with('/') {
        path.join(format!("{}.yaml", stack.stack))
    } else {
        path.to_path_buf()
    }
}

fn write_file_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::files::write_atomically(path, text.as_bytes(), crate::files::Access::AsBefore)
}

/// An export to `path` (atomically) or to stdout.
fn write_export(path: Option<&Path>, text: &str, what: &str) -> Result<Exit, CliError> {
    match path {
        Some(p) => {
            write_file_atomically(p, text)
                .map_err(|e| CliError::Io(format!("cannot write {}: {e}", p.display())))?;
            eprintln!("wrote {} ({what})", p.display());
        }
        None => out(text),
    }
    Ok(Exit::Ok)
}

/// The sidecar a command is about: the one named, or the only one.
/// Every sidecar's known addresses, in the stack's order (overlays read from the pods).
async fn current_addresses(
    ctx: &Context,
) -> Result<(Docker, Vec<Vec<crate::pairing::Address>>), CliError> {
    let stack = &ctx.stack;
    let docker = Docker::connect().await?;
    let discovered = reconcile::discover(&docker, stack, &ctx.state()).await?;
    let lan = crate::transport::lan_host(stack);
    Ok((
        docker,
        crate::transport::addresses(stack, lan.as_deref(), &discovered),
    ))
}

async fn bridge_address(ctx: &Context, args: &AddressArgs) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    let sidecar = reconcile::one_sidecar(stack, args.sidecar.as_deref())?;
    let (_, all) = current_addresses(ctx).await?;
    let i = stack
        .sidecars
        .iter()
        .position(|s| s.name == sidecar)
        .unwrap_or(0);
    let known = all.get(i).cloned().unwrap_or_default();
    if known.is_empty() {
        return Err(CliError::Usage(format!(
            "no address of `{sidecar}` is known yet: run `soul apply`, and check `soul bridge status`"
        )));
    }
    let shown = if args.all { &known[..] } else { &known[..1] };
    out(&shown.iter().map(|a| format!("{a}\n")).collect::<String>());
    Ok(Exit::Ok)
}

async fn bridge_status(ctx: &Context, output: Output) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    let (docker, all) = current_addresses(ctx).await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    let report = reconcile::transports_report(stack, &all, &observed);
    match output {
        Output::Json => out(&json_text(&report)),
        Output::Human => out(&render_transports(&report)),
    }
    Ok(Exit::Ok)
}

fn render_transports(report: &reconcile::TransportsReport) -> String {
    let mut s = format!("transports of stack `{}`\n", report.stack);
    for t in &report.transports {
        let state = match (t.up, t.running) {
            (true, _) => "up".to_string(),
            (_, Some(false)) => "down: container not running (`soul apply`)".into(),
            _ if t.address.is_none() => "down: address not known yet".into(),
            _ => format!("down: {}", t.health.as_deref().unwrap_or("unhealthy")),
        };
        s.push_str(&format!(
            "  {:<12} {:<10} {:<50} {state}\n",
            t.sidecar,
            t.transport,
            t.address.as_deref().unwrap_or("-"),
        ));
    }
    s
}

/// `soul logs`: the chosen containers' output, `<sidecar>-<role> | line`, until it ends (or,
/// with `-f`, until Ctrl-C).
async fn logs(ctx: &Context, args: &LogsArgs) -> Result<Exit, CliError> {
    use crate::pod::{Role, label, role_in_name};
    use crate::runtime::logs;
    let stack = &ctx.stack;
    if let Some(sidecar) = &args.sidecar {
        reconcile::one_sidecar(stack, Some(sidecar))?;
    }
    let role = match args.role.as_deref().map(|r| (r, Role::parse(r))) {
        Some((_, Some(role))) => Some(role),
        Some((r, None)) => {
            return Err(CliError::Usage(format!(
                "`{r}` is not a role: pick app, gate, pause, tailscale, nebula or tor"
            )));
        }
        None => None,
    };
    let docker = Docker::connect().await?;
    let mut sources: Vec<logs::Source> = docker
        .snapshot(&stack.stack)
        .await?
        .containers
        .into_iter()
        .filter_map(|c| {
            let sidecar = c.labels.get(label::SIDECAR)?.clone();
            let r = role_in_name(&c.name)?;
            let wanted = args.sidecar.as_ref().is_none_or(|s| *s == sidecar)
                && role.is_none_or(|want| want == r);
            wanted.then(|| logs::Source {
                container: c.name,
                label: format!("{sidecar}-{r}"),
            })
        })
        .collect();
    sources.sort_by(|a, b| a.label.cmp(&b.label));
    if sources.is_empty() {
        return Err(CliError::Usage(format!(
            "no container of stack `{}` matches: run `soul apply`, or check `soul status`",
            stack.stack
        )));
    }
    let width = sources.iter().map(|s| s.label.len()).max().unwrap_or(0);
    let since = args
        .since
        .map(|d| unix_now().saturating_sub(d.as_secs()) as i64);
    let options = logs::Options {
        follow: args.follow,
        since,
        tail: args.tail,
    };
    let mut lines = logs::read(&docker, sources, options);
    let stop = terminated();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(l) => out(&format!("{:<width$} | {}\n", l.label, l.text)),
                None => break,
            },
            () = &mut stop => break,
        }
    }
    Ok(Exit::Ok)
}

/// The sidecars a command names: the one given (which must exist), else all.
fn pods_of(ctx: &Context, args: &PodsArgs) -> Result<Vec<String>, CliError> {
    match &args.sidecar {
        Some(name) => Ok(vec![reconcile::one_sidecar(&ctx.stack, Some(name))?]),
        None => Ok(ctx.stack.sidecars.iter().map(|s| s.name.clone()).collect()),
    }
}

/// The containers of `sidecars` on the engine, the pod's namespace holder (pause) first.
async fn pod_containers(
    docker: &Docker,
    ctx: &Context,
    sidecars: &[String],
) -> Result<Vec<String>, CliError> {
    use crate::pod::{Role, label, role_in_name};
    let mut names: Vec<(bool, String)> = docker
        .snapshot(&ctx.stack.stack)
        .await?
        .containers
        .into_iter()
        .filter(|c| {
            c.labels
                .get(label::SIDECAR)
                .is_some_and(|s| sidecars.contains(s))
        })
        .map(|c| (role_in_name(&c.name) != Some(Role::Pause), c.name))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|(_, name)| name).collect())
}

/// `soul stop`: records the pods as stopped (so apply and watch leave them), then stops their
/// containers, dependents before the namespace holder.
async fn stop(ctx: &Context, args: &PodsArgs) -> Result<Exit, CliError> {
    let sidecars = pods_of(ctx, args)?;
    let state = ctx.open_state()?;
    let _lock = lock(&state, &ctx.stack, "holds")?;
    let mut stopped = reconcile::stopped(&state);
    stopped.extend(sidecars.iter().cloned());
    let docker = Docker::connect().await?;
    reconcile::check_ownership(&docker, &ctx.stack, &state).await?;
    reconcile::record_stopped(&state, &stopped)
        .map_err(|e| CliError::Io(format!("cannot record the stop: {e}")))?;
    for name in pod_containers(&docker, ctx, &sidecars).await?.iter().rev() {
        docker.stop_container(name).await?;
        out(&format!("  stopped {name}\n"));
    }
    out(&format!(
        "stopped {}; `soul apply` and `soul watch` leave {} so until `soul start`\n",
        sidecars.join(", "),
        if sidecars.len() == 1 { "it" } else { "them" }
    ));
    Ok(Exit::Ok)
}

/// `soul start`: clears `soul stop`'s record for the pods, then applies.
async fn start(ctx: &Context, args: &PodsArgs) -> Result<Exit, CliError> {
    let sidecars = pods_of(ctx, args)?;
    let state = ctx.open_state()?;
    {
        let _lock = lock(&state, &ctx.stack, "holds")?;
        let mut stopped = reconcile::stopped(&state);
        stopped.retain(|s| !sidecars.contains(s));
        reconcile::record_stopped(&state, &stopped)
            .map_err(|e| CliError::Io(format!("cannot clear the stop: {e}")))?;
    }
    apply(ctx).await
}

/// `soul restart`: each pod's namespace holder, then its other containers (which join the new
/// namespace when they start again).
async fn restart(ctx: &Context, args: &PodsArgs) -> Result<Exit, CliError> {
    let sidecars = pods_of(ctx, args)?;
    let state = ctx.open_state()?;
    let held = reconcile::stopped(&state);
    if let Some(s) = sidecars.iter().find(|s| held.contains(*s)) {
        return Err(CliError::Usage(format!(
            "`{s}` is stopped (`soul stop`): `soul start {s}` starts it"
        )));
    }
    let _lock = lock(&state, &ctx.stack, "holds")?;
    let docker = Docker::connect().await?;
    reconcile::check_ownership(&docker, &ctx.stack, &state).await?;
    for name in pod_containers(&docker, ctx, &sidecars).await? {
        docker.restart_container(&name).await?;
        out(&format!("  restarted {name}\n"));
    }
    Ok(Exit::Ok)
}

/// `soul init`: a first stack.kdl at `-f` (never over an existing file).
fn init(cli: &Cli, args: &InitStackArgs) -> Result<Exit, CliError> {
    use crate::stack::init::{Init, name_from};
    let path = &cli.file;
    if path.exists() {
        return Err(CliError::Usage(format!(
            "{} exists: soul init never overwrites a stack file; edit it, or move it away first",
            path.display()
        )));
    }
    let interactive = std::io::stdin().is_terminal();
    let needs_flags = || {
        CliError::Usage(
            "without a terminal to ask on, soul init needs --image IMAGE and --port PORT (the port the service listens on)".into(),
        )
    };
    let image = match &args.image {
        Some(image) => image.clone(),
        None if interactive => ask("Image of your service", "nginx:latest")?,
        None => return Err(needs_flags()),
    };
    let port = match args.port {
        Some(port) => port,
        None if interactive => ask("Port it listens on inside its container", "80")?
            .parse()
            .map_err(|_| CliError::Usage("a port is a number from 1 to 65535".into()))?,
        None => return Err(needs_flags()),
    };
    let directory = std::env::current_dir()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let stack = match &args.name {
        Some(name) if name_from(name, "") == *name => name.clone(),
        Some(name) => {
            return Err(CliError::Usage(format!(
                "`{name}` is not a stack name (lowercase letters, digits and dashes, starting with a letter, at most 32): try `{}`",
                name_from(name, "home")
            )));
        }
        None => name_from(&directory, "home"),
    };
    let init = Init { stack, image, port };
    let text = init.text();
    stack::parse(&path.display().to_string(), &text).map_err(StackError::Invalid)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| CliError::Io(format!("cannot write {}: {e}", path.display())))?;
    out(&format!(
        "wrote {} (stack `{}`, sidecar `{}` on LAN port 8443, device `my-phone`)\nnext: `soul apply`, then `soul pair my-phone` and scan the code with the phone\n",
        path.display(),
        init.stack,
        init.sidecar()
    ));
    Ok(Exit::Ok)
}

/// `soul man`: the top page on stdout, or every page into `dir`.
fn man(dir: Option<&Path>) -> Result<Exit, CliError> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            clap_mangen::generate_to(cmd, dir).map_err(|e| {
                CliError::Io(format!(
                    "cannot write the manual pages into {}: {e}",
                    dir.display()
                ))
            })?;
            eprintln!("wrote soul.1 and a page per command into {}", dir.display());
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| CliError::Io(format!("cannot render the manual page: {e}")))?;
            out(&String::from_utf8_lossy(&page));
        }
    }
    Ok(Exit::Ok)
}

/// A completion script for `shell`, generated from the argument definitions.
fn completions(shell: Shell) -> String {
    use clap_complete::{generate, shells};
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    match shell {
        Shell::Bash => generate(shells::Bash, &mut cmd, "soul", &mut script),
        Shell::Zsh => generate(shells::Zsh, &mut cmd, "soul", &mut script),
        Shell::Fish => generate(shells::Fish, &mut cmd, "soul", &mut script),
    }
    String::from_utf8_lossy(&script).into_owned()
}

/// `soul pair --serve`: the pairing page on loopback until Ctrl-C.
async fn pair_page(ctx: &Context, port: u16) -> Result<Exit, CliError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| CliError::Io(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Io(e.to_string()))?;
    let page = crate::pair_page::PairPage::new(ctx.stack.clone(), ctx.state())
        .map_err(|e| CliError::Io(format!("cannot make the page's address: {e}")))?;
    eprintln!(
        "pairing page of stack `{}`: http://{addr}{} (this machine only; Ctrl-C stops it)",
        ctx.stack.stack,
        page.path()
    );
    page.serve(listener, terminated())
        .await
        .map_err(|e| CliError::Io(format!("pairing page: {e}")))?;
    Ok(Exit::Ok)
}

fn pair(ctx: &Context, args: &PairArgs) -> Result<Exit, CliError> {
    let (stack, state) = (&ctx.stack, ctx.state());
    let device = args.device.as_deref().unwrap_or_default();
    let ext = match args.format {
        PairFormat::Terminal => "txt",
        PairFormat::Uri => "uri",
        PairFormat::Link => "link",
        PairFormat::Png => "png",
        PairFormat::Svg => "svg",
    };
    let (sidecar, bytes) =
        reconcile::pairing_code(stack, &state, device, args.sidecar.as_deref(), ext)?;
    match &args.out {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(&bytes).map(|()| f))
                .map_err(|e| CliError::Io(format!("cannot write {}: {e}", path.display())))?;
            let _ = f.flush();
            eprintln!(
                "wrote the pairing code of {}/{sidecar} to {} (it holds a token: keep it private)",
                device,
                path.display()
            );
        }
        None if matches!(args.format, PairFormat::Png) && std::io::stdout().is_terminal() => {
            return Err(CliError::Usage(
                "a PNG on a terminal is unreadable: add --out FILE".into(),
            ));
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&bytes);
            if matches!(args.format, PairFormat::Uri) {
                let _ = stdout.write_all(b"\n");
            }
            if matches!(args.format, PairFormat::Terminal) {
                let _ = writeln!(
                    stdout,
                    "scan with a phone camera: the browser opens {sidecar} and pairs {} (one \
                     browser, once; `soul rotate --device {}` makes a new code)",
                    device, device
                );
            }
        }
    }
    Ok(Exit::Ok)
}

async fn rotate(cli: &Cli, args: &RotateArgs) -> Result<Exit, CliError> {
    let (stack, bumped) = stack::edit::rotate_file(&cli.file, args.device.as_deref())?;
    let ctx = Context::of(cli, stack);
    let what = match &args.device {
        Some(d) => format!("device `{d}` generation"),
        None => "secret-generation".into(),
    };
    if args.new_key {
        for aside in ctx
            .open_state()?
            .set_aside_lost_key(unix_now())
            .map_err(|e| CliError::Io(format!("cannot move the lost stack key aside: {e}")))?
        {
            out(&format!("moved aside: {aside}\n"));
        }
    }
    out(&format!(
        "{}: {what} {} → {} (commit this edit)\n",
        ctx.file.display(),
        bumped.from,
        bumped.to
    ));
    apply(&ctx).await
}

/// `soul status`'s lines about a running `soul watch`.
fn watch_lines(watch: Option<&reconcile::WatchStatus>) -> String {
    let Some(w) = watch else {
        return "  watch: not running (`soul watch` keeps this stack converged)\n".into();
    };
    let now = unix_now();
    let ago = |t: u64| format!("{} s ago", now.saturating_sub(t));
    let mut s = format!("  watch: running (pid {}), {} passes\n", w.pid, w.passes);
    if let Some(at) = w.last_pass_at {
        s.push_str(&format!(
            "    last pass {} ({}), {} ms, {} changes\n",
            ago(at),
            w.last_pass_trigger.as_deref().unwrap_or("-"),
            w.last_pass_ms.unwrap_or(0),
            w.last_pass_changes.map_or("-".into(), |c| c.to_string())
        ));
    }
    if let Some(next) = w.next_resync_at {
        s.push_str(&format!(
            "    next resync in {} s\n",
            next.saturating_sub(now)
        ));
    }
    if let Some(e) = &w.last_error {
        s.push_str(&format!("    last pass failed: {e}\n"));
    }
    if !w.config_valid {
        s.push_str(&format!(
            "    config INVALID since {}: {}; running the last good config\n",
            w.config_invalid_since.map_or("?".into(), ago),
            w.config_error.as_deref().unwrap_or("?")
        ));
    }
    for d in &w.degraded {
        s.push_str(&format!("    degraded: {d} keeps restarting\n"));
    }
    s
}
