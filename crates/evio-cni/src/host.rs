//! The host effects of the verbs, behind traits: the bridge ([`Bridge`], evio-bridge), the masquerade table
//! ([`Firewall`], evio-firewall), the delegated IPAM plugin ([`Ipam`]) and the links ([`PodLinks`] for
//! ADD, [`HostLinks`] for DEL and GC). [`Real`] is what the plugin runs; the tests run the same verbs
//! against recording doubles (`fake.rs`), so ADD's rollback and DEL's and GC's error handling are tested
//! without root.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::process::Child;

pub use evio_bridge::{Bridge, PortOwner};
use evio_cni_types::config::NetConf;
use evio_cni_types::env::Env;
use evio_cni_types::result::Route;
use evio_cni_types::{CniError, ErrorCode};
pub use evio_firewall::Firewall;
use evio_netlink::{LinkChange, Netlink, RouteSpec, netns, sysctl};
use ipnet::IpNet;
use tracing::{debug, warn};

use crate::common::{bridge_backend, io_err, open_netns};
use crate::delegate::Delegate;

/// The effects one plugin run may have on the host.
pub trait Host {
    /// The bridge backend of the config (built once per run).
    fn bridge(&self) -> Result<&dyn Bridge, CniError>;
    fn firewall(&self) -> &dyn Firewall;
    /// The config's IPAM plugin, found and asked for its versions.
    fn ipam(&self, conf: &NetConf, env: &Env) -> Result<Box<dyn Ipam>, CniError>;
    /// The links of the attachment `env` names (ADD): checks the pod netns and that `CNI_IFNAME` is free.
    fn pod_links(&self, env: &Env) -> Result<Box<dyn PodLinks>, CniError>;
    /// The node's links (DEL, GC).
    fn host_links(&self) -> Result<Box<dyn HostLinks>, CniError>;
}

/// A delegated plugin run, still going or finished.
pub enum Running {
    Child(Child),
    /// Already finished (what the test doubles hand back).
    #[cfg_attr(not(test), allow(dead_code))]
    Done(Result<Vec<u8>, CniError>),
}

/// The delegated IPAM plugin.
pub trait Ipam: Sync {
    /// The version we talk to it in.
    fn version(&self) -> &str;
    /// Starts `command` with `stdin`, for another attachment than the environment's when given.
    fn start(
        &self,
        command: &str,
        stdin: &[u8],
        attachment: Option<(&str, &str)>,
    ) -> Result<Running, CniError>;
    /// Waits for a run: its stdout, or its CNI error.
    fn finish(&self, run: Running, command: &str) -> Result<Vec<u8>, CniError>;

    fn run(
        &self,
        command: &str,
        stdin: &[u8],
        attachment: Option<(&str, &str)>,
    ) -> Result<Vec<u8>, CniError> {
        let r = self.start(command, stdin, attachment)?;
        self.finish(r, command)
    }

    /// True when it speaks `v` or newer.
    fn speaks_at_least(&self, v: &str) -> bool {
        use evio_cni_types::version::Version;
        matches!((Version::parse(self.version()), Version::parse(v)), (Some(a), Some(b)) if a >= b)
    }
}

impl Ipam for Delegate {
    fn version(&self) -> &str {
        &self.version
    }
    fn start(
        &self,
        command: &str,
        stdin: &[u8],
        attachment: Option<(&str, &str)>,
    ) -> Result<Running, CniError> {
        self.spawn(command, stdin, attachment).map(Running::Child)
    }
    fn finish(&self, run: Running, command: &str) -> Result<Vec<u8>, CniError> {
        match run {
            Running::Child(c) => Delegate::finish(self, c, command),
            Running::Done(r) => r,
        }
    }
}

/// ADD's links: the veth pair of one attachment and what goes on it.
pub trait PodLinks {
    /// Creates the veth pair (the pod end `CNI_IFNAME` in the pod netns, a fresh host end), both up, with
    /// `arp_notify` on the pod end. Returns the host end's name.
    fn create_veth(&mut self, mtu: Option<u32>) -> Result<String, CniError>;
    /// Deletes the host end (and with it the pod end): ADD's rollback.
    fn delete_veth(&mut self, host: &str) -> Result<(), CniError>;
    /// The MAC of the node link `name` (`what` names it in the error when it is gone).
    fn host_mac(&mut self, name: &str, what: &str) -> Result<Option<String>, CniError>;
    fn set_hairpin(&mut self, host: &str) -> Result<(), CniError>;
    /// Puts the gateway address `gw` on the bridge and turns forwarding on for its family.
    fn add_gateway(&mut self, bridge: &str, gw: IpNet) -> Result<(), CniError>;
    fn add_pod_address(&mut self, addr: &IpNet) -> Result<(), CniError>;
    fn add_pod_route(&mut self, r: &Route, gateway: Option<IpAddr>) -> Result<(), CniError>;
    /// Makes the kernel announce the pod's IPv4 addresses (gratuitous ARP); best effort.
    fn announce(&mut self);
    fn pod_mac(&self) -> Option<String>;
}

