//! The command line: clap definitions, one library call per command, output formatting, and
//! the one place where errors become exit codes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::machine::Host;
use crate::pod::{Role, label};
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

const EXIT_CODES: &str = "\
Not built yet: the relay. A `relay` node validates and its address goes into pairing codes, but
no relay server or pod agent exists, so that address leads nowhere; leave it out for now.

Exit codes:
  0  success (for `plan --detailed-exitcode`: nothing to change)
  1  invalid input or a failed operation
  2  `plan --detailed-exitcode`: changes are pending
  3  the Docker engine cannot be reached (check DOCKER_HOST and that the daemon runs)";

/// soul drives a Docker engine to the state declared in stack.kdl: your service in a pod, the
/// transports that reach it, and the devices allowed in.
#[derive(Debug, Parser)]
#[command(name = "soul", version, about, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    /// The stack file.
    #[arg(
        short = 'f',
        long = "file",
        global = true,
        default_value = "stack.kdl",
        value_name = "PATH"
    )]
    pub file: PathBuf,
    /// Where this stack's state lives [default: /var/lib/soul/<stack> as root,
    /// $XDG_STATE_HOME/soul/<stack> otherwise].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug, -vvv trace). SOUL_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log lines as text for people, or JSON for journald and log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check stack.kdl: KDL syntax, the JSON Schema, then every rule of the format.
    #[command(
        after_help = "Every problem is reported in one run as file:line:column with the \
source line and a hint.\n\nExample:\n  soul validate\n  soul -f examples/jellyfin.kdl validate"
    )]
    Validate,
    /// Print the JSON Schema of stack.kdl (as committed in schema/stack.schema.json).
    #[command(after_help = "Example:\n  soul schema > stack.schema.json")]
    Schema,
    /// Show the steps `apply` would take, without changing anything.
    #[command(
        after_help = "Never prints a secret. With --detailed-exitcode the exit code says \
whether anything would change: 0 nothing, 2 changes pending, 1 error.\n\nExample:\n  soul plan\n  \
soul plan --output json | jq '.steps[].step'\n  soul plan --detailed-exitcode || echo drifted"
    )]
    Plan(PlanArgs),
    /// Drive the Docker engine to stack.kdl: pods, networks, volumes, images.
    #[command(
        after_help = "Creates what is missing, recreates what changed (and only that), \
starts what stopped, removes what is no longer declared. Named volumes are never removed. \
Running it twice changes nothing the second time.\n\nExample:\n  soul apply\n  soul -f ~/stacks/home.kdl apply"
    )]
    Apply,
    /// Keep this machine on stack.kdl: re-apply on every edit, repair drift, follow git.
    #[command(
        after_help = "Every trigger runs the same whole pass: an edit of stack.kdl (also \
when an editor or `git pull` replaces it), a Docker event of this stack (die, stop, destroy, \
health), the resync timer, a change of this host's address, SIGHUP. An invalid edit is reported \
and the last good config keeps running. The engine going away is retried with backoff. \
SIGTERM/SIGINT stop soul; the containers keep running. `soul status` shows the last pass.\n\n\
Example:\n  soul watch\n  soul watch --resync 5m --pull 1m --log-format json"
    )]
    Watch(WatchArgs),
    /// Show each pod's containers: state, health, image, and whether they match stack.kdl.
    #[command(after_help = "Example:\n  soul status\n  soul status --output json")]
    Status(OutputArgs),
    /// Remove this stack's containers and networks (named volumes only with --volumes).
    #[command(
        after_help = "Only what carries this stack's labels is touched.\n\nExample:\n  \
soul down\n  soul down --volumes   # also deletes the stack's named volumes: their data is gone"
    )]
    Down(DownArgs),
    /// List the devices of stack.kdl: generation, expiry, pairing files, and whether each
    /// device's token is current.
    #[command(after_help = "Example:\n  soul devices\n  soul devices --output json")]
    Devices(OutputArgs),
    /// Show a device's pairing QR code (scan it with the phone), a link for its browser, or
    /// write either to a file.
    #[command(
        after_help = "The QR code holds the pod's reachable addresses and the device's \
token: treat it like a password. A browser opens the pod through `--format link`: the link \
holds a one-time ticket, never the token; the pod's gate redeems it for a browser session of \
that sidecar (a cookie that lasts as long as the device, at most 400 days). A used link does \
not work again: bump the device's `generation=` (or `soul rotate --device D`) for a new one.\n\nExample:\n  \
soul pair alice-phone\n  soul pair alice-phone --sidecar notes --format png --out alice.png\n  \
soul pair alice-phone --format uri\n  soul pair alice-phone --format link"
    )]
    Pair(PairArgs),
    /// Re-issue tokens: bump `secret-generation` (every device) or one device's `generation=`
    /// in stack.kdl, keeping its comments and layout, then apply. Commit the edit.
    #[command(
        after_help = "Example:\n  soul rotate                    # new stack key: every device re-pairs\n  \
soul rotate --device bob-laptop  # only bob-laptop's token changes\n  \
soul rotate --new-key            # the stack key was lost and cannot be restored: start over"
    )]
    Rotate(RotateArgs),
    /// The transports that reach the pods: their state and current addresses. Also runs as
    /// `soul-bridge` (a link named so behaves as `soul bridge`).
    #[command(subcommand)]
    Bridge(BridgeCommand),
    /// Write the stack in another tool's format.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Build soul's own image from this binary, offline (used by each pod's pause container).
    #[command(
        after_help = "`apply` builds it when missing or older than this binary; this \
command rebuilds it unconditionally.\n\nExample:\n  soul image"
    )]
    Image,
    /// Run inside a pod: the front door. Only requests with a valid device token reach the app.
    #[command(
        hide = true,
        after_help = "`apply` runs it in every pod, with the state dir's gate/ mounted at /gate; it re-reads the key and registry there, so revoking a device needs no restart.

