//! The demo cluster: the lab topology (`evio_testbed::lab`) plus, per host, the config gen, the agent and the pods. Every
//! resource is recorded the moment it exists, and [`Cluster::teardown`] (also run on `Drop`) removes them
//! in reverse order: agents (SIGTERM, then SIGKILL), processes in pod namespaces, pod namespaces, the lab
//! (etcd, coturn, its namespaces and temp dir), the demo's temp dir. Teardown is idempotent.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use evio_testbed::lab::{Host, Lab, NatKind, netns_command};
use serde_json::Value;

use crate::cni;
use crate::signals;

/// The UDP port of every agent (each in its own namespace).
pub const LISTEN_PORT: u16 = 51820;
/// The pod CIDR of the demo (the default pod overlay, docs/architecture.md).
pub const POD_CIDR: &str = "10.244.0.0/16";

/// Where the demo finds its programs.
pub struct Bins {
    pub evioctl: PathBuf,
    pub eviod: PathBuf,
    pub evio_cni: PathBuf,
}

pub struct Pod {
    /// `pod1`, `pod2`, ...
    pub name: String,
    /// The pod's network namespace.
    pub ns: String,
    pub ip: String,
}

/// A site's NAT.
#[derive(Clone)]
pub struct Nat {
    pub kind: NatKind,
    /// Its network namespace.
    pub ns: String,
    /// Its public address.
    pub wan: Ipv4Addr,
}

pub struct Node {
    /// `edge1`, `edge2`, ... (the node name in etcd).
    pub name: String,
    pub host: Host,
    /// The NAT in front of the host (None: a public host).
    pub nat: Option<Nat>,
    /// This node's temp dir: conflist, plugin bin dir, agent state dir, logs.
    pub dir: PathBuf,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub vip: Option<String>,
    pub agent: Option<Child>,
    pub pods: Vec<Pod>,
}

impl Node {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn net_d(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("eviod.log")
    }
    /// CNI_PATH: evio-cni as installed by `cni-config`, host-local and portmap from the distribution.
    pub fn cni_path(&self) -> String {
        format!("{}:{}", self.bin_dir().display(), crate::REFERENCE_PLUGINS)
    }

    /// True if the agent process has exited (or was never started).
    pub fn agent_exited(&mut self) -> bool {
        match &mut self.agent {
            None => true,
            Some(c) => !matches!(c.try_wait(), Ok(None)),
        }
    }

    pub fn agent_log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.agent_log()).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

