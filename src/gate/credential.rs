//! soul's credentials on a request, and their removal before the app sees it. A client
//! presents one of: a pairing link's query (`soul_ticket`, or `soul_token` in links made
//! before tickets), an `Authorization: Bearer` header (the scheme in any case, RFC 9110
//! §11.1), or this sidecar's session cookie. Whatever it presents, the app gets none of them:
//! no bearer header, no `soul_*` cookie (this gate's or a sibling sidecar's), no `soul_*`
//! query parameter however it is spelled.

use http::{HeaderMap, HeaderValue, Request, Uri, header};

use crate::pairing::TICKET_PARAM;
use crate::secret::Secret;

/// The query parameter of pairing links made before tickets: the device token itself.
pub const TOKEN_PARAM: &str = "soul_token";
/// Every cookie soul sets starts with this.
const COOKIE_PREFIX: &str = "soul_";

/// What a request presents, in the order the gate looks: a link re-pairs even a browser that
/// holds an older session; a bearer header is a program's; the cookie is a browser's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    Ticket(Secret),
    LinkToken(Secret),
    Bearer(Secret),
    Session(Secret),
    Nothing,
}

/// The session cookie of one sidecar's gate. Cookies are scoped to a host, not a port, so
/// every sidecar (and every stack) on one host needs a name of its own; `_` cannot occur in
/// stack or sidecar names, so no two gates share one.
pub fn cookie_name(stack: &str, sidecar: Option<&str>) -> String {
    match sidecar {
        Some(s) => format!("{COOKIE_PREFIX}{stack}_{s}"),
        None => format!("{COOKIE_PREFIX}{stack}"),
    }
}

pub fn presented<B>(req: &Request<B>, cookie: &str) -> Presented {
    for (key, value) in query_pairs(req.uri()) {
        if key == TICKET_PARAM {
            return Presented::Ticket(value.into());
        }
        if key == TOKEN_PARAM {
            return Presented::LinkToken(value.into());
        }
    }
    if let Some(t) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
    {
        return Presented::Bearer(t.into());
    }
    session(req, cookie).map_or(Presented::Nothing, Presented::Session)
}

/// The value of this gate's session cookie, whatever else the request presents.
pub fn session<B>(req: &Request<B>, cookie: &str) -> Option<Secret> {
    cookies(req.headers())
        .find(|(name, _)| *name == cookie)
        .map(|(_, v)| v.into())
}

/// The credentials of `Authorization: Bearer <token>`, the scheme compared without case.
pub(super) fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie_pairs)
}

/// The query's pairs, decoded (so `soul%5Fticket` is `soul_ticket` too).
fn query_pairs(uri: &Uri) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
}

pub(super) use crate::proto::text;

/// The `name=value` pairs of one `Cookie` header's text, trimmed; pairs without `=` are not
/// cookies and are dropped.
pub(super) fn cookie_pairs(v: &str) -> impl Iterator<Item = (&str, &str)> {
    v.split(';')
        .filter_map(|c| c.trim().split_once('='))
        .map(|(n, v)| (n.trim(), v.trim()))
}

/// Whether a cookie is soul's (this gate's, or another gate's on the same host).
pub(super) fn is_soul_cookie(name: &str) -> bool {
    name.starts_with(COOKIE_PREFIX)
}

/// Whether one raw `key=value` of a query is soul's.
fn is_soul_param(raw: &str) -> bool {
    form_urlencoded::parse(raw.as_bytes())
        .next()
        .is_some_and(|(k, _)| k == TICKET_PARAM || k == TOKEN_PARAM)
}

