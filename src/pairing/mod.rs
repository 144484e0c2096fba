//! Pairing: device tokens (EdDSA JWTs) and their verifier, the pairing URI, its QR
//! renderings, and the one-time tickets of browser links. Pure functions of the stack, the state dir's key and registry, and addresses.

pub mod qr;
mod ticket;
mod token;
mod uri;

pub use ticket::{TICKET_PARAM, Ticket, TicketError, mac, same_mac, ticket, verify_ticket};
pub use token::{Claims, TokenError, audience, claims_for, issue, unix_now, verify};
pub use uri::{Address, PairingUri, browser_links};
