//! Cryptokey routing table: longest-prefix match from an IP address to the peer that owns it.
//!
//! Lookups are per packet, so the table keeps one hash map per prefix length (longest first): a lookup
//! costs one mask and one hash probe per distinct prefix length (usually two: the /32 host VIPs and the
//! pod subnets), independent of the number of peers.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::PeerId;

#[derive(Default, Debug, Clone)]
pub struct RouteTable {
    v4: Vec<(u8, HashMap<u32, PeerId>)>,
    v6: Vec<(u8, HashMap<u128, PeerId>)>,
}

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    }
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net -> peer`, replacing a previous owner of exactly the same prefix.
    pub fn insert(&mut self, net: IpNet, peer: PeerId) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = u32::from(n.network()) & mask4(len);
                let pos = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(p) => p,
                    None => {
                        self.v4.push((len, HashMap::new()));
                        self.v4.sort_by_key(|e| std::cmp::Reverse(e.0));
                        self.v4
                            .iter()
                            .position(|(l, _)| *l == len)
                            .expect("just inserted")
                    }
                };
                self.v4[pos].1.insert(key, peer);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = u128::from(n.network()) & mask6(len);
                let pos = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(p) => p,
                    None => {
                        self.v6.push((len, HashMap::new()));
                        self.v6.sort_by_key(|e| std::cmp::Reverse(e.0));
                        self.v6
                            .iter()
                            .position(|(l, _)| *l == len)
                            .expect("just inserted")
                    }
                };
                self.v6[pos].1.insert(key, peer);
            }
        }
    }

    /// Removes every prefix owned by `peer`.
    pub fn remove_peer(&mut self, peer: PeerId) {
        for (_, m) in &mut self.v4 {
            m.retain(|_, p| *p != peer);
        }
        self.v4.retain(|(_, m)| !m.is_empty());
        for (_, m) in &mut self.v6 {
            m.retain(|_, p| *p != peer);
        }
        self.v6.retain(|(_, m)| !m.is_empty());
    }

    /// The peer owning the longest prefix that contains `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<PeerId> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, m)| m.get(&(a & mask4(*len))).copied())
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(len, m)| m.get(&(a & mask6(*len))).copied())
            }
        }
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, m)| m.len()).sum::<usize>()
            + self.v6.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Source and destination addresses of an IPv4/IPv6 packet, or `None` if it is not one.
#[inline]
pub fn packet_addrs(p: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 if p.len() >= 40 => {
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::new();
        t.insert(net("10.244.0.0/16"), 1);
        t.insert(net("10.244.3.0/24"), 2);
        t.insert(net("10.10.0.3/32"), 3);
        t.insert(net("fd00::/64"), 4);
        assert_eq!(t.lookup("10.244.3.9".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("10.244.4.9".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("10.10.0.3".parse().unwrap()), Some(3));
        assert_eq!(t.lookup("10.10.0.4".parse().unwrap()), None);
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), Some(4));
        assert_eq!(t.lookup("fd01::1".parse().unwrap()), None);
        t.remove_peer(2);
        assert_eq!(t.lookup("10.244.3.9".parse().unwrap()), Some(1));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn host_bits_in_prefix_are_ignored() {
        let mut t = RouteTable::new();
        t.insert(net("10.244.3.7/24"), 1);
        assert_eq!(t.lookup("10.244.3.200".parse().unwrap()), Some(1));
    }

    #[test]
    fn parses_packet_addresses() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let (s, d) = packet_addrs(&p).unwrap();
        assert_eq!(s, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(d, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert!(packet_addrs(&p[..19]).is_none());
        assert!(packet_addrs(&[0x60; 39]).is_none());
        assert!(packet_addrs(&[]).is_none());
    }
}
