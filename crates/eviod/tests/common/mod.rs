//! A cluster of hosts for eviod tests: an "underlay" network namespace with a Linux bridge and etcd, and one
//! network namespace per host joined to the bridge by a veth. Everything is removed on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use evio_testbed::{Etcd, Netns, run_ok, unique, wait_until};

pub const ETCD_IP: &str = "10.99.0.254";

pub struct Host {
    pub name: String,
    pub ns: Netns,
    pub ip: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub agent: Option<Child>,
    pub extra: Vec<String>,
}

pub struct Cluster {
    pub hosts: Vec<Host>,
    /// CA mode (`EVIO_TEST_CA` set): the signer and the join token every agent is started with.
    pub ca: Option<CaMode>,
    pub etcd: Etcd,
    pub underlay: Netns,
    pub dir: tempfile::TempDir,
}

/// A cluster CA for the test cluster: `evioctl ca init`, the signer in the underlay namespace (killed on
/// drop) and one reusable token.
pub struct CaMode {
    pub token: String,
    signer: Child,
}

impl Drop for CaMode {
    fn drop(&mut self) {
        let _ = self.signer.kill();
        let _ = self.signer.wait();
    }
}

impl CaMode {
    fn start(underlay: &Netns, etcd: &str, dir: &std::path::Path) -> CaMode {
        let ca_dir = dir.join("ca");
        let ctl = evioctl();
        let ctl = ctl.to_str().unwrap();
        run_ok(&[ctl, "ca", "init", "--dir", ca_dir.to_str().unwrap()]);
        let log = std::fs::File::create(dir.join("signer.log")).unwrap();
        let signer = underlay
            .command(ctl)
            .args(["ca", "serve", "--ca-dir", ca_dir.to_str().unwrap()])
            .args(["--etcd-endpoints", etcd, "--pod-cidr", "10.244.0.0/16"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the signer");
        let token = run_ok(&[
            ctl,
            "token",
            "create",
            "--reusable",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--etcd-endpoints",
            etcd,
        ])
        .trim()
        .to_string();
        CaMode { token, signer }
    }
}

pub fn eviod() -> &'static str {
    env!("CARGO_BIN_EXE_eviod")
}

pub fn evioctl() -> PathBuf {
    let p = evio_testbed::bin_dir().join("evioctl");
    assert!(
        p.exists(),
        "{} missing: build the workspace binaries first (cargo build --bins)",
        p.display()
    );
    p
}

impl Cluster {
    /// `n` hosts (10.99.0.1..n on the underlay), etcd on 10.99.0.254, no agents started yet.
    pub fn new(n: usize) -> Cluster {
        let underlay = Netns::new("eu");
        underlay.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        underlay.exec_ok(&["ip", "link", "set", "br0", "up"]);
        underlay.exec_ok(&["ip", "addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"]);
        let etcd = Etcd::start_in(Some(&underlay), ETCD_IP);
        let dir = tempfile::Builder::new()
            .prefix("eviod-test")
            .tempdir()
            .expect("tempdir");
        let mut hosts = Vec::new();
        for i in 0..n {
            let ns = Netns::new("eh");
            let port = format!("v{i}");
            ns.veth_to("eth0", &underlay, &port);
            underlay.exec_ok(&["ip", "link", "set", &port, "master", "br0"]);
            let ip = format!("10.99.0.{}", i + 1);
            ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            let name = format!("host-{}", i + 1);
            let state_dir = dir.path().join(&name);
            hosts.push(Host {
                log: dir.path().join(format!("{name}.log")),
                name,
                ns,
                ip,
                state_dir,
                agent: None,
                extra: vec![],
            });
        }
        // The suites that run this fixture run again in CA mode with EVIO_TEST_CA=1 (the Makefile).
        let ca = std::env::var_os("EVIO_TEST_CA")
            .map(|_| CaMode::start(&underlay, &etcd.endpoint(), dir.path()));
        Cluster {
            hosts,
            ca,
            etcd,
            underlay,
            dir,
        }
    }

    pub fn etcd_url(&self) -> String {
        self.etcd.endpoint()
    }

    /// Starts host `i`'s agent: with the etcd endpoint, or in CA mode with only the join token.
    pub fn start(&mut self, i: usize) {
        match &self.ca {
            Some(ca) => {
                let token = ca.token.clone();
                self.hosts[i].start_with(None, &[("EVIO_JOIN_TOKEN", &token)]);
            }
            None => {
                let url = self.etcd_url();
                self.hosts[i].start(&url);
            }
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.hosts.len() {
            self.start(i);
        }
    }

    /// Waits until every agent has every other as a peer with a session.
    pub fn wait_mesh(&self, limit: Duration) -> bool {
        let n = self.hosts.len();
        wait_until(limit, || {
            self.hosts
                .iter()
                .all(|h| h.agent.is_none() || h.peers_with_path("direct") >= n - 1)
        })
    }

    /// Runs `etcdctl` against the test's etcd (from the underlay namespace).
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let url = self.etcd.endpoint();
        let mut full = vec!["etcdctl", "--endpoints", &url];
        full.extend_from_slice(args);
        let out = self.underlay.exec(&full);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| format!("=== {} ===\n{}\n", h.name, h.log_text()))
            .collect()
    }
}

