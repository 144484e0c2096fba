//! The LAN: this host's address (or `lan address=`) and a published port per sidecar. It needs
//! no container of its own: the pause container publishes the port, which leads to the gate.

use std::net::{IpAddr, UdpSocket};

use crate::stack::Stack;

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
