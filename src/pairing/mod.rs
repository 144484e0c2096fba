//! Pairing: device tokens (EdDSA JWTs) and their verifier, the pairing link (what the QR code
//! holds) and the pairing URI, reading either back ([`Payload`]), their QR renderings, and the
//! one-time tickets of browser links. Pure functions of the stack, the state dir's key and
//! registry, and addresses.

mod payload;
pub mod qr;
mod ticket;
mod token;
mod uri;

pub use payload::{Payload, PayloadError, VERSION as PAYLOAD_VERSION, browser_address};
pub use ticket::{TICKET_PARAM, Ticket, TicketError, mac, mac_matches, ticket, verify_ticket};
pub use token::{Claims, TokenError, audience, claims_for, issue, unix_now, verify};
pub use uri::{Address, CodeFields, PairingLink, PairingUri, browser_links, public_link};
