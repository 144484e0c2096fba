//! The flags of the programs soul runs inside each pod (`soul gate`, `soul pause`): written by
//! the planner into the pod's containers, not typed by people.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::args::parse_duration_arg;

/// `soul gate`'s flags.
#[derive(Debug, Args)]
pub struct GateArgs {
    /// The stack whose tokens are accepted.
    #[arg(long)]
    pub stack: String,
    /// The sidecar this gate fronts: its browser sessions and pairing links are good here
    /// only.
    #[arg(long)]
    pub sidecar: Option<String>,
    /// The gate's writable directory (its volume in the pod): the relay agent's state, and
    /// where spent pairing links were recorded before `--spent`.
    #[arg(long, value_name = "DIR")]
    pub redeemed: Option<PathBuf>,
    /// A writable directory, outliving the pod and its volumes, where spent pairing links
    /// are recorded (as `<sidecar>`), so that a used link stays used across restarts,
    /// recreated gates and `soul down --volumes` (in `--redeemed`, or memory only, without it).
    #[arg(long, value_name = "DIR")]
    pub spent: Option<PathBuf>,
    /// Where to listen: the gate port, on every address of the pod.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: std::net::SocketAddr,
    /// The app inside the pod.
    #[arg(long)]
    pub upstream: std::net::SocketAddr,
    /// The directory with the stack's public key and device registry.
    #[arg(long, default_value = "/gate")]
    pub keys: PathBuf,
    /// How long a client may take to send its request headers, and how long a connection
    /// may stay open before a credential is admitted on it. Between a kept-alive
    /// connection's requests the gate may wait up to an eighth longer.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    pub header_timeout: Duration,
    /// Connections open at once. When all are taken, a new one evicts the oldest that has
    /// not shown a credential.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections open at once from one source address (behind Docker's userland proxy,
    /// every client on this machine shares one).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_source: u32,
    /// New connections per second from one source address (four times as many at once).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_source_rate: u32,
    /// Refused attempts per source address per minute before answering 429.
    #[arg(long, default_value_t = 30)]
    pub failures_per_minute: usize,
    /// Threads serving connections, each with a connection from accept to close (default:
    /// one per CPU the gate may use).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// Refuse plain HTTP on the port: serve only TLS, with the sidecar's certificate from the
    /// keys directory (`tls-<sidecar>.crt` and `.key`).
    #[arg(long)]
    pub tls_only: bool,
    /// Register with this relay (`host:port`) and serve the devices it carries: the pod's
    /// dial-out agent, authenticated by the keys directory's `relay-agent.key`.
    #[arg(long, value_name = "HOST:PORT", requires_all = ["sidecar", "relay_pin"])]
    pub relay: Option<String>,
    /// The pin of the relay's key (`sha256//…`): the agent sends nothing to a relay whose key
    /// does not match.
    #[arg(long, value_name = "PIN", requires = "relay")]
    pub relay_pin: Option<String>,
    /// This sidecar's public HTTPS name (`<sidecar>-<stack>.<relay's domain>`): claimed at the
    /// relay, and served with a certificate obtained from an ACME CA by TLS-ALPN-01 (kept in
    /// `--acme-dir`); every other name keeps the pinned certificate.
    #[arg(long, value_name = "NAME", requires_all = ["acme_dir", "sidecar"])]
    pub public_name: Option<String>,
    /// Where the ACME account, the public certificate and its status live (writable).
    #[arg(long, value_name = "DIR", requires = "public_name")]
    pub acme_dir: Option<PathBuf>,
    /// The ACME directory.
    #[arg(long, value_name = "URL", default_value = crate::stack::LETS_ENCRYPT)]
    pub acme_directory: String,
    /// PEM roots to trust for the ACME directory instead of the public ones (a test CA).
    #[arg(long, value_name = "FILE")]
    pub acme_ca: Option<PathBuf>,
    /// An e-mail address for the CA's notices.
    #[arg(long, value_name = "EMAIL")]
    pub acme_contact: Option<String>,
    /// The first wait after a failed ACME attempt (doubling up to an hour).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration_arg)]
    pub acme_retry: Duration,
}

/// `soul pause`'s flags.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The gate's port: every other TCP and UDP port of the pod is refused from outside.
    #[arg(long, value_name = "PORT")]
    pub gate_port: Option<u16>,
    /// A UDP port an overlay in the pod receives its peers on (repeatable).
    #[arg(long, value_name = "PORT", requires = "gate_port")]
    pub open_udp: Vec<u16>,
    /// Only check that the guard is in place (the pause container's health check).
    #[arg(long, requires = "gate_port")]
    pub check: bool,
}
