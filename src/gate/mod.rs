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

mod credential;
mod forward;
mod keys;
mod lane;
mod limits;
mod link;
mod redeemed;
mod session;
mod slots;
mod tls;

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
pub use link::{PAIR_PATH, TOKEN_PATH};
pub use redeemed::REDEEMED_FILE;
use redeemed::Redeemed;
pub use session::MAX_LIFETIME as SESSION_MAX_LIFETIME;
use session::Scope;
pub use slots::SlotLimits;
use slots::{Slot, Slots};
pub use tls::GateTls;

/// Concurrent requests one HTTP/2 connection may have in flight.
const H2_MAX_STREAMS: u32 = 128;
/// The health endpoint Docker's health check calls; it reveals nothing.
pub const HEALTH_PATH: &str = "/.soul/health";

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

/// `soul gate`: listens on `listen` and serves on `threads` threads (one per CPU it may use
/// when `None`) until `shutdown` resolves.
pub async fn run(
    cfg: GateConfig,
    listen: SocketAddr,
    threads: Option<usize>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GateError> {
    let listener = std::net::TcpListener::bind(listen).map_err(|source| GateError::Listen {
        addr: listen,
        source,
    })?;
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (stop, stopped) = watch::channel(false);
    let gate = tokio::task::spawn_blocking(move || serve(cfg, listener, threads, stopped));
    tokio::pin!(gate);
    let served = tokio::select! {
        r = &mut gate => r,
        () = shutdown => {
            let _ = stop.send(true);
            gate.await
        }
    };
    served
        .map_err(|e| GateError::Serve(std::io::Error::other(e)))?
        .map_err(GateError::Serve)
}

/// Serves on `threads` threads until `shutdown` is set. Each thread runs a single-threaded
/// runtime of its own that accepts from the one listening socket, so a connection lives on
/// one thread from accept to close and its requests never wake another core (the model of
/// nginx's worker processes). Blocks until every thread has stopped.
pub fn serve(
    cfg: GateConfig,
    listener: std::net::TcpListener,
    threads: usize,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let (keys_tx, keys_rx) = watch::channel(
        load(&cfg.keys_dir, cfg.sidecar.as_deref())
            .ok()
            .map(Arc::new),
    );
    let shared = Arc::new(Shared {
        failures: Mutex::new(Failures::new(
            cfg.failures_per_minute,
            Duration::from_secs(60),
        )),
        client: Client::builder(TokioExecutor::new()).build(upstream_connector()),
        keys: keys_rx,
        cookie: cookie_name(&cfg.stack, cfg.sidecar.as_deref()),
        redeemed: Mutex::new(Redeemed::open(cfg.spent_file.clone(), &cfg.earlier_spent)),
        slots: Slots::new(cfg.slots),
        cfg,
    });
    tracing::info!(
        "gate of `{}` listening on {}, forwarding to {}",
        shared.cfg.stack,
        listener.local_addr()?,
        shared.cfg.upstream
    );
    let mut keys_tx = Some(keys_tx);
    let workers = (0..threads.max(1))
        .map(|i| {
            let listener = listener.try_clone()?;
            let (shared, mut shutdown) = (shared.clone(), shutdown.clone());
            // The first thread also follows the key and registry files.
            let follow = keys_tx.take();
            std::thread::Builder::new().name(format!("gate-{i}")).spawn(
                move || -> std::io::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        if let Some(tx) = follow {
                            let (dir, every) =
                                (shared.cfg.keys_dir.clone(), shared.cfg.reload_every);
                            let sidecar = shared.cfg.sidecar.clone();
                            tokio::spawn(keys::follow(dir, sidecar, every, tx));
                            if let Some(relay) = shared.cfg.relay.clone() {
                                tokio::spawn(crate::relay::agent::run(
                                    relay,
                                    relayed(shared.clone()),
                                ));
                            }
                        }
                        let listener = TcpListener::from_std(listener)?;
                        accept(&listener, shared, async move {
                            let _ = shutdown.wait_for(|stop| *stop).await;
                        })
                        .await
                    })
                },
            )
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for w in workers {
        w.join()
            .map_err(|_| std::io::Error::other("a gate thread panicked"))??;
    }
    Ok(())
}