Example:
  soul gate --stack home --sidecar notes --listen 0.0.0.0:8443 --upstream 127.0.0.1:8080 --keys /gate --redeemed /redeemed"
    )]
    Gate {
        /// The stack whose tokens are accepted.
        #[arg(long)]
        stack: String,
        /// The sidecar this gate fronts: its browser sessions and pairing links are good here
        /// only.
        #[arg(long)]
        sidecar: Option<String>,
        /// A writable directory where redeemed pairing links are recorded, so that a used link
        /// stays used across restarts (in memory only without it).
        #[arg(long, value_name = "DIR")]
        redeemed: Option<PathBuf>,
        /// Where to listen: the gate port, on every address of the pod.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// The app inside the pod.
        #[arg(long)]
        upstream: std::net::SocketAddr,
        /// The directory with the stack's public key and device registry.
        #[arg(long, default_value = "/gate")]
        keys: PathBuf,
        /// How long a client may take to send its request headers.
        #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
        header_timeout: Duration,
        /// Refused attempts per source address per minute before answering 429.
        #[arg(long, default_value_t = 30)]
        failures_per_minute: usize,
        /// Threads serving connections, each with a connection from accept to close (default:
        /// one per CPU the gate may use).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: Option<u16>,
    },
    /// Run inside a pod: hold the pod's network namespace until stopped, letting in from
    /// outside the pod only the gate's port (and replies to the pod's own connections).
    #[command(
        hide = true,
        after_help = "Needs NET_ADMIN in the pod's namespace (apply gives the pause container that and nothing else). \
It installs the nftables table `inet soul_guard` there.

Example:
  soul pause --gate-port 8443
  soul pause --gate-port 8443 --check   # exit 0 when the guard is in place"
    )]
    Pause {
        /// The gate's port: every other TCP and UDP port of the pod is refused from outside.
        #[arg(long, value_name = "PORT")]
        gate_port: Option<u16>,
        /// A UDP port an overlay in the pod receives its peers on (repeatable).
        #[arg(long, value_name = "PORT", requires = "gate_port")]
        open_udp: Vec<u16>,
        /// Only check that the guard is in place (the pause container's health check).
        #[arg(long, requires = "gate_port")]
        check: bool,
    },
    /// Run inside a pod: a small HTTP service for the repository's demo stack.
    #[command(hide = true)]
    DemoApp {
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Run inside a pod: GET an http:// URL; exit 0 on a 2xx/3xx answer (a health check).
    #[command(hide = true)]
    Probe {
        url: String,
        #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
        timeout: Duration,
    },
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Exit 2 when changes are pending, 0 when there are none.
    #[arg(long)]
    pub detailed_exitcode: bool,
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Run a whole pass at least this often, so missed events still converge.
    #[arg(long, default_value = "60s", value_parser = parse_duration_arg, value_name = "DURATION")]
    pub resync: Duration,
    /// When stack.kdl is in a git work tree with an upstream: fetch and fast-forward this
    /// often (never forced: a dirty tree or diverged history is reported).
    #[arg(long, value_parser = parse_duration_arg, value_name = "INTERVAL")]
    pub pull: Option<Duration>,
    /// Restarts within --flap-window after which a container is reported degraded.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub flap_restarts: usize,
    #[arg(long, default_value = "10m", value_parser = parse_duration_arg, value_name = "DURATION")]
    pub flap_window: Duration,
    /// How often this host's addresses are checked (pairing codes carry them).
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg, value_name = "DURATION")]
    pub address_poll: Duration,
}