/// DEL's and GC's links.
pub trait HostLinks {
    /// Deletes the node link `name` if it carries `owner`'s tag; whether it did.
    fn delete_owned(&mut self, name: &str, owner: &PortOwner) -> Result<bool, CniError>;
    /// Deletes `ifname` in the netns at `netns`, if that netns still exists.
    fn delete_in_netns(&mut self, netns: &str, ifname: &str) -> Result<(), CniError>;
}

/// The real host: netlink, the configured bridge backend, nftables, delegate binaries.
pub struct Real {
    bridge: Result<Box<dyn Bridge>, CniError>,
    firewall: evio_firewall::Nftables,
}

impl Real {
    pub fn new(conf: &NetConf) -> Real {
        Real {
            bridge: bridge_backend(conf),
            firewall: evio_firewall::Nftables,
        }
    }
}

impl Host for Real {
    fn bridge(&self) -> Result<&dyn Bridge, CniError> {
        self.bridge.as_deref().map_err(Clone::clone)
    }
    fn firewall(&self) -> &dyn Firewall {
        &self.firewall
    }
    fn ipam(&self, conf: &NetConf, env: &Env) -> Result<Box<dyn Ipam>, CniError> {
        Ok(Box::new(Delegate::ipam(conf, env)?))
    }
    fn pod_links(&self, env: &Env) -> Result<Box<dyn PodLinks>, CniError> {
        Ok(Box::new(NetlinkPod::open(env)?))
    }
    fn host_links(&self) -> Result<Box<dyn HostLinks>, CniError> {
        Ok(Box::new(NetlinkHost {
            nl: Netlink::new().map_err(|e| io_err("open netlink", e))?,
        }))
    }
}

