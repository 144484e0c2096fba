//! Pairing tickets: what a browser link carries instead of the device token. A browser keeps
//! every address it opens in its history (and may sync it to its vendor), so the link holds a
//! short ticket that the pod's gate redeems once for a browser session of that one sidecar.
//! A ticket is an HMAC, under the stack's link key, over the stack, the sidecar and the
//! device's current registry entry: a new generation, a changed expiry or a rotated stack key
//! makes every earlier ticket worthless, and the gate refuses one it has redeemed before.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac as _;
use sha2::Sha256;

use crate::state::{DeviceEntry, Registry};

/// The query parameter of a browser link: `http://<address>/?soul_ticket=<ticket>`.
pub const TICKET_PARAM: &str = "soul_ticket";
/// Bytes of the HMAC a ticket carries (128 bits: not guessable, short in a QR code).
const TICKET_MAC: usize = 16;

/// A ticket's verified contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub device: String,
    pub generation: u64,
    /// The ticket as it was issued: its one spelling, and what a record of spent tickets is
    /// keyed by (so no re-spelling of a spent ticket is new to it).
    pub issued: String,
}

/// Why a ticket was refused. The messages never contain the ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("not a pairing ticket of this sidecar")]
    Invalid,
    #[error("device `{0}` is not paired (revoked or unknown)")]
    UnknownDevice(String),
    #[error("the pairing link of `{0}` is from an old generation or was re-issued")]
    Superseded(String),
    #[error("device `{0}` has expired")]
    Expired(String),
}

impl TicketError {
    /// The reason code a program reads at `/.soul/token` (docs/pairing.md).
    pub fn code(&self) -> &'static str {
        match self {
            TicketError::Invalid => "ticket-invalid",
            TicketError::UnknownDevice(_) => "device-unknown",
            TicketError::Superseded(_) => "ticket-superseded",
            TicketError::Expired(_) => "device-expired",
        }
    }

    /// The device the ticket names, when it names one.
    pub fn device(&self) -> Option<&str> {
        match self {
            TicketError::Invalid => None,
            TicketError::UnknownDevice(d)
            | TicketError::Superseded(d)
            | TicketError::Expired(d) => Some(d),
        }
    }
}

/// HMAC-SHA256 under `key` over `parts`, each followed by a NUL (names hold no NUL, so the
/// message is unambiguous), ready to finish or to verify.
fn hmac_of(key: &[u8; 32], parts: &[&str]) -> hmac::Hmac<Sha256> {
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        m.update(p.as_bytes());
        m.update(&[0]);
    }
    m
}

/// The HMAC of [`hmac_of`].
pub fn mac(key: &[u8; 32], parts: &[&str]) -> [u8; 32] {
    hmac_of(key, parts).finalize().into_bytes().into()
}

/// Whether `given` (unpadded URL-safe base64 of `len` bytes, in its one canonical spelling) is
/// the first `len` bytes of the MAC over `parts`, compared in constant time by the MAC itself:
/// a MAC that differs tells nothing about where.
pub fn mac_matches(key: &[u8; 32], parts: &[&str], given: &str, len: usize) -> bool {
    let Ok(bytes) = B64.decode(given) else {
        return false;
    };
    bytes.len() == len && hmac_of(key, parts).verify_truncated_left(&bytes).is_ok()
}

/// What a ticket's MAC covers: the stack, the sidecar and the device's registry entry.
fn ticket_parts(stack: &str, sidecar: &str, device: &str, e: &DeviceEntry) -> [String; 7] {
    [
        "ticket".into(),
        stack.into(),
        sidecar.into(),
        device.into(),
        e.generation.to_string(),
        e.issued_at.to_string(),
        e.expires_at.map(|x| x.to_string()).unwrap_or_default(),
    ]
}

fn ticket_mac(key: &[u8; 32], stack: &str, sidecar: &str, device: &str, e: &DeviceEntry) -> String {
    let parts = ticket_parts(stack, sidecar, device, e);
    let m = mac(key, &parts.each_ref().map(String::as_str));
    B64.encode(&m[..TICKET_MAC])
}

/// The ticket for `device`'s current registry entry at one sidecar's gate:
/// `<device>.<generation>.<mac>`. Deterministic, like every pairing artifact.
pub fn ticket(
    key: &[u8; 32],
    stack: &str,
    sidecar: &str,
    device: &str,
    entry: &DeviceEntry,
) -> String {
    format!(
        "{device}.{}.{}",
        entry.generation,
        ticket_mac(key, stack, sidecar, device, entry)
    )
}

