//! NAT traversal end to end: real eviod processes in evio-lab hosts behind nftables NATs, a real etcd and
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

use evio_lab::{Host, Lab, NatKind, unique_prefix, wait_until};

fn eviod() -> &'static str {
    env!("CARGO_BIN_EXE_eviod")
}

struct Agent {
    name: String,
    host: Host,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(&mut self, lab: &Lab) {
        let turn = lab.turn().expect("turn");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let _ = std::fs::remove_file(self.state_dir.join("eviod.sock"));
        let mut c = self.host.command(eviod());
        c.args([
            "--node-name",
            &self.name,
            "--etcd-endpoints",
            &lab.etcd_endpoint().unwrap(),
            "--state-dir",
        ])
        .arg(&self.state_dir)
        .args([
            "--listen-port",
            "51820",
            "--stun",
            &turn.addr.to_string(),
            "--turn",
            &turn.addr.to_string(),
        ])
        .args(["--turn-user", &turn.user, "--turn-password-file"])
        .arg(&turn.password_file)
        .env("EVIO_LOG", "info,eviod=debug,evio_nat=debug")
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
            .map(|(name, host)| Agent {
                name: name.to_string(),
                host,
                state_dir: dir.path().join(name),
                log: dir.path().join(format!("{name}.log")),
                child: None,
            })
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
            .map(|a| format!("=== {} ===\n{}\n", a.name, tail(&a.log_text(), 60)))
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

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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
    let vips = m.vips();
    // Time to first packet: every pair answers a ping.
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
        ep.starts_with(&evio_lab::SERVICES_IP.to_string()),
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
