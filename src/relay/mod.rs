//! The self-hosted relay: `soul relay serve` for a small VPS ([`server`]), and the pod's
//! dial-out agent that registers with it ([`agent`], run by the gate). The relay routes a
//! device's TLS connection by its server name ([`sni`]) to a ready data channel of the
//! sidecar's agent and splices bytes ([`splice`]); it never terminates the device's TLS and
//! holds only the public keys of the stacks it allows ([`config`]) and its own key, which the
//! agents' control channels end at and pin ([`key`]). [`wire`] is the protocol between agent
//! and relay.

pub mod agent;
pub mod config;
pub mod key;
pub mod server;
pub mod sni;
pub mod splice;
pub mod wire;
