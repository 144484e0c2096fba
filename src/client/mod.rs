//! `soul::client`: reaching a gate from a device, over the best path there is. It is what
//! `soul connect` runs, and the reference for app authors (docs/client.md states the algorithm
//! precisely enough to implement on a phone).
//!
//! - A [`Pairing`] comes from a pairing code: the URI carries the device token; the link
//!   carries a one-time ticket, which [`Pairing::from_code`] trades for the token at the gate
//!   over TLS pinned to the code's `pin`.
//! - A [`Connector`] holds the path in use. It chooses by racing the pairing's addresses in
//!   order ([`race`]: staggered by 250 ms, a pinned TLS handshake wins), keeps the choice
//!   until the network changes ([`netwatch`]), a connection over it fails, or a probe of the
//!   better paths finds one answering again.
//! - [`forward`] serves a local port that adds the device's credential to every request, so a
//!   browser or `curl` on this machine reaches the app with no token handling.
//!
//! The token is sent only inside a TLS session whose key matched the pin.

pub mod forward;
pub mod netwatch;
pub mod peer;
/// The pin verifier, which the relay's agent uses too.
pub use crate::pin;
pub mod race;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::pairing::{Address, Payload, PayloadError};
use crate::secret::Secret;
use race::{Failed, Target};

/// How long a burst of network events is let settle before the paths are compared.
const SETTLE: Duration = Duration::from_millis(250);

/// How often, while on a worse path than the first, the better ones are tried again.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// What a device needs to reach one sidecar.
#[derive(Debug, Clone)]
pub struct Pairing {
    pub stack: String,
    pub sidecar: String,
    pub device: String,
    /// In the stack's transport order: the order paths are tried in.
    pub addresses: Vec<Address>,
    /// `sha256//<base64>` of the gate's key.
    pub pin: String,
    pub token: Secret,
}

/// Why the client cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Code(#[from] PayloadError),
    #[error(
        "the pairing code has no pin: it is from a soul older than TLS; print a new one with `soul pair`"
    )]
    NoPin,
    #[error("the pairing code has neither a token nor a ticket")]
    NoCredential,
    #[error("no path to the gate answered with the pinned key:{}", failures_text(.0))]
    Unreachable(Vec<Failed>),
    #[error("the gate did not trade the ticket for a token: {0}")]
    Redeem(String),
    #[error("{0}")]
    Input(String),
}

fn failures_text(failures: &[Failed]) -> String {
    if failures.is_empty() {
        return " the pairing lists no address soul can use".into();
    }
    failures
        .iter()
        .map(|f| format!("\n  {}: {}", f.address, f.why))
        .collect()
}

impl Pairing {
    /// The pairing a code's text describes. A link's ticket is traded for the device token at
    /// the gate, over the best path, TLS pinned; the ticket is spent by it.
    pub async fn from_code(text: &str) -> Result<Pairing, ClientError> {
        let payload = Payload::parse(text)?;
        let pin = payload.pin.clone().ok_or(ClientError::NoPin)?;
        let mut pairing = Pairing {
            stack: payload.stack,
            sidecar: payload.sidecar,
            device: payload.device,
            addresses: payload.addresses,
            pin,
            token: Secret::default(),
        };
        pairing.token = match (payload.token, payload.ticket) {
            (Some(token), _) => token,
            (None, Some(ticket)) => pairing.redeem(&ticket).await?,
            (None, None) => return Err(ClientError::NoCredential),
        };
        Ok(pairing)
    }

    /// What a pinned TLS connection to this pairing's gate needs.
    pub fn target(&self) -> Target {
        let name = crate::proto::server_name(&self.stack, &self.sidecar);
        Target {
            tls: pin::client_config(&self.pin),
            server_name: ServerName::try_from(name)
                .unwrap_or_else(|_| ServerName::try_from("soul.invalid").expect("a DNS name")),
        }
    }

