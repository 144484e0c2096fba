//! The pod's guard: only the gate answers from outside the pod. The pause container, which
//! owns the pod's network namespace (and alone holds NET_ADMIN there), installs
//! policy-routing rules so that a packet that did not come from inside the pod is refused when
//! it is for the app's port (TCP and UDP, even when the app binds 0.0.0.0) or for any other TCP
//! service port but the gate's. Whatever the pod listens on stays reachable inside the pod, on
//! `lo`; the overlays, which forward to the gate there, are unaffected.
//!
//! The rules, for IPv4 and IPv6, in the namespace's rule list (`ip rule`), with the app on
//! 8080 and the gate on 8443:
//!
//! ```text
//! 10: from all iif lo goto 20                          # from inside the pod: untouched
//! 11: from all ipproto tcp dport 8080 prohibit           # the app's port: refused
//! 12: from all ipproto udp dport 8080 prohibit
//! 13: from all ipproto tcp dport 1-8442 prohibit         # every other TCP service port…
//! 14: from all ipproto tcp dport 8444-32767 prohibit     # …below the ephemeral range
//! 20: from all lookup local                             # the kernel's pref-0 rule, moved here
//! ```
//!
//! Ports from the namespace's ephemeral range (`net.ipv4.ip_local_port_range`) up stay open:
//! the replies to the pod's own outbound connections (tor, the overlays' control planes)
//! arrive there, and routing rules cannot tell a reply from a new connection.
//!
//! The rules carry soul's own rule protocol, so installing is idempotent (soul's rules are
//! removed and written again) and never touches anyone else's. They are plain rtnetlink
//! messages on a netlink socket: no iptables or nft binary is needed in soul's `FROM scratch`
//! image.

use std::io;

use rustix::fd::OwnedFd;
use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

/// The rule protocol soul's rules carry (`ip rule … protocol 83`), to find them again.
pub const RULE_PROTOCOL: u8 = 83;

const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;

const FRA_IIFNAME: u16 = 3;
const FRA_GOTO: u16 = 4;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
const FRA_IP_PROTO: u16 = 22;
const FRA_DPORT_RANGE: u16 = 24;

const FR_ACT_TO_TBL: u8 = 1;
const FR_ACT_GOTO: u8 = 2;
const FR_ACT_PROHIBIT: u8 = 8;

const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_KERNEL: u8 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const PREF_FROM_POD: u32 = 10;
const PREF_TCP: u32 = 11;
const PREF_UDP: u32 = 12;
/// The first of the service-port range rules (one or two).
const PREF_SERVICE_PORTS: u32 = 13;
const PREF_LOCAL: u32 = 20;

/// Where the ephemeral range starts when the namespace does not say.
const DEFAULT_EPHEMERAL_START: u16 = 32768;

/// What the guard keeps private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The app's port: refused from outside, TCP and UDP.
    pub app_port: u16,
    /// The gate's port: with it, every other TCP service port is refused from outside too.
    pub gate_port: Option<u16>,
}

impl Policy {
    /// The TCP port ranges refused besides the app's: every port below `ephemeral_start`
    /// except the gate's.
    fn service_ranges(&self, ephemeral_start: u16) -> Vec<(u16, u16)> {
        let Some(gate) = self.gate_port else {
            return Vec::new();
        };
        let last = ephemeral_start.saturating_sub(1);
        let mut ranges = Vec::new();
        let below = gate.saturating_sub(1).min(last);
        if below >= 1 {
            ranges.push((1, below));
        }
        if gate < last {
            ranges.push((gate + 1, last));
        }
        ranges
    }
}