/// Accepts connections on this thread until `shutdown` resolves: one when there is room for
/// it (a free slot, or an unproven connection to evict), each given its slot or closed.
async fn accept(
    listener: &TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let mut refusals = crate::quiet::Quiet::new(Duration::from_secs(10));
    loop {
        tokio::select! {
            () = shared.slots.room() => {}
            _ = &mut shutdown => return Ok(()),
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than stop serving.
                    tracing::warn!("gate cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let slot = match shared.slots.acquire(Some(peer.ip())).await {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(held_back) = refusals.say(peer.ip()) {
                    tracing::warn!(source = %peer.ip(), "closed a connection: {why}{held_back}");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(held(stream, peer, shared.clone(), slot));
    }
}

/// Serves one connection in its slot, and closes it when the slot says it must go.
async fn held(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, slot: Slot) {
    let slot = Arc::new(slot);
    let within = shared.cfg.header_timeout;
    tokio::select! {
        () = connection(stream, peer, shared, slot.clone()) => {}
        why = slot.must_close(within) => {
            tracing::debug!(source = %peer, "closed a connection that presented no credential: {why:?}");
        }
    }
}

/// What the relay agent does with a data channel a device has spoken on: serve it like a
/// connection accepted here (a slot, TLS or plain by its first byte), its peer the relay.
fn relayed(shared: Arc<Shared>) -> impl Fn(TcpStream) + Clone + Send + 'static {
    move |stream: TcpStream| {
        let Ok(peer) = stream.peer_addr() else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            // The relay's own address is every relayed device's: not counted per source.
            if let Ok(slot) = shared.slots.acquire(None).await {
                held(stream, peer, shared, slot).await;
            }
        });
    }
}

/// Connections to the app: small requests go out at once (no Nagle delay).
fn upstream_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