    /// `POST /.soul/token` with the ticket, over the best path.
    async fn redeem(&self, ticket: &Secret) -> Result<Secret, ClientError> {
        use http_body_util::BodyExt as _;
        let won = race::race(&self.addresses, &self.target(), race::STAGGER)
            .await
            .map_err(ClientError::Unreachable)?;
        let io = hyper_util::rt::TokioIo::new(won.stream);
        let redeem = |e: &dyn std::fmt::Display| ClientError::Redeem(e.to_string());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| redeem(&e))?;
        tokio::spawn(conn);
        let form: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("ticket", ticket.expose())
            .finish();
        let request = http::Request::post(crate::proto::TOKEN_PATH)
            .header(
                http::header::HOST,
                won.address.http_origin().trim_start_matches("http://"),
            )
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(http_body_util::Full::new(bytes::Bytes::from(form)))
            .map_err(|e| redeem(&e))?;
        let response = send.send_request(request).await.map_err(|e| redeem(&e))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), 16 * 1024)
            .collect()
            .await
            .map_err(|e| redeem(&e))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if !status.is_success() {
            return Err(ClientError::Redeem(format!(
                "{status}: {} (a used link does not work again: print a new one with `soul pair`)",
                text.chars().take(200).collect::<String>()
            )));
        }
        Ok(Secret::new(text))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The path in use.
#[derive(Debug, Clone)]
pub struct Choice {
    pub index: usize,
    pub address: Address,
    /// When it was chosen, and how long the race took.
    pub at: Instant,
    pub took: Duration,
}

/// Chooses and keeps a path to one pairing's gate.
pub struct Connector {
    pub pairing: Pairing,
    target: Target,
    current: Mutex<Option<Choice>>,
}

impl Connector {
    pub fn new(pairing: Pairing) -> Arc<Connector> {
        Arc::new(Connector {
            target: pairing.target(),
            pairing,
            current: Mutex::new(None),
        })
    }

    /// The path in use, if one was chosen.
    pub fn current(&self) -> Option<Choice> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    fn set(&self, choice: Option<Choice>) {
        if let Ok(mut c) = self.current.lock() {
            if let (Some(old), Some(new)) = (c.as_ref(), choice.as_ref())
                && old.index != new.index
            {
                tracing::info!(
                    "path: {} → {} ({} ms)",
                    old.address,
                    new.address,
                    new.took.as_millis()
                );
            }
            *c = choice;
        }
    }

