//! Interface address and routes of the TUN device (through `evio-netlink`: rtnetlink, no subprocess), and
//! the host's own addresses.

use std::net::IpAddr;

use anyhow::{Context, Result, anyhow};
use evio_netlink::{Netlink, RouteSpec};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

fn link_index(nl: &mut Netlink, dev: &str) -> Result<u32> {
    Ok(nl
        .link_by_name(dev)?
        .ok_or_else(|| anyhow!("no interface {dev}"))?
        .index)
}

/// Gives the TUN device a VIP with the overlay's prefix (`vip` inside `overlay`: the overlay CIDR becomes
/// a connected route through it), once per family. MTU and link state are set when the device is created.
pub fn configure_tun(dev: &str, vip: IpAddr, overlay: IpNet) -> Result<()> {
    let mut nl = Netlink::new()?;
    let index = link_index(&mut nl, dev)?;
    let addr = IpNet::new(vip, overlay.prefix_len())?;
    nl.add_address(index, &addr)
        .with_context(|| format!("address {addr} on {dev}"))?;
    Ok(())
}

/// Routes `net` through the TUN device (no error if the route is there already).
pub fn add_route(dev: &str, net: &IpNet) -> Result<()> {
    let mut nl = Netlink::new()?;
    let mut r = RouteSpec::new(*net);
    r.oif = Some(link_index(&mut nl, dev)?);
    nl.add_route(&r)?;
    Ok(())
}

/// Removes the route of `net` through the TUN device (no error if it is gone).
pub fn del_route(dev: &str, net: &IpNet) -> Result<()> {
    let mut nl = Netlink::new()?;
    let mut r = RouteSpec::new(*net);
    r.oif = Some(link_index(&mut nl, dev)?);
    nl.del_route(&r)?;
    Ok(())
}

/// An address of a local interface.
#[derive(Debug, Clone)]
pub struct HostAddr {
    pub ifname: String,
    pub addr: IpAddr,
    /// The address with its prefix length: the network it is on.
    pub network: IpNet,
}

/// An interface address with the prefix length of its netmask (without a netmask, the address alone).
fn network_of(a: &nix::ifaddrs::InterfaceAddress) -> Option<IpNet> {
    let addr = a.address.as_ref()?;
    let mask = a.netmask.as_ref();
    let net = if let Some(ip) = addr.as_sockaddr_in() {
        let len = mask
            .and_then(|m| m.as_sockaddr_in())
            .map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
        Ipv4Net::new(ip.ip(), len).map(IpNet::V4)
    } else if let Some(ip) = addr.as_sockaddr_in6() {
        let len = mask
            .and_then(|m| m.as_sockaddr_in6())
            .map_or(128, |m| u128::from(m.ip()).count_ones() as u8);
        Ipv6Net::new(ip.ip(), len).map(IpNet::V6)
    } else {
        return None;
    };
    net.ok()
}

/// IPv4 and IPv6 addresses of interfaces that are up, except loopback and `skip_if`, IPv6 link-local
/// addresses, and addresses inside `skip_nets` (overlay CIDR, own pod subnet).
pub fn host_addresses(skip_if: &str, skip_nets: &[IpNet]) -> Vec<HostAddr> {
    let mut v = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return v;
    };
    for a in addrs {
        use nix::net::if_::InterfaceFlags as F;
        if !a.flags.contains(F::IFF_UP)
            || a.flags.contains(F::IFF_LOOPBACK)
            || a.interface_name == skip_if
        {
            continue;
        }
        let Some(s) = a.address.as_ref() else {
            continue;
        };
        let ip = if let Some(v4) = s.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = s.as_sockaddr_in6() {
            // IPv6 underlay addresses (issue 15): global and unique-local ones; link-local ones need an
            // interface scope that a peer cannot name, so they are no candidates.
            let ip = v6.ip();
            if ip.is_unicast_link_local() || ip.is_multicast() || ip.is_loopback() {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        if skip_nets.iter().any(|n| n.contains(&ip)) || ip.is_unspecified() {
            continue;
        }
        v.push(HostAddr {
            ifname: a.interface_name.clone(),
            addr: ip,
            network: network_of(&a).unwrap_or_else(|| IpNet::from(ip)),
        });
    }
    v
}

/// Addresses of both families with their prefix lengths, of every interface that is up except `skip_if`
/// (loopback and IPv6 link-local included): the host's own networks.
fn interface_networks(skip_if: &str) -> Vec<IpNet> {
    let mut v = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return v;
    };
    for a in addrs {
        if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) || a.interface_name == skip_if {
            continue;
        }
        v.extend(network_of(&a));
    }
    v
}

/// The host's IPv4 networks (see [`interface_networks`]).
pub fn host_networks(skip_if: &str) -> Vec<Ipv4Net> {
    interface_networks(skip_if)
        .into_iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// The host's IPv6 networks (see [`interface_networks`]).
pub fn host_networks6(skip_if: &str) -> Vec<Ipv6Net> {
    interface_networks(skip_if)
        .into_iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        })
        .collect()
}

/// MTU of interface `name` (from sysfs).
pub fn mtu_of(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The underlay MTU: the smallest MTU among the interfaces carrying the host's addresses (1500 if none).
pub fn underlay_mtu(addrs: &[HostAddr]) -> u32 {
    addrs
        .iter()
        .filter_map(|a| mtu_of(&a.ifname))
        .min()
        .unwrap_or(1500)
}