fn random_veth_name() -> String {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.subsec_nanos() ^ std::process::id()).to_be_bytes();
    }
    format!("veth{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// [`PodLinks`] with netlink in the node and in the pod netns.
struct NetlinkPod {
    nl: Netlink,
    pnl: Netlink,
    podns: File,
    netns: String,
    ifname: String,
    pod_link: Option<evio_netlink::Link>,
    notify: bool,
}

impl NetlinkPod {
    fn open(env: &Env) -> Result<NetlinkPod, CniError> {
        let podns = open_netns(&env.netns)?;
        let mut pnl = Netlink::in_netns(Path::new(&env.netns))
            .map_err(|e| io_err("open netlink in the pod netns", e))?;
        if pnl
            .link_by_name(&env.ifname)
            .map_err(|e| io_err("look up CNI_IFNAME", e))?
            .is_some()
        {
            return Err(exists(env));
        }
        Ok(NetlinkPod {
            nl: Netlink::new().map_err(|e| io_err("open netlink", e))?,
            pnl,
            podns,
            netns: env.netns.clone(),
            ifname: env.ifname.clone(),
            pod_link: None,
            notify: false,
        })
    }

    fn pod_index(&self) -> Result<u32, CniError> {
        self.pod_link
            .as_ref()
            .map(|l| l.index)
            .ok_or_else(|| CniError::new(ErrorCode::Io, "the pod interface vanished"))
    }
}

fn exists(env: &Env) -> CniError {
    CniError::with_details(
        ErrorCode::InterfaceExists,
        format!("interface {} already exists in the container", env.ifname),
        env.netns.clone(),
    )
}

impl PodLinks for NetlinkPod {
    fn create_veth(&mut self, mtu: Option<u32>) -> Result<String, CniError> {
        let mut host = String::new();
        for attempt in 0..4 {
            host = random_veth_name();
            match self.nl.create_veth(&host, &self.ifname, &self.podns, mtu) {
                Ok(()) => break,
                Err(e) if e.is_exists() && attempt < 3 => {
                    if self.pnl.link_by_name(&self.ifname).ok().flatten().is_some() {
                        return Err(CniError::new(
                            ErrorCode::InterfaceExists,
                            format!("interface {} already exists in the container", self.ifname),
                        ));
                    }
                }
                Err(e) => return Err(io_err("create veth pair", e)),
            }
        }
        let pod_link = self
            .pnl
            .link_by_name(&self.ifname)
            .map_err(|e| io_err("look up the pod interface", e))?
            .ok_or_else(|| CniError::new(ErrorCode::Io, "the pod interface vanished"))?;
        // Gratuitous ARP without an AF_PACKET socket (closing one costs a synchronize_net(),
        // milliseconds): with arp_notify on, re-setting the interface's own MAC once it has its addresses
        // makes the kernel announce them (see `announce`).
        let key = format!("net/ipv4/conf/{}/arp_notify", self.ifname);
        let notify = netns::run_in(Path::new(&self.netns), || sysctl::set(&key, "1"))
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = &notify {
            warn!("arp_notify on {}: {e}", self.ifname);
        }
        self.notify = notify.is_ok();
        // Both ends up now, so their queues are active (linkwatch) long before the gratuitous ARP.
        let up = LinkChange {
            up: true,
            ..Default::default()
        };
        self.pnl
            .set_link(pod_link.index, &up)
            .map_err(|e| io_err("bring the pod interface up", e))?;
        self.pod_link = Some(pod_link);
        if let Some(h) = self
            .nl
            .link_by_name(&host)
            .map_err(|e| io_err("look up the host veth", e))?
        {
            self.nl
                .set_link(h.index, &up)
                .map_err(|e| io_err("bring the host veth up", e))?;
        }
        Ok(host)
    }

    fn delete_veth(&mut self, host: &str) -> Result<(), CniError> {
        match self.nl.delete_link_by_name(host) {
            Ok(_) => {
                debug!("rollback: deleted {host}");
                Ok(())
            }
            Err(e) => Err(io_err(format!("delete {host}"), e)),
        }
    }

    fn host_mac(&mut self, name: &str, what: &str) -> Result<Option<String>, CniError> {
        let l = self
            .nl
            .link_by_name(name)
            .map_err(|e| io_err(format!("look up the {what}"), e))?
            .ok_or_else(|| CniError::new(ErrorCode::Io, format!("the {what} vanished")))?;
        Ok(l.mac_string())
    }

    fn set_hairpin(&mut self, host: &str) -> Result<(), CniError> {
        let l = self
            .nl
            .link_by_name(host)
            .map_err(|e| io_err("look up the host veth", e))?
            .ok_or_else(|| CniError::new(ErrorCode::Io, "the host veth vanished"))?;
        self.nl
            .set_hairpin(l.index, true)
            .map_err(|e| io_err("hairpin mode", e))
    }

    fn add_gateway(&mut self, bridge: &str, gw: IpNet) -> Result<(), CniError> {
        let br = self
            .nl
            .link_by_name(bridge)
            .map_err(|e| io_err("look up the bridge", e))?
            .ok_or_else(|| CniError::new(ErrorCode::Io, "the bridge vanished"))?;
        self.nl
            .add_address(br.index, &gw)
            .map_err(|e| io_err("add the gateway address to the bridge", e))?;
        if gw.addr().is_ipv4() {
            sysctl::enable_ipv4_forwarding().map_err(|e| io_err("IPv4 forwarding", e))
        } else {
            sysctl::enable_ipv6_forwarding().map_err(|e| io_err("IPv6 forwarding", e))
        }
    }

    fn add_pod_address(&mut self, addr: &IpNet) -> Result<(), CniError> {
        let i = self.pod_index()?;
        self.pnl
            .add_address(i, addr)
            .map(|_| ())
            .map_err(|e| io_err("add the pod address", e))
    }

    fn add_pod_route(&mut self, r: &Route, gateway: Option<IpAddr>) -> Result<(), CniError> {
        let mut spec = RouteSpec::new(r.dst);
        spec.gateway = gateway;
        spec.oif = Some(self.pod_index()?);
        spec.metric = r.priority;
        spec.table = r.table;
        spec.mtu = r.mtu;
        self.pnl
            .add_route(&spec)
            .map(|_| ())
            .map_err(|e| io_err(format!("add route {} in the pod", r.dst), e))
    }

    fn announce(&mut self) {
        let Some(pod) = &self.pod_link else { return };
        let Some(mac) = pod.mac else { return };
        if !self.notify {
            return;
        }
        // Until the kernel has activated the interface's queues (linkwatch, asynchronous after the carrier
        // comes up) it drops what it sends: wait for that, briefly.
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            match self.pnl.link_by_index(pod.index) {
                Ok(Some(l)) if l.qdisc.as_deref() == Some("noop") => {
                    std::thread::sleep(std::time::Duration::from_micros(500))
                }
                _ => break,
            }
        }
        debug!(waited_us = t0.elapsed().as_micros() as u64, "queues active");
        if let Err(e) = self.pnl.set_link(
            pod.index,
            &LinkChange {
                mac: Some(mac),
                ..Default::default()
            },
        ) {
            warn!("gratuitous ARP: {e}");
        }
    }

    fn pod_mac(&self) -> Option<String> {
        self.pod_link.as_ref().and_then(|l| l.mac_string())
    }
}

/// [`HostLinks`] with netlink.
struct NetlinkHost {
    nl: Netlink,
}

impl HostLinks for NetlinkHost {
    fn delete_owned(&mut self, name: &str, owner: &PortOwner) -> Result<bool, CniError> {
        if name.is_empty() {
            return Ok(false);
        }
        if let Some(l) = self
            .nl
            .link_by_name(name)
            .map_err(|e| io_err("look up the host veth", e))?
            && l.alias.as_deref() == Some(owner.tag().as_str())
        {
            return self
                .nl
                .delete_link(l.index)
                .map_err(|e| io_err("delete the host veth", e));
        }
        Ok(false)
    }

    fn delete_in_netns(&mut self, ns: &str, ifname: &str) -> Result<(), CniError> {
        if ns.is_empty() || !netns::exists(Path::new(ns)) {
            return Ok(());
        }
        let mut pnl = Netlink::in_netns(Path::new(ns))
            .map_err(|e| io_err("open netlink in the pod netns", e))?;
        pnl.delete_link_by_name(ifname)
            .map(|_| ())
            .map_err(|e| io_err("delete the pod interface", e))
    }
}
