//! The pod's guard: only the gate answers from outside the pod. The pause container, which
//! owns the pod's network namespace (and alone holds NET_ADMIN there), installs an nftables
//! table in that namespace whose input hook, with connection tracking, lets in:
//!
//! ```text
//! table inet soul_guard {
//!   chain input {
//!     type filter hook input priority 0; policy drop;
//!     iifname "lo" accept                      # from inside the pod: untouched
//!     ct state established,related accept     # replies to the pod's own connections
//!     meta l4proto { icmp, ipv6-icmp } accept  # ping, path MTU, IPv6 neighbour discovery
//!     tcp dport 8443 accept                    # the gate
//!     udp dport 4242 accept                    # only with nebula: its peers' handshakes
//!     meta l4proto tcp reject with tcp reset   # every other TCP port: refused at once
//!     reject with icmpx admin-prohibited       # UDP and the rest: refused
//!   }
//! }
//! ```
//!
//! So every TCP or UDP port the pod listens on — the app's, an admin port, one in the
//! ephemeral range — is refused from the pod's network, the host, the LAN port's proxy and the
//! overlays, while every connection the pod opens (tor, the overlays' control planes and
//! hole punching, the app's outbound requests) gets its replies. Inside the pod, on `lo`,
//! everything answers; the overlays, which forward to the gate there, are unaffected.
//!
//! The table is sent as one nftables netlink batch (add, delete, add: idempotent and atomic,
//! never touching another table), on a netlink socket whose every wait is bounded: no `nft` or
//! `iptables` binary is needed in soul's `FROM scratch` image.

use std::io;
use std::time::Duration;

use rustix::fd::OwnedFd;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

/// The table soul's rules live in (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "soul_guard";
const CHAIN: &str = "input";
/// How long the kernel may take to answer one netlink request.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

// Netlink and nfnetlink.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;

// nf_tables messages and attributes (linux/netfilter/nf_tables.h).
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
const NFT_REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;
/// `ct state established,related` as conntrack's state bits.
const CT_ESTABLISHED_RELATED: u32 = 0b110;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// What the guard lets in from outside the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The gate's TCP port: the only TCP port that answers from outside.
    pub gate_port: u16,
    /// UDP ports an overlay in the pod receives its peers on (nebula's listen port).
    pub open_udp: Vec<u16>,
}

/// Why the guard could not be installed or checked.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// No netlink socket (the pause container lacks NET_ADMIN, or netlink is filtered).
    #[error(
        "cannot open a netlink socket: {0} (the pause container needs the NET_ADMIN capability)"
    )]
    Socket(io::Error),
    /// The kernel refused or did not answer a request.
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Installs `policy` in this network namespace. Safe to run again: soul's table is replaced in
/// the same transaction.
pub fn install(policy: &Policy) -> Result<(), GuardError> {
    let socket = Netlink::open()?;
    socket
        .transaction(&batch(policy))
        .map_err(|source| GuardError::Netlink {
            what: format!("installing the nftables table `inet {TABLE}`"),
            source,
        })
}

/// Whether `policy`'s table is in place with all its rules (the pause container's health check).
pub fn installed(policy: &Policy) -> Result<bool, GuardError> {
    let socket = Netlink::open()?;
    let rules = socket.count_rules().map_err(|source| GuardError::Netlink {
        what: format!("listing the rules of `inet {TABLE}`"),
        source,
    })?;
    Ok(rules == rules_of(policy).len())
}

