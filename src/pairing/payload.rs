//! Reading a pairing code, whichever form soul printed it in (docs/pairing.md):
//!
//! - the **pairing link**, what the QR code holds: `http://<best address>/?soul_ticket=<ticket>`
//!   `#v=1&stack=…&sidecar=…&device=…&addr=…&pin=…`. A phone camera opens it in the browser,
//!   which sends only the path and query to the gate (the ticket pairs that browser, once); the
//!   fragment, which browsers never send, tells a soul client every address and the pin;
//! - the **pairing URI**, `soul://pair?v=1&stack=…&sidecar=…&device=…&addr=…&pin=…&token=…`,
//!   which also carries the device token (`soul pair --format uri`, the `.uri` file): for apps
//!   that read it from a file or a terminal, never from a browser.
//!
//! Both carry the same fields in the same `key=value&…` form, percent-encoded.

use std::net::IpAddr;

use crate::secret::Secret;
use crate::stack::{TransportKind, is_name};

use super::ticket::TICKET_PARAM;
use super::uri::Address;

/// The payload version this soul prints and reads.
pub const VERSION: u32 = 1;

/// A pairing code's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub stack: String,
    pub sidecar: String,
    pub device: String,
    /// In the stack's transport order.
    pub addresses: Vec<Address>,
    /// The gate's key pin, `sha256//<base64>`; absent in codes soul printed before TLS.
    pub pin: Option<String>,
    /// The device token (the pairing URI only).
    pub token: Option<Secret>,
    /// The single-use browser ticket (the pairing link only).
    pub ticket: Option<Secret>,
}

/// Why a text is not a pairing code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("not a pairing code: expected soul://pair?… or a pairing link http(s)://…#v=1&…")]
    NotACode,
    #[error("pairing code version {0} is newer than this soul reads ({VERSION}): update soul")]
    Version(String),
    #[error("the pairing code has no `{0}`")]
    Missing(&'static str),
    #[error("the pairing code's `{key}` is repeated")]
    Repeated { key: String },
    #[error("the pairing code's address `{0}` is not <transport>:<host>:<port>")]
    Address(String),
    #[error("the pairing code's pin `{0}` is not sha256//<base64 of 32 bytes>")]
    Pin(String),
    #[error(
        "the pairing code's {field} `{value}` is not a name soul makes (a lower-case letter, then up to 31 letters, digits or `-`): refused, it may be crafted to write elsewhere"
    )]
    Name { field: &'static str, value: String },
}

impl Payload {
    /// Reads a pairing link or a pairing URI.
    pub fn parse(text: &str) -> Result<Payload, PayloadError> {
        let text = text.trim();
        if let Some(query) = text.strip_prefix("soul://pair?") {
            return Payload::from_fields(query, None);
        }
        let is_link = text.starts_with("http://") || text.starts_with("https://");
        let (Some((link, fragment)), true) = (text.split_once('#'), is_link) else {
            return Err(PayloadError::NotACode);
        };
        let ticket = link
            .split_once('?')
            .and_then(|(_, query)| {
                form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == TICKET_PARAM)
            })
            .map(|(_, v)| Secret::new(v.into_owned()));
        Payload::from_fields(fragment, ticket)
    }

    fn from_fields(fields: &str, ticket: Option<Secret>) -> Result<Payload, PayloadError> {
        let mut version = None;
        let (mut stack, mut sidecar, mut device, mut pin, mut token) =
            (None, None, None, None, None);
        let mut addresses = Vec::new();
        for (key, value) in form_urlencoded::parse(fields.as_bytes()) {
            let value = value.into_owned();
            let slot = match key.as_ref() {
                "v" => &mut version,
                "stack" => &mut stack,
                "sidecar" => &mut sidecar,
                "device" => &mut device,
                "pin" => &mut pin,
                "token" => &mut token,
                "addr" => {
                    // An address of a transport this reader does not know (a later soul's)
                    // is skipped, like an unknown field: the rest of the code still works.
                    if !unknown_transport(&value) {
                        addresses.push(Address::parse(&value)?);
                    }
                    continue;
                }
                // Fields a later version adds are skipped, as the contract promises.
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(PayloadError::Repeated {
                    key: key.into_owned(),
                });
            }
        }
        match version.as_deref() {
            Some("1") => {}
            Some(v) => return Err(PayloadError::Version(v.to_string())),
            None => return Err(PayloadError::Missing("v")),
        }
        if let Some(pin) = &pin
            && !is_pin(pin)
        {
            return Err(PayloadError::Pin(pin.clone()));
        }
        // Names become parts of file names where a client stores the pairing: only what
        // stack.kdl allows.
        let name = |field: &'static str, value: Option<String>| {
            let value = value.ok_or(PayloadError::Missing(field))?;
            if is_name(&value) {
                Ok(value)
            } else {
                Err(PayloadError::Name { field, value })
            }
        };
        Ok(Payload {
            stack: name("stack", stack)?,
            sidecar: name("sidecar", sidecar)?,
            device: name("device", device)?,
            addresses,
            pin,
            token: token.map(Secret::new),
            ticket,
        })
    }
}