/// Checks a ticket against the registry as it is now. A ticket has exactly one spelling, the
/// one [`ticket`] writes: `alice.01.<mac>` or `alice.+1.<mac>` for `alice.1.<mac>` is refused,
/// so a spent ticket cannot be made new by writing it another way. Whether it was already
/// redeemed is the gate's to know.
pub fn verify_ticket(
    ticket: &str,
    key: &[u8; 32],
    stack: &str,
    sidecar: &str,
    registry: &Registry,
    now: u64,
) -> Result<Ticket, TicketError> {
    let mut parts = ticket.splitn(3, '.');
    let (Some(device), Some(generation), Some(given)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(TicketError::Invalid);
    };
    let generation_text = generation;
    let generation: u64 = generation.parse().map_err(|_| TicketError::Invalid)?;
    if generation.to_string() != generation_text {
        return Err(TicketError::Invalid);
    }
    let Some(entry) = registry.devices.get(device) else {
        return Err(TicketError::UnknownDevice(device.to_string()));
    };
    let parts = ticket_parts(stack, sidecar, device, entry);
    let covered = parts.each_ref().map(String::as_str);
    if !mac_matches(key, &covered, given, TICKET_MAC) || entry.generation != generation {
        return Err(TicketError::Superseded(device.to_string()));
    }
    if entry.expires_at.is_some_and(|e| e <= now) {
        return Err(TicketError::Expired(device.to_string()));
    }
    Ok(Ticket {
        device: device.to_string(),
        generation,
        issued: self::ticket(key, stack, sidecar, device, entry),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(generation: u64, expires_at: Option<u64>) -> Registry {
        let mut r = Registry::default();
        r.devices.insert(
            "alice".into(),
            DeviceEntry {
                generation,
                issued_at: 1000,
                expires_at,
            },
        );
        r
    }

    #[test]
    fn a_ticket_verifies_only_for_its_sidecar_and_the_current_entry() {
        let key = [3u8; 32];
        let reg = registry(2, Some(5000));
        let t = ticket(&key, "home", "notes", "alice", &reg.devices["alice"]);
        assert!(t.starts_with("alice.2.") && t.len() < 40, "{t}");
        let ok = verify_ticket(&t, &key, "home", "notes", &reg, 4000).unwrap();
        assert_eq!(ok.device, "alice");
        // Another sidecar, stack or key: not this gate's ticket.
        assert!(verify_ticket(&t, &key, "home", "photos", &reg, 0).is_err());
        assert!(verify_ticket(&t, &key, "work", "notes", &reg, 0).is_err());
        assert!(verify_ticket(&t, &[4u8; 32], "home", "notes", &reg, 0).is_err());
        // A new generation or a changed expiry supersedes it.
        assert_eq!(
            verify_ticket(&t, &key, "home", "notes", &registry(3, Some(5000)), 0),
            Err(TicketError::Superseded("alice".into()))
        );
        assert_eq!(
            verify_ticket(&t, &key, "home", "notes", &registry(2, None), 0),
            Err(TicketError::Superseded("alice".into()))
        );
        assert_eq!(
            verify_ticket(&t, &key, "home", "notes", &reg, 5000),
            Err(TicketError::Expired("alice".into()))
        );
        assert_eq!(
            verify_ticket(&t, &key, "home", "notes", &Registry::default(), 0),
            Err(TicketError::UnknownDevice("alice".into()))
        );
        for garbage in [
            "",
            "alice",
            "alice.2",
            "alice.x.abc",
            "alice.2.",
            "bob.2.abc",
        ] {
            assert!(verify_ticket(garbage, &key, "home", "notes", &reg, 0).is_err());
        }
    }

    #[test]
    fn a_spent_ticket_re_spelled_is_refused() {
        let key = [3u8; 32];
        let reg = registry(1, None);
        let t = ticket(&key, "home", "notes", "alice", &reg.devices["alice"]);
        let mac = t.rsplit('.').next().unwrap();
        assert_eq!(
            verify_ticket(&t, &key, "home", "notes", &reg, 0)
                .unwrap()
                .issued,
            t
        );
        for generation in ["01", "+1", "00001", " 1", "1 ", "1_", "0x1", "１"] {
            let respelled = format!("alice.{generation}.{mac}");
            assert_eq!(
                verify_ticket(&respelled, &key, "home", "notes", &reg, 0),
                Err(TicketError::Invalid),
                "{respelled}"
            );
        }
    }

    proptest::proptest! {
        /// For any bytes, a gate accepts at most one string per (device, generation, mac): the
        /// one `ticket` wrote. Mutations of a real ticket (bytes inserted or removed anywhere,
        /// the generation re-written with signs, zeros and spaces) are accepted only when they
        /// give back that exact string.
        #[test]
        fn only_the_issued_spelling_of_a_ticket_is_accepted(
            generation in 0u64..20,
            at in 0usize..64,
            removed in 0usize..3,
            inserted in "[+0-9 ._A-Za-z-]{0,3}",
            sign in "(|\\+|0|00| )",
        ) {
            let key = [3u8; 32];
            let reg = registry(generation, None);
            let t = ticket(&key, "home", "notes", "alice", &reg.devices["alice"]);
            let mut mutated = t.clone();
            let at = at.min(mutated.len());
            mutated.replace_range(at..(at + removed).min(mutated.len()), &inserted);
            let mac = t.rsplit('.').next().unwrap_or_default();
            let signed = format!("alice.{sign}{generation}.{mac}");
            for candidate in [mutated, signed] {
                if let Ok(v) = verify_ticket(&candidate, &key, "home", "notes", &reg, 0) {
                    proptest::prop_assert_eq!(&candidate, &t);
                    proptest::prop_assert_eq!(&v.issued, &t);
                }
            }
        }
    }
}
