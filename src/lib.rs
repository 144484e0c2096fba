//! soul: make a self-hosted service give-able. One `stack.kdl` declares the service, the
//! transports that reach it and the devices allowed in; soul drives a Docker engine to it.
//!
//! # Layout
//! - [`stack`]: the typed model of stack.kdl, parsing, schema and validation.
//! - [`pod`]: container and pod specs and their config hash.
//! - [`reconcile`]: resolve → Desired, the pure `plan`, the executor.
pub mod stack;
pub mod pod;
pub mod reconcile;
