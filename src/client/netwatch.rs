//! Network changes, as the kernel announces them: a netlink route socket subscribed to link,
//! address and route events (IPv4 and IPv6), each read as what it changed ([`Change`]). Whether
//! a burst of them can change this client's path, [`Paths::moved`] tells: a route towards one
//! of the pairing's addresses or a default route, an address in the subnet the client sends
//! from, or the kernel's choice of source address towards any of them. A Docker bridge coming
//! and going changes none of these, and the client does not re-choose. No polling.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SocketType};
use tokio::sync::mpsc;

/// `RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR |
/// RTMGRP_IPV6_ROUTE` (linux/rtnetlink.h).
const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

/// What one netlink message changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A link came, went, or went up or down.
    Link,
    /// An address (with its prefix length) was added to or removed from an interface.
    Address { ip: IpAddr, prefix: u8 },
    /// A route to `dst`/`len` was added or removed (`dst` none: a default route).
    Route { dst: Option<IpAddr>, len: u8 },
    /// A message soul does not read.
    Other,
}

/// The kernel's network changes, as they come. `None` when this system gives no netlink
/// socket: then the client relies on failures and probes alone.
pub fn changes() -> Option<mpsc::UnboundedReceiver<Vec<Change>>> {
    // No protocol: NETLINK_ROUTE.
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None).ok()?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, GROUPS)).ok()?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("netwatch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            // Blocks in the kernel between events; ends when nobody listens any more.
            while let Ok((n, _)) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
                if tx.send(parse(&buf[..n.min(buf.len())])).is_err() {
                    return;
                }
            }
        })
        .ok()?;
    Some(rx)
}

/// The messages of one netlink datagram.
pub fn parse(mut datagram: &[u8]) -> Vec<Change> {
    let mut out = Vec::new();
    while datagram.len() >= 16 {
        let len = u32::from_ne_bytes(datagram[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(datagram[4..6].try_into().expect("2 bytes"));
        if len < 16 || len > datagram.len() {
            break;
        }
        out.push(message(kind, &datagram[16..len]));
        datagram = &datagram[align(len).min(datagram.len())..];
    }
    out
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One message's body: `RTM_NEWLINK`/`DELLINK` (16, 17), `RTM_NEWADDR`/`DELADDR` (20, 21),
/// `RTM_NEWROUTE`/`DELROUTE` (24, 25).
fn message(kind: u16, body: &[u8]) -> Change {
    match kind {
        16 | 17 => Change::Link,
        // struct ifaddrmsg { family, prefixlen, flags, scope: u8; index: u32 }; then
        // attributes, IFA_ADDRESS = 1, IFA_LOCAL = 2.
        20 | 21 if body.len() >= 8 => {
            let (family, prefix) = (body[0], body[1]);
            let ip = attributes(&body[8..])
                .find(|(t, _)| *t == 2)
                .or_else(|| attributes(&body[8..]).find(|(t, _)| *t == 1))
                .and_then(|(_, v)| ip_of(family, v));
            ip.map_or(Change::Other, |ip| Change::Address { ip, prefix })
        }
        // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type: u8;
        // flags: u32 }; then attributes, RTA_DST = 1.
        24 | 25 if body.len() >= 12 => {
            let (family, len) = (body[0], body[1]);
            let dst = attributes(&body[12..])
                .find(|(t, _)| *t == 1)
                .and_then(|(_, v)| ip_of(family, v));
            Change::Route { dst, len }
        }
        _ => Change::Other,
    }
}

/// The `(type, value)` attributes of a message body (struct rtattr { len, type: u16 }).
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]);
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[align(len).min(b.len())..];
        Some((kind, value))
    })
}

/// An address of family `AF_INET` (2) or `AF_INET6` (10).
fn ip_of(family: u8, v: &[u8]) -> Option<IpAddr> {
    match (family, v.len()) {
        (2, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        (10, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    }
}

/// The paths this client could take: towards each of the pairing's addresses (the literal
/// ones) and towards the internet at large, the source address the kernel would send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    targets: Vec<IpAddr>,
    sources: Vec<Option<IpAddr>>,
}

/// Documentation addresses (RFC 5737, RFC 3849): routed by the default routes, never sent to.
const DEFAULTS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
];

impl Paths {
    /// The paths now, asked of the kernel with a UDP socket's `connect`, which sends nothing.
    pub fn now(targets: &[IpAddr]) -> Paths {
        let sources = targets
            .iter()
            .chain(&DEFAULTS)
            .map(|ip| source(*ip))
            .collect();
        Paths {
            targets: targets.to_vec(),
            sources,
        }
    }