/// The first port of this namespace's ephemeral range.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// Why the guard could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "cannot open a netlink socket: {0} (the pause container needs the NET_ADMIN capability)"
    )]
    Socket(io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Installs `policy` in this network namespace. Safe to run again: soul's earlier rules are
/// replaced.
pub fn install(policy: Policy) -> Result<(), GuardError> {
    let socket = Netlink::open()?;
    let ranges = policy.service_ranges(ephemeral_start());
    for family in [AF_INET, AF_INET6] {
        match install_family(&socket, family, policy.app_port, &ranges) {
            // A kernel (or namespace) without IPv6 has nothing to guard there.
            Err(GuardError::Netlink { source, .. })
                if family == AF_INET6
                    && source.raw_os_error()
                        == Some(rustix::io::Errno::AFNOSUPPORT.raw_os_error()) => {}
            r => r?,
        }
    }
    Ok(())
}

/// Whether `policy`'s rules are in place (for the pause container's health check).
pub fn installed(policy: Policy) -> Result<bool, GuardError> {
    let socket = Netlink::open()?;
    let rules = socket.dump_rules(AF_INET)?;
    let has = |ip_proto: u8, dport: (u16, u16)| {
        rules.iter().any(|r| {
            r.protocol == RULE_PROTOCOL
                && r.action == FR_ACT_PROHIBIT
                && r.ip_proto == Some(ip_proto)
                && r.dport == Some(dport)
        })
    };
    let app = (policy.app_port, policy.app_port);
    let services = policy
        .service_ranges(ephemeral_start())
        .into_iter()
        .all(|range| has(IPPROTO_TCP, range));
    let kernel_local_first = rules
        .iter()
        .any(|r| r.protocol == RTPROT_KERNEL && r.table == RT_TABLE_LOCAL && r.priority == 0);
    Ok(has(IPPROTO_TCP, app) && has(IPPROTO_UDP, app) && services && !kernel_local_first)
}

fn install_family(
    socket: &Netlink,
    family: u8,
    port: u16,
    service_ranges: &[(u16, u16)],
) -> Result<(), GuardError> {
    // Remove soul's rules from an earlier run (each delete removes one).
    for _ in 0..16 {
        let mut del = Rule::new(family, 0);
        del.attr_u8(FRA_PROTOCOL, RULE_PROTOCOL);
        match socket.request(RTM_DELRULE, 0, &del.bytes) {
            Ok(()) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(source) => {
                return Err(GuardError::Netlink {
                    what: "removing soul's earlier rules".into(),
                    source,
                });
            }
        }
    }
    let add = |rule: Rule, what: &str| {
        socket
            .request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule.bytes)
            .map_err(|source| GuardError::Netlink {
                what: format!("adding the rule {what}"),
                source,
            })
    };
    // Added in an order that never leaves the pod without a local rule.
    let mut local = Rule::new(family, FR_ACT_TO_TBL);
    local.header_table(RT_TABLE_LOCAL);
    local.attr_u32(FRA_TABLE, u32::from(RT_TABLE_LOCAL));
    local.attr_u32(FRA_PRIORITY, PREF_LOCAL);
    local.attr_u8(FRA_PROTOCOL, RULE_PROTOCOL);
    add(local, "`lookup local`")?;
    let mut refused = vec![
        (PREF_TCP, IPPROTO_TCP, (port, port)),
        (PREF_UDP, IPPROTO_UDP, (port, port)),
    ];
    for (pref, range) in (PREF_SERVICE_PORTS..).zip(service_ranges) {
        refused.push((pref, IPPROTO_TCP, *range));
    }
    for (pref, ip_proto, (first, last)) in refused {
        let mut refuse = Rule::new(family, FR_ACT_PROHIBIT);
        refuse.attr_u32(FRA_PRIORITY, pref);
        refuse.attr_u8(FRA_PROTOCOL, RULE_PROTOCOL);
        refuse.attr_u8(FRA_IP_PROTO, ip_proto);
        let mut range = Vec::with_capacity(4);
        range.extend_from_slice(&first.to_ne_bytes());
        range.extend_from_slice(&last.to_ne_bytes());
        refuse.attr(FRA_DPORT_RANGE, &range);
        let name = if ip_proto == IPPROTO_TCP {
            "tcp"
        } else {
            "udp"
        };
        add(
            refuse,
            &format!("`ipproto {name} dport {first}-{last} prohibit`"),
        )?;
    }
    let mut from_pod = Rule::new(family, FR_ACT_GOTO);
    from_pod.attr_u32(FRA_PRIORITY, PREF_FROM_POD);
    from_pod.attr_u8(FRA_PROTOCOL, RULE_PROTOCOL);
    from_pod.attr(FRA_IIFNAME, b"lo\0");
    from_pod.attr_u32(FRA_GOTO, PREF_LOCAL);
    add(from_pod, &format!("`iif lo goto {PREF_LOCAL}`"))?;
    // Last, the kernel's own local rule at pref 0 goes: from now on ours decide.
    let mut kernel_local = Rule::new(family, FR_ACT_TO_TBL);
    kernel_local.header_table(RT_TABLE_LOCAL);
    kernel_local.attr_u32(FRA_TABLE, u32::from(RT_TABLE_LOCAL));
    kernel_local.attr_u8(FRA_PROTOCOL, RTPROT_KERNEL);
    match socket.request(RTM_DELRULE, 0, &kernel_local.bytes) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(GuardError::Netlink {
            what: "moving the kernel's `lookup local` rule".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// A `struct fib_rule_hdr` and its attributes.
struct Rule {
    bytes: Vec<u8>,
}

impl Rule {
    fn new(family: u8, action: u8) -> Rule {
        // family, dst_len, src_len, tos, table, res1, res2, action, flags (u32)
        Rule {
            bytes: vec![family, 0, 0, 0, 0, 0, 0, action, 0, 0, 0, 0],
        }
    }

    fn header_table(&mut self, table: u8) {
        self.bytes[4] = table;
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
    }

    fn attr_u8(&mut self, kind: u16, v: u8) {
        self.attr(kind, &[v]);
    }

    fn attr_u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_ne_bytes());
    }
}

/// One rule from a dump, as far as the guard cares.
#[derive(Debug, Default)]
struct SeenRule {
    table: u8,
    action: u8,
    priority: u32,
    protocol: u8,
    ip_proto: Option<u8>,
    dport: Option<(u16, u16)>,
}

struct Netlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Netlink {
    fn open() -> Result<Netlink, GuardError> {
        let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)
            .map_err(|e| GuardError::Socket(e.into()))?;
        Ok(Netlink {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    fn send(&self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<u32> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        rustix::net::sendto(
            &self.fd,
            &msg,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        Ok(seq)
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    fn request(&self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let seq = self.send(kind, flags | NLM_F_ACK, payload)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            for (kind, msg_seq, body) in messages(&buf[..n]) {
                if msg_seq != seq || kind != NLMSG_ERROR {
                    continue;
                }
                let errno = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                return if errno == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-errno))
                };
            }
        }
    }

    fn dump_rules(&self, family: u8) -> Result<Vec<SeenRule>, GuardError> {
        let failed = |source: io::Error| GuardError::Netlink {
            what: "listing the rules".into(),
            source,
        };
        let seq = self
            .send(RTM_GETRULE, NLM_F_DUMP, &Rule::new(family, 0).bytes)
            .map_err(failed)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())
                .map_err(|e| failed(e.into()))?;
            for (kind, msg_seq, body) in messages(&buf[..n]) {
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = body
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        return Err(failed(io::Error::from_raw_os_error(-errno)));
                    }
                    RTM_NEWRULE => out.push(parse_rule(body)),
                    _ => {}
                }
            }
        }
    }
}

