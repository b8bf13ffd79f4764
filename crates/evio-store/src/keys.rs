//! The etcd key layout, shared with eviod (documented in docs/store.md). Everything lives under
//! [`PREFIX`]; values are JSON.
//!
//! | key | value |
//! |---|---|
//! | `/evio/v1/subnets/by-subnet/<a.b.c.d-len>` | [`SubnetClaim`](crate::SubnetClaim) |
//! | `/evio/v1/subnets/by-node/<node>` | the same [`SubnetClaim`](crate::SubnetClaim) |
//! | `/evio/v1/addresses/by-address/<a.b.c.d>` | [`AddressClaim`](crate::AddressClaim) |
//! | `/evio/v1/addresses/by-node/<node>` | the same [`AddressClaim`](crate::AddressClaim) |
//! | `/evio/v1/nodes/<node>` | [`NodeRecord`](crate::NodeRecord), attached to the node's lease |
//! | `/evio/v1/join/<node>` | a join request (evio-trust `JoinRequest`), written by a joining host |
//! | `/evio/v1/renew/<node>` | a renewal request (evio-trust `RenewRequest`) |
//! | `/evio/v1/certs/<node>` | `{"cert": "<CA-signed certificate>"}`, written by the signer |
//! | `/evio/v1/refused/<node>` | `{"refusal": "<CA-signed refusal>"}`, the signer's answer to a refused request |
//! | `/evio/v1/revoked/<node>/<serial>` | `{"revocation": "<CA-signed revocation>"}` |
//! | `/evio/status/v1/paths/<node>` | [`PathSummary`](crate::PathSummary), attached to the node's lease |

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Root of every evio key.
pub const PREFIX: &str = "/evio/v1/";
/// Prefix of the subnet claims indexed by subnet.
pub const SUBNETS_BY_SUBNET: &str = "/evio/v1/subnets/by-subnet/";
/// Prefix of the subnet claims indexed by node.
pub const SUBNETS_BY_NODE: &str = "/evio/v1/subnets/by-node/";
/// Prefix of the host overlay address claims indexed by address.
pub const ADDRESSES_BY_ADDRESS: &str = "/evio/v1/addresses/by-address/";
/// Prefix of the host overlay address claims indexed by node.
pub const ADDRESSES_BY_NODE: &str = "/evio/v1/addresses/by-node/";
/// Prefix of the live node registrations.
pub const NODES: &str = "/evio/v1/nodes/";

/// Prefix of the join requests (cluster CA mode).
pub const JOIN: &str = "/evio/v1/join/";
/// Prefix of the certificate renewal requests.
pub const RENEW: &str = "/evio/v1/renew/";
/// Prefix of the node certificates.
pub const CERTS: &str = "/evio/v1/certs/";
/// Prefix of the signer's refusals.
pub const REFUSED: &str = "/evio/v1/refused/";
/// Prefix of the revocations.
pub const REVOKED: &str = "/evio/v1/revoked/";

/// Prefix of the nodes' peer path summaries (for `evioctl ui`).
/// Root of everything evio writes: the control plane's keys ([`PREFIX`]) and the status summaries
/// ([`STATUS_PREFIX`]).
pub const ROOT: &str = "/evio/";
/// Status summaries for `evioctl ui`. Outside [`PREFIX`] on purpose: the agents watch [`PREFIX`], and
/// every node's frequently rewritten summary would otherwise be sent to every agent (about 13 MB/s out of
/// etcd at 100 busy nodes).
pub const STATUS_PREFIX: &str = "/evio/status/v1/";
/// Prefix of the peer path summaries.
pub const PATHS: &str = "/evio/status/v1/paths/";

/// `a.b.c.d-len`: a CIDR as one key segment (no `/`).
pub fn subnet_segment(net: &Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

/// Parses a segment made by [`subnet_segment`].
pub fn parse_subnet_segment(seg: &str) -> Option<Ipv4Net> {
    let (a, l) = seg.rsplit_once('-')?;
    Ipv4Net::new(a.parse().ok()?, l.parse().ok()?).ok()
}

pub fn subnet_by_subnet(net: &Ipv4Net) -> String {
    format!("{SUBNETS_BY_SUBNET}{}", subnet_segment(net))
}

pub fn subnet_by_node(node: &str) -> String {
    format!("{SUBNETS_BY_NODE}{node}")
}

pub fn address_by_address(ip: Ipv4Addr) -> String {
    format!("{ADDRESSES_BY_ADDRESS}{ip}")
}

pub fn address_by_node(node: &str) -> String {
    format!("{ADDRESSES_BY_NODE}{node}")
}

pub fn node(node: &str) -> String {
    format!("{NODES}{node}")
}

pub fn paths(node: &str) -> String {
    format!("{PATHS}{node}")
}

pub fn join(node: &str) -> String {
    format!("{JOIN}{node}")
}

pub fn renew(node: &str) -> String {
    format!("{RENEW}{node}")
}

pub fn cert(node: &str) -> String {
    format!("{CERTS}{node}")
}

pub fn refused(node: &str) -> String {
    format!("{REFUSED}{node}")
}

/// The revocation of the certificate `serial` of `node`.
pub fn revoked(node: &str, serial: u64) -> String {
    format!("{REVOKED}{node}/{serial}")
}

/// Node names become key segments (the rule is shared with the CA and the agents: `evio-api`).
pub use evio_api::valid_node_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip() {
        let n: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(
            subnet_by_subnet(&n),
            "/evio/v1/subnets/by-subnet/10.244.3.0-24"
        );
        assert_eq!(parse_subnet_segment("10.244.3.0-24"), Some(n));
        assert_eq!(parse_subnet_segment("10.244.3.0"), None);
        assert!(valid_node_name("node-1.example"));
        assert!(!valid_node_name("a/b"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name(".."));
    }
}
