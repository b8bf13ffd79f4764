//! The store's error type.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::plan::PlanError;

/// Everything a store operation can fail with. Messages are meant for operators: they say what failed and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "etcd at {endpoints} is unreachable: {what} did not complete within {timeout:?} ({detail}); check the \
         etcd endpoints and that etcd is running"
    )]
    Unreachable {
        endpoints: String,
        what: &'static str,
        timeout: Duration,
        detail: String,
    },
    #[error(
        "TLS with etcd at {endpoints} failed ({what}): {detail}; check the CA (--etcd-ca), the client certificate \
         and key (--etcd-cert, --etcd-key) and that the endpoints are https"
    )]
    Tls {
        endpoints: String,
        what: &'static str,
        detail: String,
    },
    #[error("etcd {what} failed: {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "the pod subnet pool {pool} is exhausted: all {capacity} node subnets are held ({held} nodes hold claims); \
         free the claim of a departed node with `evioctl release NODE` or use a larger pool/nodeBits"
    )]
    Exhausted {
        pool: Ipv4Net,
        capacity: u64,
        held: usize,
    },
    #[error("the address pool {pool} is exhausted: {held} nodes hold addresses")]
    AddressesExhausted { pool: Ipv4Net, held: usize },
    #[error("address {address} is already held by node {holder}")]
    Conflict { address: Ipv4Addr, holder: String },
    #[error("address {address} is not a usable host address of {pool}")]
    BadAddress { address: Ipv4Addr, pool: Ipv4Net },
    #[error(
        "node {node} holds {held}, which is not a subnet of the current plan ({pool}); the pool or nodeBits \
         changed: release it first with `evioctl release {node}`"
    )]
    OutsidePlan {
        node: String,
        held: String,
        pool: Ipv4Net,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("invalid etcd configuration: {0}")]
    Config(String),
    #[error("invalid node name {0:?}: use 1-253 characters of letters, digits, '.', '-' and '_'")]
    InvalidNodeName(String),
    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "node name {node} is registered with another public key ({holder_key}): a name belongs to the first key \
         registered under it while that registration's lease lives; stop the other agent, or wait for its lease to \
         expire, or use another --node-name"
    )]
    NameTaken { node: String, holder_key: String },
    #[error("{what}: gave up after {attempts} attempts lost to concurrent writers")]
    Contention { what: &'static str, attempts: u32 },
}

impl StoreError {
    /// True when the error means etcd could not be reached (as opposed to a refusal by the store's rules).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::Unreachable { .. })
    }
}
