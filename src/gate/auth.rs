//! Who a credential lets in: a device token or this sidecar's session checked against the
//! current keys, remembered per connection, and checked again when the keys change or a grant
//! runs out (then the connection is closed).

use super::*;

/// Whether a credential lets the lane forward a request: recalled from this connection under
/// the current keys, or verified now (and remembered). One that fails is not refused here: the
/// lane hands the request to the full server, which refuses, logs and counts it.
pub(super) fn authorize(shared: &Shared, client: &ClientConnection, shown: lane::Shown) -> bool {
    let Some(keys) = shared.keys.borrow().clone() else {
        return false;
    };
    // A credential this connection showed before, under these keys: nothing to copy or check.
    let now = crate::pairing::unix_now();
    if (client.held.lock()).is_ok_and(|h| h.recalls(shown, &keys, now)) {
        return true;
    }
    let credential = match shown {
        lane::Shown::Token(t) => Credential::Token(t.into()),
        lane::Shown::Session(s) => Credential::Session(s.into()),
    };
    admit(shared, client, &keys, &credential).is_ok()
}

/// What `credential` grants on this connection: recalled when it verified under exactly
/// `keys` and has not run out, or verified now and remembered (the first time, logged).
pub(super) fn admit(
    shared: &Shared,
    client: &ClientConnection,
    keys: &Arc<Keys>,
    credential: &Credential,
) -> Result<Grant, Refusal> {
    let now = crate::pairing::unix_now();
    let recalled = client
        .held
        .lock()
        .ok()
        .and_then(|h| h.recall(credential, keys, now));
    if let Some(grant) = recalled {
        return Ok(grant);
    }
    let grant = check(shared, Some(keys), credential)?;
    client.slot.prove();
    if client
        .held
        .lock()
        .is_ok_and(|mut h| h.remember(credential, keys, &grant))
    {
        tracing::info!(source = %client.peer, device = %grant.device, "accepted");
    }
    Ok(grant)
}

/// A credential a client presented on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Credential {
    /// A device token (`Authorization: Bearer`).
    Token(Secret),
    /// This sidecar's browser session (its cookie's value).
    Session(Secret),
}

impl Credential {
    /// The credential as a request shows it.
    fn shown(&self) -> lane::Shown<'_> {
        match self {
            Credential::Token(t) => lane::Shown::Token(t.expose()),
            Credential::Session(s) => lane::Shown::Session(s.expose()),
        }
    }
}

/// Whom a credential let in, and until when (unix seconds; `None`: until revoked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Grant {
    pub(super) device: String,
    pub(super) until: Option<u64>,
}

/// Why a credential was refused: what the audit log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) reason: String,
    pub(super) device: String,
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Refusal {
        use TokenError as E;
        let device = match &e {
            E::Expired(d) | E::UnknownDevice(d) | E::OldGeneration(d) | E::Superseded(d) => {
                d.clone()
            }
            _ => "-".into(),
        };
        Refusal {
            reason: e.to_string(),
            device,
        }
    }
}

impl Refusal {
    pub(super) fn no_key() -> Refusal {
        Refusal {
            reason: "the gate has no key yet".into(),
            device: "-".into(),
        }
    }
}

/// The credentials one client connection has presented, each with the keys it verified
/// against. A request repeating one under the same keys skips the check; when the keys change
/// or a grant runs out, [`revoked`] checks every held credential again and closes the
/// connection if one fails.
#[derive(Default)]
pub(super) struct Held(Vec<(Credential, Arc<Keys>, Grant)>);

impl Held {
    pub(super) fn of(credential: Credential, keys: Arc<Keys>, grant: Grant) -> Held {
        Held(vec![(credential, keys, grant)])
    }

    /// The grant of `credential` if it verified against exactly `keys` and has not run out.
    pub(super) fn recall(
        &self,
        credential: &Credential,
        keys: &Arc<Keys>,
        now: u64,
    ) -> Option<Grant> {
        self.find(credential.shown(), keys, now).cloned()
    }

    /// Whether [`Held::recall`] finds the credential `shown`: the lane's question, asked of the
    /// request's own bytes (nothing copied).
    pub(super) fn recalls(&self, shown: lane::Shown, keys: &Arc<Keys>, now: u64) -> bool {
        self.find(shown, keys, now).is_some()
    }

    /// The grant of the held credential `shown` is, if it verified against exactly `keys`
    /// and has not run out.
    fn find(&self, shown: lane::Shown, keys: &Arc<Keys>, now: u64) -> Option<&Grant> {
        self.0
            .iter()
            .find(|(c, k, g)| {
                c.shown() == shown && Arc::ptr_eq(k, keys) && g.until.is_none_or(|u| u > now)
            })
            .map(|(_, _, g)| g)
    }

    /// Remembers a credential that verified; true when this connection had not presented it
    /// before.
    pub(super) fn remember(
        &mut self,
        credential: &Credential,
        keys: &Arc<Keys>,
        grant: &Grant,
    ) -> bool {
        let fresh = !self.0.iter().any(|(c, _, _)| c == credential);
        self.0.retain(|(c, _, _)| c != credential);
        self.0
            .push((credential.clone(), keys.clone(), grant.clone()));
        fresh
    }

    pub(super) fn credentials(&self) -> Vec<Credential> {
        self.0.iter().map(|(c, _, _)| c.clone()).collect()
    }

    /// When the first held grant runs out.
    pub(super) fn first_end(&self) -> Option<u64> {
        self.0.iter().filter_map(|(_, _, g)| g.until).min()
    }
}

/// Resolves with the device's name once any credential in `held` stops verifying: when the
/// keys or registry change, or when a grant reaches its end.
pub(super) async fn revoked(shared: &Shared, held: Arc<Mutex<Held>>) -> String {
    let mut keys = shared.keys.clone();
    loop {
        let first_end = held.lock().ok().and_then(|h| h.first_end());
        let sleep = match first_end {
            Some(end) => Duration::from_secs(end.saturating_sub(crate::pairing::unix_now())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            changed = keys.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
            _ = tokio::time::sleep(sleep) => {}
        }
        let current = keys.borrow().clone();
        let credentials = held.lock().map(|h| h.credentials()).unwrap_or_default();
        for c in credentials {
            if let Err(r) = check(shared, current.as_deref(), &c) {
                return r.device;
            }
        }
    }
}

pub(super) fn check(
    shared: &Shared,
    keys: Option<&Keys>,
    credential: &Credential,
) -> Result<Grant, Refusal> {
    let Some(k) = keys else {
        return Err(Refusal::no_key());
    };
    let now = crate::pairing::unix_now();
    match credential {
        Credential::Token(t) => {
            let claims = crate::pairing::verify(
                t.expose(),
                &k.public_key,
                &shared.cfg.stack,
                &k.registry,
                now,
            )?;
            Ok(Grant {
                device: claims.sub,
                until: claims.exp,
            })
        }
        Credential::Session(v) => {
            let scope = shared.scope(k).ok_or_else(Refusal::no_key)?;
            let (device, until) =
                scope
                    .verify(v.expose(), &k.registry, now)
                    .map_err(|e| Refusal {
                        device: e.device().to_string(),
                        reason: e.to_string(),
                    })?;
            Ok(Grant {
                device,
                until: Some(until),
            })
        }
    }
}