pub struct Cluster {
    pub prefix: String,
    pub nodes: Vec<Node>,
    /// Pod namespaces created so far (deleted on teardown).
    pod_namespaces: Vec<String>,
    /// Other processes started in the namespaces (iperf3 servers...), killed on teardown.
    pub extra: Vec<Child>,
    /// The CA's signer and the topology page, killed on teardown after the agents.
    services: Vec<Child>,
    lab: Option<Lab>,
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// An empty cluster owning the demo's temp dir (`$TMPDIR/evio-demo-<prefix>*`).
    pub fn new(prefix: &str) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("evio-demo-{prefix}-"))
            .tempdir()
            .context("cannot create the demo's temp dir")?;
        Ok(Cluster {
            prefix: prefix.to_string(),
            nodes: Vec::new(),
            pod_namespaces: Vec::new(),
            extra: Vec::new(),
            services: Vec::new(),
            lab: None,
            dir: Some(dir),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab built")
    }

    /// Builds the topology: the internet with etcd and coturn, one site per node behind its own NAT
    /// (the last `symmetric` of them symmetric), one host per site, then `public` hosts with public
    /// addresses directly on the internet.
    pub fn build_lab(&mut self, nodes: usize, symmetric: usize, public: usize) -> Result<()> {
        let mut b = Lab::builder(&self.prefix).etcd(true).turn(true);
        for i in 0..nodes {
            let kind = if i >= nodes - symmetric {
                NatKind::Symmetric
            } else {
                NatKind::EasyNat
            };
            b = b.site(kind, 1);
        }
        let lab = b.public_hosts(public).build().map_err(|e| anyhow!("{e}"))?;
        let mut hosts: Vec<(Host, Option<Nat>)> = lab
            .sites()
            .iter()
            .map(|s| {
                let nat = Nat {
                    kind: s.kind,
                    ns: s.nat_ns.clone(),
                    wan: s.wan_ip,
                };
                (s.hosts[0].clone(), Some(nat))
            })
            .collect();
        hosts.extend(lab.public_hosts().iter().map(|h| (h.clone(), None)));
        for (i, (host, nat)) in hosts.into_iter().enumerate() {
            let name = format!("edge{}", i + 1);
            let dir = self.dir().join(&name);
            for d in ["net.d", "bin", "state", "ipam", "cni-state"] {
                std::fs::create_dir_all(dir.join(d))?;
            }
            self.nodes.push(Node {
                name,
                host,
                nat,
                dir,
                subnet: None,
                gateway: None,
                vip: None,
                agent: None,
                pods: Vec::new(),
            });
        }
        self.lab = Some(lab);
        Ok(())
    }

    pub fn etcd_url(&self) -> String {
        self.lab().etcd_endpoint().unwrap_or_default()
    }

    /// `evioctl cni-config` on every host (real processes in the host namespaces, a few at a time: a
    /// hundred claims at once against one etcd on a busy machine run into cni-config's 5 s timeout). A
    /// failed run is retried twice: a re-run gets the same claim.
    pub fn cni_config(&mut self, bins: &Bins) -> Result<()> {
        let etcd = self.etcd_url();
        let results: Vec<Result<Value>> = parallel(&self.nodes, WORKERS, |n| {
            let mut r = cni_config_one(n, bins, &etcd);
            for _ in 0..2 {
                if r.is_ok() || signals::interrupted() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
                r = cni_config_one(n, bins, &etcd);
            }
            r
        });
        for (n, r) in self.nodes.iter_mut().zip(results) {
            let v = r?;
            n.subnet = v["subnet"].as_str().map(str::to_string);
            n.gateway = v["gateway"].as_str().map(str::to_string);
            if n.subnet.is_none() {
                bail!("cni-config on {} printed no subnet: {v}", n.name);
            }
        }
        Ok(())
    }

    /// The cluster CA: `evioctl ca init` in the demo's temp dir, the signer (`evioctl ca serve`) in the
    /// internet namespace next to etcd, and one reusable join token carrying etcd, STUN and TURN. Returns
    /// the CA's pin and the token.
    pub fn start_ca(&mut self, bins: &Bins) -> Result<(String, String)> {
        let ca_dir = self.dir().join("ca");
        let out = Command::new(&bins.evioctl)
            .args(["ca", "init", "--name", "evio-demo", "--dir"])
            .arg(&ca_dir)
            .output()
            .context("cannot run evioctl ca init")?;
        if !out.status.success() {
            bail!(
                "evioctl ca init: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let pin = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or_default()
            .to_string();
        let etcd = self.etcd_url();
        let log = std::fs::File::create(self.dir().join("signer.log"))?;
        let mut c = netns_command(self.lab().internet_ns(), &bins.evioctl.to_string_lossy());
        c.args(["ca", "serve", "--ca-dir"])
            .arg(&ca_dir)
            .args(["--etcd-endpoints", &etcd, "--pod-cidr", POD_CIDR])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut c);
        let signer = c.spawn().context("cannot start evioctl ca serve")?;
        self.services.push(signer);
        let mut t = Command::new(&bins.evioctl);
        t.args(["token", "create", "--reusable", "--ttl", "1h", "--ca-dir"])
            .arg(&ca_dir)
            .args(["--etcd-endpoints", &etcd]);
        if let Some(turn) = self.lab().turn() {
            let addr = turn.addr.to_string();
            t.args(["--stun", &addr, "--turn", &addr, "--turn-user", &turn.user])
                .arg("--turn-password-file")
                .arg(&turn.password_file);
        }
        let out = t.output().context("cannot run evioctl token create")?;
        if !out.status.success() {
            bail!(
                "evioctl token create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((pin, token))
    }

    /// Starts the topology page (`evioctl ui`) on `listen` in this (the root) namespace, reading etcd in
    /// the internet namespace; returns its address. Killed at teardown.
    pub fn start_ui(&mut self, bins: &Bins, listen: &str) -> Result<String> {
        use std::io::BufRead;
        let mut c = Command::new(&bins.evioctl);
        c.args(["ui", "--etcd-endpoints", &self.etcd_url(), "--etcd-netns"])
            .arg(self.lab().internet_ns())
            .args(["--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut c);
        let mut child = c.spawn().context("cannot start evioctl ui")?;
        let stderr = child.stderr.take().expect("piped");
        self.services.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut log = std::fs::File::create(self.dir().join("ui.log"))?;
        std::thread::spawn(move || {
            use std::io::Write;
            let mut lines = std::io::BufReader::new(stderr).lines();
            for line in lines.by_ref().map_while(|l| l.ok()) {
                let _ = writeln!(log, "{line}");
                if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                    let _ = tx.send(Ok(url.to_string()));
                    break;
                }
                let _ = tx.send(Err(line));
            }
            // The rest goes to ui.log (and the page never blocks on a full pipe).
            for line in lines.map_while(|l| l.ok()) {
                let _ = writeln!(log, "{line}");
            }
        });
        let end = Instant::now() + Duration::from_secs(10);
        let mut said = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Ok(url)) => return Ok(url),
                Ok(Err(line)) => said.push(line),
                Err(_) => break,
            }
        }
        bail!("evioctl ui did not start on {listen}: {}", said.join("; "))
    }

    /// Starts `eviod` on every host: with `token`, each agent is given only its name, state dir, port and
    /// the join token (CA mode); without, etcd and STUN/TURN flags. Children are spawned from this (the
    /// main) thread because they get PR_SET_PDEATHSIG: should the demo itself be killed with SIGKILL, the
    /// agents die with it.
    pub fn start_agents(
        &mut self,
        bins: &Bins,
        nat_flags: bool,
        token: Option<&str>,
    ) -> Result<()> {
        let etcd = self.etcd_url();
        let turn = self
            .lab()
            .turn()
            .map(|t| (t.addr.to_string(), t.user.clone(), t.password_file.clone()));
        for n in &mut self.nodes {
            if signals::interrupted() {
                return Ok(());
            }
            // Only on the host: pods route through it (a Kubernetes node has this on).
            evio_testbed::lab::sysctl_write(&n.host.ns, "net/ipv4/ip_forward", "1")
                .map_err(|e| anyhow!("{e}"))?;
            let log = std::fs::File::create(n.agent_log())?;
            let mut c = netns_command(&n.host.ns, &bins.eviod.to_string_lossy());
            c.args(["--node-name", &n.name, "--state-dir"])
                .arg(n.state_dir())
                .args(["--listen-port", &LISTEN_PORT.to_string()]);
            match token {
                Some(t) => {
                    c.env("EVIO_JOIN_TOKEN", t);
                }
                None => {
                    c.args(["--etcd-endpoints", &etcd]);
                    if nat_flags && let Some((addr, user, pw)) = &turn {
                        c.args(["--stun", addr, "--turn", addr, "--turn-user", user])
                            .arg("--turn-password-file")
                            .arg(pw);
                    }
                }
            }
            c.env("EVIO_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            die_with_parent(&mut c);
            n.agent = Some(
                c.spawn()
                    .with_context(|| format!("cannot start {}", bins.eviod.display()))?,
            );
        }
        Ok(())
    }

    /// Waits until every agent answers with its VIP.
    pub fn wait_agents(&mut self, limit: Duration) -> Result<()> {
        let end = Instant::now() + limit;
        loop {
            let mut pending = Vec::new();
            for n in &mut self.nodes {
                if n.vip.is_some() {
                    continue;
                }
                if n.agent_exited() {
                    bail!(
                        "eviod on {} exited; its log ({}):\n{}",
                        n.name,
                        n.agent_log().display(),
                        n.agent_log_tail(20)
                    );
                }
                match status(&n.state_dir()) {
                    Ok(st) if st["address"].is_string() => {
                        n.vip = st["address"].as_str().map(str::to_string);
                    }
                    _ => pending.push(n.name.clone()),
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!(
                    "no answer from eviod on {} within {limit:?}",
                    pending.join(", ")
                );
            }
            if !signals::sleep(Duration::from_millis(100)) {
                return Ok(());
            }
        }
    }

    /// Plugs `k` pods into every host through the CNI chain of its conflist (hosts in parallel).
    pub fn add_pods(&mut self, k: usize) -> Result<()> {
        // Namespaces first, from this thread, so each is recorded for teardown before it is used.
        let mut plan: Vec<Vec<(String, String)>> = Vec::new();
        for i in 0..self.nodes.len() {
            let mut v = Vec::new();
            for p in 1..=k {
                if signals::interrupted() {
                    return Ok(());
                }
                let ns = format!("{}-e{}p{p}", self.prefix, i + 1);
                evio_testbed::lab::run(Command::new("ip").args(["netns", "add", &ns]))
                    .map_err(|e| anyhow!("{e}"))?;
                self.pod_namespaces.push(ns.clone());
                evio_testbed::lab::run(
                    Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]),
                )
                .map_err(|e| anyhow!("{e}"))?;
                v.push((format!("pod{p}"), ns));
            }
            plan.push(v);
        }
        let work: Vec<(&Node, Vec<(String, String)>)> = self.nodes.iter().zip(plan).collect();
        let results: Vec<Result<Vec<Pod>>> =
            parallel(&work, WORKERS, |(n, pods)| add_pods_one(n, pods.clone()));
        for (n, r) in self.nodes.iter_mut().zip(results) {
            n.pods = r?;
        }
        Ok(())
    }

    /// Stops everything and removes every trace; safe to call more than once.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // 1. Agents: SIGTERM (they revoke their registration), then SIGKILL after a grace. eviod's own
        // shutdown allows its control plane up to 3 s for the revoke, then joins its data-plane threads
        // (which see the stop within 0.5 s): the grace must be longer than that, or a busy machine turns
        // a clean stop into "ignored SIGTERM". A healthy agent exits well before it.
        let mut agents: Vec<(String, Child)> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.agent.take().map(|c| (n.name.clone(), c)))
            .collect();
        for (_, c) in &agents {
            evio_testbed::lab::kill(c.id() as i32, evio_testbed::lab::Signal::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(10);
        for (name, c) in &mut agents {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(c.try_wait(), Ok(None)) {
                problems.push(format!("eviod on {name} ignored SIGTERM; killed"));
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for mut c in self.extra.drain(..).chain(self.services.drain(..)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // 2. Pod namespaces: whatever runs in them, then the namespaces (their veths go with them).
        for ns in self.pod_namespaces.iter().rev() {
            kill_netns_pids(ns);
        }
        for ns in self.pod_namespaces.drain(..).rev() {
            if let Err(e) = evio_testbed::lab::run(Command::new("ip").args(["netns", "del", &ns])) {
                problems.push(format!("cannot delete namespace {ns}: {e}"));
            }
        }
        // 3. The lab: etcd, coturn, everything in its namespaces, the namespaces, its temp dir.
        self.lab.take();
        // 4. Our temp dir (state dirs, conflists, logs).
        if let Some(d) = self.dir.take() {
            let path = d.path().to_path_buf();
            if let Err(e) = d.close() {
                problems.push(format!("cannot remove {}: {e}", path.display()));
            }
        }
        problems
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("teardown: {p}");
        }
    }
}

/// How many hosts are set up at once (config gen, pods): enough to keep 2 cores busy, few enough not
/// to bury etcd under a hundred clients at the same moment.
const WORKERS: usize = 8;

/// `f` on every item with at most `workers` threads; results in item order.
fn parallel<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    *out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item processed")
        })
        .collect()
}

