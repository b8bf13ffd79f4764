//! Links: lookup, veth pairs, bridges, attributes, deletion.

use std::fs::File;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};

use crate::{Netlink, Result};

/// What we read back about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`bridge`, `veth`, `tun`, ...), when the link has one.
    pub kind: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Index of the bridge (or other controller) the link is a port of.
    pub master: Option<u32>,
    pub alias: Option<String>,
    pub up: bool,
    /// The queueing discipline (`noop` until the kernel has activated the link's queues).
    pub qdisc: Option<String>,
}

impl Link {
    /// `aa:bb:cc:dd:ee:ff`, if the link has an Ethernet address.
    pub fn mac_string(&self) -> Option<String> {
        self.mac.map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }

    fn from_message(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            mtu: 0,
            master: None,
            alias: None,
            up: m.header.flags.contains(LinkFlags::Up),
            qdisc: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Mtu(v) => l.mtu = *v,
                LinkAttribute::Controller(v) => l.master = Some(*v),
                LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
                LinkAttribute::Qdisc(s) => l.qdisc = Some(s.clone()),
                LinkAttribute::Address(b) if b.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(b);
                    l.mac = Some(mac);
                }
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = Some(kind_name(k));
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Changes applied to an existing link in one request (all optional).
#[derive(Debug, Clone, Default)]
pub struct LinkChange {
    pub up: bool,
    pub mtu: Option<u32>,
    /// Make the link a port of this bridge (index).
    pub master: Option<u32>,
    pub alias: Option<String>,
    /// Set the Ethernet address (setting the current one again makes the kernel announce the link's
    /// IPv4 addresses with a gratuitous ARP when `arp_notify` is on).
    pub mac: Option<[u8; 6]>,
}

impl Netlink {
    /// The link called `name`, or `None`.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(
            &format!("get link {name}"),
            RouteNetlinkMessage::GetLink(m),
            0,
        ) {
            Ok(v) => Ok(first_link(&v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link with index `index`, or `None`.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(
            &format!("get link #{index}"),
            RouteNetlinkMessage::GetLink(m),
            0,
        ) {
            Ok(v) => Ok(first_link(&v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let v = self.request(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(v.iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates bridge `name` with a fixed MAC (so it never changes as ports come and go) and `mtu`.
    /// Returns false when a link of that name already exists (not an error: concurrent creators race).
    pub fn create_bridge(&mut self, name: &str, mac: [u8; 6], mtu: Option<u32>) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        match self.request(
            &format!("create bridge {name}"),
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair: `host` here, `peer` directly inside the namespace `peer_ns` (so the pod side
    /// never appears in this namespace). Fails with EEXIST if either name is taken on its side.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_ns: &File,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.to_string()));
        p.attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        if let Some(mtu) = mtu {
            p.attributes.push(LinkAttribute::Mtu(mtu));
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(host.to_string()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        self.request(
            &format!("create veth {host} (peer {peer})"),
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Applies `c` to link `index` in one request.
    pub fn set_link(&mut self, index: u32, c: &LinkChange) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if c.up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        if let Some(mtu) = c.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(master) = c.master {
            m.attributes.push(LinkAttribute::Controller(master));
        }
        if let Some(a) = &c.alias {
            m.attributes.push(LinkAttribute::IfAlias(a.clone()));
        }
        if let Some(mac) = c.mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        self.request(
            &format!("set link #{index}"),
            RouteNetlinkMessage::SetLink(m),
            0,
        )?;
        Ok(())
    }

    /// Sets hairpin mode on bridge port `index` (it must already be a port of a bridge).
    pub fn set_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                on,
            )])),
        ]));
        self.request(
            &format!("set hairpin on link #{index}"),
            RouteNetlinkMessage::NewLink(m),
            0,
        )?;
        Ok(())
    }

    /// Deletes link `index`; Ok(false) when it was already gone.
    pub fn delete_link(&mut self, index: u32) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(
            &format!("delete link #{index}"),
            RouteNetlinkMessage::DelLink(m),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the link called `name`; Ok(false) when there is none.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(
            &format!("delete link {name}"),
            RouteNetlinkMessage::DelLink(m),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn first_link(v: &[RouteNetlinkMessage]) -> Option<Link> {
    v.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
        _ => None,
    })
}