/// One client connection. Its first byte tells TLS (a handshake record, 0x16) from plain HTTP
/// on the one gate port; plain HTTP is refused when the stack says `gate tls-only=#true`.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, slot: Arc<Slot>) {
    // A client that connects and sends nothing holds a connection slot: it gets as long as
    // a request's headers would (hyper's header timer only starts at the first byte).
    let mut first = [0u8; 1];
    match tokio::time::timeout(shared.cfg.header_timeout, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => {
            tracing::debug!(source = %peer, "closed a connection that sent nothing");
            return;
        }
    }
    if first[0] != TLS_HANDSHAKE {
        if shared.cfg.tls_only {
            tls::refuse_plain(stream, peer, HEALTH_PATH).await;
        } else {
            serve_http(stream, peer, false, shared, slot).await;
        }
        return;
    }
    let identity = shared.keys.borrow().as_ref().and_then(|k| k.tls.clone());
    let Some(identity) = identity else {
        tracing::info!(source = %peer, "refused a TLS handshake: this gate has no certificate yet (run `soul apply`)");
        return;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(identity.config).accept(stream);
    match tokio::time::timeout(shared.cfg.header_timeout, handshake).await {
        Ok(Ok(stream)) => serve_http(stream, peer, true, shared, slot).await,
        Ok(Err(e)) => tracing::debug!(source = %peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(source = %peer, "TLS handshake timed out"),
    }
}

/// A TLS record's first byte when it carries a handshake (a ClientHello, first of all).
const TLS_HANDSHAKE: u8 = 0x16;

/// HTTP/1.1 or HTTP/2 on one connection, plain or TLS: served until it ends, or until a device
/// it authenticated as is revoked (then it is closed, WebSockets included). The fast
/// [`lane`] serves it while its requests are the lane's; the full server serves the rest.
async fn serve_http<I>(mut io: I, peer: SocketAddr, tls: bool, shared: Arc<Shared>, slot: Arc<Slot>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let client = Arc::new(ClientConnection {
        peer,
        tls,
        forwarded_for: forward::client_address(peer.ip()),
        held: Arc::default(),
        app: AppConnection::default(),
        slot,
    });
    let held = client.held.clone();
    let served = async {
        match lane::serve(&mut io, &shared, &client).await {
            lane::Outcome::Closed => {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            }
            lane::Outcome::HandOver(read) => {
                serve_hyper(crate::rewind::Rewind::new(read, io), client, shared.clone()).await;
            }
        }
    };
    tokio::select! {
        () = served => {}
        device = revoked(&shared, held) => {
            tracing::info!(source = %peer, device = %device, "closing the connection of a revoked device");
        }
    }
}

/// The full server (hyper): every request, HTTP/1.1 and HTTP/2, pairing and refusals included.
async fn serve_hyper<I>(io: I, client: Arc<ClientConnection>, shared: Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.peer;
    let svc = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| {
            let (shared, client) = (shared.clone(), client.clone());
            async move { Ok::<_, Infallible>(handle(req, &shared, &client).await) }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.cfg.header_timeout)
        .max_buf_size(shared.cfg.max_header_bytes.max(8192))
        .max_headers(shared.cfg.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(shared.cfg.max_header_bytes as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        // A peer that stops answering pings is gone: free its slot.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(source = %peer, "connection ended: {e}");
    }
}

/// Whether a credential lets the lane forward a request: recalled from this connection under
/// the current keys, or verified now (and remembered). One that fails is not refused here: the
/// lane hands the request to the full server, which refuses, logs and counts it.
fn authorize(shared: &Shared, client: &ClientConnection, shown: lane::Shown) -> bool {
    let Some(keys) = shared.keys.borrow().clone() else {
        return false;
    };
    let credential = match shown {
        lane::Shown::Token(t) => Credential::Token(t.into()),
        lane::Shown::Session(s) => Credential::Session(s.into()),
    };
    admit(shared, client, &keys, &credential).is_ok()
}

/// What `credential` grants on this connection: recalled when it verified under exactly
/// `keys` and has not run out, or verified now and remembered (the first time, logged).
fn admit(
    shared: &Shared,
    client: &ClientConnection,
    keys: &Arc<Keys>,
    credential: &Credential,
) -> Result<Grant, Refusal> {
    let now = crate::pairing::unix_now();
    let recalled = client
        .held
        .lock()
        .ok()
        .and_then(|h| h.recall(credential, keys, now));
    if let Some(grant) = recalled {
        return Ok(grant);
    }
    let grant = check(shared, Some(keys), credential)?;
    client.slot.prove();
    if client
        .held
        .lock()
        .is_ok_and(|mut h| h.remember(credential, keys, &grant))
    {
        tracing::info!(source = %client.peer, device = %grant.device, "accepted");
    }
    Ok(grant)
}

/// A credential a client presented on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    /// A device token (`Authorization: Bearer`).
    Token(Secret),
    /// This sidecar's browser session (its cookie's value).
    Session(Secret),
}

/// Whom a credential let in, and until when (unix seconds; `None`: until revoked).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    device: String,
    until: Option<u64>,
}

/// Why a credential was refused: what the audit log says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    reason: String,
    device: String,
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Refusal {
        use TokenError as E;
        let device = match &e {
            E::Expired(d) | E::UnknownDevice(d) | E::OldGeneration(d) | E::Superseded(d) => {
                d.clone()
            }
            _ => "-".into(),
        };
        Refusal {
            reason: e.to_string(),
            device,
        }
    }
}

impl Refusal {
    fn no_key() -> Refusal {
        Refusal {
            reason: "the gate has no key yet".into(),
            device: "-".into(),
        }
    }
}

/// The credentials one client connection has presented, each with the keys it verified
/// against. A request repeating one under the same keys skips the check; when the keys change
/// or a grant runs out, [`revoked`] checks every held credential again and closes the
/// connection if one fails.
#[derive(Default)]
struct Held(Vec<(Credential, Arc<Keys>, Grant)>);