#[derive(Debug, Subcommand)]
pub enum BridgeCommand {
    /// Choose how the pods are reached and write it into stack.kdl (only the `transport`
    /// block changes; comments survive). Prints the diff; commit it.
    #[command(
        after_help = "On a terminal it asks (Tailscale by default, then the auth-key file). \
In scripts pass the choice and --yes.\n\nExample:\n  soul bridge init\n  soul bridge init --tailscale \
--authkey-file /run/secrets/ts --yes\n  soul bridge init --headscale https://hs.example.com --yes\n  \
soul bridge init --tor --yes\n  soul bridge init --lan-only --yes"
    )]
    Init(InitArgs),
    /// Per sidecar and transport: is it up (container running and healthy, address known)?
    #[command(after_help = "Example:\n  soul bridge status\n  soul bridge status --output json")]
    Status(OutputArgs),
    /// The current best address in the stack's transport order (what pairing codes lead with).
    #[command(
        after_help = "Addresses print as <transport>:<host>:<port>, as in pairing codes.\n\n\
Example:\n  soul bridge address\n  soul bridge address --sidecar notes --all\n  soul-bridge address"
    )]
    Address(AddressArgs),
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// The stack as a Compose file (ScaleTail's shape: each pod's containers join its
    /// namespace owner with `network_mode: service:…`). Secrets become `${NAME}`.
    #[command(
        after_help = "Example:\n  soul export compose\n  soul export compose --out docker-compose.yml && docker-compose config"
    )]
    Compose {
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("choice").args(["tailscale", "headscale", "nebula", "tor", "lan_only"])))]
pub struct InitArgs {
    /// Reach the pods over Tailscale (the default).
    #[arg(long)]
    pub tailscale: bool,
    /// Reach the pods over your own Headscale server at URL.
    #[arg(long, value_name = "URL")]
    pub headscale: Option<String>,
    /// Reach the pods over Nebula, with this lighthouse (host:port); needs --nebula-ip,
    /// --lighthouse-ip, --ca-file, --cert-file and --key-file.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["nebula_ip", "lighthouse_ip", "ca_file", "cert_file", "key_file"])]
    pub nebula: Option<String>,
    /// Reach the pods over a Tor onion service.
    #[arg(long)]
    pub tor: bool,
    /// The LAN only: no overlay.
    #[arg(long)]
    pub lan_only: bool,
    /// The Tailscale/Headscale auth key's file on this machine (never the key itself).
    #[arg(long, value_name = "PATH")]
    pub authkey_file: Option<String>,
    /// Tailscale ACL tags to advertise, e.g. tag:soul.
    #[arg(long)]
    pub tags: Option<String>,
    #[arg(long, value_name = "CIDR")]
    pub nebula_ip: Option<String>,
    #[arg(long, value_name = "IP")]
    pub lighthouse_ip: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub cert_file: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<String>,
    /// Write without asking.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct AddressArgs {
    /// Which sidecar (needed when the stack has several).
    #[arg(long)]
    pub sidecar: Option<String>,
    /// Every known address, best first, one per line.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct PairArgs {
    /// The device, as named in stack.kdl.
    pub device: String,
    /// Which sidecar's code (needed when the stack has several).
    #[arg(long)]
    pub sidecar: Option<String>,
    #[arg(long, value_enum, default_value_t = PairFormat::Terminal)]
    pub format: PairFormat,
    /// Write to this file (0600) instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PairFormat {
    /// A QR code drawn in the terminal, black on white whatever the terminal's colours.
    Terminal,
    /// The pairing URI itself.
    Uri,
    Png,
    Svg,
    /// Links to open in a browser, one per address, best first
    /// (`http://<host>:<port>/?soul_ticket=…`); each is good for one browser, once.
    Link,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Re-issue this device's token alone (bumps its `generation=`).
    #[arg(long, value_name = "NAME", conflicts_with = "new_key")]
    pub device: Option<String>,
    /// Start over after the stack key was lost: what is left of the key and the device
    /// registry is moved aside (`stack.key.lost-<time>`), a new key is made and every device
    /// must scan a new pairing code. Without it, apply refuses to replace a lost key.
    #[arg(long)]
    pub new_key: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Also remove this stack's named volumes (their data is deleted).
    #[arg(long)]
    pub volumes: bool,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    stack::parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration like 500ms, 5s or 1m"))
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
    /// A file soul reads or writes for the user.
    #[error("{0}")]
    Io(String),
    /// The request cannot be met as asked; the message says what to do.
    #[error("{0}")]
    Usage(String),
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
        Command::Validate => validate(&cli),
        Command::Schema => {
            out(&stack::schema_json());
            Ok(Exit::Ok)
        }
        Command::Plan(args) => plan(&cli, args).await,
        Command::Apply => apply(&cli).await,
        Command::Status(args) => status(&cli, args.output).await,
        Command::Watch(args) => {
            let opts = reconcile::WatchOptions {
                file: cli.file.clone(),
                state_dir: cli.state_dir.clone(),
                resync: args.resync,
                pull: args.pull,
                flap_restarts: args.flap_restarts,
                flap_window: args.flap_window,
                address_poll: args.address_poll,
                debounce: Duration::from_millis(50),
            };
            reconcile::watch(opts, terminated()).await?;
            Ok(Exit::Ok)
        }
        Command::Down(args) => down(&cli, args).await,
        Command::Image => image().await,
        Command::Devices(args) => devices(&cli, args.output),
        Command::Pair(args) => pair(&cli, args),
        Command::Rotate(args) => rotate(&cli, args).await,
        Command::Export(ExportCommand::Compose { out: path }) => {
            export_compose(&cli, path.as_deref())
        }
        Command::Bridge(BridgeCommand::Init(args)) => bridge_init(&cli, args),
        Command::Bridge(BridgeCommand::Status(args)) => bridge_status(&cli, args.output).await,
        Command::Bridge(BridgeCommand::Address(args)) => bridge_address(&cli, args).await,
        Command::Gate {
            stack,
            sidecar,
            redeemed,
            listen,
            upstream,
            keys,
            header_timeout,
            failures_per_minute,
            threads,
        } => {
            let mut cfg = crate::gate::GateConfig::new(stack, *upstream, keys.clone());
            cfg.sidecar = sidecar.clone();
            cfg.redeemed_dir = redeemed.clone();
            cfg.header_timeout = *header_timeout;
            cfg.failures_per_minute = *failures_per_minute;
            let listener = std::net::TcpListener::bind(listen)
                .map_err(|e| CliError::Io(format!("gate: cannot listen on {listen}: {e}")))?;
            let threads = threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            );
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let gate = tokio::task::spawn_blocking(move || {
                crate::gate::serve(cfg, listener, threads, stopped)
            });
            tokio::pin!(gate);
            let served = tokio::select! {
                r = &mut gate => r,
                () = terminated() => {
                    let _ = stop.send(true);
                    gate.await
                }
            };
            served
                .map_err(|e| CliError::Io(format!("gate: {e}")))?
                .map_err(|e| CliError::Io(format!("gate: {e}")))?;
            Ok(Exit::Ok)
        }
        Command::Pause {
            gate_port,
            open_udp,
            check,
        } => {
            let policy = gate_port.map(|gate_port| crate::guard::Policy {
                gate_port,
                open_udp: open_udp.clone(),
            });
            if let (Some(policy), true) = (&policy, check) {
                return match crate::guard::installed(policy) {
                    Ok(true) => Ok(Exit::Ok),
                    Ok(false) => Err(CliError::Io(format!(
                        "the pod is not guarded: only the gate's port {} should answer from outside",
                        policy.gate_port
                    ))),
                    Err(e) => Err(CliError::Io(e.to_string())),
                };
            }
            if let Some(policy) = policy {
                // Never stop holding the namespace over this: the pod stays up, and the
                // pause container's health check reports it as unguarded.
                let port = policy.gate_port;
                match crate::guard::install(&policy) {
                    Ok(()) => {
                        tracing::info!("only the gate's port {port} answers from outside the pod")
                    }
                    Err(e) => tracing::error!("the pod's ports are NOT private: {e}"),
                }
            }
            crate::agent::pause()
                .await
                .map_err(|e| RuntimeError::Build(e.to_string()))?;
            Ok(Exit::Ok)
        }
        Command::DemoApp { port } => {
            crate::agent::demo_app(*port, async {
                let _ = crate::agent::pause().await;
            })
            .await
            .map_err(|e| RuntimeError::Build(format!("demo-app: {e}")))?;
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

fn load(cli: &Cli) -> Result<Stack, CliError> {
    Ok(stack::load(&cli.file)?)
}

fn state_dir(cli: &Cli, stack: &Stack) -> Result<StateDir, CliError> {
    Ok(StateDir::open(&state_path(cli, stack))?)
}

fn validate(cli: &Cli) -> Result<Exit, CliError> {
    let s = load(cli)?;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    out(&format!(
        "{} is valid: stack `{}`, {}, {}, transports: {}\n",
        cli.file.display(),
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
    stack: Stack,
    desired: Desired,
    docker: Docker,
    plan: Plan,
    state: StateDir,
}

/// Load, connect, then resolve, observe and plan.
async fn prepare(cli: &Cli, state: StateDir) -> Result<Pass, CliError> {
    let stack = load(cli)?;
    let desired = reconcile::desire(&stack, &Host, &state)?;
    let docker = Docker::connect().await?;
    let planned = reconcile::prepare(&docker, &stack, &state, desired, unix_now()).await?;
    Ok(Pass {
        stack,
        desired: planned.desired,
        docker,
        plan: planned.plan,
        state,
    })
}

fn state_path(cli: &Cli, stack: &Stack) -> PathBuf {
    cli.state_dir
        .clone()
        .unwrap_or_else(|| state::default_dir(&stack.stack))
}

async fn plan(cli: &Cli, args: &PlanArgs) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    let Pass { stack, plan, .. } = prepare(cli, StateDir::at(&state_path(cli, &stack))).await?;
    match args.output {
        Output::Json => out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({
                "stack": stack.stack,
                "file": cli.file,
                "changes": plan.steps.len(),
                "steps": plan.steps,
            }))
            .unwrap_or_default()
        )),
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
        | Step::RemoveNetwork { .. }
        | Step::RemoveDuplicateNetwork { .. } => '-',
        Step::StartContainer { .. } => '>',
        _ => '+',
    }
}

