//! NAT traversal end to end: real eviod processes in lab hosts (`evio_testbed::lab`) behind nftables NATs, a real etcd and
//! a real coturn (STUN and TURN) on the lab's "internet". Run as root:
//! `cargo test -p eviod --test nat -- --nocapture` (prints the measured times).
//!
//! The matrix: two sites behind port-preserving NATs (direct), a site behind a symmetric NAT (relayed to
//! the NATed sites, direct to the public host), a public host, two hosts behind one NAT (direct over
//! the LAN). Then: one NAT's conntrack flushed, the TURN server killed and started again.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::Pod;
use evio_testbed::lab::{Host, Lab, NatKind, unique_prefix, wait_until};

/// The agent under test: this build's, or `EVIO_TEST_EVIOD` (to compare another build on the same lab).
fn eviod() -> String {
    std::env::var("EVIO_TEST_EVIOD").unwrap_or_else(|_| env!("CARGO_BIN_EXE_eviod").to_string())
}

struct Agent {
    name: String,
    host: Host,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Extra eviod flags (e.g. `--lazy-peers`).
    extra: Vec<String>,
    /// etcd's URL and the STUN/TURN server's address to use instead of the lab's IPv4 ones.
    services: Option<(String, String)>,
}

impl Agent {
    /// An agent named `name` on `host`, its state and log under `dir`, not started.
    fn new(name: &str, host: Host, dir: &std::path::Path) -> Agent {
        Agent {
            name: name.to_string(),
            host,
            state_dir: dir.join(name),
            log: dir.join(format!("{name}.log")),
            child: None,
            extra: Vec::new(),
            services: None,
        }
    }

