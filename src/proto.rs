//! What a client, a gate and a relay agree on, in one room that imports none of them: the
//! gate's public paths, the server names a relay routes by, and the rule that tells a
//! browser's request sent by a page of another origin (the gate's for its cookie, a client's
//! forward for the credential it adds).

use http::{Method, Request, header};

/// The health endpoint Docker's health check calls; it reveals nothing.
pub const HEALTH_PATH: &str = "/.soul/health";
/// Where the gate's pairing page posts its ticket.
pub const PAIR_PATH: &str = "/.soul/pair";
/// Where a soul client posts a pairing link's ticket (`ticket=…`) for the device token.
pub const TOKEN_PATH: &str = "/.soul/token";
/// Where a paired client reads the gate's current addresses (`{"addresses":[…]}`), with its
/// credential: how it follows its home to a new address.
pub const ADDRESSES_PATH: &str = "/.soul/addresses";

/// The server name of a relay agent's control channel (never a route: routes have two labels
/// before `.soul`).
pub const AGENT_SERVER_NAME: &str = "relay.soul";

/// The server name a client presents to reach `sidecar` of `stack` through a relay: the relay
/// routes by it, the gate ignores it.
pub fn server_name(stack: &str, sidecar: &str) -> String {
    format!("{sidecar}.{stack}.soul")
}

/// The (stack, sidecar) a [`server_name`] names.
pub fn route_of(server_name: &str) -> Option<(&str, &str)> {
    let rest = server_name.strip_suffix(".soul")?;
    let (sidecar, stack) = rest.split_once('.')?;
    (!stack.contains('.') && !sidecar.is_empty() && !stack.is_empty()).then_some((stack, sidecar))
}

/// Whether a cookie-authenticated request must be refused as cross-origin: a WebSocket (or
/// other) upgrade, or a method that changes state, sent by a page of another origin. Cookies
/// do not tell ports apart, and SameSite does not either (a site ignores ports), so the gate
/// compares the browser's `Origin` with the address the request was sent to, and with the
/// scheme its clients use (`tls`): a page on `https://host` is not the gate's `http://host`.
pub fn foreign_origin<B>(req: &Request<B>, tls: bool) -> bool {
    let value = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    foreign(
        &Provenance {
            safe: matches!(
                *req.method(),
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            ) && !req.headers().contains_key(header::UPGRADE),
            fetch_site: value("sec-fetch-site"),
            origin: req.headers().get(header::ORIGIN).map(|v| v.as_bytes()),
            host: value(header::HOST.as_str())
                .or_else(|| req.uri().authority().map(|a| a.as_str())),
        },
        tls,
    )
}

/// What a request says of where it comes from and where it was sent, for [`foreign`].
pub struct Provenance<'a> {
    /// A method that changes nothing, and no upgrade.
    pub safe: bool,
    /// `Sec-Fetch-Site`, when it is text.
    pub fetch_site: Option<&'a str>,
    /// `Origin`, as sent.
    pub origin: Option<&'a [u8]>,
    /// `Host` (or the target's authority), when it is text.
    pub host: Option<&'a str>,
}

/// [`foreign_origin`] of a request described by `p`.
pub fn foreign(p: &Provenance, tls: bool) -> bool {
    if p.safe {
        return false;
    }
    // Fetch Metadata, when the browser sends it, says who made the request, and a page
    // cannot forge it (a page with `Referrer-Policy: no-referrer` posts with `Origin: null`).
    if let Some(site) = p.fetch_site {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = p.origin else {
        // Browsers send Origin with every upgrade and cross-origin write; a program that
        // sends none is not a page riding a cookie.
        return false;
    };
    let Some(host) = p.host else {
        return true;
    };
    let Some(authority) = text(origin)
        .and_then(|o| o.split_once("://"))
        .map(|(scheme, authority)| (scheme.to_ascii_lowercase(), authority))
    else {
        return true; // `null` (a sandboxed or opaque origin), or garbage
    };
    let (scheme, default_port) = if tls {
        ("https", ":443")
    } else {
        ("http", ":80")
    };
    if authority.0 != scheme {
        return true;
    }
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let origin_host = authority.1;
    !(same(origin_host, host)
        || same(&format!("{origin_host}{default_port}"), host)
        || same(origin_host, &format!("{host}{default_port}")))
}

/// A header value as text, when it is visible ASCII (what `HeaderValue::to_str` accepts).
pub fn text(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}
