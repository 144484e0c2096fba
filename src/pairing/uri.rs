//! The pairing URI v1 (STACK-FORMAT.md): one per (device, sidecar), carrying the reachable
//! addresses in the stack's transport order and the device's token.

use std::fmt;
use std::net::IpAddr;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

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

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // IPv6 hosts go in brackets; names and onion hosts as they are.
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => write!(f, "{}:[{v6}]:{}", self.transport.as_str(), self.port),
            _ => write!(f, "{}:{}:{}", self.transport.as_str(), self.host, self.port),
        }
    }
}

/// A pairing URI's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingUri<'a> {
    pub stack: &'a str,
    pub sidecar: &'a str,
    pub device: &'a str,
    pub addresses: &'a [Address],
    pub token: &'a str,
}

impl fmt::Display for PairingUri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let enc = |s: &str| utf8_percent_encode(s, QUERY_VALUE).to_string();
        write!(
            f,
            "soul://pair?v=1&stack={}&sidecar={}&device={}",
            enc(self.stack),
            enc(self.sidecar),
            enc(self.device)
        )?;
        for a in self.addresses {
            write!(f, "&addr={}", enc(&a.to_string()))?;
        }
        write!(f, "&token={}", enc(self.token))
    }
}

/// Links a browser can open from a pairing URI, one per address, best first:
/// `http://<host>:<port>/?soul_token=<token>`. The pod's gate trades the token for an HttpOnly
/// cookie and redirects to the same page without it.
pub fn browser_links(uri: &str) -> Vec<String> {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    let values = |key: &str| -> Vec<String> {
        query
            .split('&')
            .filter_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(|v| percent_decode_str(v).decode_utf8_lossy().into_owned())
            .collect()
    };
    let Some(token) = values("token").pop() else {
        return Vec::new();
    };
    values("addr")
        .iter()
        .filter_map(|a| a.split_once(':'))
        .map(|(_, host_port)| format!("http://{host_port}/?soul_token={token}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_of_the_contract() {
        let addrs = [
            Address {
                transport: TransportKind::Lan,
                host: "192.168.1.20".into(),
                port: 8443,
            },
            Address {
                transport: TransportKind::Tailscale,
                host: "fd7a:115c::1".into(),
                port: 443,
            },
            Address {
                transport: TransportKind::Tor,
                host: "abc.onion".into(),
                port: 80,
            },
        ];
        let uri = PairingUri {
            stack: "home",
            sidecar: "notes",
            device: "alice-phone",
            addresses: &addrs,
            token: "a.b-c_d.e",
        }
        .to_string();
        assert_eq!(
            uri,
            "soul://pair?v=1&stack=home&sidecar=notes&device=alice-phone&addr=lan:192.168.1.20:8443&addr=tailscale:%5Bfd7a:115c::1%5D:443&addr=tor:abc.onion:80&token=a.b-c_d.e"
        );
        assert_eq!(
            browser_links(&uri),
            [
                "http://192.168.1.20:8443/?soul_token=a.b-c_d.e",
                "http://[fd7a:115c::1]:443/?soul_token=a.b-c_d.e",
                "http://abc.onion:80/?soul_token=a.b-c_d.e",
            ]
        );
        assert!(browser_links("soul://pair?v=1&addr=lan:h:1").is_empty());
    }
}
