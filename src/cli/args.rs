//! soul's arguments: the clap definitions of every command and its flags, and the help text
//! they print. Nothing here runs anything.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::program_args::{GateArgs, PauseArgs};
use crate::stack;

const EXIT_CODES: &str = "\
The relay: `soul relay serve` on a small VPS, `relay \"host:port\"` in stack.kdl, and the
stack's line from `soul relay allow` in the relay's file. `soul connect` reaches a sidecar
over the LAN, an overlay or the relay, whichever answers first with the gate's key.

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

/// The pods a command acts on.
#[derive(Debug, Args)]
pub struct PodsArgs {
    /// Only this sidecar's pod [default: every pod of the stack].
    pub sidecar: Option<String>,
}

/// `soul logs`'s flags.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Only this sidecar's pod.
    pub sidecar: Option<String>,
    /// Only this role's container: app, gate, pause, tailscale, nebula or tor.
    #[arg(long)]
    pub role: Option<String>,
    /// Keep following new output, across containers recreated by apply or watch (`-F`, as
    /// `tail -F` follows a file that is replaced: `-f` is the stack file, as for every command).
    #[arg(short = 'F', long)]
    pub follow: bool,
    /// Only output newer than this (`10m`, `2h`).
    #[arg(long, value_parser = parse_duration_arg)]
    pub since: Option<Duration>,
    /// Only the last N lines of each container.
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
}

/// `soul init`'s flags.
#[derive(Debug, Args)]
pub struct InitStackArgs {
    /// The service's image.
    #[arg(long)]
    pub image: Option<String>,
    /// The port the service listens on inside its container.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// The stack's name [default: this directory's name].
    #[arg(long)]
    pub name: Option<String>,
}

