//! `soul relay serve`: one port where pods' agents register (over [`super::wire`]) and
//! devices connect with TLS. A device's connection is routed by the server name of its
//! ClientHello ([`super::sni`], [`super::wire::route_of`]) to a ready data channel of the
//! sidecar's agent and spliced ([`super::splice`]); the relay never holds a key that could read
//! it. An agent's control channel is TLS that ends here, with the relay's own key
//! ([`super::key`]), which the agent pins. Only stacks in the allow-list register, each with its
//! one agent key; every per-stack and per-source quantity is bounded
//! ([`super::config::Limits`]), a connection counts as pending until it is routed or
//! registered, and refusals a flood repeats are logged once per interval ([`crate::quiet`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

mod register;
mod status;

use register::*;
pub use status::{SidecarStatus, StackStatus, Status, serve_status};

use super::config::RelayConfig;
use super::sni::{self, Hello as ClientHello};
use super::splice::splice;
use super::wire::{self, CHANNEL_ID, FromAgent, Hello, ToAgent};
use crate::quiet::Quiet;
use crate::rewind::Rewind;

/// How often the relay pings a control channel, and how long it waits for any frame before it
/// counts the agent gone.
pub const PING_EVERY: Duration = Duration::from_secs(15);
const CONTROL_SILENCE: Duration = Duration::from_secs(45);

/// How many data channel ids of a registration the relay expects ahead of the highest used.
const CHANNEL_WINDOW: u64 = 256;

type RouteKey = (String, String);
/// A data channel's id ([`wire::channel_id`]).
type ChannelId = [u8; CHANNEL_ID];

/// The relay's live state.
pub struct Relay {
    cfg: RelayConfig,
    state: Mutex<State>,
    started: Instant,
    /// The relay's own TLS, for agents' control channels.
    tls: Arc<rustls::ServerConfig>,
    /// What agents pin.
    pin: String,
    /// Refusals a flood would repeat, by source.
    refusals: Mutex<Quiet<IpAddr>>,
}

#[derive(Default)]
struct State {
    routes: HashMap<RouteKey, Route>,
    /// Public name → the route it reaches (each held by one registration at a time).
    names: HashMap<String, RouteKey>,
    /// Data channel id → the route it belongs to and its number (each taken once).
    channels: HashMap<[u8; CHANNEL_ID], (RouteKey, u64)>,
    /// Device connections being spliced, per stack.
    open: HashMap<String, usize>,
    /// Device connections being spliced, per stack and source address.
    open_from: HashMap<(String, IpAddr), usize>,
    /// Connections that have not said where they go yet, per source address.
    pending: HashMap<IpAddr, usize>,
    pending_total: usize,
    next_id: u64,
    /// How often each sidecar's registration was replaced by a newer one: more than a
    /// restart's worth says two machines serve the same stack.
    replaced: HashMap<RouteKey, u64>,
}

/// One registered sidecar.
struct Route {
    id: u64,
    /// The key its data channels' ids are made with.
    channel_key: [u8; 32],
    /// The ids expected next, by number.
    expected: BTreeMap<u64, [u8; CHANNEL_ID]>,
    agent: SocketAddr,
    since: u64,
    control: mpsc::Sender<ToAgent>,
    ready: VecDeque<TcpStream>,
    waiting: VecDeque<oneshot::Sender<TcpStream>>,
    sessions_total: u64,
    /// The public name routed here too, if the registration claimed one the relay gave.
    public: Option<String>,
}

/// Why a device connection was not spliced (logged, never shown to the device: it gets a
/// closed connection).
#[derive(Debug, thiserror::Error)]
enum Unrouted {
    #[error("no agent of {0} is registered here")]
    NotRegistered(String),
    #[error("{0} already has its limit of open sessions")]
    StackFull(String),
    #[error("{0} already has its limit of open sessions from this address")]
    SourceFull(String),
    #[error("{0} already has its limit of devices waiting")]
    TooManyWaiting(String),
    #[error("no data channel from {0}'s agent came in time")]
    NoChannel(String),
}

