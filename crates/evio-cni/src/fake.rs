//! Recording doubles of the host effects (bridge, firewall, IPAM delegate, links): each call is recorded,
//! changes a model of the host ([`World`]), and the Nth call of a run can be made to fail, so the verbs'
//! sequencing is tested without root: every failure point of ADD is rolled back to the state before, and
//! DEL and GC go on past failures.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use evio_bridge::{Bridge, BridgeError, PortOwner};
use evio_cni_types::config::NetConf;
use evio_cni_types::env::Env;
use evio_cni_types::result::Route;
use evio_cni_types::{CniError, ErrorCode};
use evio_firewall::Firewall;
use ipnet::IpNet;

use crate::host::{Host, HostLinks, Ipam, PodLinks, Running};

/// What the doubles model of the host: everything an attachment owns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct World {
    /// IPAM reservations: (container id, ifname) -> address.
    pub leases: BTreeMap<(String, String), IpNet>,
    /// Host veths and the pod end each one carries (deleting one deletes the other).
    pub veths: BTreeSet<String>,
    /// Bridge ports: port -> owner tag.
    pub ports: BTreeMap<String, String>,
    /// Masquerade entries: address -> key.
    pub masq: BTreeMap<IpAddr, String>,
    /// The pod ends' addresses and routes, by host veth (they go with the veth).
    pub pod_addrs: BTreeSet<(String, IpNet)>,
    pub pod_routes: BTreeSet<(String, IpNet)>,
    /// State files of the network.
    pub state_files: BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    world: World,
    calls: Vec<String>,
    /// Call numbers (since the recorder was made) that fail.
    fail_at: BTreeSet<usize>,
    /// Veth names handed out.
    next_veth: u32,
}

/// The doubles' shared record. Cloning shares it.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Inner>>);

impl Recorder {
    /// Makes the `n`th call (1-based, counting from now) fail; `None`: none fails.
    pub fn fail_at(&self, n: Option<usize>) {
        self.fail_calls(n.as_slice());
    }

    /// Makes the calls numbered `ns` (1-based, counting from now) fail.
    pub fn fail_calls(&self, ns: &[usize]) {
        let mut i = self.0.lock().unwrap();
        let base = i.calls.len();
        i.fail_at = ns.iter().map(|n| base + n).collect();
    }

    pub fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().calls.clone()
    }

    /// The modelled host, with the state files found in `state_dir/network`.
    pub fn world(&self, state_dir: &Path, network: &str) -> World {
        let mut w = self.0.lock().unwrap().world.clone();
        w.state_files = std::fs::read_dir(state_dir.join(network))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        w
    }

    /// Records `call`; fails it when it is the one chosen, else applies `f` to the world.
    fn call<T>(&self, call: String, f: impl FnOnce(&mut Inner) -> T) -> Result<T, String> {
        let mut i = self.0.lock().unwrap();
        i.calls.push(call.clone());
        if i.fail_at.contains(&i.calls.len()) {
            return Err(format!("injected failure of {call}"));
        }
        Ok(f(&mut i))
    }
}

fn cni(e: String) -> CniError {
    CniError::new(ErrorCode::Io, e)
}

/// The [`Host`] of the doubles.
pub struct FakeHost {
    pub rec: Recorder,
    bridge: FakeBridge,
    firewall: FakeFirewall,
}

impl FakeHost {
    pub fn new(rec: &Recorder) -> FakeHost {
        FakeHost {
            rec: rec.clone(),
            bridge: FakeBridge(rec.clone()),
            firewall: FakeFirewall(rec.clone()),
        }
    }
}

impl Host for FakeHost {
    fn bridge(&self) -> Result<&dyn Bridge, CniError> {
        Ok(&self.bridge)
    }
    fn firewall(&self) -> &dyn Firewall {
        &self.firewall
    }
    fn ipam(&self, _conf: &NetConf, env: &Env) -> Result<Box<dyn Ipam>, CniError> {
        self.rec.call("ipam.find".into(), |_| ()).map_err(cni)?;
        Ok(Box::new(FakeIpam {
            rec: self.rec.clone(),
            attachment: (env.container_id.clone(), env.ifname.clone()),
        }))
    }
    fn pod_links(&self, env: &Env) -> Result<Box<dyn PodLinks>, CniError> {
        self.rec.call("links.open".into(), |_| ()).map_err(cni)?;
        Ok(Box::new(FakeLinks {
            rec: self.rec.clone(),
            host: None,
            ifname: env.ifname.clone(),
        }))
    }
    fn host_links(&self) -> Result<Box<dyn HostLinks>, CniError> {
        Ok(Box::new(FakeLinks {
            rec: self.rec.clone(),
            host: None,
            ifname: String::new(),
        }))
    }
}

pub struct FakeBridge(Recorder);

fn bridge_err(e: String) -> BridgeError {
    BridgeError::Other(e)
}

