//! The full server's answer to one request: health, pairing, refusals (logged and counted
//! once, here), and the proxy for a credential that admits.

use super::*;

pub(super) fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
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

/// An answer of the gate's own that no cache keeps (`Cache-Control: no-store`): a token, a
/// pod's addresses, a refusal a program reads.
pub(super) fn unstored(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// 401 for a request with no credential at all: never rate-limited (a browser that is not
/// paired yet must always learn so, whoever shares its address).
pub(super) fn unpaired() -> Response<Body> {
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
pub(super) fn refuse(
    shared: &Shared,
    peer: SocketAddr,
    path: &str,
    refusal: &Refusal,
) -> Response<Body> {
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
pub(super) struct ClientConnection {
    pub(super) peer: SocketAddr,
    /// Whether this connection is TLS, terminated by the gate. Only that counts: whatever a
    /// client sends (`X-Forwarded-Proto`, an h2 `:scheme`) does not make the gate believe
    /// otherwise, since on loopback arrive the overlays' forwards of remote clients, not a
    /// trusted proxy.
    pub(super) tls: bool,
    /// The peer's address as the app's `X-Forwarded-For`, made once.
    pub(super) forwarded_for: HeaderValue,
    pub(super) held: Arc<Mutex<Held>>,
    pub(super) app: AppConnection,
    /// Its slot, proven by the first credential admitted on it.
    pub(super) slot: Arc<Slot>,
}

pub(super) async fn handle(
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
    if path == TOKEN_PATH {
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
    if path == ADDRESSES_PATH {
        // Only to a credential: where the pod is reached tells a stranger something.
        let v = serde_json::json!({ "addresses": keys.addresses });
        return unstored(StatusCode::OK, format!("{v}\n"), "application/json");
    }
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
