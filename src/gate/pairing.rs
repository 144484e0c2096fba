//! The gate's pairing endpoints: a link's page, the browser's redemption for a session, a
//! client's redemption for its token; each ticket spent once.

use super::*;

/// A ticket link opened: the page that posts it back, or straight on for a browser this gate
/// has already paired with that ticket.
pub(super) fn open_link(
    req: &Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
    ticket: &str,
) -> Response<Body> {
    let peer = client.peer;
    let to = link::target(req.uri());
    let used = shared.redeemed.lock().is_ok_and(|r| r.contains(ticket));
    if used {
        if let Some(v) = credential::session(req, &shared.cookie)
            && check(shared, Some(keys), &Credential::Session(v)).is_ok()
        {
            return link::onward(&to);
        }
        tracing::warn!(source = %peer, "refused: a pairing link that was already used");
        return link::refused_page(StatusCode::GONE, "it was already used");
    }
    link::ticket_page(ticket, &to)
}

/// The pairing page's post: redeems its ticket once and starts a session.
pub(super) async fn redeem(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Response<Body> {
    let (t, to) = match spend_posted(req, client, shared, keys).await {
        Ok(spent) => spent,
        Err(refused) => return *refused,
    };
    start_session(client, shared, keys, &t.device, &to)
}

/// A pairing form posted from the gate's own origin, its ticket spent ([`spend`]).
pub(super) async fn spend_posted(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Result<(crate::pairing::Ticket, String), Box<Response<Body>>> {
    if credential::foreign_origin(&req, client.tls) {
        tracing::warn!(source = %client.peer, "refused: a pairing post from another origin");
        return Err(Box::new(plain(
            StatusCode::FORBIDDEN,
            "forbidden: cross-origin request\n",
        )));
    }
    let body = match Limited::new(req.into_body(), link::MAX_FORM)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(Box::new(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "pairing form too large\n",
            )));
        }
    };
    spend(&body, client, shared, keys)
}

/// Spends the ticket a pairing form carries: verified, then recorded as used, once. Returns the
/// ticket's device and the same-origin page to go on to, or the refusal to answer.
pub(super) fn spend(
    body: &[u8],
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Result<(crate::pairing::Ticket, String), Box<Response<Body>>> {
    let peer = client.peer;
    let (Some(ticket), to) = link::form(body) else {
        return Err(Box::new(link::refused_page(
            StatusCode::BAD_REQUEST,
            "it holds no ticket",
        )));
    };
    let Some(scope) = shared.scope(keys) else {
        return Err(Box::new(link::refused_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "this gate has no link key yet",
        )));
    };
    let now = crate::pairing::unix_now();
    let verified = crate::pairing::verify_ticket(
        &ticket,
        scope.key,
        scope.stack,
        scope.sidecar,
        &keys.registry,
        now,
    );
    let t = match verified {
        Ok(t) => t,
        Err(e) => {
            let device = match &e {
                crate::pairing::TicketError::Invalid => "-".to_string(),
                crate::pairing::TicketError::UnknownDevice(d)
                | crate::pairing::TicketError::Superseded(d)
                | crate::pairing::TicketError::Expired(d) => d.clone(),
            };
            let r = refuse(
                shared,
                peer,
                PAIR_PATH,
                &Refusal {
                    reason: e.to_string(),
                    device,
                },
            );
            if r.status() == StatusCode::TOO_MANY_REQUESTS {
                return Err(Box::new(r));
            }
            return Err(Box::new(link::refused_page(
                StatusCode::UNAUTHORIZED,
                &e.to_string(),
            )));
        }
    };
    // Recorded as issued, whatever spelling was posted (only the issued one verifies).
    let first = match shared.redeemed.lock() {
        Ok(mut r) if !r.contains(&t.issued) => match r.insert(&t.issued) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("cannot record a redeemed pairing ticket: {e}");
                return Err(Box::new(link::refused_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the gate cannot record it",
                )));
            }
        },
        _ => false,
    };
    if !first {
        tracing::warn!(source = %peer, device = %t.device, "refused: a pairing link that was already used");
        return Err(Box::new(link::refused_page(
            StatusCode::GONE,
            "it was already used",
        )));
    }
    Ok((t, to))
}

/// A soul client that scanned a pairing link trades its ticket for the device token: over TLS
/// only (the client has checked the gate's pin first), and once, like a browser's redemption.
pub(super) async fn hand_token(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Response<Body> {
    if !client.tls {
        tracing::warn!(source = %client.peer, "refused: a token request over plain HTTP");
        return plain(
            StatusCode::FORBIDDEN,
            "the token is given over TLS only: connect with https and check the pin\n",
        );
    }
    let (t, _) = match spend_posted(req, client, shared, keys).await {
        Ok(spent) => spent,
        Err(refused) => return *refused,
    };
    let file = shared
        .cfg
        .keys_dir
        .join(crate::state::layout::gate_device_token(&t.device));
    match crate::files::read_text_bounded(&file, crate::state::MAX_STATE_FILE) {
        Ok(token) => {
            tracing::info!(source = %client.peer, device = %t.device, "gave a paired client its token");
            let mut r = Response::new(
                Full::new(Bytes::from(token))
                    .map_err(|e| match e {})
                    .boxed(),
            );
            let headers = r.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            tracing::error!(device = %t.device, "no token to give: {e}");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "this gate holds no token for the device yet: run `soul apply`\n",
            )
        }
    }
}

/// A session for `device`, then on to `to`.
pub(super) fn start_session(
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
    device: &str,
    to: &str,
) -> Response<Body> {
    let peer = client.peer;
    let Some(scope) = shared.scope(keys) else {
        return link::refused_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "this gate has no link key yet",
        );
    };
    let minted = keys
        .registry
        .devices
        .get(device)
        .and_then(|entry| scope.mint(device, entry, crate::pairing::unix_now()));
    let Some((value, max_age)) = minted else {
        return link::refused_page(StatusCode::UNAUTHORIZED, "the device has expired");
    };
    tracing::info!(source = %peer, device = %device, "paired a browser");
    link::paired(to, &shared.cookie, &value, max_age, client.tls)
}