async fn apply(cli: &Cli) -> Result<Exit, CliError> {
    let started = Instant::now();
    let stack = load(cli)?;
    if let Some(relay) = &stack.relay {
        eprintln!(
            "warning: the relay is not built yet: `relay` {} goes into pairing codes, but nothing serves it (see `soul --help`)",
            relay.endpoint
        );
    }
    let dir = state_dir(cli, &stack)?;
    let _lock = dir.lock(|holder| {
        eprintln!(
            "waiting: another soul process{} is applying stack `{}`…",
            holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            stack.stack
        );
    })?;
    let Pass {
        stack,
        desired,
        docker,
        plan,
        state,
    } = prepare(cli, dir).await?;
    if plan.is_empty() {
        out(&format!(
            "stack `{}` is up to date: 0 changes ({} ms)\n",
            stack.stack,
            started.elapsed().as_millis()
        ));
        return Ok(Exit::Ok);
    }
    let mut total = plan.steps.len();
    reconcile::run(&docker, &state, &stack, &plan, |i, step| {
        tracing::info!(step = %step, "applying");
        out(&format!("  [{}/{total}] {} {step}\n", i + 1, sigil(step)));
    })
    .await?;
    // Transports that just started publish their addresses a moment later: wait for them, so
    // the pairing codes this apply leaves behind carry every address.
    let carriers: Vec<Role> = crate::transport::drivers(&stack)
        .iter()
        .map(|d| d.role())
        .collect();
    let overlays: Vec<&str> = desired
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| carriers.contains(&c.role))
        .map(|c| c.name.as_str())
        .collect();
    let started_overlay = plan.steps.iter().any(
        |s| matches!(s, Step::StartContainer { name, .. } if overlays.contains(&name.as_str())),
    );
    let wait = if started_overlay {
        Duration::from_secs(30)
    } else {
        Duration::ZERO
    };
    let missing = reconcile::await_addresses(&docker, &stack, &state, wait).await?;
    for m in &missing {
        eprintln!(
            "warning: the {m} is not known yet; `soul apply` again (or `soul watch`) adds it to the pairing codes"
        );
    }
    let again = reconcile::desire(&stack, &Host, &state)?;
    let again = reconcile::prepare(&docker, &stack, &state, again, unix_now())
        .await?
        .plan;
    let more = again.steps.len();
    reconcile::run(&docker, &state, &stack, &again, |i, step| {
        out(&format!("  [{}/{more}] {} {step}\n", i + 1, sigil(step)));
    })
    .await?;
    total += more;
    let mut summary = format!(
        "applied {total} change{} to stack `{}` in {:.2} s\n",
        if total == 1 { "" } else { "s" },
        stack.stack,
        started.elapsed().as_secs_f64()
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
    out(&summary);
    Ok(Exit::Ok)
}