/// The (type, sequence, body) of each netlink message in a datagram.
fn messages(mut buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        out.push((kind, seq, &buf[16..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

fn parse_rule(body: &[u8]) -> SeenRule {
    let mut rule = SeenRule::default();
    if body.len() < 12 {
        return rule;
    }
    rule.table = body[4];
    rule.action = body[7];
    let mut attrs = &body[12..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let v = &attrs[4..len];
        match (kind, v.len()) {
            (FRA_PRIORITY, 4) => rule.priority = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            (FRA_TABLE, 4) => {
                rule.table =
                    u8::try_from(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])).unwrap_or(0);
            }
            (FRA_PROTOCOL, 1) => rule.protocol = v[0],
            (FRA_IP_PROTO, 1) => rule.ip_proto = Some(v[0]),
            (FRA_DPORT_RANGE, 4) => {
                rule.dport = Some((
                    u16::from_ne_bytes([v[0], v[1]]),
                    u16::from_ne_bytes([v[2], v[3]]),
                ));
            }
            _ => {}
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    rule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tcp_service_port_but_the_gates_is_refused_below_the_ephemeral_range() {
        let p = |gate| Policy {
            app_port: 80,
            gate_port: gate,
        };
        assert_eq!(
            p(Some(8443)).service_ranges(32768),
            [(1, 8442), (8444, 32767)]
        );
        assert_eq!(p(Some(1)).service_ranges(32768), [(2, 32767)]);
        assert_eq!(p(Some(32767)).service_ranges(32768), [(1, 32766)]);
        assert_eq!(p(Some(40000)).service_ranges(32768), [(1, 32767)]);
        assert_eq!(
            p(Some(8443)).service_ranges(10000),
            [(1, 8442), (8444, 9999)]
        );
        assert!(p(None).service_ranges(32768).is_empty());
    }

    #[test]
    fn a_rule_encodes_and_parses_back() {
        let mut r = Rule::new(AF_INET, FR_ACT_PROHIBIT);
        r.attr_u32(FRA_PRIORITY, PREF_TCP);
        r.attr_u8(FRA_PROTOCOL, RULE_PROTOCOL);
        r.attr_u8(FRA_IP_PROTO, IPPROTO_TCP);
        let mut range = 8080u16.to_ne_bytes().to_vec();
        range.extend_from_slice(&8080u16.to_ne_bytes());
        r.attr(FRA_DPORT_RANGE, &range);
        // Every attribute is padded to 4 bytes.
        assert_eq!(r.bytes.len(), 12 + 8 + 8 + 8 + 8);
        let seen = parse_rule(&r.bytes);
        assert_eq!(seen.action, FR_ACT_PROHIBIT);
        assert_eq!(seen.priority, PREF_TCP);
        assert_eq!(seen.protocol, RULE_PROTOCOL);
        assert_eq!(seen.ip_proto, Some(IPPROTO_TCP));
        assert_eq!(seen.dport, Some((8080, 8080)));
    }

    #[test]
    fn messages_split_a_datagram() {
        let mut buf = Vec::new();
        for (kind, seq, body) in [(NLMSG_ERROR, 7u32, &[0u8; 4][..]), (NLMSG_DONE, 8, &[1, 2])] {
            let len = 16 + body.len();
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(body);
            buf.resize(buf.len().next_multiple_of(4), 0);
        }
        let m = messages(&buf);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].0, m[0].1, m[0].2.len()), (NLMSG_ERROR, 7, 4));
        assert_eq!((m[1].0, m[1].1, m[1].2), (NLMSG_DONE, 8, &[1u8, 2][..]));
    }
}
