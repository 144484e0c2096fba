//! The pod's relay agent, run inside the gate: it dials out to `soul relay` (nothing on the
//! home side listens on the internet) over TLS pinned to the relay's key (a relay with another
//! key is sent nothing), registers its sidecar with the stack's agent key,
//! keeps a pool of ready data channels so that a device's session starts without a round trip
//! to the home, and hands each data channel to the gate as soon as the device's first byte
//! arrives on it: the gate serves it like any connection, TLS and all. It reconnects with
//! capped exponential backoff and jitter, and while registered it keeps a file saying so (the
//! relay's host), which `soul apply` reads to put the relay address into pairing codes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;

use super::wire::{self, AgentKey, FromAgent, Hello, ToAgent};
use crate::backoff::{Backoff, jitter};

/// The file (in the gate's writable directory) that holds the relay's host while registered.
pub const STATE_FILE: &str = "relay.registered";

/// How long a connection to the relay may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the relay may stay silent before the agent counts it gone (it pings every 15 s).
const SILENCE: Duration = Duration::from_secs(45);
/// How [`serve`] says the relay replaced this registration with a newer one (then who by).
const REPLACED: &str = "replaced by ";
/// The first wait after a newer registration replaced this one (doubling, to 20 minutes):
/// long, since the other machine holds the name until it stops.
const REPLACED_WAIT: Duration = Duration::from_secs(5 * 60);

/// A registration that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(30);
/// The most data channels one registration keeps open at once, whatever the relay asks.
const MOST_CHANNELS: usize = 64;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the relay (stack.kdl's `relay`).
    pub relay: String,
    /// `sha256//…` of the relay's key (stack.kdl's `relay … pin=`).
    pub pin: String,
    pub stack: String,
    pub sidecar: String,
    /// The agent key file (hex of the seed), re-read at every registration so a rotated key
    /// takes effect without a restart.
    pub key_file: PathBuf,
    /// Holds the relay's host while registered; absent otherwise.
    pub state_file: Option<PathBuf>,
    /// The public name the sidecar claims at the relay (`<label>.<relay's domain>`), if any.
    pub public: Option<String>,
}

/// Why a registration ended or failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent key at {0} (run `soul apply`)")]
    NoKey(PathBuf),
    #[error("cannot reach the relay {relay}: {source}")]
    Connect {
        relay: String,
        source: std::io::Error,
    },
    #[error(
        "the relay {relay} does not have the key stack.kdl pins ({pin}): nothing was sent to it; compare with `soul relay status` on the relay"
    )]
    Pin { relay: String, pin: String },
    #[error("the relay {relay} refused: {reason}")]
    Refused { relay: String, reason: String },
    #[error("the relay {relay} broke the protocol: {why}")]
    Protocol { relay: String, why: String },
}

/// Registers and serves until the task is dropped; each data channel a device speaks on goes
/// to `deliver`.
pub async fn run<F>(cfg: AgentConfig, deliver: F)
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut last_error = String::new();
    let mut replaced = 0u32;
    clear_state(&cfg);
    loop {
        let started = Instant::now();
        match register(&cfg).await {
            Ok((control, channel_key, ready)) => {
                tracing::info!(
                    "relay agent: {}.{} registered at {}",
                    cfg.sidecar,
                    cfg.stack,
                    cfg.relay
                );
                last_error.clear();
                write_state(&cfg);
                clear_replaced(&cfg);
                let why = serve(&cfg, control, channel_key, ready, deliver.clone()).await;
                clear_state(&cfg);
                if let Some(by) = why.strip_prefix(REPLACED) {
                    // Another registration of this sidecar took over: fighting it for the
                    // name would make the two flap. Say so loudly, and wait long.
                    replaced += 1;
                    write_replaced(&cfg, by);
                    let wait = REPLACED_WAIT * 2u32.saturating_pow(replaced.min(3) - 1);
                    tracing::error!(
                        "relay agent: {}.{} was registered at {} again, from {by}: the relay keeps the newest, so this machine stops serving it there. If the stack moved, run `soul down` here; if not, another machine runs the same stack (its state bundle). Registering again in {} min",
                        cfg.sidecar,
                        cfg.stack,
                        cfg.relay,
                        wait.as_secs() / 60
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                tracing::warn!("relay agent: registration at {} ended: {why}", cfg.relay);
                if started.elapsed() >= STABLE {
                    backoff.reset();
                }
            }
            Err(e) => {
                // The same failure again is not news: log it once, then quietly.
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!("relay agent: {text}; retrying with backoff");
                    last_error = text;
                } else {
                    tracing::debug!("relay agent: {text}");
                }
            }
        }
        tokio::time::sleep(backoff.next_delay(jitter())).await;
    }
}

