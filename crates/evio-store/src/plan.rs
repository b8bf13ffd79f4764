//! Pure subnet arithmetic: a pool CIDR cut into `2^nodeBits` equal node subnets.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Why a subnet plan (pool CIDR + nodeBits) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0:?} is not an IPv4 CIDR (expected a.b.c.d/len, e.g. 10.244.0.0/16)")]
    NotCidr(String),
    #[error("{given} is not a network address: host bits are set (did you mean {network}?)")]
    HostBitsSet { given: String, network: Ipv4Net },
    #[error("nodeBits {0:?} is not a whole number between 0 and 30")]
    BadNodeBits(String),
    #[error(
        "{pool} with nodeBits {node_bits} gives node subnets of prefix /{prefix}: fewer than 2 host bits \
         leave no room for a gateway and pods (use a larger pool or fewer nodeBits; at most /30)"
    )]
    TooFewHostBits {
        pool: Ipv4Net,
        node_bits: u8,
        prefix: u32,
    },
    #[error("{subnet} has fewer than 2 host bits: no room for a gateway and a pod")]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error("{0:?} is not an IPv6 CIDR (expected e.g. fd00:10:244::/56)")]
    NotCidr6(String),
    #[error("{given} is not a network address: host bits are set (did you mean {network}?)")]
    HostBitsSet6 { given: String, network: Ipv6Net },
    #[error(
        "{pool} with nodeBits {node_bits} gives node subnets of prefix /{prefix}: at most /{MAX_PREFIX6} \
         leaves room for pods (use a larger IPv6 pool)"
    )]
    TooFewHostBits6 {
        pool: Ipv6Net,
        node_bits: u8,
        prefix: u32,
    },
}

/// The longest IPv6 node subnet prefix (at least 8 host bits: a gateway and 250-odd pods, like a /24).
pub const MAX_PREFIX6: u32 = 120;

