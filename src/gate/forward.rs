//! The full server's use of the gate's [`super::policy`] on a header map (RFC 9110 §7.6.1):
//! hop-by-hop headers end at the gate, both ways, and the forwarding headers the app gets say
//! what the gate itself saw, never what a client claimed.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// [`super::policy::HOP_BY_HOP`] as header names, made once.
static HOP_BY_HOP: std::sync::LazyLock<Vec<HeaderName>> = std::sync::LazyLock::new(|| {
    super::policy::HOP_BY_HOP
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect()
});

/// Drops hop-by-hop headers: those in [`HOP_BY_HOP`] and every header `Connection` names.
/// An upgrade keeps `Upgrade` and `Connection: upgrade`, which it needs on the next hop.
fn drop_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        // `Connection: keep-alive` (and `close`) names no header of its own.
        .filter(|n| !HOP_BY_HOP.contains(n))
        .collect();
    let kept_upgrade = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
    if let Some(u) = kept_upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A client's address as an `X-Forwarded-For` value.
pub fn client_address(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).expect("an IP address is a valid header value")
}

/// A request on its way to the app: no hop-by-hop headers, and `X-Forwarded-For` (`client`,
/// from [`client_address`]), `X-Forwarded-Proto` and `X-Forwarded-Host` set from the
/// connection the gate accepted.
pub fn request(headers: &mut HeaderMap, client: HeaderValue, tls: bool, upgrade: bool) {
    drop_hop_by_hop(headers, upgrade);
    let host = headers.get(header::HOST).cloned();
    for name in super::policy::FORWARDING {
        headers.remove(name);
    }
    for (name, value) in super::policy::forwarded(
        client.as_bytes(),
        tls,
        host.as_ref().map(HeaderValue::as_bytes),
    ) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
}

/// A response on its way to the client. A `101 Switching Protocols` keeps its upgrade headers.
pub fn response(headers: &mut HeaderMap, upgrade: bool) {
    drop_hop_by_hop(headers, upgrade);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_end_here_and_forwarding_is_what_the_gate_saw() {
        let mut h = map(&[
            ("host", "pod:8443"),
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=6.6.6.6"),
            ("accept", "*/*"),
        ]);
        request(
            &mut h,
            client_address("192.0.2.7".parse().unwrap()),
            false,
            false,
        );
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "proxy-authorization",
            "forwarded",
        ] {
            assert!(!names.contains(&gone), "{gone} reached the app: {names:?}");
        }
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "pod:8443");
        assert_eq!(h["accept"], "*/*");
    }

    #[test]
    fn an_upgrade_keeps_what_it_needs() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        request(
            &mut h,
            client_address("127.0.0.1".parse().unwrap()),
            true,
            true,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["x-forwarded-proto"], "https");
        let mut r = map(&[
            ("connection", "close"),
            ("keep-alive", "x"),
            ("content-type", "a"),
        ]);
        response(&mut r, false);
        assert_eq!(r.len(), 1);
    }
}
