//! The gate's policy on what passes between a client and the app, written once for both of its
//! HTTP engines (the fast [`super::lane`] and the full server): which headers are hop-by-hop
//! and end at the gate, which forwarding headers a client could forge and never reach the app,
//! what the app is told instead, which cookies are the app's, and which queries might carry
//! soul's parameters. The engines parse and frame; what they forward is decided here.

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the
/// proxy-only ones a client may send to the wrong hop), lower-case.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwarding headers a client could forge, lower-case: never passed on.
pub const FORWARDING: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// What the app is told of the client's connection, from what the gate itself saw: the
/// client's address, whether the gate terminated TLS, and the `Host` it was sent.
pub fn forwarded<'a>(
    client: &'a [u8],
    tls: bool,
    host: Option<&'a [u8]>,
) -> impl Iterator<Item = (&'static str, &'a [u8])> {
    let proto: &[u8] = if tls { b"https" } else { b"http" };
    [
        Some(("x-forwarded-for", client)),
        Some(("x-forwarded-proto", proto)),
        host.map(|h| ("x-forwarded-host", h)),
    ]
    .into_iter()
    .flatten()
}

/// The `Cookie` header the app gets from the client's `Cookie` headers' text: its own cookies,
/// in order, without any of soul's (this gate's or a sibling's); `None` when none is left.
pub fn app_cookies<'a>(values: impl Iterator<Item = &'a str>) -> Option<String> {
    let kept: Vec<String> = values
        .flat_map(super::credential::cookie_pairs)
        .filter(|(name, _)| !super::credential::is_soul_cookie(name))
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// Whether a query might carry one of soul's parameters, however it is spelled (any
/// `soul`, or any %-escape): only the full server, which decodes it, may forward it.
pub fn query_may_be_souls(query: &str) -> bool {
    query.contains('%')
        || query
            .as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"soul"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_gets_its_own_cookies_and_what_the_gate_saw() {
        assert_eq!(
            app_cookies(
                [
                    "theme=dark; soul_home_notes=x.1.2",
                    "soul_home_wiki=y; lang=en"
                ]
                .into_iter()
            ),
            Some("theme=dark; lang=en".into())
        );
        assert_eq!(app_cookies(["soul_a=1"].into_iter()), None);
        let told: Vec<_> = forwarded(b"192.0.2.7", true, Some(b"h:1")).collect();
        assert_eq!(
            told,
            [
                ("x-forwarded-for", &b"192.0.2.7"[..]),
                ("x-forwarded-proto", b"https"),
                ("x-forwarded-host", b"h:1")
            ]
        );
        assert!(query_may_be_souls("a=1&SOUL_ticket=2") && query_may_be_souls("x=%41"));
        assert!(!query_may_be_souls("page=2&sort=asc"));
    }
}