/// The messages of the batch that installs `policy`: add the table (so the delete cannot fail),
/// delete it with whatever an earlier run left, add it again with its chain and rules.
fn batch(policy: &Policy) -> Vec<(u16, u16, Vec<u8>)> {
    let table = Attrs::new().string(NFTA_TABLE_NAME, TABLE);
    let mut msgs = vec![
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, table.0.clone()),
        (NFT_MSG_DELTABLE, 0, table.0.clone()),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, table.0),
    ];
    let hook = Attrs::new()
        .u32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_IN)
        .u32(NFTA_HOOK_PRIORITY, 0);
    let chain = Attrs::new()
        .string(NFTA_CHAIN_TABLE, TABLE)
        .string(NFTA_CHAIN_NAME, CHAIN)
        .nested(NFTA_CHAIN_HOOK, hook)
        .u32(NFTA_CHAIN_POLICY, NF_DROP)
        .string(NFTA_CHAIN_TYPE, "filter");
    msgs.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, chain.0));
    for exprs in rules_of(policy) {
        let list = exprs
            .into_iter()
            .fold(Attrs::new(), |l, e| l.nested(NFTA_LIST_ELEM, e));
        let rule = Attrs::new()
            .string(NFTA_RULE_TABLE, TABLE)
            .string(NFTA_RULE_CHAIN, CHAIN)
            .nested(NFTA_RULE_EXPRESSIONS, list);
        msgs.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule.0));
    }
    msgs
}

/// The chain's rules, each a list of expressions (see the module's doc).
fn rules_of(policy: &Policy) -> Vec<Vec<Attrs>> {
    let mut lo = [0u8; 16]; // IFNAMSIZ
    lo[..2].copy_from_slice(b"lo");
    let mut rules = vec![
        vec![
            meta(NFT_META_IIFNAME),
            cmp(NFT_CMP_EQ, &lo),
            verdict(NF_ACCEPT),
        ],
        vec![
            ct_state(),
            bitwise(&CT_ESTABLISHED_RELATED.to_ne_bytes()),
            cmp(NFT_CMP_NEQ, &0u32.to_ne_bytes()),
            verdict(NF_ACCEPT),
        ],
        vec![
            meta(NFT_META_L4PROTO),
            cmp(NFT_CMP_EQ, &[IPPROTO_ICMP]),
            verdict(NF_ACCEPT),
        ],
        vec![
            meta(NFT_META_L4PROTO),
            cmp(NFT_CMP_EQ, &[IPPROTO_ICMPV6]),
            verdict(NF_ACCEPT),
        ],
        vec![
            meta(NFT_META_L4PROTO),
            cmp(NFT_CMP_EQ, &[IPPROTO_TCP]),
            dport(),
            cmp(NFT_CMP_EQ, &policy.gate_port.to_be_bytes()),
            verdict(NF_ACCEPT),
        ],
    ];
    for port in &policy.open_udp {
        rules.push(vec![
            meta(NFT_META_L4PROTO),
            cmp(NFT_CMP_EQ, &[IPPROTO_UDP]),
            dport(),
            cmp(NFT_CMP_EQ, &port.to_be_bytes()),
            verdict(NF_ACCEPT),
        ]);
    }
    rules.push(vec![
        meta(NFT_META_L4PROTO),
        cmp(NFT_CMP_EQ, &[IPPROTO_TCP]),
        reject_tcp(),
    ]);
    rules.push(vec![reject_other()]);
    rules
}

fn expr(name: &str, data: Attrs) -> Attrs {
    Attrs::new()
        .string(NFTA_EXPR_NAME, name)
        .nested(NFTA_EXPR_DATA, data)
}

/// `meta load <key> => reg 1`.
fn meta(key: u32) -> Attrs {
    expr("meta", Attrs::new().u32(1, NFT_REG_1).u32(2, key)) // DREG, KEY
}

/// `cmp <op> reg 1 <value>`.
fn cmp(op: u32, value: &[u8]) -> Attrs {
    let data = Attrs::new().bytes(NFTA_DATA_VALUE, value);
    expr(
        "cmp",
        Attrs::new().u32(1, NFT_REG_1).u32(2, op).nested(3, data),
    ) // SREG, OP, DATA
}

/// `ct load state => reg 1`.
fn ct_state() -> Attrs {
    expr("ct", Attrs::new().u32(1, NFT_REG_1).u32(2, NFT_CT_STATE)) // DREG, KEY
}