/// Shells `soul completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a first stack.kdl here: one service on the LAN and one device, commented. It
    /// never overwrites a file; on a terminal it asks for what the flags do not say.
    #[command(
        after_help = "Example:\n  soul init                                  # asks for the image and its port\n  \
soul init --image ghcr.io/example/notes:1.4 --port 8080\n  \
soul -f ~/stacks/home.kdl init --image nginx:1.27 --port 80 --name home"
    )]
    Init(InitStackArgs),
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
    /// Move stack.lock's images to what their tags name now at their registries.
    #[command(
        after_help = "`soul apply` runs the digests stack.lock holds, whatever a tag points to \
now, and only adds the images stack.kdl newly names. `soul update` asks each registry (through \
the engine, without pulling) what the tags name now, rewrites stack.lock and prints each change; \
--apply applies it. Review and commit stack.lock like any change.\n\nExample:\n  soul update\n  \
soul update notes --apply"
    )]
    Update(UpdateArgs),
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
    /// Show the pods' output, each line named by sidecar and role (like `docker compose logs`).
    #[command(
        after_help = "Example:\n  soul logs                    # every container of the stack\n  \
soul logs notes --role app -F  # follow one app, across recreations\n  \
soul logs --since 10m --tail 50"
    )]
    Logs(LogsArgs),
    /// Stop a sidecar's pod, or every pod, and keep it stopped: `apply` and `watch` leave it
    /// so until `soul start`.
    #[command(
        after_help = "Example:\n  soul stop notes   # one pod\n  soul stop         # the whole stack"
    )]
    Stop(PodsArgs),
    /// Start what `soul stop` stopped (and apply).
    #[command(after_help = "Example:\n  soul start notes\n  soul start")]
    Start(PodsArgs),
    /// Restart a sidecar's pod, or every pod: its namespace holder first, then the rest.
    #[command(after_help = "Example:\n  soul restart notes\n  soul restart")]
    Restart(PodsArgs),
    /// Remove this stack's containers and networks (named volumes only with --volumes).
    #[command(
        after_help = "Only what carries this stack's labels is touched.\n\nExample:\n  \
soul down\n  soul down --volumes   # also deletes the stack's named volumes: their data is gone\n  \
soul down --images    # also removes the images soul pulled for it"
    )]
    Down(DownArgs),
    /// Remove the images soul pulled for this stack that no container uses any more (a tag
    /// `soul update` moved, a sidecar removed). `soul status` lists them first.
    #[command(
        after_help = "Only images soul itself pulled (recorded in the state dir) are removed, never \
forced: an image a container uses, or that another tag still names (another tool's), stays.\n\n\
Example:\n  soul status   # lists \"unused images soul pulled\"\n  soul prune"
    )]
    Prune,
    /// List the devices of stack.kdl: generation, expiry, pairing files, and whether each
    /// device's token is current.
    #[command(after_help = "Example:\n  soul devices\n  soul devices --output json")]
    Devices(OutputArgs),
    /// Show a device's pairing QR code (a phone camera opens it, paired), a link for a
    /// browser here, or the URI; write any to a file; or serve a page of every code (--serve).
    #[command(
        after_help = "The QR code holds the pairing link: a phone camera opens it in the \
browser at the pod's first address a browser reaches, and the pod's gate redeems its one-time \
ticket for a browser session of that sidecar (a cookie that lasts as long as the device, at \
most 400 days). The link never holds the device token; its part after `#` tells a soul client \
the addresses and the gate's key pin, and the client trades the ticket for the token over TLS. \
A used code does not work again: `soul rotate --device D` makes a new one. `--format uri` \
prints the pairing URI, which holds the token: treat it like a password.\n\nExample:\n  \
soul pair alice-phone\n  soul pair alice-phone --sidecar notes --format png --out alice.png\n  \
soul pair alice-phone --format uri\n  soul pair alice-phone --format link\n  soul pair --serve"
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
    /// Back up the stack's identity, or restore it on a new machine: the stack key, the device
    /// registry and the spent pairing tickets, in one passphrase-encrypted file.
    #[command(subcommand)]
    State(StateCommand),
    /// Reach a paired sidecar from this machine: a local port that forwards to its gate over
    /// the best path (LAN, overlay, relay) and adds the device's credential.
    #[command(
        after_help = "PAIRING is a pairing code (the link a QR code holds, or the soul:// URI), a file holding one (text, or a PNG of the QR code), or a pairing stored by an earlier run (<stack>.<sidecar>.<device>, listed by `soul connect --list`). A link's one-time ticket is traded for the device token at the gate over TLS pinned to the code's key; the pairing is then stored, 0600, in ~/.config/soul/pairings.

Paths are tried in the code's order, each 250 ms after the one before (at once when it fails), and the first TLS handshake with the pinned key wins: a gate with another key is never sent the token. The choice is kept until the network changes, a connection over it fails, or a better path answers again (tried every 5 s).

Example:
  soul connect 'http://192.168.1.20:8443/?soul_ticket=…#v=1&…'
  soul connect alice-laptop.png --listen 127.0.0.1:8080
  soul connect home.notes.alice-laptop
  soul connect home.notes.alice-laptop --probe   # {\"path\":\"lan\",\"address\":\"…\",\"ms\":…}"
    )]
    Connect(ConnectArgs),
    /// The self-hosted relay: serve it on a small VPS, see who is registered, and print the
    /// line that lets this stack's pods register.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// Print a completion script for your shell.
    #[command(
        after_help = "Example:\n  soul completions bash > ~/.local/share/bash-completion/completions/soul\n  \
soul completions zsh > \"${fpath[1]}/_soul\"\n  \
soul completions fish > ~/.config/fish/completions/soul.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print soul's manual page (roff), or write it and one page per command into a directory.
    #[command(after_help = "Example:\n  soul man | man -l -\n  \
