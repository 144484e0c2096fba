//! The self-hosted relay (`soul relay`, not served yet: the `relay` node still only puts its
//! address into pairing codes, as README says). What is built so far is the part that lets a
//! relay route without reading: [`sni::server_name`], the name a client's TLS ClientHello asks
//! for, read without terminating TLS.

pub mod sni;
