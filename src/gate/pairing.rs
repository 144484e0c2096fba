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
        Err(refused) => return refused.for_browser(),
    };
    start_session(client, shared, keys, &t.device, &to)
}

/// Why a ticket was not spent: an HTTP status and a stable reason code (docs/pairing.md lists
/// them), with a sentence for people. A browser gets it as a page, a program (at
/// `/.soul/token`) as JSON or one line of text.
pub(super) struct PairRefusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The rate limiter's own answer (429, with its `Retry-After`).
    limited: Option<Box<Response<Body>>>,
}

impl PairRefusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> PairRefusal {
        PairRefusal {
            status,
            code,
            message: message.into(),
            limited: None,
        }
    }

    fn for_browser(self) -> Response<Body> {
        if let Some(r) = self.limited {
            return *r;
        }
        match self.code {
            "cross-origin" => plain(self.status, "forbidden: cross-origin request\n"),
            "too-large" => plain(self.status, "pairing form too large\n"),
            _ => link::refused_page(self.status, &self.message),
        }
    }

    /// `{"error":"<code>","message":"…"}` when the client accepts JSON, else `<code>: …`.
    pub(super) fn for_program(self, req_accepts_json: bool) -> Response<Body> {
        let retry_after = self
            .limited
            .as_ref()
            .and_then(|r| r.headers().get(header::RETRY_AFTER).cloned());
        let (body, kind) = if req_accepts_json {
            let v = serde_json::json!({ "error": self.code, "message": self.message });
            (format!("{v}\n"), "application/json")
        } else {
            (
                format!("{}: {}\n", self.code, self.message),
                "text/plain; charset=utf-8",
            )
        };
        let mut r = unstored(self.status, body, kind);
        let headers = r.headers_mut();
        if let Some(v) = retry_after {
            headers.insert(header::RETRY_AFTER, v);
        }
        if self.code == "method" {
            headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        r
    }
}

/// Whether a request's `Accept` names JSON.
pub(super) fn accepts_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json"))
}

/// A pairing form posted from the gate's own origin, its ticket spent ([`spend`]).
pub(super) async fn spend_posted(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Result<(crate::pairing::Ticket, String), PairRefusal> {
    // The form is read (it is small) before any answer: an HTTP/2 client sees a stream
    // answered before its body was taken as reset.
    let foreign = credential::foreign_origin(&req, client.tls);
    let body = match Limited::new(req.into_body(), link::MAX_FORM)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(PairRefusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "the pairing form is too large",
            ));
        }
    };
    if foreign {
        tracing::warn!(source = %client.peer, "refused: a pairing post from another origin");
        return Err(PairRefusal::new(
            StatusCode::FORBIDDEN,
            "cross-origin",
            "a pairing post from another origin",
        ));
    }
    spend(&body, client, shared, keys)
}

/// Spends the ticket a pairing form carries: verified, then recorded as used, once. Returns the
/// ticket's device and the same-origin page to go on to, or why not.
pub(super) fn spend(
    body: &[u8],
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Result<(crate::pairing::Ticket, String), PairRefusal> {
    let peer = client.peer;
    let (Some(ticket), to) = link::form(body) else {
        return Err(PairRefusal::new(
            StatusCode::BAD_REQUEST,
            "no-ticket",
            "it holds no ticket",
        ));
    };
    let Some(scope) = shared.scope(keys) else {
        return Err(PairRefusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-link-key",
            "this gate has no link key yet",
        ));
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
            let (device, code) = (e.device().unwrap_or("-").to_string(), e.code());
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
                let mut refusal = PairRefusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "too many refused attempts from this address: wait and try again",
                );
                refusal.limited = Some(Box::new(r));
                return Err(refusal);
            }
            return Err(PairRefusal::new(
                StatusCode::UNAUTHORIZED,
                code,
                e.to_string(),
            ));
        }
    };
    // Recorded as issued, whatever spelling was posted (only the issued one verifies).
    let first = match shared.redeemed.lock() {
        Ok(mut r) if !r.contains(&t.issued) => match r.insert(&t.issued) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("cannot record a redeemed pairing ticket: {e}");
                return Err(PairRefusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot-record",
                    "the gate cannot record it",
                ));
            }
        },
        _ => false,
    };
    if !first {
        tracing::warn!(source = %peer, device = %t.device, "refused: a pairing link that was already used");
        return Err(PairRefusal::new(
            StatusCode::GONE,
            "ticket-spent",
            "it was already used",
        ));
    }
    Ok((t, to))
}

/// A soul client that scanned a pairing link trades its ticket for the device token: over TLS
/// only (the client has checked the gate's pin first), and once, like a browser's redemption.
/// Refusals come back as a reason code (JSON when asked for, else one line of text).
pub(super) async fn hand_token(
    req: Request<Incoming>,
    client: &ClientConnection,
    shared: &Shared,
    keys: &Keys,
) -> Response<Body> {
    let json = accepts_json(&req);
    if req.method() != Method::POST {
        return PairRefusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "post the ticket: POST /.soul/token with ticket=<the soul_ticket value>",
        )
        .for_program(json);
    }
    if !client.tls {
        tracing::warn!(source = %client.peer, "refused: a token request over plain HTTP");
        return PairRefusal::new(
            StatusCode::FORBIDDEN,
            "plain-http",
            "the token is given over TLS only: connect with https and check the pin",
        )
        .for_program(json);
    }
    let (t, _) = match spend_posted(req, client, shared, keys).await {
        Ok(spent) => spent,
        Err(refused) => return refused.for_program(json),
    };
    let file = shared
        .cfg
        .keys_dir
        .join(crate::state::layout::gate_device_token(&t.device));
    match crate::files::read_text_bounded(&file, crate::state::MAX_STATE_FILE) {
        Ok(token) => {
            tracing::info!(source = %client.peer, device = %t.device, "gave a paired client its token");
            unstored(StatusCode::OK, token, "text/plain")
        }
        Err(e) => {
            tracing::error!(device = %t.device, "no token to give: {e}");
            PairRefusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-token-yet",
                "this gate holds no token for the device yet: run `soul apply`",
            )
            .for_program(json)
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
