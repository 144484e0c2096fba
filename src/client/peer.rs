//! Who opened a local connection: the user owning the connecting socket, read from the
//! kernel's socket tables (`/proc/net/tcp` and `/proc/net/tcp6`, where each socket is listed
//! with its addresses and its owner's uid). `soul connect`'s forward serves only its own user:
//! on a shared machine another user's program must not borrow the device's credential.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The most of a socket table read: a busy host lists some thousands of sockets.
const MAX_TABLE: u64 = 64 << 20;

/// The uid owning the socket at `peer` that is connected to `local` (the forward's own end),
/// if the kernel lists it.
pub fn owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let tables: &[&str] = match peer {
        SocketAddr::V4(_) => &["/proc/net/tcp", "/proc/net/tcp6"],
        SocketAddr::V6(_) => &["/proc/net/tcp6", "/proc/net/tcp"],
    };
    tables.iter().find_map(|t| {
        let text = crate::files::read_text_bounded(std::path::Path::new(t), MAX_TABLE).ok()?;
        owner_in(&text, peer, local)
    })
}

/// [`owner`] in the text of one table.
fn owner_in(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid …
        let (own, remote, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (same(parse(own)?, peer) && same(parse(remote)?, local)).then(|| uid.parse().ok())?
    })
}

/// Whether two socket addresses are one, an IPv4 address and its IPv4-mapped IPv6 form alike.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word as the kernel
/// printed it from memory, so in this machine's byte order.
fn parse(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        addr.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_real_loopback_connection_is_this_process_user() {
        use std::os::unix::fs::MetadataExt as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        assert_eq!(owner(peer, listener.local_addr().unwrap()), Some(me));
        // A port nobody connected from: not listed.
        let nobody = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
        assert_eq!(owner(nobody, listener.local_addr().unwrap()), None);
    }

    #[test]
    fn table_lines_read_as_the_kernel_writes_them() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let v4 = |a: SocketAddr| {
            let SocketAddr::V4(a) = a else { unreachable!() };
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            )
        };
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: {} {} 01 00000000:00000000 00:00000000 00000000  1000        0 1 1 0\n   1: {} {} 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n",
            v4(peer),
            v4(local),
            v4(local),
            v4(peer),
        );
        assert_eq!(owner_in(&table, peer, local), Some(1000));
        assert_eq!(owner_in(&table, local, peer), Some(0));
        assert_eq!(owner_in("garbage\n1 2 3\n", peer, local), None);
    }
}
