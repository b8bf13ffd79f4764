//! The verbs.

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::process::Child;

use evio_bridge::{Bridge, BridgeSpec, BridgeType, PortOwner};
use evio_cni_types::config::{BridgeKind, LogLevel, NetConf};
use evio_cni_types::env::{Command, Env};
use evio_cni_types::result::{CniResult, Interface, IpConfig, Route};
use evio_cni_types::version::Version;
use evio_cni_types::{CniError, ErrorCode};
use evio_netlink::{LinkChange, Netlink, RouteSpec, netns, sysctl};
use ipnet::IpNet;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::Output;
use crate::delegate::{self, Delegate};
use crate::state::State;

fn io_err(msg: impl Into<String>, e: impl std::fmt::Display) -> CniError {
    CniError::with_details(ErrorCode::Io, msg, e.to_string())
}

fn init_log(conf: &NetConf) {
    let Some(path) = &conf.log_file else { return };
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let level = match conf.log_level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

fn require_version(conf: &NetConf, min: &str, verb: &str) -> Result<(), CniError> {
    let have = Version::parse(&conf.cni_version);
    let need = Version::parse(min);
    if have < need {
        return Err(CniError::with_details(
            ErrorCode::IncompatibleVersion,
            format!("{verb} needs cniVersion {min} or later"),
            format!("config is {}", conf.cni_version),
        ));
    }
    Ok(())
}

pub fn dispatch(env: &Env, stdin: &[u8]) -> Result<Output, CniError> {
    let conf = NetConf::parse(stdin)?;
    init_log(&conf);
    debug!(command = ?env.command, container = %env.container_id, ifname = %env.ifname, netns = %env.netns, "invoked");
    match env.command {
        Command::Add => add(env, &conf),
        Command::Del => del(env, &conf),
        Command::Check => {
            require_version(&conf, "0.4.0", "CHECK")?;
            check(env, &conf)
        }
        Command::Status => {
            require_version(&conf, "1.1.0", "STATUS")?;
            status(env, &conf)
        }
        Command::Gc => {
            require_version(&conf, "1.1.0", "GC")?;
            gc(env, &conf)
        }
        Command::Version => unreachable!("handled in main"),
    }
}

fn bridge_type(conf: &NetConf) -> BridgeType {
    match conf.bridge_kind {
        BridgeKind::Linux => BridgeType::Linux,
        BridgeKind::Ovs => BridgeType::Ovs,
    }
}

fn bridge_backend(conf: &NetConf) -> Result<Box<dyn Bridge>, CniError> {
    let spec = BridgeSpec {
        name: conf.bridge.clone(),
        mtu: conf.mtu,
        ovs_datapath_type: conf.ovs_datapath_type.as_str().to_string(),
        ovsdb_socket: conf.ovsdb_socket.clone(),
    };
    evio_bridge::backend(bridge_type(conf), spec)
        .map_err(|e| io_err(format!("bridge {}", conf.bridge), e))
}

/// Rejects IPAM sections with malformed addresses before anything is created (host-local's own keys).
fn validate_ipam(ipam: &Value) -> Result<(), CniError> {
    fn check_obj(o: &Value, at: &str) -> Result<(), CniError> {
        let bad = |k: &str, v: &str| {
            CniError::with_details(
                ErrorCode::InvalidConfig,
                format!("invalid network config: {at}.{k}"),
                format!("{v:?} is malformed"),
            )
        };
        if let Some(v) = o.get("subnet").and_then(Value::as_str) {
            let n: IpNet = v.parse().map_err(|_| bad("subnet", v))?;
            let _ = n;
        }
        for k in ["rangeStart", "rangeEnd", "gateway"] {
            if let Some(v) = o.get(k).and_then(Value::as_str) {
                v.parse::<IpAddr>().map_err(|_| bad(k, v))?;
            }
        }
        Ok(())
    }
    check_obj(ipam, "ipam")?;
    if let Some(ranges) = ipam.get("ranges").and_then(Value::as_array) {
        for set in ranges {
            for r in set.as_array().into_iter().flatten() {
                check_obj(r, "ipam.ranges")?;
            }
        }
    }
    if let Some(routes) = ipam.get("routes").and_then(Value::as_array) {
        for r in routes {
            if let Some(d) = r.get("dst").and_then(Value::as_str) {
                d.parse::<IpNet>().map_err(|_| {
                    CniError::with_details(
                        ErrorCode::InvalidConfig,
                        "invalid network config: ipam.routes.dst",
                        format!("{d:?} is not a CIDR"),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// The testing hook: fail right after `step` when `EVIO_CNI_FAIL_AFTER` names it. Compiled only into debug
/// builds (what `cargo test` and `make test` run) or with the `test-hooks` feature; a release binary has no
/// such variable.
fn fail_point(step: &str) -> Result<(), CniError> {
    debug!(step, "step done");
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    if std::env::var("EVIO_CNI_FAIL_AFTER").is_ok_and(|s| s == step) {
        return Err(CniError::with_details(
            ErrorCode::Io,
            format!("injected failure after step {step}"),
            "EVIO_CNI_FAIL_AFTER testing hook",
        ));
    }
    Ok(())
}

fn random_veth_name() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into the valid buffer `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.subsec_nanos() ^ std::process::id()).to_be_bytes();
    }
    format!("veth{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

fn open_netns(path: &str) -> Result<File, CniError> {
    if !netns::exists(Path::new(path)) {
        return Err(CniError::with_details(
            ErrorCode::InvalidEnv,
            "CNI_NETNS is not a network namespace",
            format!("{path:?} does not exist or is not a netns file"),
        ));
    }
    File::open(path).map_err(|e| io_err(format!("open netns {path}"), e))
}

/// What ADD has done so far, undone in reverse on failure.
struct Rollback<'a> {
    conf: &'a NetConf,
    ipam: Option<(&'a Delegate, Vec<u8>)>,
    child: Option<Child>,
    host_veth: Option<String>,
    /// Set once the veth is a bridge port (OVS keeps a database row for it that must go too).
    port_owner: Option<PortOwner>,
    masq_ips: Vec<IpAddr>,
    masq_pending: Option<evio_firewall::Pending>,
    state: bool,
    env: &'a Env,
}

impl Rollback<'_> {
    fn run(&mut self, bridge: &dyn Bridge) {
        if let Some(c) = self.child.take() {
            let _ = c.wait_with_output();
        }
        if let Some(p) = self.masq_pending.take() {
            let _ = p.wait();
        }
        if !self.masq_ips.is_empty()
            && let Err(e) = evio_firewall::remove(&self.masq_ips)
        {
            warn!("rollback: masquerade entries: {e}");
        }
        if let Some(o) = self.port_owner.take()
            && let Err(e) = bridge.detach(&o)
        {
            warn!("rollback: detach from the bridge: {e}");
        }
        if let Some(v) = self.host_veth.take() {
            match Netlink::new().and_then(|mut nl| nl.delete_link_by_name(&v)) {
                Ok(_) => debug!("rollback: deleted {v}"),
                Err(e) => warn!("rollback: delete {v}: {e}"),
            }
        }
        if self.state {
            State::remove(
                &self.conf.state_dir,
                &self.conf.name,
                &self.env.container_id,
                &self.env.ifname,
            );
        }
        if let Some((d, bytes)) = self.ipam.take()
            && let Err(e) = d.run("DEL", &bytes, None)
        {
            warn!("rollback: IPAM DEL: {e}");
        }
    }
}

fn add(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let ipam = conf.ipam.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network config: an ipam section is required",
        )
    })?;
    validate_ipam(&ipam.raw)?;
    let bridge = bridge_backend(conf)?;
    let podns = open_netns(&env.netns)?;
    let mut pnl = Netlink::in_netns(Path::new(&env.netns))
        .map_err(|e| io_err("open netlink in the pod netns", e))?;
    if pnl
        .link_by_name(&env.ifname)
        .map_err(|e| io_err("look up CNI_IFNAME", e))?
        .is_some()
    {
        return Err(CniError::with_details(
            ErrorCode::InterfaceExists,
            format!("interface {} already exists in the container", env.ifname),
            env.netns.clone(),
        ));
    }
    let dlg = Delegate::ipam(conf, env)?;
    let ipam_conf = conf.for_delegate(&dlg.version, None);
    let mut rb = Rollback {
        conf,
        ipam: None,
        child: None,
        host_veth: None,
        port_owner: None,
        masq_ips: Vec::new(),
        masq_pending: None,
        state: false,
        env,
    };
    let r = add_steps(
        env, conf, &*bridge, &podns, &mut pnl, &dlg, &ipam_conf, &mut rb,
    );
    if let Err(e) = &r {
        info!("ADD failed, rolling back: {e}");
        rb.run(&*bridge);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn add_steps<'a>(
    env: &Env,
    conf: &NetConf,
    bridge: &dyn Bridge,
    podns: &File,
    pnl: &mut Netlink,
    dlg: &'a Delegate,
    ipam_conf: &'a [u8],
    rb: &mut Rollback<'a>,
) -> Result<Output, CniError> {
    // IPAM runs while we build the veth pair.
    rb.child = Some(dlg.spawn("ADD", ipam_conf, None)?);
    debug!("IPAM started");
    rb.ipam = Some((dlg, ipam_conf.to_vec()));

    let mut nl = Netlink::new().map_err(|e| io_err("open netlink", e))?;
    let mut host = String::new();
    for attempt in 0..4 {
        host = random_veth_name();
        match nl.create_veth(&host, &env.ifname, podns, conf.mtu) {
            Ok(()) => break,
            Err(e) if e.is_exists() && attempt < 3 => {
                if pnl.link_by_name(&env.ifname).ok().flatten().is_some() {
                    return Err(CniError::new(
                        ErrorCode::InterfaceExists,
                        format!("interface {} already exists in the container", env.ifname),
                    ));
                }
            }
            Err(e) => return Err(io_err("create veth pair", e)),
        }
    }
    rb.host_veth = Some(host.clone());
    fail_point("veth")?;
    let pod_link = pnl
        .link_by_name(&env.ifname)
        .map_err(|e| io_err("look up the pod interface", e))?
        .ok_or_else(|| CniError::new(ErrorCode::Io, "the pod interface vanished"))?;
    // Gratuitous ARP without an AF_PACKET socket (closing one costs a synchronize_net(), milliseconds):
    // with arp_notify on, re-setting the interface's own MAC once it has its addresses makes the kernel
    // announce them (done after the routes, below).
    let key = format!("net/ipv4/conf/{}/arp_notify", env.ifname);
    let notify = netns::run_in(Path::new(&env.netns), || sysctl::set(&key, "1"))
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = &notify {
        warn!("arp_notify on {}: {e}", env.ifname);
    }

    // Both ends up now, so their queues are active (linkwatch) long before the gratuitous ARP below.
    let up = LinkChange {
        up: true,
        ..Default::default()
    };
    pnl.set_link(pod_link.index, &up)
        .map_err(|e| io_err("bring the pod interface up", e))?;
    if let Some(h) = nl
        .link_by_name(&host)
        .map_err(|e| io_err("look up the host veth", e))?
    {
        nl.set_link(h.index, &up)
            .map_err(|e| io_err("bring the host veth up", e))?;
    }

    let child = rb.child.take().expect("IPAM started");
    let out = dlg.finish(child, "ADD")?;
    let ipam_result = CniResult::from_slice(&out)?;
    if ipam_result.ips.is_empty() {
        return Err(CniError::new(
            ErrorCode::Io,
            "the IPAM plugin returned no address",
        ));
    }
    fail_point("ipam")?;

    bridge.ensure().map_err(|e| io_err("bridge", e))?;
    fail_point("bridge")?;
    let owner = PortOwner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    bridge
        .attach(&host, &owner)
        .map_err(|e| io_err("attach the veth to the bridge", e))?;
    rb.port_owner = Some(owner.clone());
    let host_link = nl
        .link_by_name(&host)
        .map_err(|e| io_err("look up the host veth", e))?
        .ok_or_else(|| CniError::new(ErrorCode::Io, "the host veth vanished"))?;
    if conf.hairpin_mode && conf.bridge_kind == BridgeKind::Linux {
        nl.set_hairpin(host_link.index, true)
            .map_err(|e| io_err("hairpin mode", e))?;
    }
    fail_point("attach")?;

    let br_link = nl
        .link_by_name(&conf.bridge)
        .map_err(|e| io_err("look up the bridge", e))?
        .ok_or_else(|| CniError::new(ErrorCode::Io, "the bridge vanished"))?;
    // Gateways: IPAM's, or the subnet's first address when we are the gateway and IPAM named none.
    let mut ips: Vec<IpConfig> = Vec::new();
    for ip in &ipam_result.ips {
        let mut gw = ip.gateway;
        if gw.is_none() && conf.is_gateway {
            gw = first_host(&ip.address);
        }
        ips.push(IpConfig {
            address: ip.address,
            gateway: gw,
            interface: Some(2),
        });
    }
    if conf.is_gateway {
        for ip in &ips {
            let Some(gw) = ip.gateway else { continue };
            let gwnet =
                IpNet::new(gw, ip.address.prefix_len()).map_err(|e| io_err("gateway", e))?;
            nl.add_address(br_link.index, &gwnet)
                .map_err(|e| io_err("add the gateway address to the bridge", e))?;
            if gw.is_ipv4() {
                sysctl::enable_ipv4_forwarding().map_err(|e| io_err("IPv4 forwarding", e))?;
            } else {
                sysctl::enable_ipv6_forwarding().map_err(|e| io_err("IPv6 forwarding", e))?;
            }
        }
    }
    fail_point("gateway")?;

    // Masquerade: one nfnetlink batch once our table is set up, else an nft run that proceeds while we
    // configure the pod.
    let pod_ips: Vec<IpAddr> = ips.iter().map(|i| i.address.addr()).collect();
    if conf.ip_masq {
        let key = evio_firewall::attachment_key(&conf.name, &env.container_id, &env.ifname);
        let mut no_masq: Vec<IpNet> = ips.iter().map(|i| i.address.trunc()).collect();
        no_masq.extend(conf.no_masq.iter().copied());
        rb.masq_ips = pod_ips.clone();
        rb.masq_pending = Some(
            evio_firewall::start_add(&conf.state_dir, &key, &pod_ips, &no_masq)
                .map_err(|e| io_err("IP masquerade", e))?,
        );
    }

    for ip in &ips {
        pnl.add_address(pod_link.index, &ip.address)
            .map_err(|e| io_err("add the pod address", e))?;
    }
    fail_point("address")?;

    let mut routes = ipam_result.routes.clone();
    if conf.is_default_gateway {
        for ip in &ips {
            let Some(gw) = ip.gateway else { continue };
            let any: IpNet = if gw.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            };
            if !routes.iter().any(|r| r.dst == any) {
                routes.push(Route::new(any, Some(gw)));
            }
        }
    }
    for r in &routes {
        let gw = r.gw.or_else(|| {
            ips.iter()
                .find(|i| i.address.addr().is_ipv4() == r.dst.addr().is_ipv4())
                .and_then(|i| i.gateway)
        });
        let mut spec = RouteSpec::new(r.dst);
        spec.gateway = gw;
        spec.oif = Some(pod_link.index);
        spec.metric = r.priority;
        spec.table = r.table;
        spec.mtu = r.mtu;
        pnl.add_route(&spec)
            .map_err(|e| io_err(format!("add route {} in the pod", r.dst), e))?;
    }
    fail_point("routes")?;

    if notify.is_ok()
        && let Some(mac) = pod_link.mac
        && ips.iter().any(|i| i.address.addr().is_ipv4())
    {
        // Until the kernel has activated the interface's queues (linkwatch, asynchronous after the carrier
        // comes up) it drops what it sends: wait for that, briefly.
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            match pnl.link_by_index(pod_link.index) {
                Ok(Some(l)) if l.qdisc.as_deref() == Some("noop") => {
                    std::thread::sleep(std::time::Duration::from_micros(500))
                }
                _ => break,
            }
        }
        debug!(waited_us = t0.elapsed().as_micros() as u64, "queues active");
        if let Err(e) = pnl.set_link(
            pod_link.index,
            &LinkChange {
                mac: Some(mac),
                ..Default::default()
            },
        ) {
            warn!("gratuitous ARP: {e}");
        }
    }

    if let Some(p) = rb.masq_pending.take() {
        p.wait().map_err(|e| io_err("IP masquerade", e))?;
    }
    fail_point("masq")?;

    let st = State {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        host_veth: host.clone(),
        ips: pod_ips,
        masq: conf.ip_masq,
    };
    rb.state = true;
    st.save(&conf.state_dir, &conf.name)
        .map_err(|e| io_err("write state", e))?;
    fail_point("state")?;

    let result = CniResult {
        interfaces: vec![
            Interface {
                name: conf.bridge.clone(),
                mac: br_link.mac_string(),
                ..Default::default()
            },
            Interface {
                name: host.clone(),
                mac: host_link.mac_string(),
                ..Default::default()
            },
            Interface {
                name: env.ifname.clone(),
                mac: pod_pod_mac(&pod_link),
                sandbox: Some(env.netns.clone()),
                mtu: conf.mtu,
                ..Default::default()
            },
        ],
        ips,
        routes,
        dns: ipam_result.dns,
    };
    info!(container = %env.container_id, host_veth = %host, "ADD done");
    Ok(Output::Json(
        result.to_value(&conf.cni_version)?.to_string(),
    ))
}

fn pod_pod_mac(l: &evio_netlink::Link) -> Option<String> {
    l.mac_string()
}

fn first_host(n: &IpNet) -> Option<IpAddr> {
    match n.trunc() {
        IpNet::V4(v) if v.prefix_len() < 31 => {
            Some(IpAddr::V4((u32::from(v.network()) + 1).into()))
        }
        IpNet::V6(v) if v.prefix_len() < 127 => {
            Some(IpAddr::V6((u128::from(v.network()) + 1).into()))
        }
        _ => None,
    }
}

/// Removes the host veth recorded in `st` (only if it still carries the owner tag).
/// Returns whether it deleted it.
fn delete_host_veth(nl: &mut Netlink, name: &str, owner: &PortOwner) -> Result<bool, CniError> {
    if name.is_empty() {
        return Ok(false);
    }
    if let Some(l) = nl
        .link_by_name(name)
        .map_err(|e| io_err("look up the host veth", e))?
        && l.alias.as_deref() == Some(owner.tag().as_str())
    {
        return nl
            .delete_link(l.index)
            .map_err(|e| io_err("delete the host veth", e));
    }
    Ok(false)
}

fn del(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let owner = PortOwner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let st = State::load(&conf.state_dir, &conf.name, &env.container_id, &env.ifname);
    let key = evio_firewall::attachment_key(&conf.name, &env.container_id, &env.ifname);
    let dlg = match &conf.ipam {
        Some(_) => Some(Delegate::ipam(conf, env)?),
        None => None,
    };
    let ipam_conf = dlg.as_ref().map(|d| conf.for_delegate(&d.version, None));
    let needs_fw = st.as_ref().map(|s| s.masq).unwrap_or(conf.ip_masq);
    // The address is released only after its masquerade entry is gone, so a new pod that gets it next is
    // never hit by our removal; both run alongside the veth removal.
    let (fw_ipam, links) = std::thread::scope(|s| {
        let fw_ipam = s.spawn(|| -> Result<(), CniError> {
            if needs_fw {
                match &st {
                    Some(st) => evio_firewall::remove(&st.ips),
                    None => evio_firewall::remove_key(&key).map(|_| ()),
                }
                .map_err(|e| io_err("remove IP masquerade", e))?;
            }
            if let (Some(d), Some(c)) = (&dlg, &ipam_conf) {
                d.run("DEL", c, None)?;
                debug!("IPAM DEL done");
            }
            Ok(())
        });
        let links = (|| -> Result<(), CniError> {
            // The recorded host veth (checked by its owner tag) is the quick way; the backend's detach
            // finds ports by tag (a link dump for Linux) and removes OVS port records.
            let mut nl = Netlink::new().map_err(|e| io_err("open netlink", e))?;
            let deleted = match &st {
                Some(st) => delete_host_veth(&mut nl, &st.host_veth, &owner)?,
                None => false,
            };
            debug!(deleted, "host veth");
            if !deleted || conf.bridge_kind != BridgeKind::Linux {
                match bridge_backend(conf) {
                    Ok(b) => b
                        .detach(&owner)
                        .map_err(|e| io_err("detach from the bridge", e))?,
                    Err(e) => warn!("DEL without bridge backend: {e}"),
                }
            }
            if !deleted && !env.netns.is_empty() && netns::exists(Path::new(&env.netns)) {
                let mut pnl = Netlink::in_netns(Path::new(&env.netns))
                    .map_err(|e| io_err("open netlink in the pod netns", e))?;
                pnl.delete_link_by_name(&env.ifname)
                    .map_err(|e| io_err("delete the pod interface", e))?;
            }
            Ok(())
        })();
        (fw_ipam.join(), links)
    });
    let fw_ipam =
        fw_ipam.unwrap_or_else(|_| Err(CniError::new(ErrorCode::Io, "DEL thread panicked")));
    fw_ipam?;
    links?;
    State::remove(&conf.state_dir, &conf.name, &env.container_id, &env.ifname);
    info!(container = %env.container_id, "DEL done");
    Ok(Output::Nothing)
}

fn check_failed(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::CheckFailed, msg)
}

fn check(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let prev_v = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network config: CHECK needs prevResult",
        )
    })?;
    let prev = CniResult::from_value(prev_v)?;
    if conf.ipam.is_some() {
        let d = Delegate::ipam(conf, env)?;
        if d.speaks_at_least("0.4.0") {
            let p = prev.to_value(&d.version)?;
            d.run("CHECK", &conf.for_delegate(&d.version, Some(p)), None)?;
        }
    }
    let mut nl = Netlink::new().map_err(|e| io_err("open netlink", e))?;
    let br = nl
        .link_by_name(&conf.bridge)
        .map_err(|e| io_err("look up the bridge", e))?
        .ok_or_else(|| check_failed(format!("bridge {} does not exist", conf.bridge)))?;
    if !br.up {
        return Err(check_failed(format!("bridge {} is down", conf.bridge)));
    }
    let mut pnl = Netlink::in_netns(Path::new(&open_netns_path(&env.netns)?))
        .map_err(|e| io_err("open netlink in the pod netns", e))?;
    let pod = pnl
        .link_by_name(&env.ifname)
        .map_err(|e| io_err("look up the pod interface", e))?
        .ok_or_else(|| {
            check_failed(format!(
                "interface {} is missing in the container",
                env.ifname
            ))
        })?;
    if !pod.up {
        return Err(check_failed(format!("interface {} is down", env.ifname)));
    }
    let have: Vec<IpNet> = pnl
        .addresses(pod.index)
        .map_err(|e| io_err("list pod addresses", e))?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    for ip in &prev.ips {
        let ours = ip
            .interface
            .and_then(|i| prev.interfaces.get(i))
            .is_none_or(|i| i.name == env.ifname);
        if ours && !have.contains(&ip.address) {
            return Err(check_failed(format!(
                "address {} is missing on {}",
                ip.address, env.ifname
            )));
        }
    }
    for fam_v6 in [false, true] {
        let routes = pnl
            .routes(fam_v6)
            .map_err(|e| io_err("list pod routes", e))?;
        for r in prev
            .routes
            .iter()
            .filter(|r| r.dst.addr().is_ipv6() == fam_v6)
        {
            if !routes
                .iter()
                .any(|x| x.dst == r.dst.trunc() && (r.gw.is_none() || x.gateway == r.gw))
            {
                return Err(check_failed(format!(
                    "route to {} is missing in the container",
                    r.dst
                )));
            }
        }
    }
    let bridge = bridge_backend(conf)?;
    let owner = PortOwner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    for i in prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_none() && i.name != conf.bridge)
    {
        bridge
            .check_port(&i.name, &owner)
            .map_err(|e| check_failed(format!("host veth {}: {e}", i.name)))?;
    }
    if conf.ip_masq {
        let key = evio_firewall::attachment_key(&conf.name, &env.container_id, &env.ifname);
        let entries = evio_firewall::list().map_err(|e| io_err("list IP masquerade", e))?;
        for ip in &prev.ips {
            if !entries
                .iter()
                .any(|(a, k)| *a == ip.address.addr() && *k == key)
            {
                return Err(check_failed(format!(
                    "IP masquerade entry for {} is missing",
                    ip.address.addr()
                )));
            }
        }
    }
    Ok(Output::Nothing)
}

fn open_netns_path(p: &str) -> Result<String, CniError> {
    open_netns(p).map(|_| p.to_string())
}

fn status(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    if let Some(ipam) = &conf.ipam {
        delegate::find(&ipam.kind, env).map_err(|e| {
            CniError::with_details(
                ErrorCode::NotAvailable,
                format!("IPAM plugin {} is not available", ipam.kind),
                e.to_string(),
            )
        })?;
        let d = Delegate::ipam(conf, env)?;
        if d.speaks_at_least("1.1.0") {
            d.run("STATUS", &conf.for_delegate(&d.version, None), None)?;
        }
    }
    if let Err(e) = bridge_backend(conf) {
        return Err(CniError::with_details(
            ErrorCode::NotAvailable,
            "the bridge backend is not available",
            e.to_string(),
        ));
    }
    if conf.bridge_kind == BridgeKind::Ovs && !conf.ovsdb_socket.exists() {
        return Err(CniError::with_details(
            ErrorCode::NotAvailable,
            "Open vSwitch is not available",
            format!("no OVSDB socket at {}", conf.ovsdb_socket.display()),
        ));
    }
    Ok(Output::Nothing)
}

fn gc(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network config: GC needs cni.dev/valid-attachments",
        )
    })?;
    let keep: HashSet<(String, String)> = valid
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let dlg = match &conf.ipam {
        Some(_) => Some(Delegate::ipam(conf, env)?),
        None => None,
    };
    let mut nl = Netlink::new().map_err(|e| io_err("open netlink", e))?;
    let mut errors = Vec::new();
    for st in State::all(&conf.state_dir, &conf.name) {
        if keep.contains(&(st.container_id.clone(), st.ifname.clone())) {
            continue;
        }
        info!(container = %st.container_id, ifname = %st.ifname, "GC: stale attachment");
        let owner = PortOwner {
            container_id: st.container_id.clone(),
            ifname: st.ifname.clone(),
        };
        if st.masq
            && let Err(e) = evio_firewall::remove(&st.ips)
        {
            errors.push(format!("masquerade of {}: {e}", st.container_id));
            continue;
        }
        if let Err(e) = delete_host_veth(&mut nl, &st.host_veth, &owner).and_then(|_| {
            bridge_backend(conf)?
                .detach(&owner)
                .map_err(|e| io_err("detach from the bridge", e))
        }) {
            errors.push(e.to_string());
        }
        if let Some(d) = &dlg
            && let Err(e) = d.run(
                "DEL",
                &conf.for_delegate(&d.version, None),
                Some((&st.container_id, &st.ifname)),
            )
        {
            errors.push(format!("IPAM DEL of {}: {e}", st.container_id));
            continue;
        }
        State::remove(&conf.state_dir, &conf.name, &st.container_id, &st.ifname);
    }
    let keys: HashSet<String> = valid
        .iter()
        .map(|a| evio_firewall::attachment_key(&conf.name, &a.container_id, &a.ifname))
        .collect();
    if let Err(e) = evio_firewall::gc(&conf.name, &keys) {
        errors.push(format!("masquerade GC: {e}"));
    }
    let owners: Vec<PortOwner> = valid
        .iter()
        .map(|a| PortOwner {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    match bridge_backend(conf) {
        Ok(b) => {
            if let Err(e) = b.gc(&owners) {
                errors.push(format!("bridge GC: {e}"));
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    if let Some(d) = &dlg
        && d.speaks_at_least("1.1.0")
        && let Err(e) = d.run("GC", &conf.for_delegate(&d.version, None), None)
    {
        errors.push(format!("IPAM GC: {e}"));
    }
    if !errors.is_empty() {
        return Err(CniError::with_details(
            ErrorCode::Io,
            "GC could not remove everything",
            errors.join("; "),
        ));
    }
    Ok(Output::Nothing)
}