impl Relay {
    /// A relay serving `cfg` with the TLS identity `identity` ([`super::key::load_or_make`]).
    pub fn new(cfg: RelayConfig, identity: &crate::tls::Identity) -> Arc<Relay> {
        Arc::new(Relay {
            cfg,
            state: Mutex::default(),
            started: Instant::now(),
            tls: server_tls(identity),
            pin: identity.pin.clone(),
            refusals: Mutex::new(Quiet::new(Duration::from_secs(10))),
        })
    }

    /// The pin of the relay's key: `relay "host:port" pin="…"` in stack.kdl.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// Logs a refusal from `source` unless a flood has already said it lately.
    fn refused(&self, source: IpAddr, what: std::fmt::Arguments<'_>) {
        let said = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .say(source);
        if let Some(held_back) = said {
            tracing::warn!(source = %source, "{what}{held_back}");
        }
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
                accepted = crate::accept::next(&listener, "relay") => accepted,
                () = &mut shutdown => return,
            };
            let Some(pending) = Pending::reserve(&self, peer.ip()) else {
                self.refused(
                    peer.ip(),
                    format_args!("refused a connection: too many not yet routed from its address"),
                );
                continue;
            };
            let _ = stream.set_nodelay(true);
            let relay = self.clone();
            tokio::spawn(async move { relay.connection(stream, peer, pending).await });
        }
    }

    /// Tells an agent from a device by the first byte, within the hello timeout: a data
    /// channel by its marker, an agent of version 1 by its magic (told to upgrade), and TLS by
    /// its ClientHello's server name, the relay's own for an agent's control channel.
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
        if first[0] == wire::DATA_MARKER {
            let mut hello = [0u8; 1 + CHANNEL_ID];
            match tokio::time::timeout(timeout, stream.read_exact(&mut hello)).await {
                Ok(Ok(_)) => {
                    drop(pending);
                    let id: [u8; CHANNEL_ID] = hello[1..].try_into().expect("16 bytes");
                    self.data_channel(stream, peer, &id);
                }
                _ => tracing::debug!(source = %peer, "a data channel's hello did not come"),
            }
            return;
        }
        if first[0] == wire::MAGIC_V1[0] {
            let mut magic = [0u8; wire::MAGIC_V1.len()];
            if let Ok(Ok(_)) = tokio::time::timeout(timeout, stream.read_exact(&mut magic)).await
                && &magic == wire::MAGIC_V1
            {
                let why = "this relay takes agents over TLS only (soul-relay/2): upgrade soul on the stack's machine and add the relay's pin to stack.kdl (`soul relay status` shows it)";
                self.refused(
                    peer.ip(),
                    format_args!(
                        "refused an agent in clear text (soul-relay/1): it must be upgraded"
                    ),
                );
                let _ =
                    wire::write_frame(&mut stream, &ToAgent::Refused { reason: why.into() }).await;
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
        if name == wire::AGENT_SERVER_NAME {
            return self.agent(stream, peer, bytes, pending).await;
        }
        drop(pending);
        let public = self.state().names.get(&name.to_ascii_lowercase()).cloned();
        let (stack, sidecar) = match (public, wire::route_of(&name)) {
            (Some(key), _) => key,
            (None, Some((stack, sidecar))) => (stack.to_string(), sidecar.to_string()),
            (None, None) => {
                tracing::info!(source = %peer, "closed a connection for `{name}`: not a soul route (<sidecar>.<stack>.soul) nor a registered public name");
                return;
            }
        };
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
        let (channel, _open) = match self.channel_for(&stack, &sidecar, &route, peer.ip()).await {
            Ok(c) => c,
            Err(why) => {
                self.refused(peer.ip(), format_args!("refused a session: {why}"));
                return;
            }
        };
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

    /// A ready data channel of the route, or one the agent opens on request; and the session
    /// counted against the stack and the device's source address.
    async fn channel_for(
        &self,
        stack: &str,
        sidecar: &str,
        route: &str,
        source: IpAddr,
    ) -> Result<(TcpStream, OpenSession<'_>), Unrouted> {
        let limits = &self.cfg.limits;
        let (waiter, session) = {
            let mut state = self.state();
            if state.open.get(stack).copied().unwrap_or(0) >= limits.sessions_per_stack {
                return Err(Unrouted::StackFull(stack.to_string()));
            }
            let from = (stack.to_string(), source);
            if state.open_from.get(&from).copied().unwrap_or(0) >= limits.sessions_per_source {
                return Err(Unrouted::SourceFull(stack.to_string()));
            }
            let key = (stack.to_string(), sidecar.to_string());
            if !state.routes.contains_key(&key) {
                return Err(Unrouted::NotRegistered(route.to_string()));
            }
            let session = OpenSession::new(self, &mut state, stack, source);
            let r = state.routes.get_mut(&key).expect("checked above");
            r.sessions_total += 1;
            while let Some(c) = r.ready.pop_front() {
                if is_idle(&c) {
                    return Ok((c, session));
                }
            }
            if r.waiting.len() >= limits.waiting_per_sidecar {
                return Err(Unrouted::TooManyWaiting(route.to_string()));
            }
            let (tx, rx) = oneshot::channel();
            r.waiting.push_back(tx);
            let _ = r.control.try_send(ToAgent::Open { count: 1 });
            (rx, session)
        };
        match tokio::time::timeout(limits.open_timeout, waiter).await {
            Ok(Ok(c)) => Ok((c, session)),
            _ => Err(Unrouted::NoChannel(route.to_string())),
        }
    }

    /// A data channel arrives with its id: to a waiting device, else into the ready pool
    /// (bounded). Each id is taken once; one the relay did not expect is closed.
    fn data_channel(&self, mut stream: TcpStream, peer: SocketAddr, id: &[u8; CHANNEL_ID]) {
        let mut state = self.state();
        let Some((key, seq)) = state.channels.remove(id) else {
            drop(state);
            self.refused(
                peer.ip(),
                format_args!("refused a data channel of no registration"),
            );
            return;
        };
        let most = self.cfg.limits.ready * 2;
        let Some(r) = state.routes.get_mut(&key) else {
            return;
        };
        r.expected.remove(&seq);
        let (stale, added) = r.advance(seq);
        for id in stale {
            state.channels.remove(&id);
        }
        for (seq, id) in added {
            state.channels.insert(id, (key.clone(), seq));
        }
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

/// A spliced session, counted against its stack and its source address.
struct OpenSession<'a> {
    relay: &'a Relay,
    stack: String,
    source: IpAddr,
}

impl<'a> OpenSession<'a> {
    /// Counts a session in `state` (which the caller has locked).
    fn new(relay: &'a Relay, state: &mut State, stack: &str, source: IpAddr) -> OpenSession<'a> {
        *state.open.entry(stack.to_string()).or_default() += 1;
        *state
            .open_from
            .entry((stack.to_string(), source))
            .or_default() += 1;
        OpenSession {
            relay,
            stack: stack.to_string(),
            source,
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
        let from = (std::mem::take(&mut self.stack), self.source);
        if let Some(n) = state.open_from.get_mut(&from) {
            *n -= 1;
            if *n == 0 {
                state.open_from.remove(&from);
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::config::{Limits, RelayConfig};
    use crate::relay::wire::AgentKey;
    use std::collections::BTreeMap;
    use tokio::io::AsyncWriteExt as _;
    use tokio_rustls::client::TlsStream;

    /// The test relay's key seed.
    const SEED: [u8; 32] = [7; 32];

    async fn relay_allowing(stack: &str, key: &AgentKey) -> (Arc<Relay>, SocketAddr) {
        relay_with(stack, key, Limits::default()).await
    }

    async fn relay_with(stack: &str, key: &AgentKey, limits: Limits) -> (Arc<Relay>, SocketAddr) {
        let mut allow = BTreeMap::new();
        allow.insert(
            stack.to_string(),
            wire::parse_public(&key.public()).unwrap(),
        );
        let cfg = RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            status: None,
            allow,
            names: BTreeMap::new(),
            domain: None,
            limits,
        };
        serve_config(cfg).await
    }

    async fn serve_config(cfg: RelayConfig) -> (Arc<Relay>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay::new(cfg, &crate::tls::relay_identity(&SEED));
        tokio::spawn(relay.clone().serve(listener, std::future::pending()));
        (relay, addr)
    }

    /// A control channel to the relay at `addr`, its key pinned to `pin`, the agent's hello
    /// sent; and the session's exporter value.
    async fn control(
        addr: SocketAddr,
        pin: &str,
        stack: &str,
        sidecar: &str,
        key: &AgentKey,
    ) -> std::io::Result<(TlsStream<TcpStream>, [u8; 32])> {
        control_claiming(addr, pin, stack, sidecar, key, None).await
    }

    /// [`control`], claiming the public name `public`.
    async fn control_claiming(
        addr: SocketAddr,
        pin: &str,
        stack: &str,
        sidecar: &str,
        key: &AgentKey,
        public: Option<&str>,
    ) -> std::io::Result<(TlsStream<TcpStream>, [u8; 32])> {
        let tcp = TcpStream::connect(addr).await?;
        let mut cfg = crate::pin::client_config(pin).as_ref().clone();
        cfg.alpn_protocols.clear();
        let name = rustls::pki_types::ServerName::try_from(wire::AGENT_SERVER_NAME).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let binding = wire::session_binding(tls.get_ref().1).unwrap();
        let mut hello = wire::MAGIC.to_vec();
        wire::write_frame(
            &mut hello,
            &Hello::Control {
                stack: stack.into(),
                sidecar: sidecar.into(),
                key: key.public(),
                public: public.map(str::to_string),
            },
        )
        .await?;
        tls.write_all(&hello).await?;
        Ok((tls, binding))
    }

    /// Registers as `sidecar` of `stack` with `key`; the relay's last answer.
    async fn register(
        addr: SocketAddr,
        stack: &str,
        sidecar: &str,
        key: &AgentKey,
    ) -> (TlsStream<TcpStream>, ToAgent) {
        register_claiming(addr, stack, sidecar, key, None).await
    }

    async fn register_claiming(
        addr: SocketAddr,
        stack: &str,
        sidecar: &str,
        key: &AgentKey,
        public: Option<&str>,
    ) -> (TlsStream<TcpStream>, ToAgent) {
        let pin = crate::tls::relay_identity(&SEED).pin;
        let (mut s, binding) = control_claiming(addr, &pin, stack, sidecar, key, public)
            .await
            .unwrap();
        let answer: ToAgent = wire::read_frame(&mut s).await.unwrap();
        let ToAgent::Challenge { nonce } = answer else {
            return (s, answer);
        };
        let nonce = wire::decode_nonce(&nonce).unwrap();
        let signature = key.sign(stack, sidecar, &nonce, &binding);
        wire::write_frame(&mut s, &FromAgent::Signature { signature })
            .await
            .unwrap();
        let answer = wire::read_frame(&mut s).await.unwrap();
        (s, answer)
    }

    /// Two machines serving one stack (the old one still running after a move) once made the
    /// name flap between them: each registration replaced the other's. Now the replaced agent
    /// is told, says so, and does not register again for minutes; the relay counts it.
    #[tokio::test]
    async fn a_replaced_agent_is_told_and_does_not_fight_the_newer_registration_for_its_name() {
        let key = AgentKey::from_seed([5; 32]);
        let limits = Limits {
            ready: 0,
            ..Limits::default()
        };
        let (relay, addr) = relay_with("home", &key, limits).await;
        // The relay tells the older registration, on its control channel.
        let (mut older, answer) = register(addr, "home", "notes", &key).await;
        assert!(matches!(answer, ToAgent::Registered { .. }), "{answer:?}");
        let (newer, answer) = register(addr, "home", "notes", &key).await;
        assert!(matches!(answer, ToAgent::Registered { .. }), "{answer:?}");
        let told = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match wire::read_frame::<_, ToAgent>(&mut older).await {
                    Ok(ToAgent::Ping) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the older registration hears of it");
        let newer_addr = newer.get_ref().0.local_addr().unwrap().to_string();
        assert!(
            matches!(&told, Ok(ToAgent::Replaced { by }) if *by == newer_addr),
            "{told:?}"
        );
        drop(newer);
        tokio::time::sleep(Duration::from_millis(200)).await;

        // A real agent (the old machine's gate) is replaced by the new machine's registration:
        // it does not take the name back.
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("relay-agent.key");
        std::fs::write(&key_file, hex::encode([5u8; 32])).unwrap();
        let cfg = crate::relay::agent::AgentConfig {
            relay: addr.to_string(),
            pin: crate::tls::relay_identity(&SEED).pin,
            stack: "home".into(),
            sidecar: "notes".into(),
            key_file,
            state_file: Some(dir.path().join(crate::relay::agent::STATE_FILE)),
            public: None,
        };
        let cfg_of_old = cfg.clone();
        let old = tokio::spawn(crate::relay::agent::run(cfg, |_s: TcpStream| {}));
        let agent_of = |relay: &Relay| {
            relay.status().stacks[0]
                .sidecars
                .first()
                .map(|c| (c.agent.clone(), c.replaced))
        };
        let mut registered = None;
        for _ in 0..50 {
            registered = agent_of(&relay);
            if registered.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (old_agent, before) = registered.expect("the old machine's agent registers");
        // The new machine's gate: the same key, its own state.
        let new_dir = tempfile::tempdir().unwrap();
        let new_cfg = crate::relay::agent::AgentConfig {
            key_file: new_dir.path().join("relay-agent.key"),
            state_file: Some(new_dir.path().join(crate::relay::agent::STATE_FILE)),
            ..cfg_of_old.clone()
        };
        std::fs::write(&new_cfg.key_file, hex::encode([5u8; 32])).unwrap();
        let new = tokio::spawn(crate::relay::agent::run(new_cfg, |_s: TcpStream| {}));
        let mut holder = None;
        for _ in 0..50 {
            holder = agent_of(&relay).filter(|(agent, _)| *agent != old_agent);
            if holder.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (new_agent, _) = holder.expect("the new machine's agent registers");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (agent, replaced) = agent_of(&relay).unwrap();
        assert_eq!(
            agent, new_agent,
            "the newest registration holds the name (old: {old_agent})"
        );
        assert_eq!(replaced, before + 1, "replaced once, not fought over");
        // Each machine's gate records its side, for `soul status` there.
        let record = std::fs::read_to_string(dir.path().join(crate::relay::agent::REPLACED_FILE))
            .expect("the replaced agent records it");
        assert!(record.starts_with(&format!("{new_agent} ")), "{record}");
        assert!(
            !dir.path().join(crate::relay::agent::STATE_FILE).exists(),
            "no longer claims to be registered"
        );
        let took =
            std::fs::read_to_string(new_dir.path().join(crate::relay::agent::TOOK_OVER_FILE))
                .expect("the newer agent records that it took over");
        assert!(took.starts_with(&format!("{old_agent} ")), "{took}");
        new.abort();
        old.abort();
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
        assert_eq!(status.pin, crate::tls::relay_identity(&SEED).pin);
    }

    #[tokio::test]
    async fn a_signature_for_another_sidecar_or_another_tls_session_does_not_register() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_allowing("home", &key).await;
        let pin = crate::tls::relay_identity(&SEED).pin;
        for (sidecar, other_session) in [("photos", false), ("notes", true)] {
            let (mut s, binding) = control(addr, &pin, "home", "notes", &key).await.unwrap();
            let ToAgent::Challenge { nonce } = wire::read_frame(&mut s).await.unwrap() else {
                panic!("no challenge")
            };
            let nonce = wire::decode_nonce(&nonce).unwrap();
            // A relay in the middle would have its own session with the real relay.
            let session = if other_session { [0u8; 32] } else { binding };
            let signature = key.sign("home", sidecar, &nonce, &session);
            wire::write_frame(&mut s, &FromAgent::Signature { signature })
                .await
                .unwrap();
            let answer: ToAgent = wire::read_frame(&mut s).await.unwrap();
            assert!(matches!(answer, ToAgent::Refused { .. }), "{answer:?}");
        }
        assert!(relay.status().stacks[0].sidecars.is_empty());
    }

    /// The agent's channel was plain text and its session id worked as a password: captured,
    /// it let an attacker inject data channels that took devices' connections.
    #[tokio::test]
    async fn a_data_channel_id_is_taken_once_and_an_unknown_one_never() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_with(
            "home",
            &key,
            Limits {
                ready: 1,
                ..Limits::default()
            },
        )
        .await;
        let (_control, registered) = register(addr, "home", "notes", &key).await;
        let ToAgent::Registered { channel_key, .. } = registered else {
            panic!("{registered:?}")
        };
        let channel_key = wire::decode_key(&channel_key).unwrap();
        let ready = || relay.status().stacks[0].sidecars[0].ready;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first
            .write_all(&wire::data_hello(&channel_key, 0))
            .await
            .unwrap();
        let wait = || async {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        wait().await;
        assert_eq!(ready(), 1, "the agent's channel is in the pool");
        // The same id again (a capture replayed), and ids under another key: closed.
        for hello in [
            wire::data_hello(&channel_key, 0),
            wire::data_hello(&[9; 32], 1),
        ] {
            let mut replayed = TcpStream::connect(addr).await.unwrap();
            replayed.write_all(&hello).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(2), replayed.read(&mut [0u8; 1]))
                .await
                .expect("closed at once")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        assert_eq!(ready(), 1, "no injected channel joined the pool");
        // The agent's next number is good.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second
            .write_all(&wire::data_hello(&channel_key, 1))
            .await
            .unwrap();
        wait().await;
        assert_eq!(ready(), 2);
    }

    #[tokio::test]
    async fn an_agent_in_clear_text_is_told_to_upgrade() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_allowing("home", &key).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = wire::MAGIC_V1.to_vec();
        hello.extend_from_slice(b"\x00\x02{}");
        s.write_all(&hello).await.unwrap();
        let answer: ToAgent = wire::read_frame(&mut s).await.unwrap();
        assert!(
            matches!(&answer, ToAgent::Refused { reason } if reason.contains("TLS only")),
            "{answer:?}"
        );
        assert!(relay.status().stacks[0].sidecars.is_empty());
    }

    #[tokio::test]
    async fn a_device_for_an_unregistered_route_or_without_tls_is_closed() {
        let key = AgentKey::from_seed([1; 32]);
        let (_relay, addr) = relay_allowing("home", &key).await;
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

    /// Connections waiting for a registration challenge were not counted as pending: one
    /// source held 590 against a limit of 64.
    #[tokio::test]
    async fn one_source_cannot_hold_more_pending_connections_than_its_share() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_with(
            "home",
            &key,
            Limits {
                pending_per_source: 3,
                ..Limits::default()
            },
        )
        .await;
        let pin = crate::tls::relay_identity(&SEED).pin;
        // Silent connections, and control channels that never answer their challenge, hold
        // this source's share; a fourth is closed at once.
        let mut held = vec![TcpStream::connect(addr).await.unwrap()];
        let mut unsigned = Vec::new();
        for _ in 0..2 {
            unsigned.push(control(addr, &pin, "home", "notes", &key).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(relay.status().pending, 3);
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut [0u8; 1]))
            .await
            .expect("the fourth is closed without waiting for the hello timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        held.clear();
        unsigned.clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(relay.status().pending, 0, "the share is given back");
    }

    /// A public name is routed to the registration that claimed it and no other: another
    /// stack's agent cannot claim it (by its `allow` line, nor while it is held), and a
    /// device's ClientHello naming it waits for the claiming sidecar's data channel.
    #[tokio::test]
    async fn another_stacks_agent_cannot_take_a_public_name_and_a_hello_for_it_reaches_its_sidecar()
    {
        let home = AgentKey::from_seed([1; 32]);
        let friend = AgentKey::from_seed([2; 32]);
        let mut allow = BTreeMap::new();
        allow.insert(
            "home".to_string(),
            wire::parse_public(&home.public()).unwrap(),
        );
        allow.insert(
            "friend".to_string(),
            wire::parse_public(&friend.public()).unwrap(),
        );
        let mut names = BTreeMap::new();
        // The relay's owner let the friend claim `notes-home` too (a mistake): first come.
        names.insert(
            "friend".to_string(),
            vec!["*-friend".into(), "notes-home".into()],
        );
        let (relay, addr) = serve_config(RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            status: None,
            allow,
            names,
            domain: Some("relay.test".into()),
            limits: Limits {
                ready: 0,
                ..Limits::default()
            },
        })
        .await;
        let refused = |answer: &ToAgent| match answer {
            ToAgent::Registered { public_refused, .. } => public_refused.clone(),
            other => panic!("{other:?}"),
        };
        // The friend's own pattern does not give it `blog-home`.
        let (_f0, answer) = register_claiming(
            addr,
            "friend",
            "blog",
            &friend,
            Some("blog-home.relay.test"),
        )
        .await;
        assert!(
            refused(&answer).is_some_and(|why| why.contains("not a name stack `friend` may claim")),
            "{answer:?}"
        );
        let (_home, answer) =
            register_claiming(addr, "home", "notes", &home, Some("notes-home.relay.test")).await;
        assert_eq!(refused(&answer), None);
        let (_f1, answer) = register_claiming(
            addr,
            "friend",
            "notes",
            &friend,
            Some("notes-home.relay.test"),
        )
        .await;
        assert!(
            refused(&answer).is_some_and(|why| why.contains("held by another registration")),
            "{answer:?}"
        );
        let status = relay.status();
        let home_status = status.stacks.iter().find(|s| s.stack == "home").unwrap();
        assert_eq!(
            home_status.sidecars[0].public.as_deref(),
            Some("notes-home.relay.test")
        );
        // A browser's ClientHello for the public name waits for home's notes, not friend's.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let cfg = crate::pin::client_config(&crate::tls::relay_identity(&[1; 32]).pin);
        let name = rustls::pki_types::ServerName::try_from("Notes-Home.relay.test").unwrap();
        let device = tokio::spawn(async move {
            let _ = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await;
        });
        let waiting = || {
            let status = relay.status();
            let of = |stack: &str| {
                status
                    .stacks
                    .iter()
                    .find(|s| s.stack == stack)
                    .map_or(0, |s| s.sidecars.iter().map(|c| c.waiting).sum::<usize>())
            };
            (of("home"), of("friend"))
        };
        for _ in 0..100 {
            if waiting() != (0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(waiting(), (1, 0));
        device.abort();
    }

    /// A device's ClientHello for `notes.home.soul` from `source`, left waiting.
    async fn device_from(source: [u8; 4], addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let cfg = crate::pin::client_config(&crate::tls::relay_identity(&[1; 32]).pin);
        let name = rustls::pki_types::ServerName::try_from("notes.home.soul").unwrap();
        tokio::spawn(async move {
            let _ = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await;
        })
    }

    /// 256 sessions from one client kept a real device of the stack out for 100 s.
    #[tokio::test]
    async fn one_source_cannot_take_a_stacks_every_session() {
        let key = AgentKey::from_seed([1; 32]);
        let (relay, addr) = relay_with(
            "home",
            &key,
            Limits {
                ready: 0,
                sessions_per_source: 2,
                ..Limits::default()
            },
        )
        .await;
        let (_control, registered) = register(addr, "home", "notes", &key).await;
        assert!(matches!(registered, ToAgent::Registered { .. }));
        let mut devices = Vec::new();
        for _ in 0..3 {
            devices.push(device_from([127, 0, 0, 1], addr).await);
        }
        devices.push(device_from([127, 0, 0, 2], addr).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = relay.status();
        assert_eq!(
            (
                status.stacks[0].open_sessions,
                status.stacks[0].sidecars[0].waiting
            ),
            (3, 3),
            "two sessions from 127.0.0.1 and one from 127.0.0.2 wait; the third from .1 was refused"
        );
        for d in devices {
            d.abort();
        }
    }
}