impl Host {
    pub fn start(&mut self, etcd: &str) {
        self.start_with(Some(etcd), &[]);
    }

    /// Starts the agent with `--etcd-endpoints` only if `etcd` is given (a joined host needs none), with
    /// extra environment variables `env` (e.g. `EVIO_JOIN_TOKEN`).
    pub fn start_with(&mut self, etcd: Option<&str>, env: &[(&str, &str)]) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        // A socket left by a killed agent is not a sign of life.
        let _ = std::fs::remove_file(self.state_dir.join("eviod.sock"));
        let mut c = self.ns.command(eviod());
        c.args(["--node-name", &self.name]);
        if let Some(etcd) = etcd {
            c.args(["--etcd-endpoints", etcd]);
        }
        c.envs(env.iter().copied());
        c.arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--listen-port", "51820"])
            .args(&self.extra)
            .env("EVIO_LOG", "info,eviod=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.agent = Some(c.spawn().expect("start eviod"));
        // Up means answering on its control socket, not only its socket file existing.
        assert!(
            wait_until(Duration::from_secs(20), || self.status().is_some()
                || self.exited()),
            "eviod on {} did not start: {}",
            self.name,
            self.log_text()
        );
        assert!(
            !self.exited(),
            "eviod on {} exited: {}",
            self.name,
            self.log_text()
        );
    }