/// Parses an IPv4 CIDR strictly: a network address (no host bits set) with a prefix length.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, PlanError> {
    let t = s.trim();
    if !t.contains('/') {
        return Err(PlanError::NotCidr(s.to_string()));
    }
    let net: Ipv4Net = t.parse().map_err(|_| PlanError::NotCidr(s.to_string()))?;
    if net.trunc() != net {
        return Err(PlanError::HostBitsSet {
            given: s.to_string(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// Reads `nodeBits` from JSON: a number (`8`) or a string (`"8"`, as the original Evio ConfigMap wrote it).
pub fn node_bits_from_json(v: &serde_json::Value) -> Result<u8, PlanError> {
    let bad = || PlanError::BadNodeBits(v.to_string());
    let n: u64 = match v {
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(bad)?,
        serde_json::Value::String(s) => s.trim().parse().map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    if n > 30 {
        return Err(bad());
    }
    Ok(n as u8)
}

/// One node's subnet: `.0` (network) and the broadcast unused, `.1` the bridge gateway, `.2`..broadcast-1
/// the pod range handed to host-local IPAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSubnet {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub range_start: Ipv4Addr,
    pub range_end: Ipv4Addr,
}

impl NodeSubnet {
    /// The layout of `subnet`; refuses subnets with fewer than 2 host bits.
    pub fn of(subnet: Ipv4Net) -> Result<NodeSubnet, PlanError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > 30 {
            return Err(PlanError::SubnetTooSmall { subnet });
        }
        let net = u32::from(subnet.network());
        let bcast = u32::from(subnet.broadcast());
        Ok(NodeSubnet {
            subnet,
            gateway: Ipv4Addr::from(net + 1),
            range_start: Ipv4Addr::from(net + 2),
            range_end: Ipv4Addr::from(bcast - 1),
        })
    }

    /// How many pod addresses the range holds (`2^hostBits - 3`: 253 for a /24).
    pub fn pod_addresses(&self) -> u32 {
        u32::from(self.range_end) - u32::from(self.range_start) + 1
    }
}

/// A pool cut into `2^node_bits` node subnets of prefix `pool.prefix_len() + node_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPlan {
    pool: Ipv4Net,
    node_bits: u8,
}

impl SubnetPlan {
    /// Checks the plan: `pool` must be a network address and the node subnets must keep at least 2 host bits.
    pub fn new(pool: Ipv4Net, node_bits: u8) -> Result<SubnetPlan, PlanError> {
        if pool.trunc() != pool {
            return Err(PlanError::HostBitsSet {
                given: pool.to_string(),
                network: pool.trunc(),
            });
        }
        let prefix = u32::from(pool.prefix_len()) + u32::from(node_bits);
        if prefix > 30 {
            return Err(PlanError::TooFewHostBits {
                pool,
                node_bits,
                prefix,
            });
        }
        Ok(SubnetPlan { pool, node_bits })
    }

    /// Parses `podCIDR` text and checks the plan (see [`SubnetPlan::new`]).
    pub fn parse(pool: &str, node_bits: u8) -> Result<SubnetPlan, PlanError> {
        SubnetPlan::new(parse_cidr(pool)?, node_bits)
    }

    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    pub fn node_bits(&self) -> u8 {
        self.node_bits
    }

    /// Prefix length of every node subnet.
    pub fn node_prefix(&self) -> u8 {
        self.pool.prefix_len() + self.node_bits
    }

    /// Number of node subnets (`2^node_bits`).
    pub fn len(&self) -> u64 {
        1u64 << self.node_bits
    }

    /// Always false: a plan has at least one subnet.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Addresses per node subnet.
    fn subnet_size(&self) -> u64 {
        1u64 << (32 - u32::from(self.node_prefix()))
    }

    /// The `index`-th node subnet (0 is the lowest), or None past the end.
    pub fn subnet(&self, index: u64) -> Option<NodeSubnet> {
        if index >= self.len() {
            return None;
        }
        let base = u64::from(u32::from(self.pool.network())) + index * self.subnet_size();
        let net = Ipv4Net::new(Ipv4Addr::from(base as u32), self.node_prefix()).ok()?;
        NodeSubnet::of(net).ok()
    }

    /// The index of `subnet` when it is exactly one of this plan's node subnets.
    pub fn index_of(&self, subnet: &Ipv4Net) -> Option<u64> {
        if subnet.prefix_len() != self.node_prefix()
            || subnet.trunc() != *subnet
            || !self.pool.contains(subnet)
        {
            return None;
        }
        let off =
            u64::from(u32::from(subnet.network())) - u64::from(u32::from(self.pool.network()));
        Some(off / self.subnet_size())
    }

    /// Indices of the node subnets that overlap `other` (any CIDR, e.g. a claim made under an older plan).
    pub fn overlapping(&self, other: &Ipv4Net) -> std::ops::Range<u64> {
        let ps = u64::from(u32::from(self.pool.network()));
        let pe = u64::from(u32::from(self.pool.broadcast()));
        let os = u64::from(u32::from(other.network()));
        let oe = u64::from(u32::from(other.broadcast()));
        let (s, e) = (ps.max(os), pe.min(oe));
        if s > e {
            return 0..0;
        }
        let size = self.subnet_size();
        (s - ps) / size..(e - ps) / size + 1
    }

    /// All node subnets, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = NodeSubnet> + '_ {
        (0..self.len()).filter_map(|i| self.subnet(i))
    }
}

/// The IPv6 half of a dual-stack plan: the IPv6 pool cut into `2^node_bits` node subnets (its own node
/// prefix length, e.g. /64s), node `i`'s IPv6 subnet being the `i`-th: the one at the index of its IPv4
/// subnet. So a node's IPv4 subnet claim is its IPv6 claim too: one claim per node, one certificate
/// entry, nothing that could disagree between the families (and no second etcd write). The IPv6 pool
/// needs at least as many subnets as the IPv4 one ([`SubnetPlan6::holds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPlan6 {
    pool: Ipv6Net,
    node_bits: u8,
}

impl SubnetPlan6 {
    pub fn new(pool: Ipv6Net, node_bits: u8) -> Result<SubnetPlan6, PlanError> {
        if pool.trunc() != pool {
            return Err(PlanError::HostBitsSet6 {
                given: pool.to_string(),
                network: pool.trunc(),
            });
        }
        let prefix = u32::from(pool.prefix_len()) + u32::from(node_bits);
        if prefix > MAX_PREFIX6 {
            return Err(PlanError::TooFewHostBits6 {
                pool,
                node_bits,
                prefix,
            });
        }
        Ok(SubnetPlan6 { pool, node_bits })
    }

    /// Parses the IPv6 pool's text strictly (a network address with a prefix length) and checks the plan.
    pub fn parse(pool: &str, node_bits: u8) -> Result<SubnetPlan6, PlanError> {
        let t = pool.trim();
        let net: Ipv6Net = t
            .contains('/')
            .then(|| t.parse().ok())
            .flatten()
            .ok_or_else(|| PlanError::NotCidr6(pool.to_string()))?;
        SubnetPlan6::new(net, node_bits)
    }

    pub fn pool(&self) -> Ipv6Net {
        self.pool
    }

    pub fn node_prefix(&self) -> u8 {
        self.pool.prefix_len() + self.node_bits
    }

