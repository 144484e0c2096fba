//! Pairing a browser by link. Opening `…/?soul_ticket=T` answers a small page that posts the
//! ticket back to [`PAIR_PATH`] (so a chat app's link preview, which only GETs, cannot spend
//! it); the post redeems it once and answers `303` to the page the link named, with the
//! sidecar's session cookie. Every redirect stays on the gate's own origin: the target is a
//! path, never `//host` or `/\host`. Nothing here checks a credential: the gate does.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};

use super::Body;
use super::credential::query_without_soul;
use crate::html::escape;

pub use crate::proto::{ADDRESSES_PATH, PAIR_PATH, TOKEN_PATH};
/// The most a pairing post may carry.
pub const MAX_FORM: usize = 4096;

/// The same-origin target of a link: its path (a run of leading `/` or `\` made one `/`, so it
/// cannot name another host) and its query without soul's parameters.
pub fn target(uri: &Uri) -> String {
    let rest = uri.path().trim_start_matches(['/', '\\']);
    let path = format!("/{rest}");
    match query_without_soul(uri) {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// A redirect target received in a post: kept only if it is a same-origin path.
pub fn same_origin(to: &str) -> String {
    match to.parse::<Uri>() {
        Ok(u) if u.scheme().is_none() && u.authority().is_none() => target(&u),
        _ => "/".into(),
    }
}

fn page(status: StatusCode, html: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    private(h);
    r
}

/// Headers of every answer that carries or follows a credential: never cached, never sent on
/// as a Referer.
fn private(h: &mut http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The page a ticket link opens: it posts the ticket at once (or on a tap, without scripts).
pub fn ticket_page(ticket: &str, to: &str) -> Response<Body> {
    let (ticket, to) = (escape(ticket), escape(to));
    page(
        StatusCode::OK,
        format!(
            "<!doctype html><meta charset=utf-8><meta name=referrer content=no-referrer>\
<meta name=viewport content=\"width=device-width\"><title>Pairing…</title>\
<form method=post action=\"{PAIR_PATH}\"><input type=hidden name=ticket value=\"{ticket}\">\
<input type=hidden name=to value=\"{to}\"><p>Pairing this browser…</p>\
<button>Pair this browser</button></form>\
<script>document.forms[0].submit()</script>\n"
        ),
    )
}

/// A link that cannot pair (used, superseded, not this sidecar's).
pub fn refused_page(status: StatusCode, why: &str) -> Response<Body> {
    page(
        status,
        format!(
            "<!doctype html><meta charset=utf-8><meta name=referrer content=no-referrer>\
<title>Not paired</title><p>This pairing link cannot pair this browser: {}.</p>\
<p>Ask the owner for a new link (<code>soul pair DEVICE --format link</code> after bumping \
the device's <code>generation=</code>).</p>\n",
            escape(why)
        ),
    )
}

/// `303` to `to` with the session cookie set.
pub fn paired(to: &str, cookie: &str, value: &str, max_age: u64, secure: bool) -> Response<Body> {
    let mut r = page(StatusCode::SEE_OTHER, String::new());
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(to) {
        h.insert(header::LOCATION, v);
    }
    let secure = if secure { "; Secure" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{cookie}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{secure}"
    )) {
        h.insert(header::SET_COOKIE, v);
    }
    r
}

/// `303` to `to`, for a browser that is already paired.
pub fn onward(to: &str) -> Response<Body> {
    let mut r = page(StatusCode::SEE_OTHER, String::new());
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The `ticket` and `to` fields of a pairing post.
pub fn form(body: &[u8]) -> (Option<String>, String) {
    let mut ticket = None;
    let mut to = "/".to_string();
    for (k, v) in form_urlencoded::parse(body) {
        match k.as_ref() {
            "ticket" => ticket = Some(v.into_owned()),
            "to" => to = same_origin(&v),
            _ => {}
        }
    }
    (ticket, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_redirect_stays_on_the_gates_origin() {
        let t = |s: &str| target(&s.parse::<Uri>().unwrap());
        assert_eq!(t("//evil.example/?soul_ticket=x"), "/evil.example/");
        assert_eq!(t("/\\evil.example/?soul_ticket=x"), "/evil.example/");
        assert_eq!(t("/page?x=1&soul_ticket=y&z=2"), "/page?x=1&z=2");
        assert_eq!(t("/?soul_token=y"), "/");
        assert_eq!(same_origin("https://evil.example/"), "/");
        assert_eq!(same_origin("//evil.example/a"), "/evil.example/a");
        assert_eq!(same_origin("/a?b=c"), "/a?b=c");
        assert_eq!(same_origin("javascript:alert(1)"), "/");
        let (ticket, to) = form(b"ticket=alice.1.abc&to=%2F%2Fevil.example%2F");
        assert_eq!(ticket.as_deref(), Some("alice.1.abc"));
        assert_eq!(to, "/evil.example/");
    }

    #[test]
    fn the_pairing_page_escapes_what_it_echoes() {
        assert_eq!(
            escape("a\"><script>'&"),
            "a&quot;&gt;&lt;script&gt;&#39;&amp;"
        );
        let r = ticket_page("a\"><script>", "/x\"y");
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        let p = paired("/", "soul_home_notes", "v", 60, false);
        assert_eq!(
            p.headers()["set-cookie"],
            "soul_home_notes=v; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"
        );
    }
}
