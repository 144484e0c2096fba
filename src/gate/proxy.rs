//! The full server's way to the app: one kept connection per client connection, and the
//! proxying of a request and its answer (upgrades included).

use super::*;

/// Why a request did not reach the app (the client gets 502, the log says which).
#[derive(Debug, thiserror::Error)]
pub(super) enum ProxyError {
    #[error("cannot connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Pool(#[from] hyper_util::client::legacy::Error),
    #[error("not a target the app can be asked for: {0}")]
    Target(#[from] http::uri::InvalidUri),
}

/// The connection to the app of one client connection. An HTTP/1.1 client sends one request
/// at a time, so it gets a connection to the app of its own, reused for its next request: no
/// pool to look up and no lock shared with other clients on the hot path. HTTP/2 clients, whose
/// streams run side by side, share the pool.
#[derive(Default)]
pub(super) struct AppConnection(Mutex<Option<http1::SendRequest<Incoming>>>);

impl AppConnection {
    /// Sends `req` (origin-form) on this client's connection to the app, opening one when there
    /// is none or the app closed it. A request that was not sent because the app had just
    /// closed the connection is sent once more on a new one.
    async fn send(
        &self,
        shared: &Shared,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ProxyError> {
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

pub(super) async fn open_app_connection(
    shared: &Shared,
) -> Result<http1::SendRequest<Incoming>, ProxyError> {
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
pub(super) async fn proxy(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    app: &AppConnection,
    held: Held,
) -> Result<Response<Body>, ProxyError> {
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
