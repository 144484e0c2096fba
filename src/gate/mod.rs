//! `soul gate`: the pod's front door. It listens on the gate port, lets a request through only
//! with a device token that the library's one verifier accepts (EdDSA pinned; iss, aud, exp,
//! registry and generation checked), and proxies it to the app on 127.0.0.1 — HTTP/1.1 and
//! h2c, streamed both ways, WebSocket upgrades included. It watches its key and registry
//! files: a revoked device's next request is refused and its open connections are closed,
//! without a restart. It must not touch the engine or the stack key (it has only the public key).

mod keys;
mod limits;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::pairing::{Claims, TokenError};
pub use keys::{GATE_DIR, Keys, PUBLIC_KEY_FILE, REGISTRY_FILE, load};
use limits::Failures;

/// The cookie a browser gets in exchange for a pairing link's `?soul_token=`.
pub const COOKIE: &str = "soul_token";
/// Concurrent requests one HTTP/2 connection may have in flight.
const H2_MAX_STREAMS: u32 = 128;
/// The health endpoint Docker's health check calls; it reveals nothing.
pub const HEALTH_PATH: &str = "/.soul/health";

/// How the gate runs.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub stack: String,
    /// The app, inside the pod.
    pub upstream: SocketAddr,
    /// The directory holding [`PUBLIC_KEY_FILE`] and [`REGISTRY_FILE`].
    pub keys_dir: PathBuf,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// How long a client may take to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// Refused attempts per source address per minute before the gate answers 429.
    pub failures_per_minute: usize,
    /// How often the key and registry files are re-read.
    pub reload_every: Duration,
}

impl GateConfig {
    pub fn new(stack: &str, upstream: SocketAddr, keys_dir: PathBuf) -> GateConfig {
        GateConfig {
            stack: stack.to_string(),
            upstream,
            keys_dir,
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout: Duration::from_secs(10),
            failures_per_minute: 30,
            reload_every: Duration::from_millis(200),
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Shared {
    cfg: GateConfig,
    /// The current key and registry; `None` until the files are readable.
    keys: watch::Receiver<Option<Arc<Keys>>>,
    failures: Mutex<Failures>,
    client: Client<HttpConnector, Incoming>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    cfg: GateConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let (keys_tx, keys_rx) = watch::channel(load(&cfg.keys_dir).ok().map(Arc::new));
    tokio::spawn(keys::follow(
        cfg.keys_dir.clone(),
        cfg.reload_every,
        keys_tx,
    ));
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let shared = Arc::new(Shared {
        failures: Mutex::new(Failures::new(
            cfg.failures_per_minute,
            Duration::from_secs(60),
        )),
        client: Client::builder(TokioExecutor::new()).build(upstream_connector()),
        keys: keys_rx,
        cfg,
    });
    tracing::info!(
        "gate of `{}` listening on {}, forwarding to {}",
        shared.cfg.stack,
        listener.local_addr()?,
        shared.cfg.upstream
    );
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            _ = &mut shutdown => return Ok(()),
        };
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
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            connection(stream, peer, shared).await;
            drop(permit);
        });
    }
}

/// Connections to the app: small requests go out at once (no Nagle delay).
fn upstream_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

/// One client connection: served until it ends, or until a device it authenticated as is
/// revoked (then it is closed, WebSockets included).
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
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
    let held: Arc<Mutex<Held>> = Arc::default();
    let svc = {
        let (shared, held) = (shared.clone(), held.clone());
        hyper::service::service_fn(move |req| {
            let (shared, held) = (shared.clone(), held.clone());
            async move { Ok::<_, Infallible>(handle(req, peer, shared, held).await) }
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
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(source = %peer, "connection ended: {e}");
            }
        }
        device = revoked(&shared, held) => {
            tracing::info!(source = %peer, device = %device, "closing the connection of a revoked device");
        }
    }
}

/// The tokens one client connection has presented, each with the keys it verified against.
/// A request repeating a token under the same keys skips the signature check; when the keys
/// change, [`revoked`] verifies every held token again and closes the connection if one fails.
#[derive(Default)]
struct Held(Vec<(String, Arc<Keys>, Claims)>);

impl Held {
    fn of(token: String, keys: Arc<Keys>, claims: Claims) -> Held {
        Held(vec![(token, keys, claims)])
    }