    fn exited(&self) -> bool {
        // ip netns exec execs eviod, so the child is the agent itself.
        let Some(c) = &self.agent else { return true };
        let pid = c.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (the agent revokes its registration).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            // SAFETY: signal to our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let ok = wait_until(Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !ok {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's status document, read from its control socket.
    pub fn status(&self) -> Option<serde_json::Value> {
        use std::io::{Read, Write};
        let mut s =
            std::os::unix::net::UnixStream::connect(self.state_dir.join("eviod.sock")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"status\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        serde_json::from_str(&body).ok()
    }

    /// Peer names in the agent's status (empty when it does not answer).
    pub fn peer_names(&self) -> std::collections::BTreeSet<String> {
        self.status()
            .and_then(|s| {
                s["peers"].as_array().map(|p| {
                    p.iter()
                        .filter_map(|p| p["node"].as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    pub fn peers_with_path(&self, path: &str) -> usize {
        self.status()
            .and_then(|s| {
                s["peers"]
                    .as_array()
                    .map(|p| p.iter().filter(|p| p["path"] == path).count())
            })
            .unwrap_or(0)
    }

    pub fn vip(&self) -> String {
        self.status()
            .and_then(|s| s["address"].as_str().map(String::from))
            .unwrap_or_default()
    }

    /// One ping from this host to `ip`; true if answered.
    pub fn ping(&self, ip: &str) -> bool {
        self.ns
            .exec(&["ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
    }

    pub fn ping_until(&self, ip: &str, limit: Duration) -> bool {
        wait_until(limit, || self.ping(ip))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Silences an unused import warning in test crates that do not use every helper.
pub fn _unused() {
    let _ = (
        run_ok as fn(&[&str]) -> String,
        unique as fn(&str) -> String,
        Command::new("true"),
    );
}

/// A pod: a network namespace plugged into its host's pod bridge.
pub struct Pod {
    pub ns: Netns,
    pub ip: String,
}

impl Pod {
    pub fn exec(&self, cmd: &[&str]) -> std::process::Output {
        self.ns.exec(cmd)
    }
    pub fn ping(&self, ip: &str) -> bool {
        self.ns
            .exec(&["ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
    }
    pub fn ping_until(&self, ip: &str, limit: Duration) -> bool {
        wait_until(limit, || self.ping(ip))
    }
}

impl Host {
    /// Turns on forwarding in the host namespace (pods route through it).
    pub fn enable_forwarding(&self) {
        self.ns
            .exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    }

    /// Claims this host's pod subnet with `evioctl cni-config`; returns its JSON line
    /// (`node`, `subnet`, `gateway`, ...).
    pub fn cni_config(&self, etcd: &str, dir: &std::path::Path) -> serde_json::Value {
        cni_config_in(
            self.ns.name(),
            &self.name,
            etcd,
            &dir.join(format!("{}-cni", self.name)),
        )
    }

    /// Plugs a new pod in with the real `evio-cni` (ADD with the first plugin of the conflist that
    /// `cni_config` wrote, host-local IPAM); returns it with its address.
    pub fn add_pod_cni(&self, dir: &std::path::Path) -> Pod {
        add_pod_in(self.ns.name(), &dir.join(format!("{}-cni", self.name)))
    }

    /// Plugs a pod into bridge `eviobr0` (created with `gateway/prefix` on first use) with address `ip`.
    pub fn add_pod(&self, ip: &str, gateway: &str, prefix: u8) -> Pod {
        if !self.ns.links().iter().any(|l| l == "eviobr0") {
            self.ns
                .exec_ok(&["ip", "link", "add", "eviobr0", "type", "bridge"]);
            self.ns.exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("{gateway}/{prefix}"),
                "dev",
                "eviobr0",
            ]);
            self.ns.exec_ok(&["ip", "link", "set", "eviobr0", "up"]);
        }
        let pod = Netns::new("ep");
        let hv = unique("vp");
        pod.veth_to("eth0", &self.ns, &hv);
        self.ns
            .exec_ok(&["ip", "link", "set", &hv, "master", "eviobr0"]);
        pod.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            "eth0",
        ]);
        pod.exec_ok(&["ip", "route", "add", "default", "via", gateway]);
        Pod {
            ns: pod,
            ip: ip.to_string(),
        }
    }

    /// The agent's metrics (Prometheus text) through its control socket.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.state_dir.join("eviod.sock"))
        else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(b"metrics\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        serde_json::from_str::<String>(body.trim()).unwrap_or_default()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Prefixes routed through the agent's TUN device.
    pub fn tun_routes(&self) -> String {
        String::from_utf8_lossy(
            &self
                .ns
                .exec(&["ip", "route", "show", "dev", "evio0"])
                .stdout,
        )
        .into_owned()
    }
}

/// The CNI plugin binary to install with `cni-config` (the real one when built, else a placeholder).
pub fn plugin_binary() -> PathBuf {
    let p = evio_testbed::bin_dir().join("evio-cni");
    if p.exists() {
        return p;
    }
    // Answers VERSION (cni-config asks it), fails everything else.
    let f = std::env::temp_dir().join("eviod-test-plugin-placeholder-v2");
    if !f.exists() {
        std::fs::write(
            &f,
            "#!/bin/sh\n[ \"$CNI_COMMAND\" = VERSION ] && echo '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"1.0.0\"]}' && exit 0\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    f
}

/// Runs `evioctl cni-config` in network namespace `ns` for node `node` against `etcd`, with everything
/// (net-conf, conflist, plugin, plugin state, IPAM data, log) under `d`; returns its JSON line.
pub fn cni_config_in(ns: &str, node: &str, etcd: &str, d: &std::path::Path) -> serde_json::Value {
    cni_config_with(ns, node, etcd, d, serde_json::json!({}))
}

/// [`cni_config_in`] with `extra` net-conf keys (e.g. `podCIDRs`).
pub fn cni_config_with(
    ns: &str,
    node: &str,
    etcd: &str,
    d: &std::path::Path,
    extra: serde_json::Value,
) -> serde_json::Value {
    std::fs::create_dir_all(d.join("net.d")).unwrap();
    std::fs::create_dir_all(d.join("bin")).unwrap();
    let conf = d.join("net-conf.json");
    let mut net_conf = serde_json::json!({
        "podCIDR": "10.244.0.0/16",
        "nodeBits": 8,
        "stateDir": d.join("state"),
        "logFile": d.join("plugin.log"),
        "logLevel": "debug",
        "ipam": {"dataDir": d.join("ipam")},
    });
    for (k, v) in extra.as_object().unwrap() {
        net_conf[k] = v.clone();
    }
    std::fs::write(&conf, net_conf.to_string()).unwrap();
    let plugin = plugin_binary();
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(evioctl())
        .arg("cni-config")
        .arg("--net-conf")
        .arg(&conf)
        .args(["--node-name", node, "--etcd-endpoints", etcd])
        .arg("--cni-conf-dir")
        .arg(d.join("net.d"))
        .arg("--cni-bin-dir")
        .arg(d.join("bin"))
        .arg("--plugin-binary")
        .arg(&plugin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cni-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cni-config JSON")
}

/// Plugs a new pod in from network namespace `ns` with the real `evio-cni` (ADD with the first plugin of
/// the conflist `cni_config_in` wrote under `d`, host-local IPAM); returns it with its address.
pub fn add_pod_in(ns: &str, d: &std::path::Path) -> Pod {
    add_pod_with_ips(ns, d).0
}

/// [`add_pod_in`], also returning every address the plugin's result lists (without prefix lengths).
pub fn add_pod_with_ips(ns: &str, d: &std::path::Path) -> (Pod, Vec<String>) {
    let list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("net.d").join("10-evio.conflist")).unwrap())
            .unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let plugin = evio_testbed::bin_dir().join("evio-cni");
    assert!(
        plugin.exists(),
        "{} missing: build the workspace binaries first",
        plugin.display()
    );
    let path = d.join("cni-path");
    if !path.exists() {
        std::fs::create_dir_all(&path).unwrap();
        std::os::unix::fs::symlink(&plugin, path.join("evio-cni")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/cni/host-local", path.join("host-local")).unwrap();
    }
    let pod = Netns::new("ep");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(&plugin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "CNI ADD: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(d.join("plugin.log")).unwrap_or_default()
    );
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ips: Vec<String> = res["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    (
        Pod {
            ns: pod,
            ip: ips[0].clone(),
        },
        ips,
    )
}