impl Bridge for FakeBridge {
    fn ensure(&self) -> Result<(), BridgeError> {
        self.0
            .call("bridge.ensure".into(), |_| ())
            .map_err(bridge_err)
    }
    fn attach(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError> {
        self.0
            .call(format!("bridge.attach {port}"), |i| {
                i.world.ports.insert(port.to_string(), owner.tag());
            })
            .map_err(bridge_err)
    }
    fn detach(&self, owner: &PortOwner) -> Result<(), BridgeError> {
        self.0
            .call(format!("bridge.detach {}", owner.tag()), |i| {
                i.world.ports.retain(|_, t| *t != owner.tag());
            })
            .map_err(bridge_err)
    }
    fn gc(&self, valid: &[PortOwner]) -> Result<(), BridgeError> {
        let tags: HashSet<String> = valid.iter().map(PortOwner::tag).collect();
        self.0
            .call("bridge.gc".into(), |i| {
                i.world.ports.retain(|_, t| tags.contains(t));
            })
            .map_err(bridge_err)
    }
    fn check_port(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError> {
        self.0
            .call(format!("bridge.check_port {port}"), |i| {
                i.world.ports.get(port) == Some(&owner.tag())
            })
            .map_err(bridge_err)?
            .then_some(())
            .ok_or_else(|| BridgeError::Other(format!("{port} is not a port")))
    }
}

pub struct FakeFirewall(Recorder);

fn fw_err(e: String) -> evio_firewall::Error {
    evio_firewall::Error::Nft(e)
}

impl Firewall for FakeFirewall {
    fn add(&self, key: &str, ips: &[IpAddr], _no_masq: &[IpNet]) -> evio_firewall::Result<()> {
        self.0
            .call(format!("fw.add {key}"), |i| {
                for ip in ips {
                    i.world.masq.insert(*ip, key.to_string());
                }
            })
            .map_err(fw_err)
    }
    fn remove(&self, ips: &[IpAddr]) -> evio_firewall::Result<()> {
        self.0
            .call(format!("fw.remove {ips:?}"), |i| {
                for ip in ips {
                    i.world.masq.remove(ip);
                }
            })
            .map_err(fw_err)
    }
    fn remove_key(&self, key: &str) -> evio_firewall::Result<usize> {
        self.0
            .call(format!("fw.remove_key {key}"), |i| {
                let n = i.world.masq.len();
                i.world.masq.retain(|_, k| k != key);
                n - i.world.masq.len()
            })
            .map_err(fw_err)
    }
    fn list(&self) -> evio_firewall::Result<Vec<(IpAddr, String)>> {
        self.0
            .call("fw.list".into(), |i| {
                i.world.masq.iter().map(|(a, k)| (*a, k.clone())).collect()
            })
            .map_err(fw_err)
    }
    fn gc(&self, network: &str, valid_keys: &HashSet<String>) -> evio_firewall::Result<usize> {
        let prefix = format!("{} ", evio_firewall::network_prefix(network));
        self.0
            .call("fw.gc".into(), |i| {
                let n = i.world.masq.len();
                i.world
                    .masq
                    .retain(|_, k| !k.starts_with(&prefix) || valid_keys.contains(k));
                n - i.world.masq.len()
            })
            .map_err(fw_err)
    }
}

/// host-local in miniature: one address per attachment from 10.22.0.0/24.
pub struct FakeIpam {
    rec: Recorder,
    attachment: (String, String),
}

impl Ipam for FakeIpam {
    fn version(&self) -> &str {
        "1.1.0"
    }
    fn start(
        &self,
        command: &str,
        _stdin: &[u8],
        attachment: Option<(&str, &str)>,
    ) -> Result<Running, CniError> {
        let who = attachment
            .map(|(c, i)| (c.to_string(), i.to_string()))
            .unwrap_or_else(|| self.attachment.clone());
        let out = self
            .rec
            .call(format!("ipam.{command} {}/{}", who.0, who.1), |i| {
                match command {
                    "ADD" => {
                        let used: BTreeSet<IpNet> = i.world.leases.values().copied().collect();
                        let a = (2..255)
                            .map(|n| format!("10.22.0.{n}/24").parse().unwrap())
                            .find(|a| !used.contains(a))
                            .expect("a free address");
                        let a = *i.world.leases.entry(who).or_insert(a);
                        serde_json::json!({"cniVersion": "1.1.0", "ips": [{"address": a.to_string()}]})
                            .to_string()
                            .into_bytes()
                    }
                    "DEL" => {
                        i.world.leases.remove(&who);
                        Vec::new()
                    }
                    _ => Vec::new(),
                }
            })
            .map_err(cni)?;
        Ok(Running::Done(Ok(out)))
    }
    fn finish(&self, run: Running, command: &str) -> Result<Vec<u8>, CniError> {
        self.rec
            .call(format!("ipam.finish {command}"), |_| ())
            .map_err(cni)?;
        match run {
            Running::Done(r) => r,
            Running::Child(_) => unreachable!("the double runs no process"),
        }
    }
}

pub struct FakeLinks {
    rec: Recorder,
    host: Option<String>,
    ifname: String,
}

impl PodLinks for FakeLinks {
    fn create_veth(&mut self, _mtu: Option<u32>) -> Result<String, CniError> {
        let ifname = self.ifname.clone();
        let name = self
            .rec
            .call(format!("links.create_veth {ifname}"), |i| {
                i.next_veth += 1;
                let n = format!("veth{:08x}", i.next_veth);
                i.world.veths.insert(n.clone());
                n
            })
            .map_err(cni)?;
        self.host = Some(name.clone());
        Ok(name)
    }
    fn delete_veth(&mut self, host: &str) -> Result<(), CniError> {
        self.rec
            .call(format!("links.delete_veth {host}"), |i| {
                i.world.veths.remove(host);
                // The kernel drops the port with the link, and the pod end's addresses and routes.
                i.world.ports.remove(host);
                i.world.pod_addrs.retain(|(v, _)| v != host);
                i.world.pod_routes.retain(|(v, _)| v != host);
            })
            .map_err(cni)
    }
    fn host_mac(&mut self, name: &str, _what: &str) -> Result<Option<String>, CniError> {
        self.rec
            .call(format!("links.host_mac {name}"), |_| {
                Some("02:00:00:00:00:01".to_string())
            })
            .map_err(cni)
    }
    fn set_hairpin(&mut self, host: &str) -> Result<(), CniError> {
        self.rec
            .call(format!("links.set_hairpin {host}"), |_| ())
            .map_err(cni)
    }
    fn add_gateway(&mut self, bridge: &str, gw: IpNet) -> Result<(), CniError> {
        // The bridge's gateway address is shared by every pod: never undone.
        self.rec
            .call(format!("links.add_gateway {bridge} {gw}"), |_| ())
            .map_err(cni)
    }
    fn add_pod_address(&mut self, addr: &IpNet) -> Result<(), CniError> {
        let veth = self.host.clone().unwrap_or_default();
        self.rec
            .call(format!("links.add_pod_address {addr}"), |i| {
                i.world.pod_addrs.insert((veth, *addr));
            })
            .map_err(cni)
    }
    fn add_pod_route(&mut self, r: &Route, _gateway: Option<IpAddr>) -> Result<(), CniError> {
        let veth = self.host.clone().unwrap_or_default();
        self.rec
            .call(format!("links.add_pod_route {}", r.dst), |i| {
                i.world.pod_routes.insert((veth, r.dst));
            })
            .map_err(cni)
    }
    fn announce(&mut self) {
        let _ = self.rec.call("links.announce".into(), |_| ());
    }
    fn pod_mac(&self) -> Option<String> {
        Some("02:00:00:00:00:02".into())
    }
}

impl HostLinks for FakeLinks {
    fn delete_owned(&mut self, name: &str, owner: &PortOwner) -> Result<bool, CniError> {
        self.rec
            .call(format!("links.delete_owned {name}"), |i| {
                let ours = i.world.veths.contains(name)
                    && i.world.ports.get(name).is_none_or(|t| *t == owner.tag());
                if ours {
                    i.world.veths.remove(name);
                    i.world.ports.remove(name);
                    i.world.pod_addrs.retain(|(v, _)| v != name);
                    i.world.pod_routes.retain(|(v, _)| v != name);
                }
                ours
            })
            .map_err(cni)
    }
    fn delete_in_netns(&mut self, netns: &str, ifname: &str) -> Result<(), CniError> {
        self.rec
            .call(format!("links.delete_in_netns {netns} {ifname}"), |_| ())
            .map_err(cni)
    }
}

/// A config for the doubles: host-local IPAM, masquerade and hairpin on, state in `state_dir`.
pub fn conf(state_dir: &Path, extra: &str) -> NetConf {
    NetConf::parse(
        format!(
            r#"{{"cniVersion":"1.1.0","name":"net","type":"evio-cni","ipMasq":true,"hairpinMode":true,
                "stateDir":{:?},"ipam":{{"type":"host-local","subnet":"10.22.0.0/24"}}{extra}}}"#,
            state_dir.to_str().unwrap()
        )
        .as_bytes(),
    )
    .unwrap()
}

/// The environment of `command` for attachment `container_id`/eth0.
pub fn env(command: &str, container_id: &str) -> Env {
    Env::from_lookup(|k| {
        Some(match k {
            "CNI_COMMAND" => command.to_string(),
            "CNI_CONTAINERID" => container_id.to_string(),
            "CNI_NETNS" => "/run/netns/fake".to_string(),
            "CNI_IFNAME" => "eth0".to_string(),
            "CNI_PATH" => "/nonexistent".to_string(),
            _ => return None,
        })
    })
    .unwrap()
}
