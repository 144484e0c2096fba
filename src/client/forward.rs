//! `soul connect`'s local port: each connection a local program opens on 127.0.0.1 gets its
//! own pinned TLS connection to the gate over the [`super::Connector`]'s path, and every
//! request on it is sent with the device's credential (`Authorization: Bearer`), replacing
//! any the local program sent. WebSocket and other upgrades are carried through.
//!
//! Since it lends the device's credential, it serves only what is this user's on this machine:
//! a connection whose socket another user owns is closed ([`super::peer`]); a request for a
//! host that is not loopback or `localhost` is refused (a DNS-rebinding page that reached the
//! port under its own name); and a write or upgrade that a browser says another origin sent
//! is refused exactly as the gate refuses it for a cookie ([`crate::proto::foreign_origin`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::Connector;

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    connector: Arc<Connector>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::accept::next(&listener, "the local forward") => accepted,
            () = &mut shutdown => return,
        };
        let Ok(local_addr) = stream.local_addr() else {
            continue;
        };
        let owner = super::peer::owner(peer, local_addr);
        if owner != Some(my_uid()) {
            tracing::warn!(
                "refused a local connection from {peer}: {}",
                match owner {
                    Some(uid) => format!("it belongs to user {uid}, not to this one"),
                    None => "its owner is not listed by the kernel".into(),
                }
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(local(stream, connector.clone()));
    }
}

/// One local connection: HTTP/1.1, each request forwarded over one gate connection opened at
/// the first request.
async fn local(stream: TcpStream, connector: Arc<Connector>) {
    let upstream: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
    let bearer = HeaderValue::from_str(&format!("Bearer {}", connector.pairing.token.expose()))
        .ok()
        .map(|mut v| {
            v.set_sensitive(true);
            v
        });
    let svc = hyper::service::service_fn(move |req| {
        let (connector, upstream, bearer) = (connector.clone(), upstream.clone(), bearer.clone());
        async move { Ok::<_, Infallible>(forward(req, &connector, &upstream, bearer).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .await;
}

async fn forward(
    mut req: Request<Incoming>,
    connector: &Connector,
    upstream: &Mutex<Option<SendRequest<Incoming>>>,
    bearer: Option<HeaderValue>,
) -> Response<Body> {
    let Some(bearer) = bearer else {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored token is not a header value",
        );
    };
    if let Err(refused) = local_request(&req) {
        tracing::warn!("refused a local request: {refused}");
        return answer(StatusCode::FORBIDDEN, refused);
    }
    let mut held = upstream.lock().await;
    if held.as_ref().is_none_or(|s| s.is_closed()) {
        match open(connector).await {
            Ok(send) => *held = Some(send),
            Err(why) => return answer(StatusCode::BAD_GATEWAY, &why),
        }
    }
    let Some(send) = held.as_mut() else {
        return answer(StatusCode::BAD_GATEWAY, "no connection to the gate");
    };
    if send.ready().await.is_err() {
        *held = None;
        return answer(StatusCode::BAD_GATEWAY, "the gate closed the connection");
    }
    req.headers_mut().insert(header::AUTHORIZATION, bearer);
    let local_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    match send.send_request(req).await {
        Ok(mut response) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(local_upgrade) = local_upgrade
            {
                let remote_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(local), Ok(remote)) = (local_upgrade.await, remote_upgrade.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(local),
                            &mut TokioIo::new(remote),
                        )
                        .await;
                    }
                });
            }
            response.map(|b| b.boxed())
        }
        Err(e) => {
            *held = None;
            answer(StatusCode::BAD_GATEWAY, &format!("the gate: {e}"))
        }
    }
}

/// A new HTTP/1.1 connection to the gate over the connector's path.
async fn open(connector: &Connector) -> Result<SendRequest<Incoming>, String> {
    let tls = connector.connect().await.map_err(|e| e.to_string())?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// Whether a request may have the device's credential: sent to this machine by name
/// (loopback or `localhost`, never a name a page made resolve here), and not a write or an
/// upgrade that a browser says another origin sent.
fn local_request<B>(req: &Request<B>) -> Result<(), &'static str> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .ok_or("a request without Host")?;
    if !is_loopback_host(host) {
        return Err("a request for another host than this machine (DNS rebinding?)");
    }
    if crate::proto::foreign_origin(req, false) {
        return Err("a write or upgrade from a page of another origin");
    }
    Ok(())
}

/// `127.0.0.1`, any loopback address, `[::1]` or `localhost`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The uid this process runs as (the owner of its `/proc/self`).
fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

fn is_upgrade(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

/// An answer of the forwarder itself (not the gate's), saying why.
fn answer(status: StatusCode, why: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("soul connect: {why}\n")))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, extra: &[(&str, &str)], method: &str) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri("/x")
            .header("host", host);
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_this_machines_names_and_its_own_pages_get_the_credential() {
        for host in [
            "127.0.0.1:8080",
            "localhost:1",
            "LOCALHOST",
            "[::1]:80",
            "127.9.9.9",
        ] {
            assert_eq!(local_request(&req(host, &[], "GET")), Ok(()), "{host}");
        }
        for host in [
            "rebind.evil.example:8080",
            "10.0.0.1:80",
            "[fd00::1]:80",
            "localhost.evil",
        ] {
            assert!(local_request(&req(host, &[], "GET")).is_err(), "{host}");
        }
        let cross = [
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ];
        assert!(local_request(&req("127.0.0.1:8080", &cross, "POST")).is_err());
        let upgrade = [("upgrade", "websocket"), ("origin", "http://evil.example")];
        assert!(local_request(&req("127.0.0.1:8080", &upgrade, "GET")).is_err());
        let own = [
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(local_request(&req("127.0.0.1:8080", &own, "POST")), Ok(()));
        // A program (curl) sends no Origin: it is not a page riding the credential.
        assert_eq!(local_request(&req("127.0.0.1:8080", &[], "POST")), Ok(()));
    }
}
