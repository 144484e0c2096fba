//! The pairing URI v1 (STACK-FORMAT.md): one per (device, sidecar), carrying the reachable
//! addresses in the stack's transport order and the device's token.

use std::fmt;
use std::net::IpAddr;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::stack::TransportKind;

/// Query-value characters that must be escaped; `:` stays readable (RFC 3986 allows it).
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Where a client can reach a pod: `<transport>:<host>:<port>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Address {
    pub transport: TransportKind,
    pub host: String,
    pub port: u16,
}

impl Address {
    pub fn new(transport: TransportKind, host: impl Into<String>, port: u16) -> Address {
        Address {
            transport,
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // IPv6 hosts go in brackets; names and onion hosts as they are.
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => write!(f, "{}:[{v6}]:{}", self.transport.as_str(), self.port),
            _ => write!(f, "{}:{}:{}", self.transport.as_str(), self.host, self.port),
        }
    }
}

/// What both forms of a pairing code say besides their secret: whose code it is, where the pod
/// is reached, and the gate's key pin. Its `Display` is the shared part,
/// `v=1&stack=…&sidecar=…&device=…&addr=…&pin=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeFields<'a> {
    pub stack: &'a str,
    pub sidecar: &'a str,
    pub device: &'a str,
    /// In the stack's transport order.
    pub addresses: &'a [Address],
    /// The gate's public key pin, `sha256//<base64>` (see [`crate::tls`]).
    pub pin: &'a str,
}

impl fmt::Display for CodeFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v=1&stack={}&sidecar={}&device={}",
            enc(self.stack),
            enc(self.sidecar),
            enc(self.device)
        )?;
        for a in self.addresses {
            write!(f, "&addr={}", enc(&a.to_string()))?;
        }
        write!(f, "&pin={}", enc(self.pin))
    }
}

/// The pairing URI. Its `Debug` leaves the token out; its `Display` is the URI itself, token and
/// all, which soul writes only into the device's artifacts.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingUri<'a> {
    pub fields: CodeFields<'a>,
    pub token: &'a str,
}

impl fmt::Debug for PairingUri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingUri")
            .field("fields", &self.fields)
            .field("token", &crate::secret::Secret::default())
            .finish()
    }
}

impl fmt::Display for PairingUri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "soul://pair?{}&token={}", self.fields, enc(self.token))
    }
}

/// The pairing link: what the QR code holds. A phone camera opens it in the browser at the
/// first address a browser reaches; the gate redeems its ticket once for a browser session; its
/// fragment, which browsers never send, carries what a soul client needs besides the token
/// (docs/pairing.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingLink<'a> {
    /// At least one address, or a public name: the link opens the first a browser reaches.
    pub fields: CodeFields<'a>,
    pub ticket: &'a str,
    /// The sidecar's public HTTPS name (`relay … public=#true`): the link opens
    /// `https://<name>/`, one origin on every network, instead of the best LAN address.
    pub public: Option<&'a str>,
    /// Without a public name, the transport whose address the link opens
    /// (`transport { browser "…" }`); `None`: the first a browser reaches, the LAN by default.
    pub browser: Option<TransportKind>,
}

impl fmt::Display for PairingLink<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match self.public {
            Some(name) => format!("https://{name}"),
            None => super::payload::browser_address(self.fields.addresses, self.browser)
                .map(Address::http_origin)
                .unwrap_or_else(|| "http://localhost".into()),
        };
        let ticket = super::ticket::TICKET_PARAM;
        write!(f, "{origin}/?{ticket}={}#{}", enc(self.ticket), self.fields)
    }
}

/// A value as the payload writes it.
fn enc(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// The link a browser opens at a sidecar's public name: `https://<name>/?soul_ticket=<ticket>`.
pub fn public_link(name: &str, ticket: &str) -> String {
    let ticket = utf8_percent_encode(ticket, QUERY_VALUE);
    format!("https://{name}/?{}={ticket}", super::ticket::TICKET_PARAM)
}

/// Links a browser can open, one per address, best first:
/// `http://<host>:<port>/?soul_ticket=<ticket>`. The pod's gate redeems the ticket once for a
/// browser session of that sidecar; the device token itself never goes into a browser.
pub fn browser_links(addresses: &[Address], ticket: &str) -> Vec<String> {
    let ticket = utf8_percent_encode(ticket, QUERY_VALUE);
    addresses
        .iter()
        .map(|a| {
            let host = match a.host.parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
                _ => a.host.clone(),
            };
            format!(
                "http://{host}:{}/?{}={ticket}",
                a.port,
                super::ticket::TICKET_PARAM
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PairingUri` derived `Debug`, and with it printed the device's token.
    #[test]
    fn a_pairing_uri_debug_print_leaves_the_token_out() {
        let uri = PairingUri {
            fields: CodeFields {
                stack: "home",
                sidecar: "notes",
                device: "alice",
                addresses: &[],
                pin: "sha256//AAAA",
            },
            token: "eyJ.secret.token",
        };
        let shown = format!("{uri:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("[redacted]"),
            "{shown}"
        );
        assert!(uri.to_string().contains("eyJ.secret.token"));
    }

    #[test]
    fn format_of_the_contract() {
        let addrs = [
            Address::new(TransportKind::Lan, "192.168.1.20", 8443),
            Address::new(TransportKind::Tailscale, "fd7a:115c::1", 443),
            Address::new(TransportKind::Tor, "abc.onion", 80),
        ];
        let uri = PairingUri {
            fields: CodeFields {
                stack: "home",
                sidecar: "notes",
                device: "alice-phone",
                addresses: &addrs,
                pin: "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=",
            },
            token: "a.b-c_d.e",
        }
        .to_string();
        assert_eq!(
            uri,
            "soul://pair?v=1&stack=home&sidecar=notes&device=alice-phone&addr=lan:192.168.1.20:8443&addr=tailscale:%5Bfd7a:115c::1%5D:443&addr=tor:abc.onion:80&pin=sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE%3D&token=a.b-c_d.e"
        );
        assert_eq!(
            browser_links(&addrs, "alice-phone.1.x_y-z"),
            [
                "http://192.168.1.20:8443/?soul_ticket=alice-phone.1.x_y-z",
                "http://[fd7a:115c::1]:443/?soul_ticket=alice-phone.1.x_y-z",
                "http://abc.onion:80/?soul_ticket=alice-phone.1.x_y-z",
            ]
        );
        assert!(browser_links(&[], "t").is_empty());
    }
}
