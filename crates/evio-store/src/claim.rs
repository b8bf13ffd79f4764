//! A claim record and the two keys it lives under (the same JSON value under both): what the claim
//! algorithm ([`crate::pool`]) writes and what the snapshot and the watch believe ([`crate::store`]).

use std::fmt::Display;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::keys;
use crate::records::{AddressClaim, SubnetClaim, unix_now};

/// The names of a claim's etcd operations, as errors report them.
pub(crate) struct OpNames {
    pub claim_read: &'static str,
    pub claim: &'static str,
    pub read: &'static str,
    pub list: &'static str,
    pub release_read: &'static str,
    pub release: &'static str,
}

/// The operation names for claims of `$what` ("claim subnet", "release subnet (read)", ...).
macro_rules! op_names {
    ($what:literal) => {
        OpNames {
            claim_read: concat!("claim ", $what, " (read)"),
            claim: concat!("claim ", $what),
            read: concat!("read ", $what, " claim"),
            list: concat!("list ", $what, " claims"),
            release_read: concat!("release ", $what, " (read)"),
            release: concat!("release ", $what),
        }
    };
}

/// A claim record and where it lives: the same JSON value under both index keys.
pub(crate) trait Claim: Serialize + DeserializeOwned + Clone {
    /// What is claimed (a subnet, an address).
    type Item: Copy + PartialEq + Display;
    /// Prefix of the keys indexed by item (`.../by-subnet/`, `.../by-address/`).
    const BY_ITEM: &'static str;
    /// Prefix of the keys indexed by node (`.../by-node/`).
    const BY_NODE: &'static str;
    const OPS: OpNames;
    /// A new claim of `item` by `node`, made now.
    fn new(node: &str, item: Self::Item) -> Self;
    fn node(&self) -> &str;
    fn item(&self) -> Self::Item;
    /// The item as one key segment (no `/`).
    fn segment(item: Self::Item) -> String;
    /// Sort key of a listing (lowest item first).
    fn order(&self) -> (u32, u8);

    fn by_item(item: Self::Item) -> String {
        format!("{}{}", Self::BY_ITEM, Self::segment(item))
    }

    fn by_node(node: &str) -> String {
        format!("{}{node}", Self::BY_NODE)
    }
}

impl Claim for SubnetClaim {
    type Item = Ipv4Net;
    const BY_ITEM: &'static str = keys::SUBNETS_BY_SUBNET;
    const BY_NODE: &'static str = keys::SUBNETS_BY_NODE;
    const OPS: OpNames = op_names!("subnet");

    fn new(node: &str, subnet: Ipv4Net) -> Self {
        SubnetClaim {
            node: node.to_string(),
            subnet,
            since: unix_now(),
        }
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn item(&self) -> Ipv4Net {
        self.subnet
    }

    fn segment(subnet: Ipv4Net) -> String {
        keys::subnet_segment(&subnet)
    }

    fn order(&self) -> (u32, u8) {
        (u32::from(self.subnet.network()), self.subnet.prefix_len())
    }
}

impl Claim for AddressClaim {
    type Item = Ipv4Addr;
    const BY_ITEM: &'static str = keys::ADDRESSES_BY_ADDRESS;
    const BY_NODE: &'static str = keys::ADDRESSES_BY_NODE;
    const OPS: OpNames = op_names!("address");

    fn new(node: &str, address: Ipv4Addr) -> Self {
        AddressClaim {
            node: node.to_string(),
            address,
            since: unix_now(),
        }
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn item(&self) -> Ipv4Addr {
        self.address
    }

    fn segment(address: Ipv4Addr) -> String {
        address.to_string()
    }

    fn order(&self) -> (u32, u8) {
        (u32::from(self.address), 32)
    }
}
