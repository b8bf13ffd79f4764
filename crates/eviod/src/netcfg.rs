//! Interface address, MTU and routes of the TUN device, and the host's own addresses.
//!
//! This first version drives iproute2 (`ip`), which every node has; it should move to `evio-netlink`
//! (netlink sockets, no subprocess) once that crate's API covers addresses and routes of a given device.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};
use ipnet::{IpNet, Ipv4Net};

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Gives the TUN device its address (VIP with the overlay's prefix: the overlay CIDR becomes a connected
/// route through it), sets the MTU and brings it up.
pub fn configure_tun(dev: &str, vip: Ipv4Addr, overlay: Ipv4Net, mtu: u32) -> Result<()> {
    ip(&["link", "set", "dev", dev, "mtu", &mtu.to_string()])?;
    ip(&[
        "addr",
        "replace",
        &format!("{vip}/{}", overlay.prefix_len()),
        "dev",
        dev,
    ])?;
    ip(&["link", "set", "dev", dev, "up"])?;
    Ok(())
}

/// Routes `net` through the TUN device.
pub fn add_route(dev: &str, net: &IpNet) -> Result<()> {
    ip(&["route", "replace", &net.to_string(), "dev", dev])
}

/// Removes the route of `net` through the TUN device (no error if it is gone).
pub fn del_route(dev: &str, net: &IpNet) -> Result<()> {
    match ip(&["route", "del", &net.to_string(), "dev", dev]) {
        Err(e) if e.to_string().contains("No such process") => Ok(()),
        r => r,
    }
}

/// An address of a local interface.
#[derive(Debug, Clone)]
pub struct HostAddr {
    pub ifname: String,
    pub addr: IpAddr,
}

/// IPv4 addresses of interfaces that are up, except loopback and `skip_if`, and except addresses inside
/// `skip_nets` (overlay CIDR, own pod subnet).
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
        let Some(sa) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) else {
            continue;
        };
        let ip = IpAddr::V4(sa.ip());
        if skip_nets.iter().any(|n| n.contains(&ip)) || ip.is_unspecified() {
            continue;
        }
        v.push(HostAddr {
            ifname: a.interface_name.clone(),
            addr: ip,
        });
    }
    v
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