async fn status(cli: &Cli, output: Output) -> Result<Exit, CliError> {
    let stack = match load(cli) {
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
    let desired = match reconcile::resolve(&stack, &Host, &state_path(cli, &stack)) {
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
    let want = |name: &str| {
        desired.as_ref().and_then(|d| {
            d.pods
                .iter()
                .flat_map(|p| &p.containers)
                .find(|c| c.name == name)
                .map(|c| c.config_hash())
        })
    };
    let mut pods = Vec::new();
    for sidecar in &stack.sidecars {
        let roles = desired
            .as_ref()
            .and_then(|d| d.pods.iter().find(|p| p.sidecar == sidecar.name))
            .map_or(vec![Role::Pause, Role::App, Role::Gate], |p| {
                p.containers.iter().map(|c| c.role).collect()
            });
        let containers: Vec<_> = roles
            .iter()
            .map(|role| {
                let name = crate::pod::container_name(&stack.stack, &sidecar.name, *role);
                let seen = observed.containers.iter().find(|c| c.name == name);
                let desired_hash = want(&name);
                json!({
                    "role": role.as_str(),
                    "name": name,
                    "id": seen.map(|c| c.id.chars().take(12).collect::<String>()),
                    "state": seen.map_or("missing", |c| c.state.as_str()),
                    "health": seen.and_then(|c| c.health.clone()),
                    "image": seen.map(|c| c.image.clone()),
                    "current": match (seen, desired_hash) {
                        (Some(c), Some(h)) => json!(c.config_hash.as_deref() == Some(h.as_str())),
                        _ => json!(null),
                    },
                })
            })
            .collect();
        pods.push(json!({
            "sidecar": sidecar.name,
            "network": crate::pod::network_name(&stack.stack),
            "containers": containers,
        }));
    }
    let declared: Vec<String> = match &desired {
        Some(d) => d
            .pods
            .iter()
            .flat_map(|p| p.containers.iter().map(|c| c.name.clone()))
            .collect(),
        None => stack
            .sidecars
            .iter()
            .flat_map(|s| {
                [Role::Pause, Role::App, Role::Gate]
                    .map(|r| crate::pod::container_name(&stack.stack, &s.name, r))
            })
            .collect(),
    };
    let undeclared: Vec<_> = observed
        .containers
        .iter()
        .filter(|c| !declared.contains(&c.name))
        .map(|c| json!({"name": c.name, "state": c.state}))
        .collect();
    let watch = reconcile::WatchStatus::read(&StateDir::at(&state_path(cli, &stack)));
    match output {
        Output::Json => out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({
                "stack": stack.stack,
                "pods": pods,
                "undeclared": undeclared,
                "watch": watch,
            }))
            .unwrap_or_default()
        )),
        Output::Human => {
            let mut s = format!("stack `{}` ({})\n", stack.stack, cli.file.display());
            for pod in &pods {
                s.push_str(&format!(
                    "  pod {}\n",
                    pod["sidecar"].as_str().unwrap_or("")
                ));
                for c in pod["containers"].as_array().into_iter().flatten() {
                    let state = c["state"].as_str().unwrap_or("");
                    let health = c["health"]
                        .as_str()
                        .map(|h| format!(" ({h})"))
                        .unwrap_or_default();
                    let current = match c["current"].as_bool() {
                        Some(true) => "up to date",
                        Some(false) => "differs from stack.kdl: `soul apply` recreates it",
                        None if state == "missing" => "`soul apply` creates it",
                        None => "unknown",
                    };
                    s.push_str(&format!(
                        "    {:<6} {:<22} {:<28} {current}\n",
                        c["role"].as_str().unwrap_or(""),
                        format!("{state}{health}"),
                        c["image"].as_str().unwrap_or("-"),
                    ));
                }
            }
            s.push_str(&watch_lines(watch.as_ref()));
            for u in &undeclared {
                s.push_str(&format!(
                    "  undeclared: {} ({}): `soul apply` removes it\n",
                    u["name"].as_str().unwrap_or(""),
                    u["state"].as_str().unwrap_or("")
                ));
            }
            out(&s);
        }
    }
    Ok(Exit::Ok)
}