    /// The `index`-th node subnet, or None past the end (`2^nodeBits` subnets).
    pub fn subnet(&self, index: u64) -> Option<Ipv6Net> {
        if index >= 1u64 << self.node_bits {
            return None;
        }
        let shift = 128 - u32::from(self.node_prefix());
        let base = u128::from(self.pool.network()) + (u128::from(index) << shift);
        Ipv6Net::new(Ipv6Addr::from(base), self.node_prefix()).ok()
    }

    /// True if every node subnet of `plan4` has its pair here.
    pub fn holds(&self, plan4: &SubnetPlan) -> bool {
        self.node_bits >= plan4.node_bits()
    }

    /// The IPv6 subnet paired with node subnet `subnet4` of `plan4` (same index), if it is one of its and
    /// the index fits.
    pub fn paired(&self, plan4: &SubnetPlan, subnet4: &Ipv4Net) -> Option<Ipv6Net> {
        self.subnet(plan4.index_of(subnet4)?)
    }
}

/// A host's IPv6 VIP in a dual-stack host overlay: at the same offset in `overlay6` as its IPv4 VIP `addr`
/// in `overlay` (so the IPv4 address claim, or the certificate's address, is the IPv6 one too). `None` if
/// `addr` is outside `overlay` or its offset does not fit in `overlay6`.
pub fn paired_address6(overlay: Ipv4Net, addr: Ipv4Addr, overlay6: Ipv6Net) -> Option<Ipv6Addr> {
    if !overlay.contains(&addr) {
        return None;
    }
    let offset = u128::from(u32::from(addr) - u32::from(overlay.network()));
    let host_bits = 128 - u32::from(overlay6.prefix_len());
    if host_bits < 128 && offset >> host_bits != 0 {
        return None;
    }
    Some(Ipv6Addr::from(u128::from(overlay6.network()) + offset))
}

/// The bridge's IPv6 gateway in a node's IPv6 subnet: its first address after the network (`::1`).
pub fn gateway6(subnet: &Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()) + 1)
}

