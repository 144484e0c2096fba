//! The stack in other tools' formats, resolved without reading any secret: a Compose file
//! ([`compose`]) and Kubernetes manifests ([`kubernetes`]).

mod compose;
pub mod kubernetes;

pub use compose::{Export, compose, compose_of};