/// Whether `addr` is well formed (`<transport>:<host>:<port>`, the transport a name of
/// lower-case letters, digits and `-`) but names a transport this reader does not know.
fn unknown_transport(addr: &str) -> bool {
    let Some((transport, rest)) = addr.split_once(':') else {
        return false;
    };
    let well_formed = transport.starts_with(|c: char| c.is_ascii_lowercase())
        && transport
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    well_formed && !TransportKind::ALL.iter().any(|k| k.as_str() == transport)
}

/// `sha256//` and the standard base64 of 32 bytes.
fn is_pin(pin: &str) -> bool {
    use base64::Engine as _;
    pin.strip_prefix("sha256//").is_some_and(|b64| {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .is_ok_and(|bytes| bytes.len() == 32)
    })
}

impl Address {
    /// `<transport>:<host>:<port>`, an IPv6 host in brackets.
    pub fn parse(text: &str) -> Result<Address, PayloadError> {
        let bad = || PayloadError::Address(text.to_string());
        let (transport, rest) = text.split_once(':').ok_or_else(bad)?;
        let transport = TransportKind::ALL
            .into_iter()
            .find(|k| k.as_str() == transport)
            .ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6.to_string(),
            Some(_) => return Err(bad()),
            None if host.contains(':') || host.is_empty() => return Err(bad()),
            None => host.to_string(),
        };
        // `0.0.0.0` and `::` name no host: a client would dial itself.
        if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
            return Err(bad());
        }
        Ok(Address {
            transport,
            host,
            port,
        })
    }

    /// This address as a browser opens it: `http://host:port` (IPv6 in brackets).
    pub fn http_origin(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("http://[{v6}]:{}", self.port),
            _ => format!("http://{}:{}", self.host, self.port),
        }
    }
}

