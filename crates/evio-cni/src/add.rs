//! ADD: a list of steps ([`STEPS`]); each one that changes the host records its undo, and when a step
//! fails the undos run in reverse, so a failed ADD leaves the host as it found it.

use std::net::IpAddr;

use evio_cni_types::config::{BridgeKind, NetConf};
use evio_cni_types::env::Env;
use evio_cni_types::result::{CniResult, Interface, IpConfig, Route};
use evio_cni_types::{CniError, ErrorCode};
use ipnet::IpNet;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::common::Output;
use crate::common::{Attachment, io_err};
use crate::host::{Host, Ipam, PodLinks, Running};
use crate::state::State;

/// ADD's steps, in order. `EVIO_CNI_FAIL_AFTER=<name>` (debug builds) fails ADD right after the step of
/// that name.
pub const STEPS: &[Step] = &[
    Step::IpamStart,
    Step::Veth,
    Step::Ipam,
    Step::Bridge,
    Step::Attach,
    Step::Gateway,
    Step::Masq,
    Step::Address,
    Step::Routes,
    Step::Announce,
    Step::State,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// IPAM ADD starts (it runs while the veth pair is built).
    IpamStart,
    Veth,
    /// IPAM's answer.
    Ipam,
    Bridge,
    Attach,
    Gateway,
    /// The masquerade entries (one nfnetlink transaction).
    Masq,
    Address,
    Routes,
    Announce,
    State,
}

impl Step {
    /// The name of the step for the failure-injection hook (`None`: the hook cannot stop there).
    pub fn hook_name(self) -> Option<&'static str> {
        Some(match self {
            Step::Veth => "veth",
            Step::Ipam => "ipam",
            Step::Bridge => "bridge",
            Step::Attach => "attach",
            Step::Gateway => "gateway",
            Step::Address => "address",
            Step::Routes => "routes",
            Step::Masq => "masq",
            Step::State => "state",
            Step::IpamStart | Step::Announce => return None,
        })
    }
}

/// What undoes a step that changed the host.
#[derive(Debug, Clone, PartialEq)]
enum Undo {
    IpamDel,
    DeleteVeth(String),
    Detach,
    Masq(Vec<IpAddr>),
    State,
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
            v.parse::<IpNet>().map_err(|_| bad("subnet", v))?;
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

/// One ADD in progress: its inputs, the values computed once, what the steps produced, and the undo log.
struct Add<'a> {
    env: &'a Env,
    conf: &'a NetConf,
    host: &'a dyn Host,
    links: Box<dyn PodLinks>,
    ipam: Box<dyn Ipam>,
    ipam_conf: Vec<u8>,
    att: Attachment,
    running: Option<Running>,
    host_veth: String,
    ipam_result: CniResult,
    bridge_mac: Option<String>,
    host_mac: Option<String>,
    ips: Vec<IpConfig>,
    routes: Vec<Route>,
    undo: Vec<Undo>,
}

pub fn add(env: &Env, conf: &NetConf, host: &dyn Host) -> Result<Output, CniError> {
    let ipam = conf.ipam.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network config: an ipam section is required",
        )
    })?;
    validate_ipam(&ipam.raw)?;
    host.bridge()?;
    let links = host.pod_links(env)?;
    let ipam = host.ipam(conf, env)?;
    let ipam_conf = conf.for_delegate(ipam.version(), None);
    let mut a = Add {
        env,
        conf,
        host,
        links,
        ipam,
        ipam_conf,
        att: Attachment::new(conf, &env.container_id, &env.ifname),
        running: None,
        host_veth: String::new(),
        ipam_result: CniResult::default(),
        bridge_mac: None,
        host_mac: None,
        ips: Vec::new(),
        routes: Vec::new(),
        undo: Vec::new(),
    };
    for step in STEPS {
        if let Err(e) = a
            .run(*step)
            .and_then(|()| step.hook_name().map_or(Ok(()), fail_point))
        {
            info!("ADD failed, rolling back: {e}");
            a.roll_back();
            return Err(e);
        }
    }
    info!(container = %env.container_id, host_veth = %a.host_veth, "ADD done");
    Ok(Output::Json(
        a.result().to_value(&conf.cni_version)?.to_string(),
    ))
}