/// The query without soul's parameters, the others exactly as sent; `None` when nothing is left.
pub fn query_without_soul(uri: &Uri) -> Option<String> {
    let kept: Vec<&str> = uri
        .query()?
        .split('&')
        .filter(|kv| !kv.is_empty() && !is_soul_param(kv))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Removes every soul credential from a request that is about to reach the app.
pub fn strip<B>(req: &mut Request<B>) {
    let headers = req.headers_mut();
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| bearer(v).is_some())
    {
        headers.remove(header::AUTHORIZATION);
    }
    let kept = super::policy::app_cookies(
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    headers.remove(header::COOKIE);
    if let Some(v) = kept.and_then(|k| HeaderValue::from_str(&k).ok()) {
        headers.insert(header::COOKIE, v);
    }
    if req.uri().query().is_some() {
        let path = req.uri().path();
        let pq = match query_without_soul(req.uri()) {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
}

pub use crate::proto::{Provenance, foreign, foreign_origin};

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_link_is_looked_at_before_a_bearer_header_and_the_cookie() {
        let cookie = cookie_name("home", Some("notes"));
        assert_eq!(cookie, "soul_home_notes");
        let both = [
            ("authorization", "Bearer tok"),
            ("cookie", "a=1; soul_home_notes=sess"),
        ];
        assert_eq!(
            presented(&req("/?soul_ticket=t1", &both), &cookie),
            Presented::Ticket("t1".into())
        );
        assert_eq!(
            presented(&req("/?x=1&soul%5Ftoken=old", &both), &cookie),
            Presented::LinkToken("old".into())
        );
        assert_eq!(
            presented(&req("/", &both), &cookie),
            Presented::Bearer("tok".into())
        );
        assert_eq!(
            presented(&req("/", &[("authorization", "bearer low")]), &cookie),
            Presented::Bearer("low".into()),
            "the scheme is case-insensitive"
        );
        assert_eq!(
            presented(&req("/", &[("cookie", "soul_home_notes=sess")]), &cookie),
            Presented::Session("sess".into())
        );
        assert_eq!(
            presented(&req("/", &[("cookie", "soul_home_photos=x")]), &cookie),
            Presented::Nothing,
            "a sibling's cookie is not this gate's"
        );
    }

    #[test]
    fn no_soul_credential_survives_strip() {
        let mut r = req(
            "/p?a=1&soul_token=T&soul%5Fticket=U&b=2",
            &[
                ("authorization", "BEARER T"),
                ("cookie", "app=1; soul_home_notes=S; soul_home_photos=P"),
                ("cookie", "soul_token=T; other=2"),
            ],
        );
        strip(&mut r);
        assert_eq!(r.uri().to_string(), "/p?a=1&b=2");
        assert!(r.headers().get("authorization").is_none());
        assert_eq!(r.headers()["cookie"], "app=1; other=2");
        let mut only = req("/?soul_ticket=U", &[("authorization", "Basic dTpw")]);
        strip(&mut only);
        assert_eq!(only.uri().to_string(), "/");
        assert_eq!(
            only.headers()["authorization"],
            "Basic dTpw",
            "the app's own"
        );
    }

    #[test]
    fn cross_origin_writes_and_upgrades_are_foreign() {
        let ws = |origin: &str| {
            req(
                "/ws",
                &[
                    ("host", "192.168.1.20:8443"),
                    ("upgrade", "websocket"),
                    ("origin", origin),
                ],
            )
        };
        assert!(!foreign_origin(&ws("http://192.168.1.20:8443"), false));
        assert!(
            foreign_origin(&ws("http://192.168.1.20:8444"), false),
            "another port"
        );
        assert!(foreign_origin(&ws("http://evil.example"), false));
        assert!(foreign_origin(&ws("null"), false));
        assert!(
            foreign_origin(&ws("https://192.168.1.20:8443"), false),
            "another scheme"
        );
        assert!(!foreign_origin(&ws("https://192.168.1.20:8443"), true));
        let default_port = req(
            "/",
            &[
                ("host", "pod.lan"),
                ("upgrade", "x"),
                ("origin", "http://pod.lan"),
            ],
        );
        assert!(!foreign_origin(&default_port, false));
        let post = Request::post("/save")
            .header("host", "h:1")
            .header("origin", "http://h:2")
            .body(())
            .unwrap();
        assert!(foreign_origin(&post, false));
        let metadata = |site: &str| {
            req(
                "/ws",
                &[
                    ("host", "h:1"),
                    ("upgrade", "websocket"),
                    ("origin", "null"),
                    ("sec-fetch-site", site),
                ],
            )
        };
        assert!(!foreign_origin(&metadata("same-origin"), false));
        assert!(
            foreign_origin(&metadata("same-site"), false),
            "another port, same site"
        );
        assert!(foreign_origin(&metadata("cross-site"), false));
        let get = req("/", &[("host", "h:1"), ("origin", "http://h:2")]);
        assert!(!foreign_origin(&get, false), "a plain GET changes nothing");
    }
}