    /// Whether `changes` (a burst of them) can have moved a path: the kernel now sends from
    /// another address, or one of them touched a route to a target or a default route, or an
    /// address in a subnet the client sends from.
    pub fn moved(&self, now: &Paths, changes: &[Change]) -> bool {
        if self.sources != now.sources {
            return true;
        }
        changes.iter().any(|c| match c {
            Change::Route { dst: None, .. } => true,
            Change::Route {
                dst: Some(dst),
                len,
            } => *len == 0 || self.targets.iter().any(|t| within(*t, *dst, *len)),
            Change::Address { ip, prefix } => self
                .sources
                .iter()
                .flatten()
                .any(|s| within(*s, *ip, *prefix)),
            Change::Link | Change::Other => false,
        })
    }
}

/// Whether `ip` is in `net`/`len`.
fn within(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let bits = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32u8),
        IpAddr::V6(v6) => (u128::from(v6), 128u8),
    };
    let ((a, wa), (b, wb)) = (bits(ip), bits(net));
    if wa != wb {
        return false;
    }
    let len = u32::from(len.min(wa));
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    a & mask == b & mask
}

fn source(ip: IpAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect((ip, 9)).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// `soul connect` logged "the network changed" 211 times in 6 minutes on a host whose
    /// Docker made and removed bridges.
    #[test]
    fn a_docker_bridge_coming_and_going_moves_no_path() {
        let before = Paths {
            targets: vec![ip("192.168.1.20"), ip("203.0.113.7")],
            sources: vec![Some(ip("192.168.1.5")), Some(ip("192.168.1.5")), None, None],
        };
        let bridge = [
            Change::Link,
            Change::Address {
                ip: ip("172.18.0.1"),
                prefix: 16,
            },
            Change::Route {
                dst: Some(ip("172.18.0.0")),
                len: 16,
            },
            Change::Other,
        ];
        assert!(!before.moved(&before, &bridge));
        // What does move it: another source, a route to a target or a default route, an
        // address in the subnet the client sends from.
        let mut elsewhere = before.clone();
        elsewhere.sources[0] = Some(ip("10.0.0.9"));
        assert!(before.moved(&elsewhere, &[]));
        for change in [
            Change::Route { dst: None, len: 0 },
            Change::Route {
                dst: Some(ip("192.168.1.0")),
                len: 24,
            },
            Change::Address {
                ip: ip("192.168.1.77"),
                prefix: 24,
            },
        ] {
            assert!(
                before.moved(&before, std::slice::from_ref(&change)),
                "{change:?}"
            );
        }
    }

    #[test]
    fn netlink_messages_read_as_what_they_change() {
        // RTM_NEWADDR for 192.168.1.77/24 (IFA_LOCAL), then RTM_NEWROUTE to 172.18.0.0/16.
        let mut d = Vec::new();
        let mut msg = |kind: u16, body: Vec<u8>| {
            let len = 16 + body.len();
            d.extend((len as u32).to_ne_bytes());
            d.extend(kind.to_ne_bytes());
            d.extend([0u8; 10]);
            d.extend(body);
            while d.len() % 4 != 0 {
                d.push(0);
            }
        };
        let mut addr = vec![2u8, 24, 0, 0, 3, 0, 0, 0];
        addr.extend(8u16.to_ne_bytes());
        addr.extend(2u16.to_ne_bytes());
        addr.extend([192, 168, 1, 77]);
        msg(20, addr);
        let mut route = vec![2u8, 16, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0];
        route.extend(8u16.to_ne_bytes());
        route.extend(1u16.to_ne_bytes());
        route.extend([172, 18, 0, 0]);
        msg(24, route);
        msg(16, vec![0; 16]);
        assert_eq!(
            parse(&d),
            vec![
                Change::Address {
                    ip: ip("192.168.1.77"),
                    prefix: 24
                },
                Change::Route {
                    dst: Some(ip("172.18.0.0")),
                    len: 16
                },
                Change::Link,
            ]
        );
        assert!(parse(&[0xff; 7]).is_empty());
    }

    #[test]
    fn the_path_to_loopback_is_from_loopback() {
        let p = Paths::now(&[ip("127.0.0.1")]);
        assert_eq!(p.sources[0], Some(ip("127.0.0.1")));
        assert!(!p.moved(&Paths::now(&[ip("127.0.0.1")]), &[]));
    }
}
