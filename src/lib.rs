//! soul: make a self-hosted service give-able. One `stack.kdl` declares the service, the
//! transports that reach it and the devices allowed in; soul drives a Docker engine to it.
//!
//! # Layout
//! - [`stack`]: the typed model of stack.kdl, parsing, schema and validation.
pub mod stack;
