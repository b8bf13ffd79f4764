//! Addresses and routes on any link of the socket's namespace.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::{Netlink, Result};

/// A route to add or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    pub metric: Option<u32>,
    /// Routing table (default main).
    pub table: Option<u32>,
    /// Route MTU (`RTAX_MTU`).
    pub mtu: Option<u32>,
}

impl RouteSpec {
    pub fn new(dst: IpNet) -> RouteSpec {
        RouteSpec {
            dst,
            gateway: None,
            oif: None,
            metric: None,
            table: None,
            mtu: None,
        }
    }
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn addr_message(index: u32, addr: &IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(&addr.addr());
    m.header.prefix_len = addr.prefix_len();
    m.header.index = index;
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    m
}

fn route_message(r: &RouteSpec) -> RouteMessage {
    let mut m = RouteMessage::default();
    let h = &mut m.header;
    h.address_family = family(&r.dst.addr());
    h.destination_prefix_length = r.dst.prefix_len();
    h.protocol = RouteProtocol::Boot;
    h.kind = RouteType::Unicast;
    h.scope = if r.gateway.is_none() {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    let table = r.table.unwrap_or(RouteHeader::RT_TABLE_MAIN as u32);
    h.table = if table < 256 { table as u8 } else { 0 };
    if r.dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                r.dst.network(),
            )));
    }
    if let Some(gw) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(p) = r.metric {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    if table >= 256 {
        m.attributes.push(RouteAttribute::Table(table));
    }
    if let Some(mtu) = r.mtu {
        m.attributes.push(RouteAttribute::Metrics(vec![
            netlink_packet_route::route::RouteMetric::Mtu(mtu),
        ]));
    }
    m
}

impl Netlink {
    /// Adds `addr` to link `index`. Idempotent: Ok(false) when the link already has it. IPv6 addresses skip
    /// duplicate address detection (the pod's address is assigned by IPAM, not guessed).
    pub fn add_address(&mut self, index: u32, addr: &IpNet) -> Result<bool> {
        let mut m = addr_message(index, addr);
        if addr.addr().is_ipv6() {
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match self.request(
            &format!("add address {addr} to link #{index}"),
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes `addr` from link `index`; Ok(false) when it was not there.
    pub fn del_address(&mut self, index: u32, addr: &IpNet) -> Result<bool> {
        let m = addr_message(index, addr);
        match self.request(
            &format!("delete address {addr} from link #{index}"),
            RouteNetlinkMessage::DelAddress(m),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The addresses (with prefix) of link `index`, or of every link when `index` is 0.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<(u32, IpNet)>> {
        let mut m = AddressMessage::default();
        m.header.index = index;
        let v = self.request(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(m),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for msg in v {
            let RouteNetlinkMessage::NewAddress(a) = msg else {
                continue;
            };
            if index != 0 && a.header.index != index {
                continue;
            }
            let ip = a
                .attributes
                .iter()
                .find_map(|x| {
                    if let AddressAttribute::Local(ip) = x {
                        Some(*ip)
                    } else {
                        None
                    }
                })
                .or_else(|| {
                    a.attributes.iter().find_map(|x| {
                        if let AddressAttribute::Address(ip) = x {
                            Some(*ip)
                        } else {
                            None
                        }
                    })
                });
            if let Some(ip) = ip
                && let Ok(net) = IpNet::new(ip, a.header.prefix_len)
            {
                out.push((a.header.index, net));
            }
        }
        Ok(out)
    }

    /// Adds a route. Idempotent: Ok(false) when the same route already exists.
    pub fn add_route(&mut self, r: &RouteSpec) -> Result<bool> {
        match self.request(
            &format!("add route {} via {:?}", r.dst, r.gateway),
            RouteNetlinkMessage::NewRoute(route_message(r)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes a route; Ok(false) when there was none.
    pub fn del_route(&mut self, r: &RouteSpec) -> Result<bool> {
        let mut m = route_message(r);
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
        match self.request(
            &format!("delete route {}", r.dst),
            RouteNetlinkMessage::DelRoute(m),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The routes of the main table for one address family (`v6` false: IPv4).
    pub fn routes(&mut self, v6: bool) -> Result<Vec<RouteSpec>> {
        let mut m = RouteMessage::default();
        m.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let v = self.request("dump routes", RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for msg in v {
            let RouteNetlinkMessage::NewRoute(r) = msg else {
                continue;
            };
            let mut table = r.header.table as u32;
            let mut dst = None;
            let mut spec_gw = None;
            let mut oif = None;
            let mut metric = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        dst = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        dst = Some(IpAddr::V6(*ip))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                        spec_gw = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => {
                        spec_gw = Some(IpAddr::V6(*ip))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = Some(*p),
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if table != RouteHeader::RT_TABLE_MAIN as u32 {
                continue;
            }
            let dst = dst.unwrap_or(if v6 {
                IpAddr::V6(0.into())
            } else {
                IpAddr::V4(0.into())
            });
            let Ok(dst) = IpNet::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            out.push(RouteSpec {
                dst,
                gateway: spec_gw,
                oif,
                metric,
                table: Some(table),
                mtu: None,
            });
        }
        Ok(out)
    }
}