    /// The gate's current addresses (`GET /.soul/addresses` with the device's token), asked
    /// over `stream`, a pinned connection to it: how a client follows its home to a new LAN
    /// address, a new overlay address or a new machine. Addresses this client cannot read are
    /// left out.
    pub async fn home_addresses(
        &self,
        stream: TlsStream<TcpStream>,
        over: &Address,
    ) -> Result<Vec<Address>, ClientError> {
        use http_body_util::BodyExt as _;
        let ask = |e: &dyn std::fmt::Display| {
            ClientError::Input(format!("cannot ask the gate for its addresses: {e}"))
        };
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| ask(&e))?;
        // One request, then the connection goes (aborting the task closes it), not held open
        // beside the ones the client goes on to make.
        let conn = tokio::spawn(conn);
        let _closing = AbortOnDrop(conn);
        let request = http::Request::get(crate::proto::ADDRESSES_PATH)
            .header(
                http::header::HOST,
                over.http_origin().trim_start_matches("http://"),
            )
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.pairing.token.expose()),
            )
            .header(http::header::CONNECTION, "close")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| ask(&e))?;
        let response = send.send_request(request).await.map_err(|e| ask(&e))?;
        if !response.status().is_success() {
            return Err(ask(&response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| ask(&e))?
            .to_bytes();
        #[derive(serde::Deserialize)]
        struct Home {
            addresses: Vec<String>,
        }
        let home: Home = serde_json::from_slice(&body).map_err(|e| ask(&e))?;
        Ok(home
            .addresses
            .iter()
            .filter_map(|a| Address::parse(a).ok())
            .collect())
    }

    /// Races every address and keeps the winner.
    pub async fn choose(&self) -> Result<(Choice, TlsStream<TcpStream>), ClientError> {
        let won = race::race(&self.pairing.addresses, &self.target, race::STAGGER)
            .await
            .map_err(ClientError::Unreachable)?;
        let choice = Choice {
            index: won.index,
            address: won.address,
            at: Instant::now(),
            took: won.elapsed,
        };
        self.set(Some(choice.clone()));
        Ok((choice, won.stream))
    }

    /// A pinned TLS connection over the path in use; when there is none or it fails, a new
    /// race chooses again.
    pub async fn connect(&self) -> Result<TlsStream<TcpStream>, ClientError> {
        if let Some(choice) = self.current() {
            match tokio::time::timeout(
                race::ATTEMPT_TIMEOUT,
                race::attempt(&choice.address, &self.target),
            )
            .await
            {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(why)) => {
                    tracing::info!("path {} failed: {why}; choosing again", choice.address)
                }
                Err(_) => tracing::info!("path {} timed out; choosing again", choice.address),
            }
            self.set(None);
        }
        Ok(self.choose().await?.1)
    }

    /// Tries only the paths better than the one in use; moves up when one answers.
    pub async fn probe_better(&self) {
        let Some(current) = self.current() else {
            return;
        };
        if current.index == 0 {
            return;
        }
        let better = &self.pairing.addresses[..current.index];
        if let Ok(won) = race::race(better, &self.target, race::STAGGER).await {
            self.set(Some(Choice {
                index: won.index,
                address: won.address,
                at: Instant::now(),
                took: won.elapsed,
            }));
        }
    }

    /// Keeps the choice current until dropped: re-chooses on every network change, and while
    /// on a worse path probes the better ones every [`PROBE_EVERY`].
    pub async fn maintain(self: Arc<Connector>) {
        let mut changes = netwatch::changes();
        let targets: Vec<std::net::IpAddr> = self
            .pairing
            .addresses
            .iter()
            .filter_map(|a| a.host.parse().ok())
            .collect();
        let mut paths = netwatch::Paths::now(&targets);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                burst = changed => {
                    let Some(mut burst) = burst else {
                        changes = None;
                        continue;
                    };
                    // Events come in bursts (an address, then its routes): let them settle,
                    // and take the whole burst as one.
                    tokio::time::sleep(SETTLE).await;
                    if let Some(rx) = changes.as_mut() {
                        while let Ok(more) = rx.try_recv() {
                            burst.extend(more);
                        }
                    }
                    let now = netwatch::Paths::now(&targets);
                    let moved = paths.moved(&now, &burst);
                    paths = now;
                    if !moved {
                        tracing::debug!("a network change that moves no path to the gate");
                        continue;
                    }
                    tracing::info!("the network changed: choosing the path again");
                    if let Err(e) = self.choose().await {
                        self.set(None);
                        tracing::warn!("{e}");
                    }
                }
                _ = probe.tick() => self.probe_better().await,
            }
        }
    }
}

/// The text of a pairing code from what the user gave: the code itself, or a file holding
/// it (text, or a PNG of the QR code).
pub fn read_code(arg: &str) -> Result<String, ClientError> {
    let looks_like_code = arg.starts_with("soul://") || arg.contains("#v=");
    let path = std::path::Path::new(arg);
    if looks_like_code || !path.is_file() {
        return Ok(arg.to_string());
    }
    let bytes = crate::files::read_bounded(path, MAX_CODE_FILE)
        .map_err(|e| ClientError::Input(format!("cannot read {arg}: {e}")))?;
    if bytes.starts_with(b"\x89PNG") {
        return crate::pairing::qr::decode_png(&bytes)
            .map_err(|why| ClientError::Input(format!("{arg}: {why}")));
    }
    String::from_utf8(bytes)
        .map(|s| s.trim().to_string())
        .map_err(|_| {
            ClientError::Input(format!("{arg} is neither a pairing code nor a PNG of one"))
        })
}

/// The largest file `soul connect` reads a code from: a photo of a QR code, not an archive.
const MAX_CODE_FILE: u64 = 32 << 20;
#[cfg(test)]
mod tests;