/// Connects over pinned TLS and proves the key: the control channel, the channel key, the
/// pool size.
async fn register(
    cfg: &AgentConfig,
) -> Result<(TlsStream<TcpStream>, [u8; 32], usize), AgentError> {
    let key = crate::files::read_text_bounded(&cfg.key_file, 1024)
        .ok()
        .and_then(|t| AgentKey::parse(&t))
        .ok_or_else(|| AgentError::NoKey(cfg.key_file.clone()))?;
    let protocol = |why: String| AgentError::Protocol {
        relay: cfg.relay.clone(),
        why,
    };
    let mut control = open_control(cfg).await?;
    let binding = wire::session_binding(control.get_ref().1)
        .ok_or_else(|| protocol("no TLS exporter".into()))?;
    let hello = Hello::Control {
        stack: cfg.stack.clone(),
        sidecar: cfg.sidecar.clone(),
        key: key.public(),
        public: cfg.public.clone(),
    };
    let exchange = async {
        send_hello(&mut control, &hello)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let nonce = match wire::read_frame(&mut control).await {
            Ok(ToAgent::Challenge { nonce }) => wire::decode_nonce(&nonce)
                .ok_or_else(|| protocol("a challenge that is not 32 bytes".into()))?,
            Ok(ToAgent::Refused { reason }) => return Err(refused(cfg, reason)),
            Ok(other) => return Err(protocol(format!("{other:?} before the challenge"))),
            Err(e) => return Err(protocol(e.to_string())),
        };
        let signature = key.sign(&cfg.stack, &cfg.sidecar, &nonce, &binding);
        wire::write_frame(&mut control, &FromAgent::Signature { signature })
            .await
            .map_err(|e| protocol(e.to_string()))?;
        match wire::read_frame(&mut control).await {
            Ok(ToAgent::Registered {
                channel_key,
                ready,
                public_refused,
                replaced,
            }) => {
                if let Some(why) = public_refused {
                    tracing::warn!("relay agent: {}: {why}", cfg.relay);
                }
                if let Some(by) = replaced {
                    tracing::warn!(
                        "relay agent: {}: this registration replaced one from {by} (another machine serving this stack, or this one before a network break); that one was told to stop",
                        cfg.relay
                    );
                    write_took_over(cfg, &by);
                }
                wire::decode_key(&channel_key)
                    .map(|key| (key, ready))
                    .ok_or_else(|| protocol("a channel key that is not 32 bytes".into()))
            }
            Ok(ToAgent::Refused { reason }) => Err(refused(cfg, reason)),
            Ok(other) => Err(protocol(format!("{other:?} instead of a registration"))),
            Err(e) => Err(protocol(e.to_string())),
        }
    };
    let (channel_key, ready) = tokio::time::timeout(CONNECT_TIMEOUT * 2, exchange)
        .await
        .map_err(|_| protocol("no answer in time".into()))??;
    Ok((control, channel_key, ready.min(MOST_CHANNELS)))
}

fn refused(cfg: &AgentConfig, reason: String) -> AgentError {
    AgentError::Refused {
        relay: cfg.relay.clone(),
        reason,
    }
}

async fn open(cfg: &AgentConfig) -> Result<TcpStream, AgentError> {
    let connect = |source| AgentError::Connect {
        relay: cfg.relay.clone(),
        source,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&cfg.relay))
        .await
        .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The control channel: TLS to the relay, its key checked against the pin before a byte of
/// the protocol is sent.
async fn open_control(cfg: &AgentConfig) -> Result<TlsStream<TcpStream>, AgentError> {
    let tcp = open(cfg).await?;
    let mut tls = crate::pin::client_config(&cfg.pin).as_ref().clone();
    tls.alpn_protocols.clear();
    let name =
        rustls::pki_types::ServerName::try_from(wire::AGENT_SERVER_NAME).expect("a DNS name");
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp);
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) if is_pin_mismatch(&e) => Err(AgentError::Pin {
            relay: cfg.relay.clone(),
            pin: cfg.pin.clone(),
        }),
        Ok(Err(e)) => Err(AgentError::Connect {
            relay: cfg.relay.clone(),
            source: e,
        }),
        Err(_) => Err(AgentError::Connect {
            relay: cfg.relay.clone(),
            source: std::io::ErrorKind::TimedOut.into(),
        }),
    }
}