/// The address a phone's browser should open: the first of the transport the owner chose
/// (`transport { browser "tailscale" }`) when it has one; else the first, in the stack's order,
/// that a browser reaches (not the relay, which carries only soul clients, nor an onion address,
/// which only Tor Browser opens); else the first.
pub fn browser_address(addresses: &[Address], chosen: Option<TransportKind>) -> Option<&Address> {
    chosen
        .and_then(|kind| addresses.iter().find(|a| a.transport == kind))
        .or_else(|| {
            addresses
                .iter()
                .find(|a| !matches!(a.transport, TransportKind::Relay | TransportKind::Tor))
        })
        .or_else(|| addresses.first())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairing::uri::{CodeFields, PairingLink, PairingUri};
    use proptest::prelude::*;

    const PIN: &str = "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=";

    fn addresses() -> Vec<Address> {
        vec![
            Address::new(TransportKind::Lan, "192.168.1.20", 8443),
            Address::new(TransportKind::Tailscale, "fd7a:115c::1", 443),
            Address::new(TransportKind::Relay, "relay.example.com", 7000),
        ]
    }

    #[test]
    fn both_forms_soul_prints_read_back() {
        let addrs = addresses();
        let fields = CodeFields {
            stack: "home",
            sidecar: "notes",
            device: "alice-phone",
            addresses: &addrs,
            pin: PIN,
        };
        let uri = PairingUri {
            fields,
            token: "a.b-c_d.e",
        }
        .to_string();
        let read = Payload::parse(&uri).unwrap();
        assert_eq!(read.addresses, addrs);
        assert_eq!(read.token.as_ref().map(Secret::expose), Some("a.b-c_d.e"));
        assert_eq!(read.pin.as_deref(), Some(PIN));
        let link = PairingLink {
            fields,
            ticket: "alice-phone.1.x_y-z",
            public: None,
            browser: None,
        }
        .to_string();
        assert!(link.starts_with("http://192.168.1.20:8443/?soul_ticket=alice-phone.1.x_y-z#v=1&"));
        let read = Payload::parse(&link).unwrap();
        assert_eq!(
            read.ticket.as_ref().map(Secret::expose),
            Some("alice-phone.1.x_y-z")
        );
        assert_eq!(read.token, None, "a link never carries the token");
        assert_eq!(
            (read.stack.as_str(), read.device.as_str()),
            ("home", "alice-phone")
        );
        assert_eq!(read.addresses, addrs);
    }

    #[test]
    fn malformed_codes_are_refused_with_the_reason() {
        let cases = [
            ("https://example.com/", PayloadError::NotACode),
            ("soul://other?v=1", PayloadError::NotACode),
            (
                "soul://pair?stack=a&sidecar=b&device=c",
                PayloadError::Missing("v"),
            ),
            (
                "soul://pair?v=2&stack=a&sidecar=b&device=c",
                PayloadError::Version("2".into()),
            ),
            (
                "soul://pair?v=1&sidecar=b&device=c",
                PayloadError::Missing("stack"),
            ),
            (
                "soul://pair?v=1&stack=a&stack=z&sidecar=b&device=c",
                PayloadError::Repeated {
                    key: "stack".into(),
                },
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=lan:1.2.3.4",
                PayloadError::Address("lan:1.2.3.4".into()),
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=Carrier_Pigeon:x:1",
                PayloadError::Address("Carrier_Pigeon:x:1".into()),
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=carrier-pigeon:x",
                PayloadError::Address("carrier-pigeon:x".into()),
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=lan:fd7a::1:80",
                PayloadError::Address("lan:fd7a::1:80".into()),
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&pin=sha1//abc",
                PayloadError::Pin("sha1//abc".into()),
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=lan:0.0.0.0:80",
                PayloadError::Address("lan:0.0.0.0:80".into()),
            ),
            (
                "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=lan:[::]:80",
                PayloadError::Address("lan:[::]:80".into()),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(Payload::parse(text), Err(expected), "{text}");
        }
        // What a later version adds is skipped: a field, or an address of a transport this
        // reader does not know (the others still count).
        assert!(Payload::parse("soul://pair?v=1&stack=a&sidecar=b&device=c&new=1").is_ok());
        let p = Payload::parse(
            "soul://pair?v=1&stack=a&sidecar=b&device=c&addr=carrier-pigeon:x:1&addr=lan:10.0.0.2:8443",
        )
        .unwrap();
        assert_eq!(
            p.addresses,
            vec![Address::new(TransportKind::Lan, "10.0.0.2", 8443)]
        );
    }

    /// `soul connect` once stored a pairing at a path built from the code's names:
    /// `stack=%2Fsome%2Fdir%2F&sidecar=%2F&device=%2Fvictim` wrote `/some/dir/victim.json`.
    #[test]
    fn names_in_a_code_that_could_leave_the_pairings_directory_are_refused() {
        for (field, value) in [
            ("stack", "%2Fsome%2Fdir%2F"),
            ("sidecar", "%2F"),
            ("device", "..%2F..%2Fvictim"),
            ("device", "Alice"),
            ("stack", "a.b"),
            ("device", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        ] {
            let mut fields = vec![("stack", "home"), ("sidecar", "notes"), ("device", "phone")];
            for f in &mut fields {
                if f.0 == field {
                    f.1 = value;
                }
            }
            let code = format!(
                "soul://pair?v=1&{}",
                fields
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
            );
            assert!(
                matches!(Payload::parse(&code), Err(PayloadError::Name { field: f, .. }) if f == field),
                "{code}: {:?}",
                Payload::parse(&code)
            );
        }
    }

    #[test]
    fn the_browser_opens_the_first_address_a_browser_reaches() {
        let mut addrs = addresses();
        addrs.rotate_left(2); // relay first
        assert_eq!(
            browser_address(&addrs, None).unwrap().transport,
            TransportKind::Lan
        );
        assert_eq!(browser_address(&[], None), None);
    }

    #[test]
    fn the_browser_opens_the_transport_its_owner_chose_and_the_default_while_that_has_no_address() {
        let addrs = addresses();
        assert_eq!(
            browser_address(&addrs, Some(TransportKind::Tailscale))
                .unwrap()
                .transport,
            TransportKind::Tailscale
        );
        // The tailnet address is not known yet (the node has not joined): the LAN, as before.
        let lan_and_relay = [addrs[0].clone(), addrs[2].clone()];
        assert_eq!(
            browser_address(&lan_and_relay, Some(TransportKind::Tailscale))
                .unwrap()
                .transport,
            TransportKind::Lan
        );
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,20}"
    }

    fn address() -> impl Strategy<Value = Address> {
        let host = prop_oneof![
            "[a-z][a-z0-9.-]{0,30}",
            any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
            any::<[u16; 8]>().prop_map(|s| std::net::Ipv6Addr::from(s).to_string()),
        ];
        (0..TransportKind::ALL.len(), host, any::<u16>()).prop_map(|(k, host, port)| Address {
            transport: TransportKind::ALL[k],
            host,
            port,
        })
    }

    proptest! {
        /// Whatever soul prints, it reads back as it was.
        #[test]
        fn print_then_parse_round_trips(
            stack in name(),
            sidecar in name(),
            device in name(),
            addrs in prop::collection::vec(address(), 1..5),
            token in "[A-Za-z0-9._-]{1,300}",
            ticket in "[A-Za-z0-9._-]{1,60}",
            pin_bytes in any::<[u8; 32]>(),
        ) {
            let pin = crate::tls::pin_of_spki(&pin_bytes);
            let fields = CodeFields {
                stack: &stack, sidecar: &sidecar, device: &device, addresses: &addrs, pin: &pin,
            };
            let uri = PairingUri { fields, token: &token }.to_string();
            let read = Payload::parse(&uri).unwrap();
            prop_assert_eq!(&read.addresses, &addrs);
            prop_assert_eq!((&read.stack, &read.sidecar, &read.device), (&stack, &sidecar, &device));
            prop_assert_eq!(read.token.as_ref().map(Secret::expose), Some(token.as_str()));
            prop_assert!(read.pin.is_some());
            let link = PairingLink {
                fields,
                ticket: &ticket,
                public: None,
                browser: None,
            }.to_string();
            let read = Payload::parse(&link).unwrap();
            prop_assert_eq!(&read.addresses, &addrs);
            prop_assert_eq!(read.ticket.as_ref().map(Secret::expose), Some(ticket.as_str()));
            prop_assert_eq!(read.pin.as_deref(), Some(pin.as_str()));
        }
    }
}
