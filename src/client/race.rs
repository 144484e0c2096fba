//! Choosing a path to the gate, after RFC 8305 ("Happy Eyeballs"): attempts start in the
//! pairing's address order, each [`STAGGER`] after the one before or at once when the one
//! before fails, and run side by side; the first to complete a TLS handshake with the pinned
//! key wins and the others are dropped. A TCP accept proves nothing (a captive portal or a
//! black-holing middlebox accepts or swallows anything): only the pinned handshake does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::pairing::Address;
use crate::stack::TransportKind;

/// The delay between the starts of two attempts (RFC 8305's recommended Connection Attempt
/// Delay).
pub const STAGGER: Duration = Duration::from_millis(250);
/// The most one attempt (TCP and TLS) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a TLS connection to the gate needs: the pinned configuration and the server name (which
/// a relay routes by; the gate itself ignores it).
#[derive(Clone)]
pub struct Target {
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// The winner of a race.
pub struct Won {
    /// Its index in the addresses raced.
    pub index: usize,
    pub address: Address,
    pub stream: TlsStream<TcpStream>,
    /// From the race's start to the completed handshake.
    pub elapsed: Duration,
}

/// One attempt that did not win.
#[derive(Debug, Clone)]
pub struct Failed {
    pub address: Address,
    pub why: String,
}

/// Whether soul's client can use an address at all: onion addresses need Tor, which it does
/// not speak.
pub fn usable(address: &Address) -> bool {
    address.transport != TransportKind::Tor
}

/// Races `addresses` (in order) and returns the first pinned handshake, or every failure.
pub async fn race(
    addresses: &[Address],
    target: &Target,
    stagger: Duration,
) -> Result<Won, Vec<Failed>> {
    let start = Instant::now();
    let candidates: Vec<(usize, &Address)> = addresses
        .iter()
        .enumerate()
        .filter(|(_, a)| usable(a))
        .collect();
    let mut failures = Vec::new();
    let mut next = candidates.iter();
    let mut running = FuturesUnordered::new();
    let launch = |(index, address): &(usize, &Address)| {
        let (index, address, target) = (*index, (*address).clone(), target.clone());
        async move {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&address, &target)).await {
                Ok(Ok(stream)) => Ok((index, address, stream)),
                Ok(Err(why)) => Err(Failed { address, why }),
                Err(_) => Err(Failed {
                    address,
                    why: format!("no pinned handshake within {} s", ATTEMPT_TIMEOUT.as_secs()),
                }),
            }
        }
    };
    match next.next() {
        Some(first) => running.push(launch(first)),
        None => return Err(failures),
    }
    let timer = tokio::time::sleep(stagger);
    tokio::pin!(timer);
    let mut more = candidates.len() > 1;
    loop {
        tokio::select! {
            Some(done) = running.next() => match done {
                Ok((index, address, stream)) => {
                    return Ok(Won { index, address, stream, elapsed: start.elapsed() });
                }
                Err(failed) => {
                    failures.push(failed);
                    // A failure starts the next attempt at once (RFC 8305 §5).
                    match next.next() {
                        Some(c) => {
                            running.push(launch(c));
                            timer.as_mut().reset(tokio::time::Instant::now() + stagger);
                        }
                        None if running.is_empty() => return Err(failures),
                        None => more = false,
                    }
                }
            },
            () = &mut timer, if more => match next.next() {
                Some(c) => {
                    running.push(launch(c));
                    timer.as_mut().reset(tokio::time::Instant::now() + stagger);
                }
                None => more = false,
            },
        }
    }
}

/// One attempt: resolve, connect, and complete the pinned TLS handshake.
pub async fn attempt(address: &Address, target: &Target) -> Result<TlsStream<TcpStream>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((address.host.as_str(), address.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", address.host))?
        .collect();
    let first = addrs
        .first()
        .ok_or_else(|| format!("{} resolves to nothing", address.host))?;
    let tcp = TcpStream::connect(first)
        .await
        .map_err(|e| format!("TCP to {first}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    TlsConnector::from(target.tls.clone())
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS with {first}: {e}"))
}