/// The usable host addresses of a pool (for host overlay VIPs): all but the network and broadcast
/// addresses, except for /31 and /32 where every address is usable. Returns (first, last) as u32.
pub fn host_range(pool: &Ipv4Net) -> (u32, u32) {
    let n = u32::from(pool.network());
    let b = u32::from(pool.broadcast());
    if pool.prefix_len() >= 31 {
        (n, b)
    } else {
        (n + 1, b - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_matches_the_design() {
        let p = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        assert_eq!(p.len(), 256);
        let s = p.subnet(3).unwrap();
        assert_eq!(s.subnet.to_string(), "10.244.3.0/24");
        assert_eq!(s.gateway.to_string(), "10.244.3.1");
        assert_eq!(s.range_start.to_string(), "10.244.3.2");
        assert_eq!(s.range_end.to_string(), "10.244.3.254");
        assert_eq!(s.pod_addresses(), 253);
        assert_eq!(p.subnet(256), None);
        assert_eq!(p.index_of(&"10.244.255.0/24".parse().unwrap()), Some(255));
        assert_eq!(p.index_of(&"10.245.0.0/24".parse().unwrap()), None);
        assert_eq!(p.index_of(&"10.244.0.0/23".parse().unwrap()), None);
    }

    #[test]
    fn refuses_bad_plans() {
        assert!(matches!(
            SubnetPlan::parse("10.244.1.0/16", 8),
            Err(PlanError::HostBitsSet { .. })
        ));
        assert!(matches!(
            SubnetPlan::parse("10.244.0.0", 8),
            Err(PlanError::NotCidr(_))
        ));
        assert!(matches!(
            SubnetPlan::parse("banana/8", 8),
            Err(PlanError::NotCidr(_))
        ));
        assert!(matches!(
            SubnetPlan::parse("10.244.0.0/24", 7),
            Err(PlanError::TooFewHostBits { .. })
        ));
        assert!(SubnetPlan::parse("10.244.0.0/24", 6).is_ok());
        let e = SubnetPlan::parse("10.244.1.0/16", 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.244.0.0/16"), "{e}");
    }

    #[test]
    fn node_bits_number_or_string() {
        use serde_json::json;
        assert_eq!(node_bits_from_json(&json!(8)), Ok(8));
        assert_eq!(node_bits_from_json(&json!("8")), Ok(8));
        assert_eq!(node_bits_from_json(&json!(" 12 ")), Ok(12));
        assert!(node_bits_from_json(&json!(-1)).is_err());
        assert!(node_bits_from_json(&json!(8.5)).is_err());
        assert!(node_bits_from_json(&json!("eight")).is_err());
        assert!(node_bits_from_json(&json!(31)).is_err());
        assert!(node_bits_from_json(&json!(null)).is_err());
    }

    #[test]
    fn overlapping_claims_of_another_plan() {
        let p = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        assert_eq!(p.overlapping(&"10.244.2.0/23".parse().unwrap()), 2..4);
        assert_eq!(p.overlapping(&"10.244.5.128/25".parse().unwrap()), 5..6);
        assert_eq!(p.overlapping(&"10.0.0.0/8".parse().unwrap()), 0..256);
        assert_eq!(p.overlapping(&"10.245.0.0/24".parse().unwrap()), 0..0);
    }

    #[test]
    fn host_ranges() {
        assert_eq!(
            host_range(&"10.10.0.0/16".parse().unwrap()),
            (0x0a0a_0001, 0x0a0a_fffe)
        );
        assert_eq!(
            host_range(&"10.10.0.0/31".parse().unwrap()),
            (0x0a0a_0000, 0x0a0a_0001)
        );
    }

    #[test]
    fn the_ipv6_plan_pairs_each_ipv4_subnet_with_one_ipv6_subnet() {
        let plan4 = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        let plan6 = SubnetPlan6::parse("fd00:10:244::/48", 8).unwrap();
        assert_eq!(plan6.node_prefix(), 56);
        let s4: Ipv4Net = "10.244.7.0/24".parse().unwrap();
        assert_eq!(
            plan6.paired(&plan4, &s4),
            Some("fd00:10:244:700::/56".parse().unwrap())
        );
        assert_eq!(
            plan6.subnet(255),
            Some("fd00:10:244:ff00::/56".parse().unwrap())
        );
        assert_eq!(plan6.subnet(256), None);
        // Distinct IPv4 subnets, distinct IPv6 ones.
        let all: std::collections::HashSet<Ipv6Net> = plan4
            .iter()
            .map(|s| plan6.paired(&plan4, &s.subnet).unwrap())
            .collect();
        assert_eq!(all.len(), 256);
        // Not a node subnet of the plan, or another nodeBits: no pair.
        assert_eq!(
            plan6.paired(&plan4, &"10.244.7.0/25".parse().unwrap()),
            None
        );
        assert_eq!(
            plan6.paired(&plan4, &"10.245.7.0/24".parse().unwrap()),
            None
        );
        // Its own node prefix: /64s out of a /48 (16 bits: holds the 8 of the IPv4 plan).
        let p64 = SubnetPlan6::parse("fd00:10:244::/48", 16).unwrap();
        assert!(p64.holds(&plan4) && !SubnetPlan6::parse("fd00::/48", 4).unwrap().holds(&plan4));
        assert_eq!(
            p64.paired(&plan4, &s4),
            Some("fd00:10:244:7::/64".parse().unwrap())
        );
        let small = SubnetPlan6::parse("fd00:10:244::/48", 2).unwrap();
        assert_eq!(small.paired(&plan4, &s4), None, "index 7 of 4 subnets");
        assert_eq!(
            gateway6(&"fd00:10:244:700::/56".parse().unwrap()).to_string(),
            "fd00:10:244:700::1"
        );
    }

    #[test]
    fn ipv6_vips_sit_at_the_ipv4_vips_offset() {
        let o4: Ipv4Net = "10.10.0.0/16".parse().unwrap();
        let o6: Ipv6Net = "fd00:10:10::/64".parse().unwrap();
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            paired_address6(o4, a("10.10.1.48"), o6),
            Some("fd00:10:10::130".parse().unwrap())
        );
        assert_eq!(paired_address6(o4, a("10.11.0.1"), o6), None);
        // An IPv6 overlay too small for the IPv4 one's offsets.
        let small: Ipv6Net = "fd00:10:10::/120".parse().unwrap();
        assert_eq!(paired_address6(o4, a("10.10.1.48"), small), None);
        assert_eq!(
            paired_address6(o4, a("10.10.0.48"), small),
            Some("fd00:10:10::30".parse().unwrap())
        );
    }

    #[test]
    fn bad_ipv6_plans_are_refused() {
        for (pool, bits, what) in [
            ("10.244.0.0/16", 8, "not an IPv6 CIDR"),
            ("fd00::", 8, "not an IPv6 CIDR"),
            ("fd00::1/48", 8, "host bits"),
            ("fd00::/116", 8, "at most /120"),
        ] {
            let e = SubnetPlan6::parse(pool, bits).unwrap_err().to_string();
            assert!(e.contains(what), "{pool}: {e}");
        }
    }
}
