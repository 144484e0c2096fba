//! soul: make a self-hosted service give-able. One `stack.kdl` declares the service, the
//! transports that reach it and the devices allowed in; soul drives a Docker engine to it.
//!
//! # Layout
//! - [`stack`]: the typed model of stack.kdl, parsing, schema and validation.
//! - [`pod`]: container and pod specs, their config hash, and the container builder.
//! - [`reconcile`]: resolve → Desired, the pure `plan`, the executor, the watch loop.
//! - [`runtime`]: the Docker engine through bollard, and soul's own image.
//! - [`state`]: the state dir: the stack key, the device registry, the lock, and its layout.
//! - [`files`]: the one bounded reader of soul's own files and the one atomic writer.
//! - [`machine`]: what resolving reads from the machine.
//! - [`secret`]: secrets that print as `[redacted]`.
//! - [`pairing`]: device tokens and their verifier, tickets, pairing codes, QR renderings.
//! - [`tls`]: the gates' and the relay's TLS identities and their pins.
//! - [`pin`]: TLS trusted by a pin and nothing else.
//! - [`proto`]: what clients, gates and relays agree on (paths, server names, origins).
//! - [`transport`]: how each pod is reached, one driver per overlay, and address discovery.
//! - [`bridge`]: `soul bridge init`: choosing transports, written into stack.kdl.
//! - [`programs`]: the programs soul runs inside pods (pause, demo-app, probe).
//! - [`gate`]: the authenticating proxy that runs in each pod (`soul gate`).
//! - [`guard`]: the rules that keep the app's port private to its pod (run by `soul pause`).
//! - [`relay`]: `soul relay serve` and the pod's agent that registers with it.
//! - [`client`]: what `soul connect` runs: pairing, the path race, the local forward.
//! - [`pair_page`]: `soul pair --serve`, the pairing page on loopback.
//! - [`html`]: text as HTML for the pages soul serves.
//! - [`export`]: the stack as a Compose file or Kubernetes manifests.
//! - [`backoff`]: capped exponential backoff with jitter.
//! - [`quiet`]: log lines a flood would repeat, said once per interval.
//! - [`accept`]: the servers' accept loop, which waits out a failed accept.
//! - [`rewind`]: a stream whose first bytes were already read, put back in front.
//! - [`cli`]: the commands, their output, and exit codes.
//!
//! `docs/architecture.md` draws the map: which module imports which, and where a new
//! transport goes.
pub mod accept;
pub mod backoff;
pub mod bridge;
pub mod cli;
pub mod client;
pub mod export;
pub mod files;
pub mod gate;
pub mod guard;
pub mod html;
pub mod machine;
pub mod pair_page;
pub mod pairing;
pub mod pin;
pub mod pod;
pub mod programs;
pub mod proto;
pub mod quiet;
pub mod reconcile;
pub mod relay;
pub mod rewind;
pub mod runtime;
pub mod secret;
pub mod stack;
pub mod state;
pub mod tls;
pub mod transport;