/// Whether a handshake failed on the relay's certificate (its key is not the pinned one).
fn is_pin_mismatch(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

async fn send_hello<S>(stream: &mut S, hello: &Hello) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let mut bytes = wire::MAGIC.to_vec();
    wire::write_frame(&mut bytes, hello).await?;
    stream.write_all(&bytes).await
}

/// What happened to one data channel.
enum Channel {
    /// A device spoke on it: it went to the gate.
    Used,
    /// The relay closed it, or it could not be opened.
    Lost,
}

/// Keeps the pool full and answers the relay until the control channel ends; says why.
async fn serve<F>(
    cfg: &AgentConfig,
    control: TlsStream<TcpStream>,
    channel_key: [u8; 32],
    ready: usize,
    deliver: F,
) -> String
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    let (mut read, mut write) = tokio::io::split(control);
    // Each data channel has a number of its own, and so an id the relay takes once.
    let next_channel = Arc::new(AtomicU64::new(0));
    // The control channel is read by a task of its own: a frame read is never cut in half by
    // the loop below attending to something else. It ends at EOF, an error or the relay's
    // silence, with why; the set aborts it when the registration ends.
    let (frames_tx, mut frames) = mpsc::channel::<Result<ToAgent, String>>(16);
    let mut reader = JoinSet::new();
    reader.spawn(async move {
        loop {
            let frame = match tokio::time::timeout(SILENCE, wire::read_frame(&mut read)).await {
                Ok(Ok(frame)) => Ok(frame),
                Ok(Err(e)) => Err(format!("the control channel closed ({e})")),
                Err(_) => Err(format!("the relay was silent for {} s", SILENCE.as_secs())),
            };
            let end = frame.is_err();
            if frames_tx.send(frame).await.is_err() || end {
                return;
            }
        }
    });
    let (events, mut happened) = mpsc::channel::<Channel>(MOST_CHANNELS);
    // Dropping the set (when the registration ends) closes every channel not yet used.
    let mut pool = JoinSet::new();
    // A channel opens after `delay`: the wait is the channel's own, so the control channel is
    // read (and a dead relay noticed) meanwhile.
    let open_one = |pool: &mut JoinSet<()>, delay: Duration| {
        let (cfg, next_channel, events, deliver) = (
            cfg.clone(),
            next_channel.clone(),
            events.clone(),
            deliver.clone(),
        );
        pool.spawn(async move {
            tokio::time::sleep(delay).await;
            let seq = next_channel.fetch_add(1, Ordering::Relaxed);
            let outcome = data_channel(&cfg, &channel_key, seq, deliver).await;
            let _ = events.send(outcome).await;
        });
    };
    for _ in 0..ready {
        open_one(&mut pool, Duration::ZERO);
    }
    // Consecutive lost channels: wait before replacing them, so a relay that drops every
    // channel does not meet a busy loop.
    let mut lost_in_a_row = 0u32;
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(ToAgent::Ping)) => {
                    if wire::write_frame(&mut write, &FromAgent::Pong).await.is_err() {
                        return "the control channel closed".into();
                    }
                }
                Some(Ok(ToAgent::Open { count })) => {
                    for _ in 0..count.min(MOST_CHANNELS.saturating_sub(pool.len())) {
                        open_one(&mut pool, Duration::ZERO);
                    }
                }
                Some(Ok(ToAgent::Replaced { by })) => return format!("{REPLACED}{by}"),
                Some(Ok(other)) => return format!("unexpected {other:?}"),
                Some(Err(why)) => return why,
                None => return "the control channel's reader stopped".into(),
            },
            Some(event) = happened.recv() => {
                while pool.try_join_next().is_some() {}
                let delay = match event {
                    Channel::Used => {
                        lost_in_a_row = 0;
                        Duration::ZERO
                    }
                    Channel::Lost => {
                        lost_in_a_row += 1;
                        Duration::from_millis(100u64 << lost_in_a_row.min(7))
                    }
                };
                if pool.len() < ready {
                    open_one(&mut pool, delay);
                }
            }
        }
    }
}