impl Held {
    fn of(credential: Credential, keys: Arc<Keys>, grant: Grant) -> Held {
        Held(vec![(credential, keys, grant)])
    }

    /// The grant of `credential` if it verified against exactly `keys` and has not run out.
    fn recall(&self, credential: &Credential, keys: &Arc<Keys>, now: u64) -> Option<Grant> {
        self.0
            .iter()
            .find(|(c, k, g)| {
                c == credential && Arc::ptr_eq(k, keys) && g.until.is_none_or(|u| u > now)
            })
            .map(|(_, _, g)| g.clone())
    }

    /// Remembers a credential that verified; true when this connection had not presented it
    /// before.
    fn remember(&mut self, credential: &Credential, keys: &Arc<Keys>, grant: &Grant) -> bool {
        let fresh = !self.0.iter().any(|(c, _, _)| c == credential);
        self.0.retain(|(c, _, _)| c != credential);
        self.0
            .push((credential.clone(), keys.clone(), grant.clone()));
        fresh
    }

    fn credentials(&self) -> Vec<Credential> {
        self.0.iter().map(|(c, _, _)| c.clone()).collect()
    }

    /// When the first held grant runs out.
    fn first_end(&self) -> Option<u64> {
        self.0.iter().filter_map(|(_, _, g)| g.until).min()
    }
}