async fn down(cli: &Cli, args: &DownArgs) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    let dir = state_dir(cli, &stack)?;
    let _lock = dir.lock(|holder| {
        eprintln!(
            "waiting: another soul process{} holds stack `{}`…",
            holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            stack.stack
        );
    })?;
    let docker = Docker::connect().await?;
    let snapshot = docker.snapshot(&stack.stack).await?;
    let mut containers = snapshot.containers;
    // Dependents before the pause container whose namespace they share.
    containers.sort_by_key(|c| {
        c.labels.get(label::ROLE).map(String::as_str) == Some(Role::Pause.as_str())
    });
    let mut removed = 0;
    for c in &containers {
        docker.remove_container(&c.id).await?;
        out(&format!("  - removed container {}\n", c.name));
        removed += 1;
    }
    // Unused copies of a name first (by ID): the name is ambiguous until they are gone.
    for (name, id) in &snapshot.duplicate_networks {
        docker.remove_network(id).await?;
        out(&format!("  - removed a duplicate of network {name}\n"));
        removed += 1;
    }
    for (name, id) in &snapshot.network_ids {
        docker.remove_network(id).await?;
        out(&format!("  - removed network {name}\n"));
        removed += 1;
    }
    if args.volumes {
        for v in &snapshot.volumes {
            docker.remove_volume(v).await?;
            out(&format!("  - removed volume {v} (its data is gone)\n"));
            removed += 1;
        }
    } else if !snapshot.volumes.is_empty() {
        out(&format!(
            "  kept {} named volume{} ({}); `soul down --volumes` removes them\n",
            snapshot.volumes.len(),
            if snapshot.volumes.len() == 1 { "" } else { "s" },
            snapshot.volumes.join(", ")
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

fn devices(cli: &Cli, output: Output) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    let state = StateDir::at(&state_path(cli, &stack));
    let key = state.read_key().ok();
    let registry = state.read_registry();
    let now = unix_now();
    let rows: Vec<serde_json::Value> = stack
        .devices
        .iter()
        .map(|d| {
            let entry = registry.devices.get(&d.name);
            let token_path = state.path().join(crate::state::layout::token(&d.name));
            let token = std::fs::read_to_string(&token_path).ok();
            let current = match (&key, &token) {
                (Some(k), Some(t)) => {
                    crate::pairing::verify(t.trim(), &k.public_key(), &stack.stack, &registry, now)
                        .is_ok_and(|c| c.jti == format!("{}.{}", d.name, d.generation))
                }
                _ => false,
            };
            let artifacts: Vec<String> = stack
                .sidecars
                .iter()
                .flat_map(|s| {
                    ["uri", "png", "svg", "txt"].map(|ext| {
                        state.path().join(format!(
                            "{}.{ext}",
                            crate::state::layout::pairing(&d.name, &s.name)
                        ))
                    })
                })
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect();
            json!({
                "name": d.name,
                "generation": d.generation,
                "issued_at": entry.map(|e| e.issued_at),
                "expires_at": entry.and_then(|e| e.expires_at),
                "token": token_path.exists().then(|| token_path.display().to_string()),
                "token_current": current,
                "artifacts": artifacts,
            })
        })
        .collect();
    match output {
        Output::Json => out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({"stack": stack.stack, "devices": rows}))
                .unwrap_or_default()
        )),
        Output::Human => {
            let mut s = format!(
                "devices of stack `{}` ({})\n",
                stack.stack,
                state.path().display()
            );
            if rows.is_empty() {
                s.push_str("  none: add `device \"alice-phone\"` to stack.kdl and apply\n");
            }
            for r in &rows {
                let expiry = match r["expires_at"].as_u64() {
                    Some(t) if t <= now => "expired".to_string(),
                    Some(t) => format!("expires in {}d", (t - now) / 86_400),
                    None => "no expiry".into(),
                };
                let state = if r["token_current"] == true {
                    "token current"
                } else {
                    "token not issued yet: run `soul apply`"
                };
                s.push_str(&format!(
                    "  {:<20} generation {:<3} {:<18} {state}; {} pairing files\n",
                    r["name"].as_str().unwrap_or(""),
                    r["generation"],
                    expiry,
                    r["artifacts"].as_array().map_or(0, |a| a.len()),
                ));
            }
            out(&s);
        }
    }
    Ok(Exit::Ok)
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

