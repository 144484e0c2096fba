//! `soul bridge status` as a report: per sidecar and transport, in the stack's order, the
//! container that carries it, whether that runs and is healthy, the address clients dial, and
//! whether the transport is up (for the relay: the gate's agent is registered). Pure: built
//! from what discovery and observe found.

use serde::Serialize;

use super::plan::Observed;
use crate::pairing::Address;
use crate::pod::container_name;
use crate::stack::Stack;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransportsReport {
    pub stack: String,
    pub transports: Vec<TransportStatus>,
    /// The sidecars' public names through the relay ([`super::public_names`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub public: Vec<super::PublicName>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransportStatus {
    pub sidecar: String,
    pub transport: String,
    /// The container that carries it (the gate, for the relay's agent).
    pub container: Option<String>,
    /// Whether that container runs (none without one).
    pub running: Option<bool>,
    pub health: Option<String>,
    /// `transport:host:port`, when known.
    pub address: Option<String>,
    /// Its container (if any) runs and is not unhealthy, and its address is known.
    pub up: bool,
    /// A tailnet node waiting for someone to log it in: the URL its log shows (without an
    /// auth key, containerboot prints one per start, good for about a minute).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
}

/// `addresses` holds each sidecar's known addresses, in the stack's sidecar order.
pub fn report(stack: &Stack, addresses: &[Vec<Address>], observed: &Observed) -> TransportsReport {
    let mut transports = Vec::new();
    for (i, sidecar) in stack.sidecars.iter().enumerate() {
        for kind in stack.transport_order() {
            let container = crate::transport::carrier(stack, kind)
                .map(|role| container_name(&stack.stack, &sidecar.name, role));
            let seen = container
                .as_deref()
                .and_then(|name| observed.containers.iter().find(|c| c.name == name));
            let running = seen.is_some_and(|c| c.running);
            let health = seen.and_then(|c| c.health.clone());
            let address = addresses
                .get(i)
                .and_then(|a| a.iter().find(|x| x.transport == kind))
                .map(|a| a.to_string());
            let up = (container.is_none() || running)
                && health.as_deref() != Some("unhealthy")
                && address.is_some();
            transports.push(TransportStatus {
                sidecar: sidecar.name.clone(),
                transport: kind.as_str().to_string(),
                running: container.as_ref().map(|_| running),
                container,
                health,
                address,
                up,
                login: None,
            });
        }
    }
    TransportsReport {
        stack: stack.stack.clone(),
        transports,
        public: Vec::new(),
    }
}