/// Resolves with the device's name once any credential in `held` stops verifying: when the
/// keys or registry change, or when a grant reaches its end.
async fn revoked(shared: &Shared, held: Arc<Mutex<Held>>) -> String {
    let mut keys = shared.keys.clone();
    loop {
        let first_end = held.lock().ok().and_then(|h| h.first_end());
        let sleep = match first_end {
            Some(end) => Duration::from_secs(end.saturating_sub(crate::pairing::unix_now())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            changed = keys.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
            _ = tokio::time::sleep(sleep) => {}
        }
        let current = keys.borrow().clone();
        let credentials = held.lock().map(|h| h.credentials()).unwrap_or_default();
        for c in credentials {
            if let Err(r) = check(shared, current.as_deref(), &c) {
                return r.device;
            }
        }
    }
}

fn check(shared: &Shared, keys: Option<&Keys>, credential: &Credential) -> Result<Grant, Refusal> {
    let Some(k) = keys else {
        return Err(Refusal::no_key());
    };
    let now = crate::pairing::unix_now();
    match credential {
        Credential::Token(t) => {
            let claims = crate::pairing::verify(
                t.expose(),
                &k.public_key,
                &shared.cfg.stack,
                &k.registry,
                now,
            )?;
            Ok(Grant {
                device: claims.sub,
                until: claims.exp,
            })
        }
        Credential::Session(v) => {
            let scope = shared.scope(k).ok_or_else(Refusal::no_key)?;
            let (device, until) =
                scope
                    .verify(v.expose(), &k.registry, now)
                    .map_err(|e| Refusal {
                        device: e.device().to_string(),
                        reason: e.to_string(),
                    })?;
            Ok(Grant {
                device,
                until: Some(until),
            })
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// 401 for a request with no credential at all: never rate-limited (a browser that is not
/// paired yet must always learn so, whoever shares its address).
fn unpaired() -> Response<Body> {
    let mut r = plain(
        StatusCode::UNAUTHORIZED,
        "unauthorized: pair this device with soul first\n",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"soul\""),
    );
    r
}

/// Answers a refused credential: 401, or 429 once this source has had too many refused.
fn refuse(shared: &Shared, peer: SocketAddr, path: &str, refusal: &Refusal) -> Response<Body> {
    let limited = shared
        .failures
        .lock()
        .map(|mut f| f.record(peer.ip()))
        .unwrap_or(false);
    tracing::warn!(source = %peer, device = %refusal.device, reason = %refusal.reason, path, "refused");
    if limited {
        let mut r = plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many refused attempts; slow down\n",
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    unpaired()
}

/// One client connection, as its requests see it.
struct ClientConnection {
    peer: SocketAddr,
    /// Whether this connection is TLS, terminated by the gate. Only that counts: whatever a
    /// client sends (`X-Forwarded-Proto`, an h2 `:scheme`) does not make the gate believe
    /// otherwise, since on loopback arrive the overlays' forwards of remote clients, not a
    /// trusted proxy.
    tls: bool,
    /// The peer's address as the app's `X-Forwarded-For`, made once.
    forwarded_for: HeaderValue,
    held: Arc<Mutex<Held>>,
    app: AppConnection,
    /// Its slot, proven by the first credential admitted on it.
    slot: Arc<Slot>,
}

async fn handle(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    client: &ClientConnection,
) -> Response<Body> {
    let peer = client.peer;
    if req.uri().path() == HEALTH_PATH {
        return plain(StatusCode::OK, "ok\n");
    }
    let path = req.uri().path().to_string();
    let Some(keys) = shared.keys.borrow().clone() else {
        return refuse(shared, peer, &path, &Refusal::no_key());
    };
    if path == PAIR_PATH && req.method() == Method::POST {
        return redeem(req, client, shared, &keys).await;
    }
    if path == TOKEN_PATH && req.method() == Method::POST {
        return hand_token(req, client, shared, &keys).await;
    }
    let credential = match credential::presented(&req, &shared.cookie) {
        Presented::Nothing => {
            tracing::info!(source = %peer, device = "-", reason = "no token", path, "refused");
            return unpaired();
        }
        Presented::Ticket(ticket) => {
            return open_link(&req, client, shared, &keys, ticket.expose());
        }
        Presented::LinkToken(token) => {
            // A link made before tickets: the token itself, traded for a session.
            return match check(shared, Some(&keys), &Credential::Token(token)) {
                Ok(grant) => start_session(
                    client,
                    shared,
                    &keys,
                    &grant.device,
                    &link::target(req.uri()),
                ),
                Err(r) => refuse(shared, peer, &path, &r),
            };
        }
        Presented::Bearer(t) => Credential::Token(t),
        Presented::Session(v) => {
            if credential::foreign_origin(&req, client.tls) {
                tracing::warn!(source = %peer, path, "refused: a cookie-authenticated upgrade or write from another origin");
                return plain(StatusCode::FORBIDDEN, "forbidden: cross-origin request\n");
            }
            Credential::Session(v)
        }
    };
    let grant = match admit(shared, client, &keys, &credential) {
        Ok(g) => g,
        Err(r) => return refuse(shared, peer, &path, &r),
    };
    credential::strip(&mut req);
    let upgrade = req.headers().contains_key(header::UPGRADE);
    forward::request(
        req.headers_mut(),
        client.forwarded_for.clone(),
        client.tls,
        upgrade,
    );
    let device = grant.device.clone();
    proxy(req, shared, &client.app, Held::of(credential, keys, grant))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(source = %peer, device = %device, "the app did not answer: {e}");
            plain(StatusCode::BAD_GATEWAY, "the app is not answering\n")
        })
}

/// A ticket link opened: the page that posts it back, or straight on for a browser this gate
/// has already paired with that ticket.
fn open_link(
    req: &Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
    ticket: &str,
) -> Response<Body> {
    let peer = client.peer;
    let to = link::target(req.uri());
    let used = shared.redeemed.lock().is_ok_and(|r| r.contains(ticket));
    if used {
        if let Some(v) = credential::session(req, &shared.cookie)
            && check(shared, Some(keys), &Credential::Session(v)).is_ok()
        {
            return link::onward(&to);
        }
        tracing::warn!(source = %peer, "refused: a pairing link that was already used");
        return link::refused_page(StatusCode::GONE, "it was already used");
    }
    link::ticket_page(ticket, &to)
}

/// The pairing page's post: redeems its ticket once and starts a session.
async fn redeem(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Response<Body> {
    let (t, to) = match spend_posted(req, client, shared, keys).await {
        Ok(spent) => spent,
        Err(refused) => return *refused,
    };
    start_session(client, shared, keys, &t.device, &to)
}

/// A pairing form posted from the gate's own origin, its ticket spent ([`spend`]).
async fn spend_posted(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Result<(crate::pairing::Ticket, String), Box<Response<Body>>> {
    if credential::foreign_origin(&req, client.tls) {
        tracing::warn!(source = %client.peer, "refused: a pairing post from another origin");
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            "forbidden: cross-origin request\n",
        )));
    }
    let body = match Limited::new(req.into_body(), link::MAX_FORM)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(Box::new(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "pairing form too large\n",
            )));
        }
    };
    spend(&body, client, shared, keys)
}

