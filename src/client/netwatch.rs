//! Network changes, as the kernel announces them: a netlink route socket subscribed to link,
//! address and route events (IPv4 and IPv6). Any event means "the network may be another
//! one now": the client re-chooses its path. No polling.

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SocketType};
use tokio::sync::watch;

/// `RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR |
/// RTMGRP_IPV6_ROUTE` (linux/rtnetlink.h).
const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;

/// A counter that moves on every network event (its value means nothing else). `None` when
/// this system gives no netlink socket: then the client relies on failures and probes alone.
pub fn changes() -> Option<watch::Receiver<u64>> {
    // No protocol: NETLINK_ROUTE.
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None).ok()?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, GROUPS)).ok()?;
    let (tx, rx) = watch::channel(0u64);
    std::thread::Builder::new()
        .name("netwatch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            // Blocks in the kernel between events; ends when nobody listens any more.
            while rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()).is_ok() {
                n += 1;
                if tx.send(n).is_err() {
                    return;
                }
            }
        })
        .ok()?;
    Some(rx)
}
