//! CHECK: the attachment of the previous result is still as ADD left it.

use std::path::Path;

use evio_cni_types::config::NetConf;
use evio_cni_types::env::Env;
use evio_cni_types::result::CniResult;
use evio_cni_types::{CniError, ErrorCode};
use evio_netlink::Netlink;
use ipnet::IpNet;

use crate::common::Output;
use crate::common::{Attachment, io_err, open_netns};
use crate::host::Host;

fn check_failed(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::CheckFailed, msg)
}

pub fn check(env: &Env, conf: &NetConf, host: &dyn Host) -> Result<Output, CniError> {
    let prev_v = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network config: CHECK needs prevResult",
        )
    })?;
    let prev = CniResult::from_value(prev_v)?;
    if conf.ipam.is_some() {
        let d = host.ipam(conf, env)?;
        if d.speaks_at_least("0.4.0") {
            let p = prev.to_value(d.version())?;
            d.run("CHECK", &conf.for_delegate(d.version(), Some(p)), None)?;
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
    open_netns(&env.netns)?;
    let mut pnl = Netlink::in_netns(Path::new(&env.netns))
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
    let bridge = host.bridge()?;
    let att = Attachment::new(conf, &env.container_id, &env.ifname);
    for i in prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_none() && i.name != conf.bridge)
    {
        bridge
            .check_port(&i.name, &att.owner)
            .map_err(|e| check_failed(format!("host veth {}: {e}", i.name)))?;
    }
    if conf.ip_masq {
        let entries = host
            .firewall()
            .list()
            .map_err(|e| io_err("list IP masquerade", e))?;
        for ip in &prev.ips {
            if !entries
                .iter()
                .any(|(a, k)| *a == ip.address.addr() && *k == att.key)
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
