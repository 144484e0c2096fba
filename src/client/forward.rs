//! `soul connect`'s local port: each connection a local program opens on 127.0.0.1 gets its
//! own pinned TLS connection to the gate over the [`super::Connector`]'s path, and every
//! request on it is sent with the device's credential (`Authorization: Bearer`), replacing
//! any the local program sent. WebSocket and other upgrades are carried through.

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
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("cannot accept a local connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
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
