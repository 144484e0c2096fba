//! Pairing: device tokens (EdDSA JWTs) and their verifier, the pairing URI, and its QR
//! renderings. Pure functions of the stack, the state dir's key and registry, and addresses.

pub mod qr;
mod token;
mod uri;

pub use token::{Claims, TokenError, audience, claims_for, issue, verify};
pub use uri::{Address, PairingUri, browser_links};