    fn start(&mut self, lab: &Lab) {
        let turn = lab.turn().expect("turn");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = std::fs::remove_file(self.state_dir.join("eviod.sock"));
        let (etcd, server) = self
            .services
            .clone()
            .unwrap_or_else(|| (lab.etcd_endpoint().unwrap(), turn.addr.to_string()));
        let mut c = self.host.command(&eviod());
        c.args([
            "--node-name",
            &self.name,
            "--etcd-endpoints",
            &etcd,
            "--state-dir",
        ])
        .arg(&self.state_dir)
        .args([
            "--listen-port",
            "51820",
            "--stun",
            &server,
            "--turn",
            &server,
        ])
        .args(["--turn-user", &turn.user, "--turn-password-file"])
        .arg(&turn.password_file)
        .args(&self.extra)
        .env(
            "EVIO_LOG",
            "info,eviod=debug,evio_traversal=debug,evio_overlay=debug",
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        self.child = Some(c.spawn().expect("start eviod"));
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut s =
            std::os::unix::net::UnixStream::connect(self.state_dir.join("eviod.sock")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"status\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        serde_json::from_str(&body).ok()
    }

    fn metrics(&self) -> String {
        let mut s = match std::os::unix::net::UnixStream::connect(self.state_dir.join("eviod.sock"))
        {
            Ok(s) => s,
            Err(_) => return String::new(),
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(b"metrics\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        serde_json::from_str::<String>(body.trim()).unwrap_or_default()
    }

    /// `(path, endpoint)` of the peer named `peer`.
    fn path_to(&self, peer: &str) -> Option<(String, String)> {
        let st = self.status()?;
        let p = st["peers"]
            .as_array()?
            .iter()
            .find(|p| p["node"] == peer)?
            .clone();
        Some((
            p["path"].as_str()?.to_string(),
            p["endpoint"].as_str().unwrap_or("").to_string(),
        ))
    }

    fn vip(&self) -> Option<String> {
        self.status()?["address"].as_str().map(String::from)
    }

    fn ping(&self, ip: &str) -> bool {
        self.host.exec(&["ping", "-c", "1", "-W", "1", ip]).is_ok()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Agent {
    /// Claims the host's pod subnet with `evioctl cni-config` (everything under `<state>.cni`).
    fn cni_config(&self, lab: &Lab) {
        common::cni_config_in(
            &self.host.ns,
            &self.name,
            &lab.etcd_endpoint().unwrap(),
            &self.state_dir.with_extension("cni"),
        );
    }

    /// One pod through a real CNI ADD with the conflist of `cni_config`.
    fn add_pod(&self) -> Pod {
        self.host
            .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        common::add_pod_in(&self.host.ns, &self.state_dir.with_extension("cni"))
    }
}

struct Matrix {
    agents: Vec<Agent>,
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Matrix {
    /// site 0: easy NAT, two hosts; site 1: easy NAT; site 2: symmetric NAT; one public host.
    fn build() -> Matrix {
        let lab = Lab::builder(&unique_prefix("en"))
            .etcd(true)
            .turn(true)
            .site(NatKind::EasyNat, 2)
            .site(NatKind::EasyNat, 1)
            .site(NatKind::Symmetric, 1)
            .public_hosts(1)
            .build()
            .expect("lab");
        let dir = tempfile::Builder::new()
            .prefix("eviod-nat")
            .tempdir()
            .unwrap();
        let hosts = [
            ("easy-a1", lab.site_host(0, 0).clone()),
            ("easy-a2", lab.site_host(0, 1).clone()),
            ("easy-b", lab.site_host(1, 0).clone()),
            ("sym", lab.site_host(2, 0).clone()),
            ("public", lab.public_hosts()[0].clone()),
        ];
        let agents = hosts
            .into_iter()
            .map(|(name, host)| Agent::new(name, host, dir.path()))
            .collect();
        Matrix {
            agents,
            lab,
            _dir: dir,
        }
    }

    fn agent(&self, name: &str) -> &Agent {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    fn logs(&self) -> String {
        let mut s: String = self
            .agents
            .iter()
            .map(|a| {
                // Without the per-packet debug lines of the data plane.
                let text: String = a
                    .log_text()
                    .lines()
                    .filter(|l| !l.contains("eviod::dataplane"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                format!("=== {} ===\n{}\n", a.name, tail(&text, 150))
            })
            .collect();
        for a in &self.agents {
            s += &format!(
                "--- status {} ---\n{}\n",
                a.name,
                a.status().map(|v| v.to_string()).unwrap_or_default()
            );
        }
        s
    }

    /// The path every pair must settle on.
    fn expected(a: &str, b: &str) -> &'static str {
        let sym = a == "sym" || b == "sym";
        let public = a == "public" || b == "public";
        if sym && !public { "relay" } else { "direct" }
    }

    fn paths_as_expected(&self) -> bool {
        self.agents.iter().all(|a| {
            self.agents.iter().filter(|b| b.name != a.name).all(|b| {
                a.path_to(&b.name)
                    .is_some_and(|(p, _)| p == Self::expected(&a.name, &b.name))
            })
        })
    }

    fn vips(&self) -> HashMap<String, String> {
        self.agents
            .iter()
            .filter_map(|a| Some((a.name.clone(), a.vip()?)))
            .collect()
    }

    /// For every ordered pair: pings every 20 ms until the first reply; the time since `t0` it came.
    fn first_packet_times(
        &self,
        vips: &HashMap<String, String>,
        t0: Instant,
    ) -> Vec<(String, String, Option<Duration>)> {
        std::thread::scope(|s| {
            let hs: Vec<_> = self
                .agents
                .iter()
                .flat_map(|a| {
                    self.agents
                        .iter()
                        .filter(move |b| b.name != a.name)
                        .map(move |b| (a, b))
                })
                .map(|(a, b)| {
                    let vip = vips[&b.name].clone();
                    s.spawn(move || {
                        let ok = a
                            .host
                            .exec(&[
                                "ping", "-n", "-q", "-c", "1", "-i", "0.02", "-w", "20", &vip,
                            ])
                            .is_ok();
                        (a.name.clone(), b.name.clone(), ok.then(|| t0.elapsed()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Pairs (from, to) that do not answer a ping now.
    fn failing_pairs(&self, vips: &HashMap<String, String>) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        std::thread::scope(|s| {
            let hs: Vec<_> = self
                .agents
                .iter()
                .flat_map(|a| {
                    self.agents
                        .iter()
                        .filter(move |b| b.name != a.name)
                        .map(move |b| (a, b))
                })
                .map(|(a, b)| {
                    let vip = vips[&b.name].clone();
                    s.spawn(move || (!a.ping(&vip)).then(|| (a.name.clone(), b.name.clone())))
                })
                .collect();
            for h in hs {
                if let Some(p) = h.join().unwrap() {
                    bad.push(p);
                }
            }
        });
        bad
    }
}

/// Every agent's last log lines and status, for assertion messages.
fn logs(agents: &[Agent]) -> String {
    agents
        .iter()
        .map(|a| {
            format!(
                "=== {} ===\n{}\n--- status ---\n{}\n",
                a.name,
                tail(&a.log_text(), 60),
                a.status().map(|v| v.to_string()).unwrap_or_default()
            )
        })
        .collect()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The pid of the lab's etcd (in the internet namespace).
fn etcd_pid(lab: &Lab) -> i32 {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", lab.internet_ns()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "etcd")
        })
        .expect("etcd runs in the lab")
}

/// Keeps pinging `vip` from `a` every 100 ms for `d`; returns how many pings were lost.
fn lost_pings(a: &Agent, vip: &str, d: Duration) -> usize {
    let end = Instant::now() + d;
    let mut lost = 0;
    while Instant::now() < end {
        if a.host.exec(&["ping", "-c", "1", "-W", "1", vip]).is_err() {
            lost += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    lost
}

#[test]
fn matrix_direct_relay_lan_then_flush_and_turn_loss() {
    let mut m = Matrix::build();
    // Pod subnets claimed before the agents start (what the DaemonSet's init container does).
    for a in &m.agents {
        a.cni_config(&m.lab);
    }
    let t0 = Instant::now();
    for i in 0..m.agents.len() {
        let lab = &m.lab;
        m.agents[i].start(lab);
    }
    assert!(
        wait_until(Duration::from_secs(20), || m
            .agents
            .iter()
            .all(|a| a.vip().is_some())),
        "agents did not come up:\n{}",
        m.logs()
    );
    // The first registration of the symmetric-NAT host already carries its STUN mapping and its relay:
    // it waits for them (up to 1 s) instead of registering bare and updating every watcher twice more.
    let ep = m.lab.etcd_endpoint().unwrap();
    let key = evio_store::keys::node("sym");
    let etcdctl = |args: &[&str]| {
        let mut a = vec!["etcdctl", "--endpoints", ep.as_str(), "get", key.as_str()];
        a.extend_from_slice(args);
        m.lab.internet_exec(&a).unwrap()
    };
    let mut created = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let meta: serde_json::Value =
                serde_json::from_str(&etcdctl(&["-w", "json"])).unwrap_or_default();
            created = meta["kvs"][0]["create_revision"].as_i64();
            created.is_some()
        }),
        "sym never registered:\n{}",
        m.logs()
    );
    let created = created.unwrap();
    let first = etcdctl(&["--print-value-only", &format!("--rev={created}")]);
    let rec: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    let kinds: Vec<&str> = rec["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"srflx") && kinds.contains(&"relay"),
        "first registration without the STUN mapping or the relay: {first}"
    );
    let vips = m.vips();
    // Time to first packet, every ordered pair.
    let first = m.first_packet_times(&vips, t0);
    let missing: Vec<_> = first.iter().filter(|(_, _, t)| t.is_none()).collect();
    assert!(
        missing.is_empty(),
        "no first packet: {missing:?}\n{}",
        m.logs()
    );
    let mut times: Vec<Duration> = first.iter().filter_map(|(_, _, t)| *t).collect();
    times.sort();
    println!(
        "time to first packet since agent start (20 ordered pairs): min {:?}, median {:?}, max {:?}",
        times[0], times[10], times[19]
    );
    // Every pair answers a ping.
    let mut bad = Vec::new();
    let full = wait_until(Duration::from_secs(30), || {
        bad = m.failing_pairs(&vips);
        bad.is_empty()
    });
    assert!(full, "pairs without connectivity: {bad:?}\n{}", m.logs());
    let t_full = t0.elapsed();
    assert!(
        wait_until(Duration::from_secs(30), || m.paths_as_expected()),
        "paths not as expected:\n{}",
        m.logs()
    );
    let t_paths = t0.elapsed();
    println!(
        "time to full connectivity (all 20 ordered pairs ping): {t_full:?}; to every path as expected: {t_paths:?}"
    );

    // `evioctl status` shows each peer's path and endpoint.
    let evioctl = evio_testbed::bin_dir().join("evioctl");
    let sym = m.agent("sym");
    let text = sym
        .host
        .exec(&[
            evioctl.to_str().unwrap(),
            "status",
            "--state-dir",
            sym.state_dir.to_str().unwrap(),
        ])
        .unwrap();
    for (peer, path) in [
        ("easy-a1", "relay"),
        ("easy-b", "relay"),
        ("public", "direct"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(peer) && l.contains(path) && l.contains("198.18.")),
            "evioctl status does not show {peer} {path}:\n{text}"
        );
    }

    // Pods on every host reach the pods on every other host (through the same tunnels).
    let pods: Vec<Pod> = m.agents.iter().map(Agent::add_pod).collect();
    let mut bad = Vec::new();
    let ok = wait_until(Duration::from_secs(15), || {
        bad = std::thread::scope(|s| {
            let hs: Vec<_> = (0..pods.len())
                .flat_map(|i| {
                    (0..pods.len())
                        .filter(move |j| *j != i)
                        .map(move |j| (i, j))
                })
                .map(|(i, j)| {
                    let (a, b) = (&pods[i], &pods[j]);
                    s.spawn(move || {
                        (!a.ns
                            .exec(&["ping", "-c", "1", "-W", "1", &b.ip])
                            .status
                            .success())
                        .then_some((i, j))
                    })
                })
                .collect();
            hs.into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        bad.is_empty()
    });
    assert!(ok, "pod pairs without connectivity: {bad:?}\n{}", m.logs());
    println!(
        "pods: all 20 ordered pod pairs ping after {:?}",
        t0.elapsed()
    );

    // Where each path goes: LAN for the same-NAT pair, the NAT's public address across sites.
    let (_, ep) = m.agent("easy-a1").path_to("easy-a2").unwrap();
    assert!(
        ep.starts_with("192.168.1."),
        "same-NAT hosts not over the LAN: {ep}"
    );
    let (_, ep) = m.agent("easy-a1").path_to("easy-b").unwrap();
    assert_eq!(
        ep,
        format!("{}:51820", m.lab.site(1).wan_ip),
        "easy NAT is port preserving"
    );
    let (_, ep) = m.agent("easy-b").path_to("sym").unwrap();
    assert!(
        ep.starts_with(&evio_testbed::lab::SERVICES_IP.to_string()),
        "relayed path not via the TURN server: {ep}"
    );
    let metrics = m.agent("sym").metrics();
    assert!(metrics.contains("evio_path_changes_total"), "{metrics}");
    let relay_bytes = |a: &Agent| -> u64 {
        let m = a.metrics();
        ["evio_relay_tx_bytes_total", "evio_relay_rx_bytes_total"]
            .iter()
            .map(|k| {
                m.lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    let relayed: u64 = m.agents.iter().map(relay_bytes).sum();
    assert!(relayed > 0, "no relay bytes counted:\n{}", m.logs());

    // etcd frozen (SIGSTOP): direct and relayed tunnels carry on without a lost ping.
    let etcd_pid = etcd_pid(&m.lab);
    // SAFETY: signals to the etcd process this test's lab started (found in the lab's own namespace).
    unsafe { libc::kill(etcd_pid, libc::SIGSTOP) };
    let lost = std::thread::scope(|s| {
        let a = s.spawn(|| lost_pings(m.agent("easy-a1"), &vips["sym"], Duration::from_secs(5)));
        let b = s.spawn(|| lost_pings(m.agent("easy-a2"), &vips["easy-b"], Duration::from_secs(5)));
        (a.join().unwrap(), b.join().unwrap())
    });
    // SAFETY: as above.
    unsafe { libc::kill(etcd_pid, libc::SIGCONT) };
    assert_eq!(
        lost,
        (0, 0),
        "pings lost (relayed, direct) while etcd was frozen:\n{}",
        m.logs()
    );
    assert!(
        m.paths_as_expected(),
        "paths changed while etcd was frozen:\n{}",
        m.logs()
    );

    // A NAT loses every mapping: the tunnels through it heal within seconds.
    for site in [1usize, 2] {
        let (a, b) = if site == 1 {
            ("easy-b", "easy-a1")
        } else {
            ("sym", "easy-a1")
        };
        m.lab.site(site).flush_conntrack().unwrap();
        let t = Instant::now();
        let vip = vips[b].clone();
        let healed = wait_until(Duration::from_secs(20), || {
            m.agent(a).ping(&vip) && m.agent(b).ping(&vips[a])
        });
        assert!(
            healed,
            "{a} <-> {b} did not heal after flushing site {site}:\n{}",
            m.logs()
        );
        println!(
            "site {site} conntrack flush: {a} <-> {b} healed after {:?}",
            t.elapsed()
        );
    }
    let mut bad = Vec::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            bad = m.failing_pairs(&vips);
            bad.is_empty()
        }),
        "after the flushes: {bad:?}\n{}",
        m.logs()
    );

    // The TURN server dies: direct paths keep working without a lost ping.
    m.lab.turn_mut().unwrap().kill();
    let lost = lost_pings(m.agent("easy-a1"), &vips["easy-b"], Duration::from_secs(6));
    let lost_pub = lost_pings(m.agent("public"), &vips["sym"], Duration::from_secs(2));
    assert_eq!(
        (lost, lost_pub),
        (0, 0),
        "direct paths lost pings without TURN:\n{}",
        m.logs()
    );
    for a in ["easy-a1", "easy-a2", "easy-b"] {
        for b in ["easy-a1", "easy-a2", "easy-b", "public"] {
            if a != b {
                assert_eq!(m.agent(a).path_to(b).unwrap().0, "direct", "{a} -> {b}");
            }
        }
    }
    // It comes back: the relayed pairs heal.
    m.lab.turn_mut().unwrap().restart().unwrap();
    let t = Instant::now();
    let mut bad = Vec::new();
    assert!(
        wait_until(Duration::from_secs(40), || {
            bad = m.failing_pairs(&vips);
            bad.is_empty()
        }),
        "after the TURN restart: {bad:?}\n{}",
        m.logs()
    );
    println!(
        "TURN restart: full connectivity again after {:?}",
        t.elapsed()
    );
}

/// Drops all traffic between two NATs' public addresses (in `site`'s NAT), as a firewall between them would.
fn block_between(lab: &Lab, site: usize, other: std::net::Ipv4Addr) {
    let rules = format!(
        "table ip evioblock {{\n  chain blk {{\n    type filter hook forward priority -10;\n    ip daddr {other} drop\n    ip saddr {other} drop\n  }}\n}}\n"
    );
    let file = lab.dir().join(format!("block{site}.nft"));
    std::fs::write(&file, rules).unwrap();
    evio_testbed::lab::netns_exec(
        &lab.site(site).nat_ns,
        &["nft", "-f", file.to_str().unwrap()],
    )
    .unwrap();
}

fn unblock(lab: &Lab, site: usize) {
    evio_testbed::lab::netns_exec(
        &lab.site(site).nat_ns,
        &["nft", "delete", "table", "ip", "evioblock"],
    )
    .unwrap();
}

/// Two easy-NAT sites and a public host. The direct path between the sites is blocked (relay takes over,
/// nothing but the path changes), opened again (back to direct); then site 0's NAT gets a new public
/// address and its tunnels heal.
#[test]
fn relay_fallback_back_to_direct_and_public_address_change() {
    let mut lab = Lab::builder(&unique_prefix("eb"))
        .etcd(true)
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .public_hosts(1)
        .build()
        .expect("lab");
    let dir = tempfile::Builder::new()
        .prefix("eviod-nat")
        .tempdir()
        .unwrap();
    let mut agents: Vec<Agent> = [
        ("a", lab.site_host(0, 0).clone()),
        ("b", lab.site_host(1, 0).clone()),
        ("p", lab.public_hosts()[0].clone()),
    ]
    .into_iter()
    .map(|(name, host)| Agent::new(name, host, dir.path()))
    .collect();
    for a in &mut agents {
        a.start(&lab);
    }
    let path = |x: usize, y: &str| agents[x].path_to(y).map(|p| p.0).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || path(0, "b") == "direct"
            && path(1, "a") == "direct"
            && path(0, "p") == "direct"
            && path(2, "a") == "direct"),
        "not direct:\n{}",
        logs(&agents)
    );
    let vb = agents[1].vip().unwrap();
    let va = agents[0].vip().unwrap();
    let vp = agents[2].vip().unwrap();
    assert!(agents[0].ping(&vb) && agents[1].ping(&va));

    // A firewall between the two sites: the agents fall back to the relay.
    block_between(&lab, 1, lab.site(0).wan_ip);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || path(0, "b") == "relay"
            && path(1, "a") == "relay"
            && agents[0].ping(&vb)),
        "no relay fallback:\n{}",
        logs(&agents)
    );
    println!(
        "direct path blocked: relayed and working after {:?}",
        t.elapsed()
    );
    assert!(agents[1].ping(&va));
    // The relay carries the tunnel steadily while the firewall stays (no flapping back to a dead path).
    let lost = lost_pings(&agents[0], &vb, Duration::from_secs(5));
    assert_eq!(lost, 0, "pings lost over the relay:\n{}", logs(&agents));
    assert_eq!(
        (path(0, "b"), path(1, "a")),
        ("relay".to_string(), "relay".to_string())
    );
    // The firewall goes away: back to direct.
    unblock(&lab, 1);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(40), || path(0, "b") == "direct"
            && path(1, "a") == "direct"),
        "not back to direct:\n{}",
        logs(&agents)
    );
    println!("direct path open again: direct after {:?}", t.elapsed());
    assert!(agents[0].ping(&vb) && agents[1].ping(&va));

    // Site 0's NAT gets a new public address (its mappings go with the old one).
    lab.renumber_wan(0, std::net::Ipv4Addr::new(198, 18, 1, 201))
        .unwrap();
    lab.site(0).flush_conntrack().unwrap();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || agents[2].ping(&va)
            && agents[0].ping(&vp)),
        "public host <-> a did not heal after the address change:\n{}",
        logs(&agents)
    );
    println!(
        "public address change: a <-> public healed after {:?}",
        t.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(45), || agents[1].ping(&va)
            && agents[0].ping(&vb)),
        "a <-> b did not heal after the address change:\n{}",
        logs(&agents)
    );
    println!(
        "public address change: a <-> b healed after {:?} (path {})",
        t.elapsed(),
        path(0, "b")
    );
    assert!(
        wait_until(Duration::from_secs(30), || agents[2]
            .path_to("a")
            .is_some_and(
                |(p, e)| p == "direct" && e.starts_with("198.18.1.201:")
            )),
        "the public host does not use the new address:\n{}",
        logs(&agents)
    );
}

/// iperf3 from `a` to `b`'s VIP for `secs` seconds; received bits per second.
fn iperf(a: &Agent, b: &Agent, secs: u32) -> f64 {
    let vip = b.vip().unwrap();
    let mut server = b
        .host
        .command("iperf3")
        .args(["-s", "-1", "-B", &vip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = a
        .host
        .exec(&["iperf3", "-c", &vip, "-t", &secs.to_string(), "-J"])
        .expect("iperf3 client");
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
}

/// The numbers of docs/bench/nat.md. Run as root with release binaries:
/// `cargo test --release -p eviod --test nat bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_connectivity_time_and_relay_throughput() {
    let runs = 5;
    let mut full = Vec::new();
    let mut first = Vec::new();
    let mut paths = Vec::new();
    for _ in 0..runs {
        let mut m = Matrix::build();
        let t0 = Instant::now();
        for i in 0..m.agents.len() {
            let lab = &m.lab;
            m.agents[i].start(lab);
        }
        assert!(wait_until(Duration::from_secs(20), || m
            .agents
            .iter()
            .all(|a| a.vip().is_some())));
        let vips = m.vips();
        let mut times: Vec<Duration> = m
            .first_packet_times(&vips, t0)
            .into_iter()
            .map(|(a, b, t)| t.unwrap_or_else(|| panic!("{a} -> {b}: no packet")))
            .collect();
        times.sort();
        first.push(times[times.len() / 2]);
        full.push(times[times.len() - 1]);
        assert!(
            wait_until(Duration::from_secs(30), || m
                .failing_pairs(&vips)
                .is_empty()),
            "{}",
            m.logs()
        );
        assert!(
            wait_until(Duration::from_secs(30), || m.paths_as_expected()),
            "{}",
            m.logs()
        );
        paths.push(t0.elapsed());
    }
    full.sort();
    first.sort();
    paths.sort();
    println!(
        "matrix (5 agents, 20 ordered pairs), {runs} runs: agent start -> first packet of the median pair: median {:?}; -> first packet of the last pair (full connectivity): median {:?} (min {:?}, max {:?}); -> every path as expected: median {:?}",
        first[runs / 2],
        full[runs / 2],
        full[0],
        full[runs - 1],
        paths[runs / 2]
    );

    // Throughput between the same two hosts, direct and then relayed (direct path blocked).
    let lab = Lab::builder(&unique_prefix("ebn"))
        .etcd(true)
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("eviod-nat")
        .tempdir()
        .unwrap();
    let mut agents: Vec<Agent> = [
        ("a", lab.site_host(0, 0).clone()),
        ("b", lab.site_host(1, 0).clone()),
    ]
    .into_iter()
    .map(|(name, host)| Agent::new(name, host, dir.path()))
    .collect();
    for a in &mut agents {
        a.start(&lab);
    }
    let path = |x: usize, y: &str| agents[x].path_to(y).map(|p| p.0).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(30), || path(0, "b")
        == "direct"
        && path(1, "a") == "direct"));
    let direct = iperf(&agents[0], &agents[1], 5);
    block_between(&lab, 1, lab.site(0).wan_ip);
    assert!(wait_until(Duration::from_secs(20), || path(0, "b")
        == "relay"
        && path(1, "a") == "relay"
        && agents[0].ping(&agents[1].vip().unwrap())));
    let relayed = iperf(&agents[0], &agents[1], 5);
    println!(
        "iperf3 a -> b (TCP, 5 s): direct {:.2} Gbit/s, through coturn {:.2} Gbit/s",
        direct / 1e9,
        relayed / 1e9
    );
    let m = agents[0].metrics();
    println!(
        "{}",
        m.lines()
            .filter(|l| l.starts_with("evio_relay") || l.starts_with("evio_path_changes"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Seconds until the first answer of `ping -i 0.05` from `a` to `vip` (at most `secs` seconds of pings).
fn first_answer(a: &Agent, vip: &str, secs: u32) -> Option<Duration> {
    let out = a
        .host
        .command("ping")
        .args(["-n", "-i", "0.05", "-W", "1", "-w", &secs.to_string(), vip])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The first reply: its sequence number says when its request left (1 every 50 ms), plus its RTT.
    let line = text.lines().find(|l| l.contains("icmp_seq="))?;
    let seq: u32 = line
        .split("icmp_seq=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let rtt_ms: f64 = line
        .split("time=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(50) * (seq - 1) + Duration::from_secs_f64(rtt_ms / 1000.0))
}

/// A peer's NAT loses its mappings (a rebinding): the receiving agent learns the new source from the
/// first authenticated datagram (the tunnel core's `poll_source` -> the NAT agent's `tunnel_from`) and
/// traffic flows again both ways within a second of the flushed side sending, relayed (symmetric NAT) and
/// direct (two easy NATs). Without it, the agent waited for its next scheduled check (3.4-3.8 s).
#[test]
fn nat_rebinding_heals_within_a_second() {
    let lab = Lab::builder(&unique_prefix("er"))
        .etcd(true)
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::Symmetric, 1)
        .build()
        .expect("lab");
    let dir = tempfile::Builder::new()
        .prefix("eviod-rebind")
        .tempdir()
        .unwrap();
    let mut agents: Vec<Agent> = [
        ("a", lab.site_host(0, 0).clone()),
        ("b", lab.site_host(1, 0).clone()),
        ("s", lab.site_host(2, 0).clone()),
    ]
    .into_iter()
    .map(|(name, host)| Agent::new(name, host, dir.path()))
    .collect();
    for a in &mut agents {
        a.start(&lab);
    }
    let path = |x: usize, y: &str| agents[x].path_to(y).map(|p| p.0).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(40), || path(0, "b") == "direct"
            && path(1, "a") == "direct"
            && path(0, "s") == "relay"
            && path(2, "a") == "relay"),
        "paths not as expected:\n{}",
        logs(&agents)
    );
    let vips: Vec<String> = agents.iter().map(|a| a.vip().unwrap()).collect();
    assert!(
        wait_until(Duration::from_secs(10), || agents[0].ping(&vips[1])
            && agents[0].ping(&vips[2])
            && agents[2].ping(&vips[0])),
        "no connectivity:\n{}",
        logs(&agents)
    );
    // The first flush also kills `s`'s own TURN allocation (its 5-tuple at the server is gone): if its
    // path to `a` ran through it, only `s`'s agent can notice (its next check, ~3 s), nothing reaches `a`
    // before. Measured, not asserted; afterwards `s` sends from its socket to `a`'s relayed address.
    let relayed_by_a = |agents: &[Agent]| {
        agents[2]
            .path_to("a")
            .is_some_and(|(p, e)| p == "relay" && !e.ends_with(":3478"))
    };
    lab.site(2).flush_conntrack().unwrap();
    let first = first_answer(&agents[2], &vips[0], 10);
    println!(
        "BENCH rebinding: first conntrack -F of the symmetric NAT: s -> a answered after {first:?}"
    );
    assert!(first.is_some(), "s -> a did not heal:\n{}", logs(&agents));
    assert!(
        wait_until(Duration::from_secs(15), || relayed_by_a(&agents)),
        "s does not send from its socket to a's relay:\n{}",
        logs(&agents)
    );
    // Now every flush is a rebinding seen by `a`: datagrams of `s` reach `a`'s relay from a new port.
    // `a`'s tunnel authenticates the first one and its agent checks the new address at once.
    for round in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        assert!(relayed_by_a(&agents), "path changed:\n{}", logs(&agents));
        lab.site(2).flush_conntrack().unwrap();
        let heal = first_answer(&agents[2], &vips[0], 5);
        println!(
            "BENCH rebinding round {round}: conntrack -F of the symmetric NAT (relayed): s -> a answered after {heal:?}"
        );
        let heal = heal.unwrap_or_else(|| panic!("s -> a did not heal:\n{}", logs(&agents)));
        assert!(
            heal < Duration::from_secs(1),
            "s -> a healed only after {heal:?}:\n{}",
            logs(&agents)
        );
        assert!(
            agents[0].ping(&vips[2]),
            "a -> s after the flush:\n{}",
            logs(&agents)
        );
    }
}

/// Lazy peers across NATs: every agent rests until a packet wants a peer. A resting peer behind the
/// symmetric NAT is woken through its relay (its allocation permits the addresses of the peers it does not
/// check), the first packets go through once the relayed path is up, and the pairs nobody used stay idle.
#[test]
fn lazy_peers_wake_through_nats_and_the_relay() {
    let mut m = Matrix::build();
    for a in &mut m.agents {
        a.extra = vec!["--lazy-peers".into()];
    }
    for i in 0..m.agents.len() {
        let lab = &m.lab;
        m.agents[i].start(lab);
    }
    let n = m.agents.len();
    let known = wait_until(Duration::from_secs(30), || {
        m.agents.iter().all(|a| {
            a.status()
                .and_then(|s| s["peers"].as_array().map(|p| p.len()))
                == Some(n - 1)
        })
    });
    assert!(known, "peers not known: {}", m.logs());
    std::thread::sleep(Duration::from_secs(2));
    for a in &m.agents {
        for b in m.agents.iter().filter(|b| b.name != a.name) {
            assert_eq!(
                a.path_to(&b.name).map(|p| p.0).as_deref(),
                Some("idle"),
                "{} -> {}\n{}",
                a.name,
                b.name,
                m.logs()
            );
        }
    }
    let vips = m.vips();
    // Woken by a packet: an easy NAT to the symmetric NAT (relayed), and the other way round for another
    // pair, and two easy NATs (direct).
    for (from, to) in [("easy-b", "sym"), ("sym", "easy-a1"), ("easy-a2", "easy-b")] {
        let t0 = Instant::now();
        let a = m.agent(from);
        let ok = a
            .host
            .exec(&[
                "ping", "-n", "-q", "-c", "1", "-i", "0.1", "-w", "10", &vips[to],
            ])
            .is_ok();
        println!("lazy: first answer {from} -> {to} after {:?}", t0.elapsed());
        assert!(ok, "{from} -> {to} never answered\n{}", m.logs());
        let want = Matrix::expected(from, to);
        assert!(
            wait_until(Duration::from_secs(5), || {
                a.path_to(to).is_some_and(|p| p.0 == want)
                    && m.agent(to).path_to(from).is_some_and(|p| p.0 == want)
            }),
            "{from} <-> {to} not {want}\n{}",
            m.logs()
        );
    }
    // Nobody sent anything between the public host and the others.
    for b in m.agents.iter().filter(|b| b.name != "public") {
        assert_eq!(
            m.agent("public").path_to(&b.name).map(|p| p.0).as_deref(),
            Some("idle")
        );
    }
}

/// One node's resource use over a window, from the kernel's counters.
struct Usage {
    rss_kib: u64,
    cpu_ticks: u64,
    underlay_packets: u64,
    underlay_bytes: u64,
}

fn usage(a: &Agent) -> Usage {
    let pid = a.child.as_ref().map(|c| c.id()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 14th and 15th.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let cpu_ticks = rest
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + rest
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    // The host's underlay links (not lo, not the overlay's TUN): rx + tx.
    let dev = a.host.exec(&["cat", "/proc/net/dev"]).unwrap_or_default();
    let (mut underlay_packets, mut underlay_bytes) = (0, 0);
    for l in dev.lines().skip(2) {
        let Some((name, v)) = l.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" || name.starts_with("evio") {
            continue;
        }
        let v: Vec<u64> = v
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() >= 10 {
            underlay_bytes += v[0] + v[8];
            underlay_packets += v[1] + v[9];
        }
    }
    Usage {
        rss_kib,
        cpu_ticks,
        underlay_packets,
        underlay_bytes,
    }
}

/// etcd's served gRPC requests so far (all methods).
fn etcd_requests(lab: &Lab) -> u64 {
    let url = format!("{}/metrics", lab.etcd_endpoint().unwrap());
    let text = lab.internet_exec(&["curl", "-s", &url]).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// A node's cost against the size of the fleet (issue 12's cost curves): N agents, each at its own site
/// behind its own NAT (N/10 symmetric), every peer up (`eager`) or lazy peers at rest (`lazy`, no
/// traffic). After the cluster settles, a 20 s window: per node RSS, CPU, underlay packets and bytes per
/// second (medians), and etcd requests per second for the whole cluster. Run as root with release
/// binaries: `EVIO_SCALE="10 30" cargo test --release -p eviod --test nat bench_scale -- --ignored
/// --nocapture` (docs/bench/scale.md).
#[test]
#[ignore]
fn bench_scale_cost_per_node() {
    let sizes: Vec<usize> = std::env::var("EVIO_SCALE")
        .unwrap_or_else(|_| "10".into())
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let window = Duration::from_secs(20);
    let hz = 100.0; // USER_HZ
    println!(
        "| N | mode | peers up | settle | RSS MiB | CPU % of a core | underlay pkt/s | underlay B/s | etcd req/s (cluster) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &sizes {
        for lazy in [false, true] {
            let sym = n / 10;
            let mut b = Lab::builder(&unique_prefix("es")).etcd(true).turn(true);
            for i in 0..n {
                b = b.site(
                    if i < sym {
                        NatKind::Symmetric
                    } else {
                        NatKind::EasyNat
                    },
                    1,
                );
            }
            let lab = b.build().expect("lab");
            let dir = tempfile::Builder::new()
                .prefix("eviod-scale")
                .tempdir()
                .unwrap();
            let mut agents: Vec<Agent> = (0..n)
                .map(|i| {
                    let mut a =
                        Agent::new(&format!("n{i}"), lab.site_host(i, 0).clone(), dir.path());
                    if lazy {
                        a.extra = vec!["--lazy-peers".into()];
                    }
                    a
                })
                .collect();
            let t0 = Instant::now();
            for a in &mut agents {
                a.start(&lab);
            }
            let up = |a: &Agent| {
                a.status()
                    .and_then(|s| {
                        s["peers"].as_array().map(|p| {
                            p.iter()
                                .filter(|p| p["path"] == "direct" || p["path"] == "relay")
                                .count()
                        })
                    })
                    .unwrap_or(0)
            };
            let known = |a: &Agent| {
                a.status()
                    .and_then(|s| s["peers"].as_array().map(|p| p.len()))
                    .unwrap_or(0)
            };
            let settled = wait_until(Duration::from_secs(120), || {
                agents.iter().all(|a| {
                    if lazy {
                        known(a) == n - 1
                    } else {
                        up(a) == n - 1
                    }
                })
            });
            let settle = t0.elapsed();
            let peers_up: usize = agents.iter().map(up).sum();
            let before: Vec<Usage> = agents.iter().map(usage).collect();
            let etcd0 = etcd_requests(&lab);
            std::thread::sleep(window);
            let after: Vec<Usage> = agents.iter().map(usage).collect();
            let etcd1 = etcd_requests(&lab);
            let w = window.as_secs_f64();
            let per = |f: &dyn Fn(&Usage, &Usage) -> f64| {
                median(before.iter().zip(&after).map(|(b, a)| f(b, a)).collect())
            };
            println!(
                "| {n} | {} | {peers_up}/{}{} | {:.1} s | {:.1} | {:.2} | {:.1} | {:.0} | {:.1} |",
                if lazy { "lazy" } else { "eager" },
                n * (n - 1),
                if settled { "" } else { " (not settled)" },
                settle.as_secs_f64(),
                median(after.iter().map(|a| a.rss_kib as f64 / 1024.0).collect()),
                per(&|b, a| (a.cpu_ticks - b.cpu_ticks) as f64 / hz / w * 100.0),
                per(&|b, a| (a.underlay_packets - b.underlay_packets) as f64 / w),
                per(&|b, a| (a.underlay_bytes - b.underlay_bytes) as f64 / w),
                (etcd1.saturating_sub(etcd0)) as f64 / w,
            );
        }
    }
}

/// Issue 15: an IPv6 underlay. Two sites whose IPv4 sits behind symmetric NATs (only the relay crosses
/// them) but whose hosts have public IPv6 behind stateful firewalls, and a site with IPv4 only, behind a
/// symmetric NAT too. The two dual-stack hosts get a direct path over IPv6 (hole punching through both
/// firewalls) instead of the relay; each reaches the IPv4-only host through the relay. One of them reaches
/// etcd and the STUN/TURN server over IPv6 only (its relayed address is IPv4 all the same). VIPs answer
/// both ways on every path.
#[test]
fn ipv6_gives_a_direct_path_where_ipv4_needs_the_relay() {
    let lab = Lab::builder(&unique_prefix("e6"))
        .etcd(true)
        .turn(true)
        .site_with_ipv6(NatKind::Symmetric, 1)
        .site_with_ipv6(NatKind::Symmetric, 1)
        .site(NatKind::Symmetric, 1)
        .build()
        .expect("lab");
    let dir = tempfile::Builder::new()
        .prefix("eviod-ipv6")
        .tempdir()
        .unwrap();
    let over_v6 = (
        lab.etcd_endpoint6().unwrap(),
        format!(
            "[{}]:{}",
            evio_testbed::lab::SERVICES_IP6,
            evio_testbed::lab::TURN_PORT
        ),
    );
    let mut agents: Vec<Agent> = [
        ("dual-a", lab.site_host(0, 0).clone(), None),
        ("dual-b", lab.site_host(1, 0).clone(), Some(over_v6)),
        ("v4only", lab.site_host(2, 0).clone(), None),
    ]
    .into_iter()
    .map(|(name, host, services)| {
        let mut a = Agent::new(name, host, dir.path());
        a.services = services;
        a
    })
    .collect();
    for a in &mut agents {
        a.start(&lab);
    }
    let want = |a: &str, b: &str| {
        if a.starts_with("dual") && b.starts_with("dual") {
            "direct"
        } else {
            "relay"
        }
    };
    let settled = wait_until(Duration::from_secs(30), || {
        agents.iter().all(|a| {
            agents.iter().filter(|b| b.name != a.name).all(|b| {
                a.path_to(&b.name)
                    .is_some_and(|(p, _)| p == want(&a.name, &b.name))
            })
        })
    });
    assert!(settled, "paths not as expected\n{}", logs(&agents));
    // The direct path is IPv6, between the hosts' own public addresses.
    for (a, b) in [(0, 1), (1, 0)] {
        let (_, endpoint) = agents[a].path_to(&agents[b].name).unwrap();
        let theirs = agents[b].host.ip6.unwrap();
        assert_eq!(endpoint, format!("[{theirs}]:51820"), "{}", logs(&agents));
    }
    let vips: Vec<String> = agents.iter().map(|a| a.vip().unwrap()).collect();
    for (i, a) in agents.iter().enumerate() {
        for (j, vip) in vips.iter().enumerate() {
            if i != j {
                assert!(
                    wait_until(Duration::from_secs(5), || a.ping(vip)),
                    "{} -> {} ({vip})\n{}",
                    a.name,
                    agents[j].name,
                    logs(&agents)
                );
            }
        }
    }
}

/// Issue 15: an underlay without IPv4. Two public hosts with IPv6 addresses only reach etcd and the
/// STUN/TURN server over IPv6, get a direct IPv6 path to each other and carry their (IPv4) VIPs.
#[test]
fn an_ipv6_only_underlay_carries_the_overlay() {
    let lab = Lab::builder(&unique_prefix("o6"))
        .etcd(true)
        .turn(true)
        .public_hosts_ipv6_only(2)
        .build()
        .expect("lab");
    let dir = tempfile::Builder::new()
        .prefix("eviod-ipv6-only")
        .tempdir()
        .unwrap();
    let services = (
        lab.etcd_endpoint6().unwrap(),
        format!(
            "[{}]:{}",
            evio_testbed::lab::SERVICES_IP6,
            evio_testbed::lab::TURN_PORT
        ),
    );
    let mut agents: Vec<Agent> = ["six-a", "six-b"]
        .into_iter()
        .zip(lab.public_hosts().iter().cloned())
        .map(|(name, host)| {
            let mut a = Agent::new(name, host, dir.path());
            a.services = Some(services.clone());
            a
        })
        .collect();
    for a in &mut agents {
        assert!(
            a.host
                .exec(&["ip", "-4", "addr", "show"])
                .unwrap()
                .lines()
                .all(|l| !l.contains("inet ") || l.contains("127.0.0.1"))
        );
        a.start(&lab);
    }
    let direct = wait_until(Duration::from_secs(30), || {
        agents[0]
            .path_to("six-b")
            .is_some_and(|(p, _)| p == "direct")
            && agents[1]
                .path_to("six-a")
                .is_some_and(|(p, _)| p == "direct")
    });
    assert!(direct, "no direct path\n{}", logs(&agents));
    let (_, endpoint) = agents[0].path_to("six-b").unwrap();
    assert_eq!(
        endpoint,
        format!("[{}]:51820", agents[1].host.ip6.unwrap()),
        "{}",
        logs(&agents)
    );
    let vips: Vec<String> = agents.iter().map(|a| a.vip().unwrap()).collect();
    assert!(
        wait_until(Duration::from_secs(5), || agents[0].ping(&vips[1])),
        "{}",
        logs(&agents)
    );
    assert!(
        wait_until(Duration::from_secs(5), || agents[1].ping(&vips[0])),
        "{}",
        logs(&agents)
    );
}