fn bridge_init(cli: &Cli, args: &InitArgs) -> Result<Exit, CliError> {
    use crate::bridge::{Choice, DEFAULT_AUTHKEY_FILE};
    let source = stack::read_source(&cli.file)?;
    let path = cli.file.display().to_string();
    let stack = stack::parse(&path, &source).map_err(StackError::Invalid)?;
    let interactive = std::io::stdin().is_terminal() && !args.yes;
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
    let lan_line = stack::edit::child_line(&source, "transport", "lan");
    let block = crate::bridge::transport_block(&stack, &choice, lan_line.as_deref());
    let new = stack::edit::replace_transport(&source, &block)?;
    // Never write a file that would not validate.
    stack::parse(&path, &new).map_err(StackError::Invalid)?;
    let diff = crate::bridge::diff(&path, &source, &new);
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
    std::fs::write(&cli.file, &new)
        .map_err(|e| CliError::Io(format!("cannot write {path}: {e}")))?;
    out(&format!(
        "wrote {path}; commit it, then `soul apply` (or let `soul watch` pick it up)\n"
    ));
    Ok(Exit::Ok)
}

/// A machine that has every file and variable, all empty: exporting reads no secret.
struct NoSecrets;

impl crate::machine::Machine for NoSecrets {
    fn read_file(&self, _: &str) -> std::io::Result<String> {
        Ok(String::new())
    }
    fn env_var(&self, _: &str) -> Option<String> {
        Some(String::new())
    }
    fn exists(&self, _: &str) -> bool {
        true
    }
}

fn export_compose(cli: &Cli, path: Option<&Path>) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    let desired = reconcile::resolve(&stack, &NoSecrets, &state_path(cli, &stack))
        .map_err(PassError::from)?;
    let text = crate::export::compose(&desired);
    match path {
        Some(p) => {
            std::fs::write(p, &text)
                .map_err(|e| CliError::Io(format!("cannot write {}: {e}", p.display())))?;
            eprintln!(
                "wrote {} ({} services)",
                p.display(),
                desired
                    .pods
                    .iter()
                    .map(|p| p.containers.len())
                    .sum::<usize>()
            );
        }
        None => out(&text),
    }
    Ok(Exit::Ok)
}

/// The sidecar a command is about: the one named, or the only one.
fn one_sidecar(stack: &Stack, named: Option<&str>) -> Result<String, CliError> {
    let names = || {
        stack
            .sidecars
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (named, stack.sidecars.as_slice()) {
        (Some(s), all) if all.iter().any(|x| x.name == s) => Ok(s.to_string()),
        (Some(s), _) => Err(CliError::Usage(format!(
            "no sidecar `{s}`; the stack has: {}",
            names()
        ))),
        (None, [only]) => Ok(only.name.clone()),
        (None, _) => Err(CliError::Usage(format!(
            "the stack has several sidecars; choose one with --sidecar ({})",
            names()
        ))),
    }
}

/// Every sidecar's known addresses, in the stack's order (overlays read from the pods).
async fn current_addresses(
    cli: &Cli,
    stack: &Stack,
) -> Result<(Docker, Vec<Vec<crate::pairing::Address>>), CliError> {
    let state = StateDir::at(&state_path(cli, stack));
    let docker = Docker::connect().await?;
    let discovered = reconcile::discover(&docker, stack, &state).await?;
    let lan = crate::transport::lan_host(stack);
    Ok((
        docker,
        crate::transport::addresses(stack, lan.as_deref(), &discovered),
    ))
}

async fn bridge_address(cli: &Cli, args: &AddressArgs) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    let sidecar = one_sidecar(&stack, args.sidecar.as_deref())?;
    let (_, all) = current_addresses(cli, &stack).await?;
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

async fn bridge_status(cli: &Cli, output: Output) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    let (docker, all) = current_addresses(cli, &stack).await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    let container = |name: &str| observed.containers.iter().find(|c| c.name == name);
    let mut rows = Vec::new();
    for (i, sidecar) in stack.sidecars.iter().enumerate() {
        for kind in stack.transport_order() {
            let carrier = crate::transport::carrier(&stack, kind)
                .map(|r| crate::pod::container_name(&stack.stack, &sidecar.name, r));
            let seen = carrier.as_deref().and_then(container);
            let running = seen.is_some_and(|c| c.running);
            let healthy = seen.and_then(|c| c.health.clone());
            let address = all
                .get(i)
                .and_then(|a| a.iter().find(|x| x.transport == kind))
                .map(|a| a.to_string());
            let up = (carrier.is_none() || running)
                && healthy.as_deref() != Some("unhealthy")
                && address.is_some();
            rows.push(json!({
                "sidecar": sidecar.name,
                "transport": kind.as_str(),
                "container": carrier,
                "running": carrier.as_ref().map(|_| running),
                "health": healthy,
                "address": address,
                "up": up,
            }));
        }
    }
    match output {
        Output::Json => out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({"stack": stack.stack, "transports": rows}))
                .unwrap_or_default()
        )),
        Output::Human => {
            let mut s = format!("transports of stack `{}`\n", stack.stack);
            for r in &rows {
                let state = match (r["up"].as_bool(), r["running"].as_bool()) {
                    (Some(true), _) => "up".to_string(),
                    (_, Some(false)) => "down: container not running (`soul apply`)".into(),
                    _ if r["address"].is_null() => "down: address not known yet".into(),
                    _ => format!("down: {}", r["health"].as_str().unwrap_or("unhealthy")),
                };
                s.push_str(&format!(
                    "  {:<12} {:<10} {:<50} {state}\n",
                    r["sidecar"].as_str().unwrap_or(""),
                    r["transport"].as_str().unwrap_or(""),
                    r["address"].as_str().unwrap_or("-"),
                ));
            }
            out(&s);
        }
    }
    Ok(Exit::Ok)
}