    /// The claims of `token` if it verified against exactly `keys` and has not expired.
    fn recall(&self, token: &str, keys: &Arc<Keys>, now: u64) -> Option<Claims> {
        self.0
            .iter()
            .find(|(t, k, c)| t == token && Arc::ptr_eq(k, keys) && c.exp.is_none_or(|e| e > now))
            .map(|(_, _, c)| c.clone())
    }

    /// Remembers a token that verified; true when this connection had not presented it before.
    fn remember(&mut self, token: &str, keys: &Arc<Keys>, claims: &Claims) -> bool {
        let fresh = !self.0.iter().any(|(t, _, _)| t == token);
        self.0.retain(|(t, _, _)| t != token);
        self.0
            .push((token.to_string(), keys.clone(), claims.clone()));
        fresh
    }

    fn tokens(&self) -> Vec<String> {
        self.0.iter().map(|(t, _, _)| t.clone()).collect()
    }
}

/// Resolves with the device's name once any token in `held` stops verifying.
async fn revoked(shared: &Shared, held: Arc<Mutex<Held>>) -> String {
    let mut keys = shared.keys.clone();
    loop {
        if keys.changed().await.is_err() {
            return std::future::pending().await;
        }
        let current = keys.borrow().clone();
        let tokens = held.lock().map(|h| h.tokens()).unwrap_or_default();
        for t in tokens {
            if let Err(e) = check(&shared.cfg.stack, current.as_deref(), &t) {
                return device_of(&e);
            }
        }
    }
}

fn check(stack: &str, keys: Option<&Keys>, token: &str) -> Result<Claims, TokenError> {
    let Some(k) = keys else {
        return Err(TokenError::Invalid("the gate has no key yet".into()));
    };
    crate::pairing::verify(
        token,
        &k.public_key,
        stack,
        &k.registry,
        crate::reconcile::unix_now(),
    )
}

fn device_of(e: &TokenError) -> String {
    use TokenError as E;
    match e {
        E::Expired(d) | E::UnknownDevice(d) | E::OldGeneration(d) => d.clone(),
        _ => "-".into(),
    }
}

/// Where a request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Bearer,
    Cookie,
    Query,
}

fn token_of<B>(req: &Request<B>) -> Option<(String, Source)> {
    if let Some(v) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some((t.trim().to_string(), Source::Bearer));
    }
    for v in req.headers().get_all(header::COOKIE) {
        for pair in v.to_str().unwrap_or("").split(';') {
            if let Some(t) = pair.trim().strip_prefix(&format!("{COOKIE}=")) {
                return Some((t.to_string(), Source::Cookie));
            }
        }
    }
    req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("soul_token="))
            .map(|t| (t.to_string(), Source::Query))
    })
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

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    held: Arc<Mutex<Held>>,
) -> Response<Body> {
    if req.uri().path() == HEALTH_PATH {
        return plain(StatusCode::OK, "ok\n");
    }
    let ip = peer.ip();
    let refuse = |reason: &str, device: &str| {
        let limited = shared
            .failures
            .lock()
            .map(|mut f| f.record(ip))
            .unwrap_or(false);
        tracing::warn!(source = %peer, device = %device, reason, path = %req.uri().path(), "refused");
        if limited {
            let mut r = plain(
                StatusCode::TOO_MANY_REQUESTS,
                "too many refused attempts; slow down\n",
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        let mut r = plain(
            StatusCode::UNAUTHORIZED,
            "unauthorized: pair this device with soul first\n",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"soul\""),
        );
        r
    };
    let Some((token, source)) = token_of(&req) else {
        return refuse("no token", "-");
    };
    let Some(keys) = shared.keys.borrow().clone() else {
        return refuse("the gate has no key yet", "-");
    };
    let now = crate::reconcile::unix_now();
    let recalled = held.lock().ok().and_then(|h| h.recall(&token, &keys, now));
    let claims = match recalled {
        Some(c) => c,
        None => match check(&shared.cfg.stack, Some(&keys), &token) {
            Ok(c) => {
                if held.lock().is_ok_and(|mut h| h.remember(&token, &keys, &c)) {
                    tracing::info!(source = %peer, device = %c.sub, "accepted");
                }
                c
            }
            Err(e) => return refuse(&e.to_string(), &device_of(&e)),
        },
    };
    if source == Source::Query {
        // A pairing link opened in a browser: trade the token for a cookie and drop it from
        // the address bar (and from history and Referer headers).
        let path = req.uri().path().to_string();
        let rest: Vec<&str> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.starts_with("soul_token=") && !kv.is_empty())
            .collect();
        let location = if rest.is_empty() {
            path
        } else {
            format!("{path}?{}", rest.join("&"))
        };
        let mut r = plain(StatusCode::SEE_OTHER, "paired\n");
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        let secure = if over_tls(&req, peer) { "; Secure" } else { "" };
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}"
        )) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    // The app never sees soul's credentials.
    if source == Source::Bearer {
        req.headers_mut().remove(header::AUTHORIZATION);
    }
    strip_cookie(req.headers_mut());
    proxy(req, &shared, Held::of(token, keys, claims.clone()))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(source = %peer, device = %claims.sub, "the app did not answer: {e}");
            plain(StatusCode::BAD_GATEWAY, "the app is not answering\n")
        })
}

