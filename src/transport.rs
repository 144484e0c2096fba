//! Transports: how a client reaches each pod, and how their current addresses are found.
//! For now the LAN (this host's address, or `lan address=`) and the relay endpoint; the
//! overlay drivers add theirs through the same [`addresses`] path.

use std::net::{IpAddr, UdpSocket};

use crate::pairing::Address;
use crate::stack::{Stack, TransportKind};

/// This host's primary non-loopback address: the source address the kernel would use for
/// the default route. A UDP `connect` only consults the routing table; no packet is sent.
pub fn discover_lan_address() -> Option<IpAddr> {
    let probe = |bind: &str, target: &str| {
        let s = UdpSocket::bind(bind).ok()?;
        s.connect(target).ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    };
    // Documentation prefixes (RFC 5737, RFC 3849): a route lookup, never a destination.
    probe("0.0.0.0:0", "198.51.100.1:9").or_else(|| probe("[::]:0", "[2001:db8::1]:9"))
}

/// The LAN host to advertise: `lan address=` when set, else the discovered address.
pub fn lan_host(stack: &Stack) -> Option<String> {
    stack
        .transport
        .as_ref()
        .and_then(|t| t.lan.as_ref())
        .and_then(|l| l.address.clone())
        .or_else(|| discover_lan_address().map(|ip| ip.to_string()))
}

/// Every sidecar's known addresses, in the stack's transport order. Transports whose address
/// is not known (yet) are left out.
pub fn addresses(stack: &Stack, lan_host: Option<&str>) -> Vec<Vec<Address>> {
    let lan_ports = stack.lan_ports();
    let relay = stack.relay.as_ref().and_then(|r| {
        let (host, port) = r.endpoint.rsplit_once(':')?;
        Some((host.to_string(), port.parse::<u16>().ok()?))
    });
    stack
        .sidecars
        .iter()
        .enumerate()
        .map(|(i, _)| {
            stack
                .transport_order()
                .into_iter()
                .filter_map(|kind| match kind {
                    TransportKind::Lan => Some(Address {
                        transport: kind,
                        host: lan_host?.to_string(),
                        port: lan_ports.as_ref()?[i],
                    }),
                    TransportKind::Relay => relay.as_ref().map(|(h, p)| Address {
                        transport: kind,
                        host: h.clone(),
                        port: *p,
                    }),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_order_and_the_lan_ports() {
        let stack = crate::stack::parse(
            "s",
            "stack \"h\"\nsidecar \"a\" { image \"i\"; port 1; }\nsidecar \"b\" { image \"i\"; port 1; }\ntransport { order \"relay\" \"lan\"; lan port=9000 address=\"10.0.0.5\"; }\nrelay \"r.example:7000\"\n",
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let host = lan_host(&stack);
        assert_eq!(host.as_deref(), Some("10.0.0.5"));
        let a = addresses(&stack, host.as_deref());
        let text: Vec<Vec<String>> = a
            .iter()
            .map(|v| v.iter().map(|x| x.to_string()).collect())
            .collect();
        assert_eq!(
            text,
            vec![
                vec![
                    "relay:r.example:7000".to_string(),
                    "lan:10.0.0.5:9000".into()
                ],
                vec![
                    "relay:r.example:7000".to_string(),
                    "lan:10.0.0.5:9001".into()
                ],
            ]
        );
        assert!(
            addresses(&stack, None)[0]
                .iter()
                .all(|x| x.transport != TransportKind::Lan)
        );
    }
}