/// `reg 1 = (reg 1 & mask) ^ 0`.
fn bitwise(mask: &[u8]) -> Attrs {
    let value = |v: &[u8]| Attrs::new().bytes(NFTA_DATA_VALUE, v);
    expr(
        "bitwise",
        Attrs::new()
            .u32(1, NFT_REG_1) // SREG
            .u32(2, NFT_REG_1) // DREG
            .u32(3, mask.len() as u32) // LEN
            .nested(4, value(mask)) // MASK
            .nested(5, value(&vec![0; mask.len()])), // XOR
    )
}

/// `payload load 2b @ transport header + 2 => reg 1`: the destination port of TCP or UDP.
fn dport() -> Attrs {
    expr(
        "payload",
        Attrs::new()
            .u32(1, NFT_REG_1) // DREG
            .u32(2, NFT_PAYLOAD_TRANSPORT_HEADER) // BASE
            .u32(3, 2) // OFFSET
            .u32(4, 2), // LEN
    )
}

fn verdict(code: u32) -> Attrs {
    let v = Attrs::new().u32(NFTA_VERDICT_CODE, code);
    let data = Attrs::new().nested(NFTA_DATA_VERDICT, v);
    expr(
        "immediate",
        Attrs::new().u32(1, NFT_REG_VERDICT).nested(2, data),
    ) // DREG, DATA
}

fn reject_tcp() -> Attrs {
    expr("reject", Attrs::new().u32(1, NFT_REJECT_TCP_RST)) // TYPE
}

fn reject_other() -> Attrs {
    expr(
        "reject",
        Attrs::new()
            .u32(1, NFT_REJECT_ICMPX_UNREACH) // TYPE
            .u8(2, NFT_REJECT_ICMPX_ADMIN_PROHIBITED), // ICMP_CODE
    )
}

/// Netlink attributes (`struct nlattr`, each padded to 4 bytes), built by appending.
#[derive(Debug, Clone, Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn new() -> Attrs {
        Attrs(Vec::new())
    }

    fn bytes(mut self, kind: u16, payload: &[u8]) -> Attrs {
        self.0
            .extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn string(self, kind: u16, s: &str) -> Attrs {
        let mut z = s.as_bytes().to_vec();
        z.push(0);
        self.bytes(kind, &z)
    }

    /// nftables wants its numbers in network byte order.
    fn u32(self, kind: u16, v: u32) -> Attrs {
        self.bytes(kind, &v.to_be_bytes())
    }

    fn u8(self, kind: u16, v: u8) -> Attrs {
        self.bytes(kind, &[v])
    }

    fn nested(self, kind: u16, inner: Attrs) -> Attrs {
        self.bytes(kind | NLA_F_NESTED, &inner.0)
    }
}

