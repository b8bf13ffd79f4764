//! evio's etcd store: per-node pod subnet claims, host overlay address (VIP) claims, node registrations
//! kept alive by leases, and a watch over all of it. The key layout is in [`keys`] and docs/store.md.
//!
//! Correctness rests on etcd transactions, never on etcd locks: a claim (of a pod subnet or of an address,
//! one generic algorithm over a pool of candidates) is one compare-and-swap transaction that creates both
//! index keys (`by-subnet`/`by-address` and `by-node`) only if neither exists, so two nodes never hold one
//! item and a node never holds two, whatever runs concurrently or dies half way.
//!
//! Dependencies: `etcd-client` (the maintained async etcd v3 client on tonic; TLS through rustls/ring, no
//! OpenSSL needed in the image), `ipnet` (CIDR types used across the workspace), `tokio`, `serde_json`
//! (values are JSON so operators can read them with `etcdctl get`), `thiserror`, `tracing`.

mod claim;
pub mod error;
pub mod keys;
pub mod plan;
mod pool;
pub mod records;
mod register;
mod secret;
mod store;
mod watch;

pub use error::StoreError;
/// The etcd client crate, re-exported for callers that need raw access ([`Store::client`]).
pub use etcd_client;
pub use plan::{
    MAX_PREFIX6, NodeSubnet, PlanError, SubnetPlan, SubnetPlan6, gateway6, host_range,
    node_bits_from_json, paired_address6, parse_cidr,
};
pub use records::{
    AddressClaim, Candidate, CandidateKind, NodeRecord, PathEntry, PathSummary, SubnetClaim,
    unix_now,
};
pub use register::Registration;
pub use secret::read_secret_file;
pub use store::{EtcdOptions, Snapshot, Store, subnets_by_node};
pub use watch::{StoreEvent, Watch};