fn pair(cli: &Cli, args: &PairArgs) -> Result<Exit, CliError> {
    let stack = load(cli)?;
    if !stack.devices.iter().any(|d| d.name == args.device) {
        let names: Vec<&str> = stack.devices.iter().map(|d| d.name.as_str()).collect();
        let hint = stack::did_you_mean(&args.device, &names)
            .map(|n| format!("did you mean `{n}`?"))
            .unwrap_or_else(|| {
                format!(
                    "add `device \"{}\"` to stack.kdl and run `soul apply`",
                    args.device
                )
            });
        return Err(CliError::Usage(format!(
            "no device `{}` in {}: {hint}",
            args.device,
            cli.file.display()
        )));
    }
    let sidecar = one_sidecar(&stack, args.sidecar.as_deref())?;
    let state = StateDir::at(&state_path(cli, &stack));
    let ext = match args.format {
        PairFormat::Terminal => "txt",
        PairFormat::Uri => "uri",
        PairFormat::Link => "link",
        PairFormat::Png => "png",
        PairFormat::Svg => "svg",
    };
    let rel = format!(
        "{}.{ext}",
        crate::state::layout::pairing(&args.device, &sidecar)
    );
    let bytes = state.read(&rel).map_err(|_| {
        CliError::Usage(format!(
            "no pairing code for {}/{sidecar} in {} yet: run `soul apply` first",
            args.device,
            state.path().display()
        ))
    })?;
    if matches!(args.format, PairFormat::Link) && bytes.trim_ascii().is_empty() {
        return Err(CliError::Usage(format!(
            "{}/{sidecar} has no known address yet: check `soul bridge status`",
            args.device
        )));
    }
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
                args.device,
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
                    "scan with the soul app to pair {} with {sidecar}",
                    args.device
                );
            }
        }
    }
    Ok(Exit::Ok)
}

async fn rotate(cli: &Cli, args: &RotateArgs) -> Result<Exit, CliError> {
    let source = stack::read_source(&cli.file)?;
    // Validate first: never edit (or apply) a file that is already broken.
    stack::parse(&cli.file.display().to_string(), &source).map_err(StackError::Invalid)?;
    let bumped = stack::edit::bump_generation(&source, args.device.as_deref())?;
    stack::parse(&cli.file.display().to_string(), &bumped.source).map_err(StackError::Invalid)?;
    std::fs::write(&cli.file, &bumped.source)
        .map_err(|e| CliError::Io(format!("cannot write {}: {e}", cli.file.display())))?;
    let what = match &args.device {
        Some(d) => format!("device `{d}` generation"),
        None => "secret-generation".into(),
    };
    if args.new_key {
        let stack = stack::parse(&cli.file.display().to_string(), &bumped.source)
            .map_err(StackError::Invalid)?;
        for aside in state_dir(cli, &stack)?
            .set_aside_lost_key(unix_now())
            .map_err(|e| CliError::Io(format!("cannot move the lost stack key aside: {e}")))?
        {
            out(&format!("moved aside: {aside}\n"));
        }
    }
    out(&format!(
        "{}: {what} {} → {} (commit this edit)\n",
        cli.file.display(),
        bumped.from,
        bumped.to
    ));
    apply(cli).await
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