soul man --out ~/.local/share/man/man1 && man soul-apply")]
    Man {
        /// Write soul.1 and soul-<command>.1 for every command into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
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
  soul gate --stack home --sidecar notes --listen 0.0.0.0:8443 --upstream 127.0.0.1:8080 --keys /gate --redeemed /redeemed --spent /spent"
    )]
    Gate(GateArgs),
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
    Pause(PauseArgs),
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
    /// Ask the registries this often whether a tag in stack.lock moved (`1h`); when one did,
    /// move stack.lock and apply, one log line per image. Off by default: to review lock
    /// changes instead, leave it off and run `soul update` in CI or by hand.
    #[arg(long, value_parser = parse_duration_arg, value_name = "INTERVAL")]
    pub update: Option<Duration>,
    /// Restarts within --flap-window after which a container is reported degraded.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub flap_restarts: usize,
    #[arg(long, default_value = "10m", value_parser = parse_duration_arg, value_name = "DURATION")]
    pub flap_window: Duration,
    /// After every pass, write the stack as Kubernetes manifests here (a file, or a directory
    /// that gets `<stack>.yaml`), only when they changed: a committed export stays current.
    #[arg(long, value_name = "PATH")]
    pub export_kubernetes: Option<PathBuf>,
    /// How often this host's addresses and the pods' relay registrations are checked (pairing
    /// codes carry them).
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg, value_name = "DURATION")]
    pub address_poll: Duration,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Only these sidecars' images (default: every image of the stack).
    #[arg(value_name = "SIDECAR")]
    pub sidecars: Vec<String>,
    /// Apply the new lock right away.
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Write the state bundle: what `soul apply` cannot derive (the stack key, the device
    /// registry, the spent pairing tickets), encrypted with a passphrase (age, scrypt).
    #[command(
        after_help = "Tokens, pairing codes, the gates' keys and certificates are not in it: `soul apply` derives them from the key, byte for byte, so every paired device keeps working. The file opens with `age -d` too. Keep it, and its passphrase, somewhere other than this machine.\n\nExample:\n  soul state export --out home.soul-state.age\n  soul state export --out backup.age --passphrase-file /run/secrets/backup-pass"
    )]
    Export(StateExportArgs),
    /// Restore a state bundle into this machine's state dir, then `soul apply`.
    #[command(
        after_help = "The bundle must be of the stack stack.kdl names. Nothing is written unless all of it checks out (passphrase, integrity, stack). A state dir that already holds a stack key is refused unless --replace, which moves the old key and registry aside (`stack.key.lost-<time>`), never deleting them.\n\nExample:\n  soul state import home.soul-state.age && soul apply"
    )]
    Import(StateImportArgs),
}

