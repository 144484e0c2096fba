//! `soul gate`: the pod's front door. It listens on the gate port and lets a request through
//! only with a credential the gate verifies: a device token (`Authorization: Bearer`, checked
//! by the library's one verifier against the device's current registry entry) or this
//! sidecar's browser session (a cookie a one-time pairing link is redeemed for, see [`link`]).
//! It proxies to the app on 127.0.0.1 — HTTP/1.1 and h2c, streamed both ways, WebSocket
//! upgrades included — with soul's credentials and hop-by-hop headers removed; plain
//! HTTP/1.1 requests with a good credential take the fast [`lane`]. It watches its
//! key and registry files: a revoked device's next request is refused and its open
//! connections are closed, without a restart. It must not touch the engine or the stack key
//! (it has the public key and the link key only).
//!
//! Its rooms: [`server`] (the listener, TLS sniffing, serving a connection), [`slots`] (who
//! holds one of its connections), [`auth`] (what a credential grants, remembered per
//! connection), [`handle`] (the full server's answer to a request), [`pairing`] (the pairing
//! endpoints), [`proxy`] (the way to the app), [`lane`] (the fast path), and the policy pieces
//! they share: [`policy`] (what passes to the app, written once for both engines),
//! [`credential`] (what a request presents, what is stripped), [`forward`] (the full server's
//! use of the policy on a header map), [`session`], [`link`], [`keys`], [`redeemed`],
//! [`limits`], [`tls`]; and [`acme`], the public name's certificate.

pub mod acme;
mod auth;
mod credential;
mod forward;
mod handle;
mod keys;
mod lane;
mod limits;
mod link;
mod pairing;
mod policy;
mod proxy;
mod redeemed;
mod server;
mod session;
mod slots;
mod tls;

use auth::*;
use handle::*;
use pairing::*;
use proxy::*;
pub use server::{run, serve};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::pairing::TokenError;
use crate::secret::Secret;
use credential::Presented;
pub use credential::{cookie_name, foreign_origin};
pub use keys::{Keys, load};
use limits::Failures;
pub use link::{ADDRESSES_PATH, PAIR_PATH, TOKEN_PATH};
pub use redeemed::REDEEMED_FILE;
use redeemed::Redeemed;
pub use session::MAX_LIFETIME as SESSION_MAX_LIFETIME;
use session::Scope;
pub use slots::SlotLimits;
use slots::{Slot, Slots};
pub use tls::GateTls;

pub use crate::proto::HEALTH_PATH;

/// How the gate runs.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub stack: String,
    /// The sidecar this gate fronts: its browser sessions are good here only.
    pub sidecar: Option<String>,
    /// The app, inside the pod.
    pub upstream: SocketAddr,
    /// The directory holding the files of the state dir's [`crate::state::layout::GATE_DIR`].
    pub keys_dir: PathBuf,
    /// The file recording spent pairing tickets across restarts (memory only when `None`).
    pub spent_file: Option<PathBuf>,
    /// Records an earlier version kept elsewhere, read too.
    pub earlier_spent: Vec<PathBuf>,
    /// Connections open at once, in all and per source address ([`slots`]).
    pub slots: SlotLimits,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// How long a client may take to send a request's headers (slowloris), and how long a
    /// connection may stay open without presenting a credential the gate admits.
    pub header_timeout: Duration,
    /// Refused credentials per source address per minute before the gate answers 429.
    pub failures_per_minute: usize,
    /// How often the key and registry files are re-read.
    pub reload_every: Duration,
    /// Refuse plain HTTP: only TLS (with the certificate soul made for this sidecar) is served.
    pub tls_only: bool,
    /// Register with a relay and serve the devices it carries, like any other connection.
    pub relay: Option<crate::relay::agent::AgentConfig>,
    /// The public name, whose ClientHellos get its CA-issued certificate ([`acme`]).
    pub public: Option<Arc<acme::PublicCert>>,
    /// How that certificate is obtained and renewed.
    pub acme: Option<acme::AcmeConfig>,
}

impl GateConfig {
    pub fn new(stack: &str, upstream: SocketAddr, keys_dir: PathBuf) -> GateConfig {
        GateConfig {
            stack: stack.to_string(),
            sidecar: None,
            upstream,
            keys_dir,
            spent_file: None,
            earlier_spent: Vec::new(),
            slots: SlotLimits::default(),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout: Duration::from_secs(10),
            failures_per_minute: 30,
            reload_every: Duration::from_millis(200),
            tls_only: false,
            relay: None,
            public: None,
            acme: None,
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Shared {
    cfg: GateConfig,
    /// This gate's session cookie ([`cookie_name`]).
    cookie: String,
    /// The current key and registry; `None` until the files are readable.
    keys: watch::Receiver<Option<Arc<Keys>>>,
    failures: Mutex<Failures>,
    redeemed: Mutex<Redeemed>,
    client: Client<HttpConnector, Incoming>,
    /// Connections open, across all threads ([`slots`]).
    slots: Arc<Slots>,
}

impl Shared {
    /// The session scope of this gate under `keys` (none without a link key).
    fn scope<'a>(&'a self, keys: &'a Keys) -> Option<Scope<'a>> {
        Some(Scope {
            key: keys.link_key.as_ref()?,
            stack: &self.cfg.stack,
            sidecar: self.cfg.sidecar.as_deref().unwrap_or(""),
        })
    }
}

/// Why the gate stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("gate: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gate: {0}")]
    Serve(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Arc<Keys> {
        Arc::new(Keys {
            public_key: [1; 32],
            registry: Default::default(),
            link_key: None,
            tls: None,
            addresses: Vec::new(),
        })
    }

    #[test]
    fn a_held_credential_is_recalled_only_under_the_same_keys_and_before_it_runs_out() {
        let (k, other) = (keys(), keys());
        let mut held = Held::default();
        let t = Credential::Token("t".into());
        let grant = Grant {
            device: "alice".into(),
            until: Some(2000),
        };
        assert!(held.remember(&t, &k, &grant));
        assert!(!held.remember(&t, &k, &grant), "already held");
        assert_eq!(held.recall(&t, &k, 1999), Some(grant.clone()));
        assert_eq!(held.recall(&t, &k, 2000), None, "ran out");
        assert_eq!(
            held.recall(&t, &other, 1500),
            None,
            "equal but reloaded keys"
        );
        assert_eq!(
            held.recall(&Credential::Session("t".into()), &k, 1500),
            None
        );
        // Verified again under new keys: recalled under those only.
        held.remember(&t, &other, &grant);
        assert_eq!(held.recall(&t, &k, 1500), None);
        assert!(held.recall(&t, &other, 1500).is_some());
        assert_eq!(held.credentials(), [t]);
        assert_eq!(held.first_end(), Some(2000));
    }
}