struct Netlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl Netlink {
    fn open() -> Result<Netlink, GuardError> {
        let fd = rustix::net::socket(
            AddressFamily::NETLINK,
            SocketType::RAW,
            Some(netlink::NETFILTER),
        )
        .map_err(|e| GuardError::Socket(e.into()))?;
        // Every wait for the kernel is bounded: a missing answer is an error, not a hang.
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(NETLINK_TIMEOUT),
        )
        .map_err(|e| GuardError::Socket(e.into()))?;
        Ok(Netlink {
            fd,
            seq: std::cell::Cell::new(1),
        })
    }

    /// One nfnetlink message: header, `struct nfgenmsg`, attributes.
    fn message(
        &self,
        kind: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: &[u8],
    ) -> (u32, Vec<u8>) {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[family, 0]);
        msg.extend_from_slice(&res_id.to_be_bytes());
        msg.extend_from_slice(attrs);
        (seq, msg)
    }

    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        rustix::net::sendto(
            &self.fd,
            datagram,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        Ok(())
    }

    /// Sends `msgs` as one batch (all or nothing) and waits for every acknowledgement.
    fn transaction(&self, msgs: &[(u16, u16, Vec<u8>)]) -> io::Result<()> {
        let subsys = NFNL_SUBSYS_NFTABLES << 8;
        let (_, mut datagram) = self.message(
            NFNL_MSG_BATCH_BEGIN,
            0,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let mut pending = Vec::new();
        for (kind, flags, attrs) in msgs {
            let (seq, m) = self.message(subsys | kind, flags | NLM_F_ACK, NFPROTO_INET, 0, attrs);
            pending.push(seq);
            datagram.extend_from_slice(&m);
        }
        let (_, end) = self.message(
            NFNL_MSG_BATCH_END,
            0,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        datagram.extend_from_slice(&end);
        self.send(&datagram)?;
        let mut buf = vec![0u8; 16 * 1024];
        while !pending.is_empty() {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            for (kind, seq, body) in messages(&buf[..n]) {
                if kind != NLMSG_ERROR {
                    continue;
                }
                let errno = errno_of(body);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                pending.retain(|s| *s != seq);
            }
        }
        Ok(())
    }

    /// How many rules soul's chain holds (0 when the table is missing).
    fn count_rules(&self) -> io::Result<usize> {
        let attrs = Attrs::new()
            .string(NFTA_RULE_TABLE, TABLE)
            .string(NFTA_RULE_CHAIN, CHAIN);
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE;
        let (seq, msg) = self.message(kind, NLM_F_DUMP, NFPROTO_INET, 0, &attrs.0);
        self.send(&msg)?;
        let mut count = 0;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            for (k, s, body) in messages(&buf[..n]) {
                if s != seq {
                    continue;
                }
                match k {
                    NLMSG_DONE => return Ok(count),
                    NLMSG_ERROR => {
                        return match errno_of(body) {
                            0 => Ok(count),
                            e if -e == rustix::io::Errno::NOENT.raw_os_error() => Ok(0),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => count += 1,
                    _ => {}
                }
            }
        }
    }
}

fn errno_of(body: &[u8]) -> i32 {
    body.get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested() {
        let a = Attrs::new().string(1, "lo").u32(2, 0x0102_0304);
        assert_eq!(a.0, [7, 0, 1, 0, b'l', b'o', 0, 0, 8, 0, 2, 0, 1, 2, 3, 4]);
        let n = Attrs::new().nested(4, Attrs::new().u8(1, 9));
        assert_eq!(n.0, [12, 0, 4, 0x80, 5, 0, 1, 0, 9, 0, 0, 0]);
    }

    #[test]
    fn the_batch_replaces_the_table_and_admits_only_the_gate() {
        let policy = Policy {
            gate_port: 8443,
            open_udp: vec![],
        };
        let msgs = batch(&policy);
        let kinds: Vec<u16> = msgs.iter().map(|(k, _, _)| *k).collect();
        assert_eq!(
            kinds[..4],
            [
                NFT_MSG_NEWTABLE,
                NFT_MSG_DELTABLE,
                NFT_MSG_NEWTABLE,
                NFT_MSG_NEWCHAIN
            ]
        );
        assert_eq!(kinds.len(), 4 + rules_of(&policy).len());
        let rules: Vec<&Vec<u8>> = msgs[4..].iter().map(|(_, _, a)| a).collect();
        let port = 8443u16.to_be_bytes();
        let with_port: Vec<usize> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.windows(2).any(|w| w == port))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(with_port, [4], "only the gate's rule names its port");
        assert!(
            rules.last().unwrap().windows(6).any(|w| w == b"reject"),
            "the last rule refuses"
        );
    }

    #[test]
    fn messages_split_a_datagram() {
        let mut d = Vec::new();
        for (kind, seq) in [(2u16, 7u32), (3, 8)] {
            d.extend_from_slice(&20u32.to_ne_bytes());
            d.extend_from_slice(&kind.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&[0, 0, 0, 0]);
        }
        let m = messages(&d);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].0, m[0].1, m[1].0, m[1].1), (2, 7, 3, 8));
    }
}