#[derive(Debug, Args)]
pub struct StateExportArgs {
    /// Where to write the bundle (0600; an existing file is not overwritten).
    #[arg(long, value_name = "FILE", default_value = "soul-state.age")]
    pub out: PathBuf,
    /// Read the passphrase from this file (its first line) instead of asking on the terminal.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StateImportArgs {
    /// The bundle `soul state export` wrote.
    #[arg(value_name = "FILE")]
    pub bundle: PathBuf,
    /// Replace a stack key this state dir already holds (moved aside, not deleted).
    #[arg(long)]
    pub replace: bool,
    /// Read the passphrase from this file (its first line) instead of asking on the terminal.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
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
pub enum RelayCommand {
    /// Serve the relay (for a small VPS): pods' agents dial in and register, devices connect
    /// with TLS, and each device connection is spliced to its pod by the TLS server name. The
    /// relay never terminates TLS and holds only public keys.
    #[command(
        after_help = "The file (KDL) names the port, the status address and one `allow` \
line per stack, printed by `soul relay allow` on the stack's machine:\n\n  \
listen \"0.0.0.0:7000\"\n  status \"127.0.0.1:7001\"\n  allow \"home\" key=\"ed25519:…\"\n  \
limits sessions-per-stack=256 ready=4 idle-timeout=\"5m\"\n\n\
It logs the pin of its key at start (stack.kdl: `relay \"host:7000\" pin=\"…\"`), then \
one line per registration and per session (never a secret).\n\n\
Example:\n  soul relay serve --config /etc/soul/relay.kdl"
    )]
    Serve {
        /// The relay's file.
        #[arg(long, value_name = "FILE", default_value = "/etc/soul/relay.kdl")]
        config: PathBuf,
        /// Where the relay keeps its key, made at the first start (default: systemd's
        /// $STATE_DIRECTORY, else /var/lib/soul-relay as root, else
        /// ~/.local/state/soul-relay). Its pin goes into each stack's `relay … pin=`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show a running relay's registered pods and open sessions (from its status address).
    #[command(
        after_help = "Example:\n  soul relay status\n  soul relay status --status 127.0.0.1:7001 --output json"
    )]
    Status {
        /// The relay's status address (`status` in its file).
        #[arg(long, value_name = "HOST:PORT", default_value = crate::relay::config::DEFAULT_STATUS)]
        status: String,
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Print the `allow` line for this stack: add it to the relay's file. It holds the stack's
    /// agent public key (it changes with `soul rotate`; print it again then).
    #[command(after_help = "Example:\n  soul relay allow >> relay.kdl   # then copy it to the VPS")]
    Allow,
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
    /// The stack as Kubernetes manifests: per sidecar a Deployment (the app, the gate and each
    /// overlay in one pod), a Service for the gate port, a NetworkPolicy admitting only the
    /// gate port, and a claim per named volume. No secret is in it.
    #[command(
        after_help = "Secret values and the files soul mounts (the gate's keys, registry and certificates; transport configs; auth keys) are Secrets you create: the file's header lists each with the `kubectl create secret` line that makes it from this machine's state dir. The same stack.kdl gives the same bytes, so the file can be committed for Flux or Argo CD. The NetworkPolicy plays the guard only where the network plugin enforces it, and soul's image must be pushed where the cluster pulls from (README: On Kubernetes).\n\nExample:\n  soul export kubernetes --out k8s.yaml && kubectl apply -f k8s.yaml"
    )]
    Kubernetes {
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
    #[arg(required_unless_present = "serve")]
    pub device: Option<String>,
    /// Serve a page on 127.0.0.1 with every device's codes, large enough to scan from this
    /// screen, following the state dir (new addresses and re-issued tokens show by themselves).
    /// It prints its address; stop it with Ctrl-C.
    #[arg(long, conflicts_with_all = ["format", "out", "sidecar"])]
    pub serve: bool,
    /// The port of --serve's page (default: any free port).
    #[arg(long, requires = "serve", default_value_t = 0)]
    pub port: u16,
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
    /// A QR code drawn in the terminal, black on white whatever the terminal's colours. It
    /// holds the pairing link: a phone camera opens it in the browser, which is then paired.
    Terminal,
    /// The pairing URI (`soul://pair?…`, with the device token): for an app reading it from a
    /// file or a terminal, never for a browser.
    Uri,
    /// The QR code as a PNG image (use --out).
    Png,
    /// The QR code as an SVG image.
    Svg,
    /// Links to open in a browser, one per address, best first
    /// (`http://<host>:<port>/?soul_ticket=…`); each is good for one browser, once.
    Link,
    /// Exactly the text the QR code holds: the pairing link with its `#` fragment (every
    /// address and the pin; a single-use ticket), or, while no address is known, the pairing
    /// URI (with the device token). What an app author pastes into their client.
    Code,
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
    /// Also remove the images soul pulled for this stack that no container uses any more
    /// (never an image soul did not pull, nor one another tag still names).
    #[arg(long)]
    pub images: bool,
}

pub(super) fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    stack::parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration like 500ms, 5s or 1m"))
}

/// `soul connect`'s flags.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The pairing: a code, a file holding one, or a stored pairing's name.
    #[arg(required_unless_present = "list")]
    pub pairing: Option<String>,
    /// Where to listen (a free port on loopback by default; the address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Choose a path once, print it as one JSON line and exit.
    #[arg(long)]
    pub probe: bool,
    /// List the stored pairings.
    #[arg(long, conflicts_with_all = ["pairing", "probe"])]
    pub list: bool,
}

#[cfg(test)]
mod tests {
    /// clap checks a subcommand's arguments only when that subcommand runs: `soul logs -f`
    /// (follow) once clashed with the global `-f` (file) and panicked at run time.
    #[test]
    fn a_short_flag_taken_twice_fails_here_not_at_run_time() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
