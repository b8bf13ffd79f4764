//! The JSON values stored in etcd. Every field has a serde default and unknown fields are kept, so records
//! written by older or newer versions still parse.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

/// A node's pod subnet claim (`subnets/by-subnet/<subnet>` and `subnets/by-node/<node>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetClaim {
    pub node: String,
    pub subnet: Ipv4Net,
    /// When the claim was made (Unix seconds).
    #[serde(default)]
    pub since: u64,
}

/// A node's host overlay address claim (`addresses/by-address/<ip>` and `addresses/by-node/<node>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressClaim {
    pub node: String,
    pub address: Ipv4Addr,
    /// When the claim was made (Unix seconds).
    #[serde(default)]
    pub since: u64,
}

/// How a candidate endpoint was learned (ICE terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    /// A local interface address.
    Host,
    /// Server-reflexive: the NAT's public mapping, learned from STUN.
    Srflx,
    /// A TURN relay allocation.
    Relay,
    /// A kind this version does not know (written by a newer agent).
    #[serde(other)]
    Unknown,
}

/// One candidate endpoint of a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub addr: SocketAddr,
}

/// A node's live registration (`nodes/<node>`, attached to its lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub node: String,
    /// Base64 of the node's 32-byte X25519 public key.
    #[serde(default)]
    pub public_key: String,
    /// Host overlay address (VIP).
    #[serde(default = "unspecified")]
    pub address: Ipv4Addr,
    /// The node's pod subnet, if it has one.
    #[serde(default)]
    pub pod_subnet: Option<Ipv4Net>,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub listen_port: u16,
    /// When the record was last written (Unix seconds).
    #[serde(default)]
    pub updated: u64,
    /// CA mode: the node's certificate (a signed string, evio-trust), which alone says what the node owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Fields this version does not know, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl NodeRecord {
    /// A record with only the node name set.
    pub fn new(node: impl Into<String>) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            public_key: String::new(),
            address: Ipv4Addr::UNSPECIFIED,
            pod_subnet: None,
            endpoints: Vec::new(),
            candidates: Vec::new(),
            listen_port: 0,
            updated: 0,
            certificate: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// A node's summary of its peer paths (`paths/<node>`, attached to its lease), written by eviod at a
/// bounded rate for `evioctl ui`. Read as attacker-written: bounded and validated by readers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PathSummary {
    pub node: String,
    /// The agent's version (`CARGO_PKG_VERSION`).
    #[serde(default)]
    pub version: String,
    /// When it was written (Unix seconds).
    #[serde(default)]
    pub time: u64,
    #[serde(default)]
    pub peers: Vec<PathEntry>,
}

/// Bounds of a [`PathSummary`]: a writer does not write a larger one, a reader drops a value larger than
/// [`PathSummary::MAX_BYTES`] unread and keeps at most [`PathSummary::MAX_PEERS`] entries.
impl PathSummary {
    pub const MAX_BYTES: usize = 256 * 1024;
    pub const MAX_PEERS: usize = 1024;
}

/// One peer path of a [`PathSummary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PathEntry {
    pub peer: String,
    /// `direct`, `relay`, `connecting` or `idle` (a path with no inner traffic lately).
    #[serde(default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Round-trip time of NAT traversal's last check on this path, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Unix seconds of the last handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake: Option<u64>,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    /// Inner bytes per second over the last few seconds before `time`.
    #[serde(default)]
    pub rx_rate: u64,
    #[serde(default)]
    pub tx_rate: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_round_trip_and_lenient() {
        let mut r = NodeRecord::new("n1");
        r.public_key = "AAAA".into();
        r.address = "10.10.0.3".parse().unwrap();
        r.pod_subnet = Some("10.244.3.0/24".parse().unwrap());
        r.endpoints = vec!["198.51.100.7:51820".parse().unwrap()];
        r.candidates = vec![Candidate {
            kind: CandidateKind::Srflx,
            addr: "203.0.113.9:4000".parse().unwrap(),
        }];
        r.listen_port = 51820;
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["publicKey"], "AAAA");
        assert_eq!(j["podSubnet"], "10.244.3.0/24");
        assert_eq!(j["candidates"][0]["kind"], "srflx");
        assert_eq!(j["listenPort"], 51820);
        assert_eq!(serde_json::from_value::<NodeRecord>(j).unwrap(), r);

        let old: NodeRecord = serde_json::from_str(r#"{"node":"n2","podSubnet":null}"#).unwrap();
        assert_eq!(old.node, "n2");
        assert_eq!(old.pod_subnet, None);
        let newer: NodeRecord = serde_json::from_str(
            r#"{"node":"n3","future":1,"candidates":[{"kind":"quic","addr":"1.2.3.4:5"}]}"#,
        )
        .unwrap();
        assert_eq!(newer.candidates[0].kind, CandidateKind::Unknown);
        assert_eq!(serde_json::to_value(&newer).unwrap()["future"], 1);
    }
}