/// Spends the ticket a pairing form carries: verified, then recorded as used, once. Returns the
/// ticket's device and the same-origin page to go on to, or the refusal to answer.
fn spend(
    body: &[u8],
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Result<(crate::pairing::Ticket, String), Box<Response<Body>>> {
    let peer = client.peer;
    let (Some(ticket), to) = link::form(body) else {
        return Err(Box::new(link::refused_page(
            StatusCode::BAD_REQUEST,
            "it holds no ticket",
        )));
    };
    let Some(scope) = shared.scope(keys) else {
        return Err(Box::new(link::refused_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "this gate has no link key yet",
        )));
    };
    let now = crate::pairing::unix_now();
    let verified = crate::pairing::verify_ticket(
        &ticket,
        scope.key,
        scope.stack,
        scope.sidecar,
        &keys.registry,
        now,
    );
    let t = match verified {
        Ok(t) => t,
        Err(e) => {
            let device = match &e {
                crate::pairing::TicketError::Invalid => "-".to_string(),
                crate::pairing::TicketError::UnknownDevice(d)
                | crate::pairing::TicketError::Superseded(d)
                | crate::pairing::TicketError::Expired(d) => d.clone(),
            };
            let r = refuse(
                shared,
                peer,
                PAIR_PATH,
                &Refusal {
                    reason: e.to_string(),
                    device,
                },
            );
            if r.status() == StatusCode::TOO_MANY_REQUESTS {
                return Err(Box::new(r));
            }
            return Err(Box::new(link::refused_page(
                StatusCode::UNAUTHORIZED,
                &e.to_string(),
            )));
        }
    };
    // Recorded as issued, whatever spelling was posted (only the issued one verifies).
    let first = match shared.redeemed.lock() {
        Ok(mut r) if !r.contains(&t.issued) => match r.insert(&t.issued) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("cannot record a redeemed pairing ticket: {e}");
                return Err(Box::new(link::refused_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the gate cannot record it",
                )));
            }
        },
        _ => false,
    };
    if !first {
        tracing::warn!(source = %peer, device = %t.device, "refused: a pairing link that was already used");
        return Err(Box::new(link::refused_page(
            StatusCode::GONE,
            "it was already used",
        )));
    }
    Ok((t, to))
}

/// A soul client that scanned a pairing link trades its ticket for the device token: over TLS
/// only (the client has checked the gate's pin first), and once, like a browser's redemption.
async fn hand_token(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Response<Body> {
    if !client.tls {
        tracing::warn!(source = %client.peer, "refused: a token request over plain HTTP");
        return plain(
            StatusCode::FORBIDDEN,
            "the token is given over TLS only: connect with https and check the pin\n",
        );
    }
    let (t, _) = match spend_posted(req, client, shared, keys).await {
        Ok(spent) => spent,
        Err(refused) => return *refused,
    };
    let file = shared
        .cfg
        .keys_dir
        .join(crate::state::layout::gate_device_token(&t.device));
    match crate::files::read_text_bounded(&file, crate::state::MAX_STATE_FILE) {
        Ok(token) => {
            tracing::info!(source = %client.peer, device = %t.device, "gave a paired client its token");
            let mut r = Response::new(
                Full::new(Bytes::from(token))
                    .map_err(|e| match e {})
                    .boxed(),
            );
            let headers = r.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            tracing::error!(device = %t.device, "no token to give: {e}");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "this gate holds no token for the device yet: run `soul apply`\n",
            )
        }
    }
}

