//! `soul relay serve`: one port where pods' agents register (over [`super::wire`]) and
//! devices connect with TLS. A device's connection is routed by the server name of its
//! ClientHello ([`super::sni`], [`super::wire::route_of`]) to a ready data channel of the
//! sidecar's agent and spliced ([`super::splice`]); the relay never holds a key that could read
//! it. Only stacks in the allow-list register, each with its one agent key; every per-stack and
//! per-source quantity is bounded ([`super::config::Limits`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::config::RelayConfig;
use super::sni::{self, Hello as ClientHello};
use super::splice::splice;
use super::wire::{self, FromAgent, Hello, ToAgent};

/// How often the relay pings a control channel, and how long it waits for any frame before it
/// counts the agent gone.
pub const PING_EVERY: Duration = Duration::from_secs(15);
const CONTROL_SILENCE: Duration = Duration::from_secs(45);

type RouteKey = (String, String);

/// The relay's live state.
pub struct Relay {
    cfg: RelayConfig,
    state: Mutex<State>,
    started: Instant,
}

#[derive(Default)]
struct State {
    routes: HashMap<RouteKey, Route>,
    /// Session id → the route it opens data channels for.
    sessions: HashMap<String, RouteKey>,
    /// Device connections being spliced, per stack.
    open: HashMap<String, usize>,
    /// Connections that have not said where they go yet, per source address.
    pending: HashMap<IpAddr, usize>,
    pending_total: usize,
    next_id: u64,
}

/// One registered sidecar.
struct Route {
    id: u64,
    session: String,
    agent: SocketAddr,
    since: u64,
    control: mpsc::Sender<ToAgent>,
    ready: VecDeque<TcpStream>,
    waiting: VecDeque<oneshot::Sender<TcpStream>>,
    sessions_total: u64,
}

/// Why a device connection was not spliced (logged, never shown to the device: it gets a
/// closed connection).
#[derive(Debug, thiserror::Error)]
enum Unrouted {
    #[error("no agent of {0} is registered here")]
    NotRegistered(String),
    #[error("{0} already has its limit of open sessions")]
    StackFull(String),
    #[error("{0} already has its limit of devices waiting")]
    TooManyWaiting(String),
    #[error("no data channel from {0}'s agent came in time")]
    NoChannel(String),
}