/// Whether the client reached the pod over TLS: an `https` request (HTTP/2's `:scheme`), or one
/// that a TLS-terminating proxy inside the pod (on loopback) marks `X-Forwarded-Proto: https`.
/// The gate itself speaks plain HTTP; a cookie set over TLS must stay on TLS.
fn over_tls<B>(req: &Request<B>, peer: SocketAddr) -> bool {
    req.uri().scheme() == Some(&http::uri::Scheme::HTTPS)
        || (peer.ip().is_loopback()
            && req
                .headers()
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")))
}

fn strip_cookie(headers: &mut http::HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(';')
                .map(str::trim)
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty() && !p.starts_with(&format!("{COOKIE}=")))
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// Forwards a request to the app, streaming bodies both ways. Upgrades (WebSocket) get a
/// connection of their own, spliced to the client's once the app answers 101.
async fn proxy(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    held: Held,
) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if !req.headers().contains_key(header::UPGRADE) {
        *req.uri_mut() = format!("http://{}{path}", shared.cfg.upstream).parse()?;
        // HTTP/2 from the client goes to the app as HTTP/1.1.
        *req.version_mut() = http::Version::HTTP_11;
        let resp = shared.client.request(req).await?;
        return Ok(resp.map(|b| b.boxed()));
    }
    // A connection of our own speaks origin-form.
    *req.uri_mut() = path.parse()?;
    let client_side = hyper::upgrade::on(&mut req);
    let stream = TcpStream::connect(shared.cfg.upstream).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let mut resp = sender.send_request(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
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
    use crate::pairing::claims_for;

    fn keys() -> Arc<Keys> {
        Arc::new(Keys {
            public_key: [1; 32],
            registry: Default::default(),
        })
    }

    #[test]
    fn the_pairing_cookie_is_secure_only_over_tls() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.9:5000".parse().unwrap();
        let plain = Request::get("/").body(()).unwrap();
        let https = Request::get("https://pod/").body(()).unwrap();
        let marked = Request::get("/")
            .header("x-forwarded-proto", "HTTPS")
            .body(())
            .unwrap();
        assert!(!over_tls(&plain, local));
        assert!(over_tls(&https, remote));
        assert!(over_tls(&marked, local));
        assert!(
            !over_tls(&marked, remote),
            "only a proxy inside the pod is believed"
        );
    }

    #[test]
    fn a_held_token_is_recalled_only_under_the_same_keys_and_before_it_expires() {
        let (k, other) = (keys(), keys());
        let mut held = Held::default();
        let claims = claims_for("home", "alice", 1, 1000, Some(2000));
        assert!(held.remember("t", &k, &claims));
        assert!(!held.remember("t", &k, &claims), "already held");
        assert_eq!(held.recall("t", &k, 1999), Some(claims.clone()));
        assert_eq!(held.recall("t", &k, 2000), None, "expired");
        assert_eq!(
            held.recall("t", &other, 1500),
            None,
            "equal but reloaded keys"
        );
        assert_eq!(held.recall("u", &k, 1500), None);
        // Verified again under new keys: recalled under those only.
        held.remember("t", &other, &claims);
        assert_eq!(held.recall("t", &k, 1500), None);
        assert!(held.recall("t", &other, 1500).is_some());
        assert_eq!(held.tokens(), ["t"]);
    }
}