impl Add<'_> {
    fn run(&mut self, step: Step) -> Result<(), CniError> {
        let conf = self.conf;
        match step {
            Step::IpamStart => {
                self.running = Some(self.ipam.start("ADD", &self.ipam_conf, None)?);
                debug!("IPAM started");
                self.undo.push(Undo::IpamDel);
            }
            Step::Veth => {
                self.host_veth = self.links.create_veth(conf.mtu)?;
                self.undo.push(Undo::DeleteVeth(self.host_veth.clone()));
            }
            Step::Ipam => {
                let run = self.running.take().expect("IPAM started");
                let out = self.ipam.finish(run, "ADD")?;
                self.ipam_result = CniResult::from_slice(&out)?;
                if self.ipam_result.ips.is_empty() {
                    return Err(CniError::new(
                        ErrorCode::Io,
                        "the IPAM plugin returned no address",
                    ));
                }
            }
            Step::Bridge => self
                .host
                .bridge()?
                .ensure()
                .map_err(|e| io_err("bridge", e))?,
            Step::Attach => {
                self.host
                    .bridge()?
                    .attach(&self.host_veth, &self.att.owner)
                    .map_err(|e| io_err("attach the veth to the bridge", e))?;
                self.undo.push(Undo::Detach);
                self.host_mac = self.links.host_mac(&self.host_veth, "host veth")?;
                if conf.hairpin_mode && conf.bridge_kind == BridgeKind::Linux {
                    self.links.set_hairpin(&self.host_veth)?;
                }
            }
            Step::Gateway => self.gateways()?,
            Step::Address => {
                for ip in &self.ips {
                    self.links.add_pod_address(&ip.address)?;
                }
            }
            Step::Routes => self.routes()?,
            Step::Announce => {
                if self.ips.iter().any(|i| i.address.addr().is_ipv4()) {
                    self.links.announce();
                }
            }
            Step::Masq => self.masquerade()?,
            Step::State => self.save_state()?,
        }
        Ok(())
    }

    /// The gateways (IPAM's, or the subnet's first address when we are the gateway and IPAM named none),
    /// put on the bridge when we are the gateway.
    fn gateways(&mut self) -> Result<(), CniError> {
        let conf = self.conf;
        self.bridge_mac = self.links.host_mac(&conf.bridge, "bridge")?;
        self.ips = self
            .ipam_result
            .ips
            .iter()
            .map(|ip| IpConfig {
                address: ip.address,
                gateway: ip
                    .gateway
                    .or_else(|| first_host(&ip.address).filter(|_| conf.is_gateway)),
                interface: Some(2),
            })
            .collect();
        if conf.is_gateway {
            for ip in &self.ips {
                let Some(gw) = ip.gateway else { continue };
                let gwnet =
                    IpNet::new(gw, ip.address.prefix_len()).map_err(|e| io_err("gateway", e))?;
                self.links.add_gateway(&conf.bridge, gwnet)?;
            }
        }
        Ok(())
    }

    /// Masquerades the pod's traffic leaving the cluster (one nfnetlink transaction).
    fn masquerade(&mut self) -> Result<(), CniError> {
        let conf = self.conf;
        if !conf.ip_masq {
            return Ok(());
        }
        let pod_ips = self.pod_ips();
        let mut no_masq: Vec<IpNet> = self.ips.iter().map(|i| i.address.trunc()).collect();
        no_masq.extend(conf.no_masq.iter().copied());
        self.undo.push(Undo::Masq(pod_ips.clone()));
        self.host
            .firewall()
            .add(&self.att.key, &pod_ips, &no_masq)
            .map_err(|e| io_err("IP masquerade", e))
    }

    /// IPAM's routes plus the default route(s) via the gateway when we are the default gateway.
    fn routes(&mut self) -> Result<(), CniError> {
        let mut routes = self.ipam_result.routes.clone();
        if self.conf.is_default_gateway {
            for ip in &self.ips {
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
                self.ips
                    .iter()
                    .find(|i| i.address.addr().is_ipv4() == r.dst.addr().is_ipv4())
                    .and_then(|i| i.gateway)
            });
            self.links.add_pod_route(r, gw)?;
        }
        self.routes = routes;
        Ok(())
    }

    fn save_state(&mut self) -> Result<(), CniError> {
        let (env, conf) = (self.env, self.conf);
        let st = State {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            netns: env.netns.clone(),
            host_veth: self.host_veth.clone(),
            ips: self.pod_ips(),
            masq: conf.ip_masq,
        };
        self.undo.push(Undo::State);
        st.save(&conf.state_dir, &conf.name)
            .map_err(|e| io_err("write state", e))
    }

    fn pod_ips(&self) -> Vec<IpAddr> {
        self.ips.iter().map(|i| i.address.addr()).collect()
    }

    /// Undoes what the steps did, newest first; what is in flight is waited for first.
    fn roll_back(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = self.ipam.finish(r, "ADD");
        }
        let (env, conf) = (self.env, self.conf);
        while let Some(u) = self.undo.pop() {
            let r = match &u {
                Undo::State => {
                    State::remove(&conf.state_dir, &conf.name, &env.container_id, &env.ifname);
                    Ok(())
                }
                Undo::Masq(ips) => self
                    .host
                    .firewall()
                    .remove(ips)
                    .map_err(|e| io_err("masquerade entries", e)),
                Undo::Detach => self.host.bridge().and_then(|b| {
                    b.detach(&self.att.owner)
                        .map_err(|e| io_err("detach from the bridge", e))
                }),
                Undo::DeleteVeth(v) => self.links.delete_veth(v),
                Undo::IpamDel => self.ipam.run("DEL", &self.ipam_conf, None).map(|_| ()),
            };
            if let Err(e) = r {
                warn!("rollback: {u:?}: {e}");
            }
        }
    }

    fn result(&self) -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: self.conf.bridge.clone(),
                    mac: self.bridge_mac.clone(),
                    ..Default::default()
                },
                Interface {
                    name: self.host_veth.clone(),
                    mac: self.host_mac.clone(),
                    ..Default::default()
                },
                Interface {
                    name: self.env.ifname.clone(),
                    mac: self.links.pod_mac(),
                    sandbox: Some(self.env.netns.clone()),
                    mtu: self.conf.mtu,
                    ..Default::default()
                },
            ],
            ips: self.ips.clone(),
            routes: self.routes.clone(),
            dns: self.ipam_result.dns.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeHost, Recorder, World, conf, env};

    /// Runs ADD of `cid` with the `n`th host call failing (`None`: none).
    fn add_failing_at(
        rec: &Recorder,
        dir: &std::path::Path,
        cid: &str,
        n: Option<usize>,
    ) -> Result<Output, CniError> {
        rec.fail_at(n);
        let r = add(&env("ADD", cid), &conf(dir, ""), &FakeHost::new(rec));
        rec.fail_at(None);
        r
    }

    #[test]
    fn a_successful_add_records_every_effect() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        let out = add_failing_at(&rec, d.path(), "c1", None).unwrap();
        let Output::Json(j) = out else {
            panic!("ADD prints a result")
        };
        let r: Value = serde_json::from_str(&j).unwrap();
        assert_eq!(r["ips"][0]["address"], "10.22.0.2/24");
        assert_eq!(r["ips"][0]["gateway"], "10.22.0.1");
        assert_eq!(r["interfaces"][2]["name"], "eth0");
        let w = rec.world(d.path(), "net");
        assert_eq!(w.leases.len(), 1);
        assert_eq!(w.veths.len(), 1);
        let veth = w.veths.first().unwrap();
        assert_eq!(w.ports[veth], "evio c1 eth0");
        assert_eq!(
            w.masq[&"10.22.0.2".parse::<IpAddr>().unwrap()],
            "evio net c1 eth0"
        );
        assert_eq!(w.pod_addrs.len(), 1);
        assert!(
            w.pod_routes
                .contains(&(veth.clone(), "0.0.0.0/0".parse().unwrap()))
        );
        assert_eq!(
            w.state_files,
            ["c1-eth0.json".to_string()].into_iter().collect()
        );
        // Hairpin on a Linux bridge, the gateway on the bridge.
        let calls = rec.calls();
        assert!(calls.iter().any(|c| c.starts_with("links.set_hairpin")));
        assert!(calls.contains(&"links.add_gateway eviobr0 10.22.0.1/24".to_string()));
    }

    #[test]
    fn every_failure_point_of_add_rolls_back_to_the_state_before() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        // Another attachment already there: the rollbacks must leave it alone.
        add_failing_at(&rec, d.path(), "other", None).unwrap();
        let before = rec.world(d.path(), "net");
        let n0 = rec.calls().len();
        add_failing_at(&rec, d.path(), "probe", None).unwrap();
        let calls = rec.calls().len() - n0;
        let probe = rec.world(d.path(), "net");
        // Undo the probe with the doubles' own DEL.
        crate::del::del(
            &env("DEL", "probe"),
            &conf(d.path(), ""),
            &FakeHost::new(&rec),
        )
        .unwrap();
        assert_eq!(rec.world(d.path(), "net"), before);
        assert_ne!(probe, before);

        let mut failed = 0;
        for n in 1..=calls {
            let start = rec.calls().len();
            match add_failing_at(&rec, d.path(), "c1", Some(n)) {
                Err(e) => {
                    failed += 1;
                    let failed_call = &rec.calls()[start + n - 1];
                    assert!(e.msg.contains("injected") || e.details.contains("injected"));
                    assert_eq!(
                        rec.world(d.path(), "net"),
                        before,
                        "after a failure of call {n} ({failed_call}): {:?}",
                        &rec.calls()[start..]
                    );
                }
                Ok(_) => {
                    // Only the best-effort announcement may fail without failing ADD.
                    assert_eq!(rec.calls()[start + n - 1], "links.announce");
                    crate::del::del(&env("DEL", "c1"), &conf(d.path(), ""), &FakeHost::new(&rec))
                        .unwrap();
                    assert_eq!(rec.world(d.path(), "net"), before);
                }
            }
        }
        assert_eq!(
            failed,
            calls - 1,
            "every call but the announcement can fail ADD"
        );
    }

    #[test]
    fn rollback_runs_newest_first_and_goes_on_when_an_undo_fails() {
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::default();
        let n0 = rec.calls().len();
        add_failing_at(&rec, d.path(), "c1", None).unwrap();
        let calls: Vec<String> = rec.calls()[n0..].to_vec();
        crate::del::del(&env("DEL", "c1"), &conf(d.path(), ""), &FakeHost::new(&rec)).unwrap();
        let route = 1 + calls
            .iter()
            .position(|c| c.starts_with("links.add_pod_route"))
            .unwrap();
        let kinds = |calls: &[String]| -> Vec<String> {
            calls
                .iter()
                .map(|c| c.split(' ').next().unwrap().to_string())
                .collect()
        };
        const UNDOS: [&str; 5] = [
            "fw.remove",
            "bridge.detach",
            "links.delete_veth",
            "ipam.DEL",
            "ipam.finish",
        ];
        // The route fails: the undos run newest first.
        let start = rec.calls().len();
        rec.fail_calls(&[route]);
        add(&env("ADD", "c1"), &conf(d.path(), ""), &FakeHost::new(&rec)).unwrap_err();
        assert_eq!(kinds(&rec.calls()[start + route..]), UNDOS);
        assert_eq!(rec.world(d.path(), "net"), World::default());
        // The route fails and so does the first undo (the masquerade removal): the others still run and
        // only the masquerade entry is left behind.
        let start = rec.calls().len();
        rec.fail_calls(&[route, route + 1]);
        add(&env("ADD", "c1"), &conf(d.path(), ""), &FakeHost::new(&rec)).unwrap_err();
        assert_eq!(kinds(&rec.calls()[start + route..]), UNDOS);
        let w = rec.world(d.path(), "net");
        assert_eq!(w.masq.len(), 1);
        assert_eq!(
            World {
                masq: Default::default(),
                ..w
            },
            World::default()
        );
    }
}