impl Relay {
    pub fn new(cfg: RelayConfig) -> Arc<Relay> {
        Arc::new(Relay {
            cfg,
            state: Mutex::default(),
            started: Instant::now(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `listener` (the relay port) until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Relay>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("relay cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let Some(pending) = Pending::reserve(&self, peer.ip()) else {
                tracing::debug!(source = %peer, "refused a connection: too many pending from its address");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let relay = self.clone();
            tokio::spawn(async move { relay.connection(stream, peer, pending).await });
        }
    }

    /// Tells an agent from a device by the first byte, within the hello timeout.
    async fn connection(
        self: Arc<Relay>,
        mut stream: TcpStream,
        peer: SocketAddr,
        pending: Pending,
    ) {
        let timeout = self.cfg.limits.hello_timeout;
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        if first[0] == wire::MAGIC[0] {
            let hello = tokio::time::timeout(timeout, async {
                let mut magic = [0u8; wire::MAGIC.len()];
                stream.read_exact(&mut magic).await?;
                if &magic != wire::MAGIC {
                    return Err(wire::FrameError::Io(std::io::ErrorKind::InvalidData.into()));
                }
                wire::read_frame::<_, Hello>(&mut stream).await
            })
            .await;
            match hello {
                Ok(Ok(Hello::Control {
                    stack,
                    sidecar,
                    key,
                })) => {
                    drop(pending);
                    self.control(stream, peer, stack, sidecar, key).await;
                }
                Ok(Ok(Hello::Data { session })) => {
                    drop(pending);
                    self.data_channel(stream, peer, &session);
                }
                Ok(Err(e)) => tracing::debug!(source = %peer, "not an agent: {e}"),
                Err(_) => tracing::debug!(source = %peer, "an agent's hello timed out"),
            }
            return;
        }
        let hello = tokio::time::timeout(timeout, read_client_hello(&mut stream)).await;
        let (bytes, name) = match hello {
            Ok(Ok(found)) => found,
            Ok(Err(why)) => {
                tracing::debug!(source = %peer, "closed a connection: {why}");
                return;
            }
            Err(_) => {
                tracing::debug!(source = %peer, "closed a connection: no ClientHello in time");
                return;
            }
        };
        drop(pending);
        let Some((stack, sidecar)) = wire::route_of(&name) else {
            tracing::info!(source = %peer, "closed a connection for `{name}`: not a soul route (<sidecar>.<stack>.soul)");
            return;
        };
        let (stack, sidecar) = (stack.to_string(), sidecar.to_string());
        self.device(stream, peer, bytes, stack, sidecar).await;
    }

    /// A device's connection for `sidecar` of `stack`, its ClientHello read as `hello`.
    async fn device(
        self: Arc<Relay>,
        device: TcpStream,
        peer: SocketAddr,
        hello: Vec<u8>,
        stack: String,
        sidecar: String,
    ) {
        let route = format!("{sidecar}.{stack}");
        let channel = match self.channel_for(&stack, &sidecar, &route).await {
            Ok(c) => c,
            Err(why) => {
                tracing::info!(source = %peer, "refused a session: {why}");
                return;
            }
        };
        let _open = OpenSession::new(&self, &stack);
        let started = Instant::now();
        let carried = {
            use tokio::io::AsyncWriteExt as _;
            let mut channel = channel;
            if channel.write_all(&hello).await.is_err() {
                tracing::info!(source = %peer, "session {route}: the data channel closed");
                return;
            }
            let mut carried = splice(device, channel, self.cfg.limits.idle_timeout).await;
            carried.up += hello.len() as u64;
            carried
        };
        tracing::info!(
            source = %peer,
            "session {route}: {} bytes up, {} down, {} ms{}",
            carried.up,
            carried.down,
            started.elapsed().as_millis(),
            if carried.idle { ", closed idle" } else { "" }
        );
    }

    /// A ready data channel of the route, or one the agent opens on request.
    async fn channel_for(
        &self,
        stack: &str,
        sidecar: &str,
        route: &str,
    ) -> Result<TcpStream, Unrouted> {
        let limits = &self.cfg.limits;
        let waiter = {
            let mut state = self.state();
            if state.open.get(stack).copied().unwrap_or(0) >= limits.sessions_per_stack {
                return Err(Unrouted::StackFull(stack.to_string()));
            }
            let key = (stack.to_string(), sidecar.to_string());
            let Some(r) = state.routes.get_mut(&key) else {
                return Err(Unrouted::NotRegistered(route.to_string()));
            };
            r.sessions_total += 1;
            while let Some(c) = r.ready.pop_front() {
                if is_idle(&c) {
                    return Ok(c);
                }
            }
            if r.waiting.len() >= limits.waiting_per_sidecar {
                return Err(Unrouted::TooManyWaiting(route.to_string()));
            }
            let (tx, rx) = oneshot::channel();
            r.waiting.push_back(tx);
            let _ = r.control.try_send(ToAgent::Open { count: 1 });
            rx
        };
        match tokio::time::timeout(limits.open_timeout, waiter).await {
            Ok(Ok(c)) => Ok(c),
            _ => Err(Unrouted::NoChannel(route.to_string())),
        }
    }

    /// A data channel arrives: to a waiting device, else into the ready pool (bounded).
    fn data_channel(&self, mut stream: TcpStream, peer: SocketAddr, session: &str) {
        let mut state = self.state();
        let Some(key) = state.sessions.get(session).cloned() else {
            tracing::debug!(source = %peer, "refused a data channel of no registration");
            return;
        };
        let most = self.cfg.limits.ready * 2;
        let Some(r) = state.routes.get_mut(&key) else {
            return;
        };
        while let Some(waiter) = r.waiting.pop_front() {
            match waiter.send(stream) {
                Ok(()) => return,
                Err(back) => stream = back,
            }
        }
        if r.ready.len() < most {
            r.ready.push_back(stream);
        }
    }

    /// A control channel: registers, then pings and forwards requests for data channels until
    /// the agent is gone.
    async fn control(
        self: Arc<Relay>,
        mut stream: TcpStream,
        peer: SocketAddr,
        stack: String,
        sidecar: String,
        key: String,
    ) {
        let route = format!("{sidecar}.{stack}");
        let Some(allowed) = self.cfg.allow.get(&stack) else {
            let why = format!(
                "stack `{stack}` is not allowed here (add its `soul relay allow` line to the relay's file)"
            );
            return refuse(&mut stream, peer, &route, why).await;
        };
        if wire::parse_public(&key).as_ref() != Some(allowed) {
            let why = format!("this key is not the one allowed for stack `{stack}`");
            return refuse(&mut stream, peer, &route, why).await;
        }
        let nonce = wire::random_b64(32);
        let challenge = ToAgent::Challenge {
            nonce: nonce.clone(),
        };
        let signed = tokio::time::timeout(self.cfg.limits.hello_timeout, async {
            wire::write_frame(&mut stream, &challenge).await?;
            wire::read_frame::<_, FromAgent>(&mut stream)
                .await
                .map_err(std::io::Error::other)
        })
        .await;
        let Ok(Ok(FromAgent::Signature { signature })) = signed else {
            return refuse(&mut stream, peer, &route, "no signature came".into()).await;
        };
        let nonce = wire::decode_nonce(&nonce).expect("the relay's own nonce decodes");
        if !wire::verify(allowed, &stack, &sidecar, &nonce, &signature) {
            let why = "the signature does not verify".to_string();
            return refuse(&mut stream, peer, &route, why).await;
        }
        let (control, mut requests) = mpsc::channel(64);
        let session = wire::random_b64(24);
        let registered = {
            let mut state = self.state();
            let key = (stack.clone(), sidecar.clone());
            let others = state
                .routes
                .keys()
                .filter(|(s, c)| *s == stack && *c != sidecar)
                .count();
            if others >= self.cfg.limits.sidecars_per_stack {
                None
            } else {
                state.next_id += 1;
                let id = state.next_id;
                if let Some(old) = state.routes.remove(&key) {
                    state.sessions.remove(&old.session);
                    tracing::info!(source = %peer, "{route}: a new registration replaces the one from {}", old.agent);
                }
                state.sessions.insert(session.clone(), key.clone());
                state.routes.insert(
                    key,
                    Route {
                        id,
                        session: session.clone(),
                        agent: peer,
                        since: unix_now(),
                        control,
                        ready: VecDeque::new(),
                        waiting: VecDeque::new(),
                        sessions_total: 0,
                    },
                );
                Some(id)
            }
        };
        let Some(id) = registered else {
            let why = format!(
                "stack `{stack}` already has its limit of {} registered sidecars",
                self.cfg.limits.sidecars_per_stack
            );
            return refuse(&mut stream, peer, &route, why).await;
        };
        let registered = ToAgent::Registered {
            session,
            ready: self.cfg.limits.ready,
        };
        if wire::write_frame(&mut stream, &registered).await.is_ok() {
            tracing::info!(source = %peer, "registered {route}");
            let (mut read, mut write) = stream.into_split();
            let mut ping = tokio::time::interval(PING_EVERY);
            let reader = async {
                loop {
                    match tokio::time::timeout(
                        CONTROL_SILENCE,
                        wire::read_frame::<_, FromAgent>(&mut read),
                    )
                    .await
                    {
                        Ok(Ok(FromAgent::Pong)) => {}
                        _ => return,
                    }
                }
            };
            let writer = async {
                loop {
                    let message = tokio::select! {
                        m = requests.recv() => match m { Some(m) => m, None => return },
                        _ = ping.tick() => ToAgent::Ping,
                    };
                    if wire::write_frame(&mut write, &message).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = reader => {}
                () = writer => {}
            }
        }
        let mut state = self.state();
        if state
            .routes
            .get(&(stack.clone(), sidecar.clone()))
            .map(|r| r.id)
            == Some(id)
        {
            if let Some(r) = state.routes.remove(&(stack, sidecar)) {
                state.sessions.remove(&r.session);
            }
            tracing::info!(source = %peer, "unregistered {route}: its control channel ended");
        }
    }

    /// What `soul relay status` shows.
    pub fn status(&self) -> Status {
        let state = self.state();
        let mut stacks: Vec<StackStatus> = self
            .cfg
            .allow
            .keys()
            .map(|stack| {
                let mut sidecars: Vec<SidecarStatus> = state
                    .routes
                    .iter()
                    .filter(|((s, _), _)| s == stack)
                    .map(|((_, sidecar), r)| SidecarStatus {
                        sidecar: sidecar.clone(),
                        agent: r.agent.to_string(),
                        registered_at: r.since,
                        ready: r.ready.len(),
                        waiting: r.waiting.len(),
                        sessions_total: r.sessions_total,
                    })
                    .collect();
                sidecars.sort_by(|a, b| a.sidecar.cmp(&b.sidecar));
                StackStatus {
                    stack: stack.clone(),
                    open_sessions: state.open.get(stack).copied().unwrap_or(0),
                    sidecars,
                }
            })
            .collect();
        stacks.sort_by(|a, b| a.stack.cmp(&b.stack));
        Status {
            listen: self.cfg.listen.to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            pending: state.pending_total,
            stacks,
        }
    }
}

/// Tells an agent why it is not registered, and logs it.
async fn refuse(stream: &mut TcpStream, peer: SocketAddr, route: &str, why: String) {
    tracing::warn!(source = %peer, "refused the registration of {route}: {why}");
    let _ = wire::write_frame(stream, &ToAgent::Refused { reason: why }).await;
}

/// The relay's state as `soul relay status` prints it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub listen: String,
    pub uptime_s: u64,
    /// Connections that have not said where they go yet.
    pub pending: usize,
    /// Every allowed stack, registered or not.
    pub stacks: Vec<StackStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StackStatus {
    pub stack: String,
    pub open_sessions: usize,
    pub sidecars: Vec<SidecarStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SidecarStatus {
    pub sidecar: String,
    /// The agent's address as the relay sees it.
    pub agent: String,
    /// Unix seconds.
    pub registered_at: u64,
    /// Data channels ready now.
    pub ready: usize,
    /// Devices waiting for one.
    pub waiting: usize,
    pub sessions_total: u64,
}

/// A data channel that has neither closed nor sent anything (an agent sends nothing on a ready
/// channel until the device has spoken).
fn is_idle(c: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(c.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Reads until the ClientHello is whole; returns the bytes read and the server name.
async fn read_client_hello(stream: &mut TcpStream) -> Result<(Vec<u8>, String), &'static str> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("closed before its ClientHello");
        }
        buf.extend_from_slice(&chunk[..n]);
        match sni::server_name(&buf) {
            ClientHello::Named(name) => return Ok((buf, name)),
            ClientHello::Unnamed => return Err("a ClientHello without a server name"),
            ClientHello::NotTls => return Err("neither TLS nor a soul agent"),
            ClientHello::Incomplete if buf.len() > sni::MAX_HELLO + 5 => {
                return Err("a ClientHello too large");
            }
            ClientHello::Incomplete => {}
        }
    }
}

/// A connection that has not said where it goes, counted against its source and the total.
struct Pending {
    relay: Arc<Relay>,
    source: IpAddr,
}

impl Pending {
    fn reserve(relay: &Arc<Relay>, source: IpAddr) -> Option<Pending> {
        let limits = &relay.cfg.limits;
        let mut state = relay.state();
        let mine = state.pending.get(&source).copied().unwrap_or(0);
        if mine >= limits.pending_per_source || state.pending_total >= limits.pending_total {
            return None;
        }
        state.pending.insert(source, mine + 1);
        state.pending_total += 1;
        Some(Pending {
            relay: relay.clone(),
            source,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut state = self.relay.state();
        state.pending_total -= 1;
        if let Some(n) = state.pending.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                state.pending.remove(&self.source);
            }
        }
    }
}

/// A spliced session, counted against its stack.
struct OpenSession<'a> {
    relay: &'a Relay,
    stack: String,
}

impl<'a> OpenSession<'a> {
    fn new(relay: &'a Relay, stack: &str) -> OpenSession<'a> {
        *relay.state().open.entry(stack.to_string()).or_default() += 1;
        OpenSession {
            relay,
            stack: stack.to_string(),
        }
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        let mut state = self.relay.state();
        if let Some(n) = state.open.get_mut(&self.stack) {
            *n -= 1;
            if *n == 0 {
                state.open.remove(&self.stack);
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves [`Relay::status`] as JSON on `GET /status` at `listener` (loopback by default).
pub async fn serve_status(relay: Arc<Relay>, listener: TcpListener) {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let relay = relay.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let relay = relay.clone();
                    async move {
                        let (code, body) = if req.uri().path() == "/status" {
                            (
                                http::StatusCode::OK,
                                serde_json::to_vec(&relay.status()).unwrap_or_default(),
                            )
                        } else {
                            (http::StatusCode::NOT_FOUND, b"{}".to_vec())
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(code)
                                .header(http::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(bytes::Bytes::from(body)))
                                .expect("a static response"),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::config::{Limits, RelayConfig};
    use crate::relay::wire::AgentKey;
    use std::collections::BTreeMap;

    async fn relay_allowing(stack: &str, key: &AgentKey) -> (Arc<Relay>, SocketAddr) {
        let mut allow = BTreeMap::new();
        allow.insert(
            stack.to_string(),
            wire::parse_public(&key.public()).unwrap(),
        );
        let cfg = RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            status: None,
            allow,
            limits: Limits::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay::new(cfg);
        tokio::spawn(relay.clone().serve(listener, std::future::pending()));
        (relay, addr)
    }

    /// Registers as `sidecar` of `stack` with `key`; the relay's last answer.
    async fn register(
        addr: SocketAddr,
        stack: &str,
        sidecar: &str,
        key: &AgentKey,
    ) -> (TcpStream, ToAgent) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = wire::MAGIC.to_vec();
        wire::write_frame(
            &mut hello,
            &Hello::Control {
                stack: stack.into(),
                sidecar: sidecar.into(),
                key: key.public(),
            },
        )
        .await
        .unwrap();
        use tokio::io::AsyncWriteExt as _;
        s.write_all(&hello).await.unwrap();
        let answer: ToAgent = wire::read_frame(&mut s).await.unwrap();
        let ToAgent::Challenge { nonce } = answer else {
            return (s, answer);
        };
        let nonce = wire::decode_nonce(&nonce).unwrap();
        let signature = key.sign(stack, sidecar, &nonce);
        wire::write_frame(&mut s, &FromAgent::Signature { signature })
            .await
            .unwrap();
        let answer = wire::read_frame(&mut s).await.unwrap();
        (s, answer)
    }

    #[tokio::test]
    async fn the_relay_refuses_an_unknown_stack_and_another_key_for_an_allowed_one() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_allowing("home", &key).await;
        let (_, unknown) = register(addr, "work", "notes", &key).await;
        assert!(
            matches!(&unknown, ToAgent::Refused { reason } if reason.contains("not allowed")),
            "{unknown:?}"
        );
        let intruder = AgentKey::from_seed([2; 32]);
        let (_, other_key) = register(addr, "home", "notes", &intruder).await;
        assert!(
            matches!(&other_key, ToAgent::Refused { reason } if reason.contains("not the one allowed")),
            "{other_key:?}"
        );
        let (_control, ok) = register(addr, "home", "notes", &key).await;
        assert!(matches!(ok, ToAgent::Registered { .. }), "{ok:?}");
        // The intruder cannot take over the registered sidecar either.
        let (_, again) = register(addr, "home", "notes", &intruder).await;
        assert!(matches!(again, ToAgent::Refused { .. }), "{again:?}");
        let status = relay.status();
        assert_eq!(status.stacks.len(), 1);
        assert_eq!(status.stacks[0].sidecars.len(), 1);
        assert_eq!(status.stacks[0].sidecars[0].sidecar, "notes");
    }

    #[tokio::test]
    async fn a_signature_for_another_sidecar_does_not_register() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_allowing("home", &key).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = wire::MAGIC.to_vec();
        wire::write_frame(
            &mut hello,
            &Hello::Control {
                stack: "home".into(),
                sidecar: "notes".into(),
                key: key.public(),
            },
        )
        .await
        .unwrap();
        use tokio::io::AsyncWriteExt as _;
        s.write_all(&hello).await.unwrap();
        let ToAgent::Challenge { nonce } = wire::read_frame(&mut s).await.unwrap() else {
            panic!("no challenge")
        };
        let nonce = wire::decode_nonce(&nonce).unwrap();
        let signature = key.sign("home", "photos", &nonce);
        wire::write_frame(&mut s, &FromAgent::Signature { signature })
            .await
            .unwrap();
        let answer: ToAgent = wire::read_frame(&mut s).await.unwrap();
        assert!(matches!(answer, ToAgent::Refused { .. }), "{answer:?}");
        assert!(relay.status().stacks[0].sidecars.is_empty());
    }

    #[tokio::test]
    async fn a_device_for_an_unregistered_route_or_without_tls_is_closed() {
        let key = AgentKey::from_seed([1; 32]);
        let (_relay, addr) = relay_allowing("home", &key).await;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for first in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            &b"\x16\x03\x01\x00\x05hello"[..],
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(first).await.unwrap();
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("closed, not left hanging")
                .unwrap_or(0);
            assert_eq!(n, 0, "the relay answers nothing");
        }
    }

    #[tokio::test]
    async fn one_source_cannot_hold_more_pending_connections_than_its_share() {
        let key = AgentKey::from_seed([1; 32]);
        let mut allow = BTreeMap::new();
        allow.insert(
            "home".to_string(),
            wire::parse_public(&key.public()).unwrap(),
        );
        let cfg = RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            status: None,
            allow,
            limits: Limits {
                pending_per_source: 3,
                ..Limits::default()
            },
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay::new(cfg);
        tokio::spawn(relay.clone().serve(listener, std::future::pending()));
        // Three silent connections hold this source's share; a fourth is closed at once.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(relay.status().pending, 3);
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        use tokio::io::AsyncReadExt as _;
        let n = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut buf))
            .await
            .expect("the fourth is closed without waiting for the hello timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(relay.status().pending, 0, "the share is given back");
    }
}