/// A session for `device`, then on to `to`.
fn start_session(
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
    device: &str,
    to: &str,
) -> Response<Body> {
    let peer = client.peer;
    let Some(scope) = shared.scope(keys) else {
        return link::refused_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "this gate has no link key yet",
        );
    };
    let minted = keys
        .registry
        .devices
        .get(device)
        .and_then(|entry| scope.mint(device, entry, crate::pairing::unix_now()));
    let Some((value, max_age)) = minted else {
        return link::refused_page(StatusCode::UNAUTHORIZED, "the device has expired");
    };
    tracing::info!(source = %peer, device = %device, "paired a browser");
    link::paired(to, &shared.cookie, &value, max_age, client.tls)
}

/// The connection to the app of one client connection. An HTTP/1.1 client sends one request
/// at a time, so it gets a connection to the app of its own, reused for its next request: no
/// pool to look up and no lock shared with other clients on the hot path. HTTP/2 clients, whose
/// streams run side by side, share the pool.
#[derive(Default)]
struct AppConnection(Mutex<Option<http1::SendRequest<Incoming>>>);

impl AppConnection {
    /// Sends `req` (origin-form) on this client's connection to the app, opening one when there
    /// is none or the app closed it. A request that was not sent because the app had just
    /// closed the connection is sent once more on a new one.
    async fn send(
        &self,
        shared: &Shared,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
        let mut idle = self.0.lock().ok().and_then(|mut c| c.take());
        if let Some(s) = &mut idle
            && s.ready().await.is_err()
        {
            idle = None;
        }
        let mut sender = match idle {
            Some(s) => s,
            None => open_app_connection(shared).await?,
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    sender = open_app_connection(shared).await?;
                    sender.send_request(req).await?
                }
                None => return Err(e.into_error().into()),
            },
        };
        // Ready again once this response's body has been read to its end.
        if let Ok(mut c) = self.0.lock() {
            *c = Some(sender);
        }
        Ok(resp)
    }
}

async fn open_app_connection(
    shared: &Shared,
) -> Result<http1::SendRequest<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(shared.cfg.upstream).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("a connection to the app ended: {e}");
        }
    });
    Ok(sender)
}

/// Forwards a request to the app, streaming bodies both ways. Upgrades (WebSocket) get a
/// connection of their own, spliced to the client's once the app answers 101.
async fn proxy(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    app: &AppConnection,
    held: Held,
) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    if req.version() == http::Version::HTTP_2 && !upgrade {
        // HTTP/2 from the client goes to the app as HTTP/1.1, through the shared pool.
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{}{path}", shared.cfg.upstream).parse()?;
        *req.version_mut() = http::Version::HTTP_11;
        let mut resp = shared.client.request(req).await?;
        forward::response(resp.headers_mut(), false);
        return Ok(resp.map(|b| b.boxed()));
    }
    // A connection of our own speaks origin-form, whatever form the client used.
    if req.uri().authority().is_some() {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = path.parse()?;
    }
    if !upgrade {
        let mut resp = app.send(shared, req).await?;
        forward::response(resp.headers_mut(), false);
        return Ok(resp.map(|b| b.boxed()));
    }
    let client_side = hyper::upgrade::on(&mut req);
    let stream = TcpStream::connect(shared.cfg.upstream).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let mut resp = sender.send_request(req).await?;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    forward::response(resp.headers_mut(), switching);
    if switching {
        let app_side = hyper::upgrade::on(&mut resp);
        let shared = shared.clone();
        tokio::spawn(async move {
            let (Ok(client), Ok(app)) = (client_side.await, app_side.await) else {
                return;
            };
            let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
            let held = Arc::new(Mutex::new(held));
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut app) => {}
                device = revoked(&shared, held) => {
                    tracing::info!(device = %device, "closing the upgraded connection of a revoked device");
                }
            }
        });
    }
    Ok(resp.map(|b| b.boxed()))
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