/// One ready data channel, number `seq`: opened, announced by its id, then handed to the gate
/// when the device's first byte arrives.
async fn data_channel<F>(cfg: &AgentConfig, channel_key: &[u8; 32], seq: u64, deliver: F) -> Channel
where
    F: Fn(TcpStream),
{
    let Ok(mut stream) = open(cfg).await else {
        return Channel::Lost;
    };
    if stream
        .write_all(&wire::data_hello(channel_key, seq))
        .await
        .is_err()
    {
        return Channel::Lost;
    }
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => {
            deliver(stream);
            Channel::Used
        }
        _ => Channel::Lost,
    }
}

fn write_state(cfg: &AgentConfig) {
    let Some(file) = &cfg.state_file else { return };
    let host = cfg
        .relay
        .rsplit_once(':')
        .map_or(cfg.relay.as_str(), |(h, _)| h);
    if let Err(e) = std::fs::write(file, format!("{host}\n")) {
        tracing::warn!(
            "relay agent: cannot record the registration in {}: {e}",
            file.display()
        );
    }
}

/// Beside the registration file: that a newer registration replaced this one, by whom and
/// when (`<address> <unix seconds>`), for `soul status` on this machine; removed once this
/// agent is registered again.
pub const REPLACED_FILE: &str = "relay.replaced";

fn write_replaced(cfg: &AgentConfig, by: &str) {
    let Some(file) = &cfg.state_file else { return };
    let now = crate::pairing::unix_now();
    let _ = std::fs::write(file.with_file_name(REPLACED_FILE), format!("{by} {now}\n"));
}

/// Beside the registration file: that this agent's registration replaced another's at the
/// relay, whose and when (`<address> <unix seconds>`), for `soul status` on this machine (the
/// other machine's status says it was replaced).
pub const TOOK_OVER_FILE: &str = "relay.took-over";

fn write_took_over(cfg: &AgentConfig, from: &str) {
    let Some(file) = &cfg.state_file else { return };
    let now = crate::pairing::unix_now();
    let _ = std::fs::write(
        file.with_file_name(TOOK_OVER_FILE),
        format!("{from} {now}\n"),
    );
}

fn clear_replaced(cfg: &AgentConfig) {
    if let Some(file) = &cfg.state_file {
        let _ = std::fs::remove_file(file.with_file_name(REPLACED_FILE));
    }
}

fn clear_state(cfg: &AgentConfig) {
    if let Some(file) = &cfg.state_file {
        let _ = std::fs::remove_file(file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn an_agent_whose_relay_is_down_backs_off_without_a_busy_loop() {
        // A "relay" that accepts and closes at once: every registration fails.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = attempts.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("relay-agent.key");
        std::fs::write(&key_file, hex::encode([1u8; 32])).unwrap();
        let state_file = dir.path().join(STATE_FILE);
        std::fs::write(&state_file, "stale from a killed gate\n").unwrap();
        let cfg = AgentConfig {
            relay: addr.to_string(),
            pin: "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=".into(),
            stack: "home".into(),
            sidecar: "notes".into(),
            key_file,
            state_file: Some(state_file.clone()),
            public: None,
        };
        let agent = tokio::spawn(run(cfg, |_s: TcpStream| {}));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        agent.abort();
        let n = attempts.load(Ordering::SeqCst);
        // Delays of 0.25–0.5 s, 0.5–1 s, 1–2 s…: three or four attempts in 2.5 s.
        assert!((2..=5).contains(&n), "{n} attempts in 2.5 s");
        assert!(
            !state_file.exists(),
            "an unregistered agent does not claim the relay"
        );
    }

    #[tokio::test]
    async fn an_agent_without_its_key_file_says_so() {
        let cfg = AgentConfig {
            relay: "127.0.0.1:1".into(),
            pin: "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=".into(),
            stack: "home".into(),
            sidecar: "notes".into(),
            key_file: "/nonexistent/relay-agent.key".into(),
            state_file: None,
            public: None,
        };
        let err = register(&cfg).await.unwrap_err();
        assert!(err.to_string().contains("soul apply"), "{err}");
    }
}