fn kill_netns_pids(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                evio_testbed::lab::kill(pid, evio_testbed::lab::Signal::SIGKILL);
            }
        }
    }
}

fn cni_config_one(n: &Node, bins: &Bins, etcd: &str) -> Result<Value> {
    let conf = n.dir.join("net-conf.json");
    let net_conf = serde_json::json!({
        "name": "evio",
        // No cniVersion: cni-config chooses one that portmap (asked on the CNI path) and runtimes accept.
        "podCIDR": POD_CIDR,
        "nodeBits": 8,
        "stateDir": n.dir.join("cni-state"),
        "logFile": n.dir.join("evio-cni.log"),
        "logLevel": "info",
        "ipam": {"dataDir": n.dir.join("ipam")},
    });
    std::fs::write(&conf, net_conf.to_string())?;
    let out = netns_command(&n.host.ns, &bins.evioctl.to_string_lossy())
        .arg("cni-config")
        .arg("--net-conf")
        .arg(&conf)
        .args(["--node-name", &n.name, "--etcd-endpoints", etcd])
        .arg("--cni-conf-dir")
        .arg(n.net_d())
        .arg("--cni-bin-dir")
        .arg(n.bin_dir())
        .arg("--cni-path")
        .arg(n.cni_path())
        .arg("--plugin-binary")
        .arg(&bins.evio_cni)
        .stdin(Stdio::null())
        .output()
        .context("cannot run evioctl cni-config")?;
    if !out.status.success() {
        bail!(
            "evioctl cni-config on {} failed: {}",
            n.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim())
        .with_context(|| format!("cni-config on {} printed {line:?}", n.name))
}

fn add_pods_one(n: &Node, pods: Vec<(String, String)>) -> Result<Vec<Pod>> {
    let path = n.net_d().join(evio_cni_types::config::CONFLIST);
    let conflist: Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let cni_path = n.cni_path();
    let mut out = Vec::new();
    for (name, ns) in pods {
        if signals::interrupted() {
            break;
        }
        let netns_path = Path::new("/run/netns").join(&ns);
        let res = cni::add(
            &conflist,
            &cni_path,
            &cni::Attach {
                node_ns: &n.host.ns,
                container_id: &ns,
                netns_path: &netns_path,
                ifname: "eth0",
                pod_name: &format!("{}-{name}", n.name),
            },
        )
        .with_context(|| format!("CNI ADD of {}/{name}", n.name))?;
        let ip = cni::first_ipv4(&res).ok_or_else(|| {
            anyhow!(
                "CNI result for {}/{name} has no IPv4 address: {res}",
                n.name
            )
        })?;
        out.push(Pod { name, ns, ip });
    }
    Ok(out)
}

/// What `evioctl status --json --state-dir DIR` prints (the same code, asked in-process), or why the
/// agent did not answer.
pub fn status(state_dir: &Path) -> Result<Value, String> {
    evio_api::query_status(state_dir, std::time::Duration::from_secs(5))
        .map_err(|e| format!("{e:#}"))
        .and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string()))
}

/// Makes `c`'s process die with the demo (PR_SET_PDEATHSIG), so a demo killed with SIGKILL leaves no
/// agent, signer or page behind.
fn die_with_parent(c: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            Ok(())
        });
    }
}
