//! `evio-demo` end to end (root): the real binaries, etcd, coturn, NATs in network namespaces.
//!
//! Every run gets its own TMPDIR, so "nothing left behind" is checked exactly: no namespace with the
//! demo's prefix (derived from its pid), no process whose command line mentions the run's TMPDIR (eviod's
//! state dir, etcd's data dir and coturn's config all live there), and an empty TMPDIR.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn evio_demo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_evio-demo"));
    let dir = p.parent().unwrap();
    for b in ["evioctl", "eviod", "evio-cni"] {
        assert!(
            dir.join(b).is_file(),
            "{}/{b} missing: build the workspace binaries first (cargo build --workspace --bins)",
            dir.display()
        );
    }
    p
}

/// A demo process with its stdout and stderr collected in the background.
struct Demo {
    child: Child,
    out: Arc<Mutex<String>>,
    /// How many of the two reader threads saw the end of their pipe.
    drained: Arc<AtomicUsize>,
    tmp: Arc<tempfile::TempDir>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let tmp = tempfile::Builder::new()
            .prefix("evio-demo-test")
            .tempdir()
            .unwrap();
        Demo::start_in(Arc::new(tmp), args)
    }

    /// A demo with TMPDIR `tmp`.
    fn start_in(tmp: Arc<tempfile::TempDir>, args: &[&str]) -> Demo {
        Demo::spawn(&evio_demo(), tmp, args)
    }

    /// `exe ARGS` with TMPDIR `tmp`.
    fn spawn(exe: &Path, tmp: Arc<tempfile::TempDir>, args: &[&str]) -> Demo {
        evio_testbed::require_root();
        let mut child = Command::new(exe)
            .args(args)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start evio-demo");
        let out = Arc::new(Mutex::new(String::new()));
        let drained = Arc::new(AtomicUsize::new(0));
        for mut r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            let drained = drained.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                drained.fetch_add(1, Ordering::SeqCst);
            });
        }
        Demo {
            child,
            out,
            drained,
            tmp,
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// The namespace prefix of this demo (`evio_testbed::lab::unique_prefix("evdemo")` in the demo process).
    fn prefix(&self) -> String {
        format!("evdemo{:x}x", self.child.id())
    }

    /// Waits for the exit status (kills the demo after `limit`).
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // All output read: both pipes at their end (a generous bound in case a leftover
                // process still holds one; assert_nothing_left reports such a process).
                evio_testbed::wait_until(Duration::from_secs(10), || {
                    self.drained.load(Ordering::SeqCst) == 2
                });
                return st.code();
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("demo did not finish within {limit:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Asserts that nothing of this demo is left on the machine.
    fn assert_nothing_left(&self) {
        let prefix = self.prefix();
        let netns: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            netns.is_empty(),
            "namespaces left: {netns:?}\n{}",
            self.output()
        );
        let tmp = self.tmp.path().to_string_lossy().into_owned();
        let procs = processes_mentioning(&tmp);
        assert!(
            procs.is_empty(),
            "processes left: {procs:?}\n{}",
            self.output()
        );
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        assert!(
            left.is_empty(),
            "temp files left: {left:?}\n{}",
            self.output()
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A failed assertion while the demo runs: let it clean up, then make sure it is gone.
            self.signal(Signal::SIGTERM);
            let end = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let p = e.path();
        if !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(p.join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{}: {cmd}", p.display()));
            }
        }
    }
    found
}

fn wait_for_output(d: &Demo, needle: &str, limit: Duration) {
    let end = Instant::now() + limit;
    while !d.output().contains(needle) {
        assert!(
            Instant::now() < end,
            "no {needle:?} within {limit:?}:\n{}",
            d.output()
        );
        assert!(
            d.output().is_empty() || !d.output().contains("tearing down"),
            "demo ended early:\n{}",
            d.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The README's main command with --check: three edge hosts behind NATs (one symmetric), two pods
/// each; every host VIP and every pod must reach every other.
#[test]
fn demo_check_three_nodes_one_symmetric_nat() {
    let mut d = Demo::start(&["--nodes", "3", "--symmetric-nat", "1", "--check"]);
    let t = Instant::now();
    let code = d.wait(Duration::from_secs(180));
    let out = d.output();
    println!("{out}");
    assert_eq!(
        code,
        Some(0),
        "demo --check failed after {:?}:\n{out}",
        t.elapsed()
    );
    for s in [
        "every pair reaches every other",
        "host VIPs: 6/6 reached, pods: 12/12 reached",
        "data plane: 6 of the 6 peer paths the agents report up carried a ping",
        "check: passed",
        "no namespaces, processes or files left",
        // CA mode by default: every host joins with one token; the topology page is served.
        "CA pin sha256:",
        "joining with the token",
    ] {
        assert!(out.contains(s), "output lacks {s:?}:\n{out}");
    }
    assert!(
        out.lines().any(|l| l.starts_with("topology page: http://")),
        "{out}"
    );
    // Three subnets, three VIPs in the table.
    assert!(out.matches("10.10.0.").count() >= 3, "{out}");
    d.assert_nothing_left();
}

/// Two sites behind symmetric NATs: no direct path is possible between them (each NAT maps every
/// destination to a new port and filters by endpoint), nor between them and the easy site, so every
/// pair must go through the TURN relay, symmetric to symmetric included.
#[test]
fn demo_check_two_symmetric_nats_relay_everything() {
    let mut d = Demo::start(&[
        "--nodes",
        "3",
        "--symmetric-nat",
        "2",
        "--pods-per-node",
        "1",
        "--check",
    ]);
    let code = d.wait(Duration::from_secs(180));
    let out = d.output();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("host VIPs: 6/6 reached, pods: 6/6 reached"),
        "{out}"
    );
    // Six peer paths (3 nodes, both directions), every one relayed.
    assert_eq!(out.matches("relay via ").count(), 6, "{out}");
    assert!(!out.contains("direct via "), "{out}");
    d.assert_nothing_left();
}

/// A public-address cluster exercises the whole demo (matrix, direct throughput) without NAT traversal.
#[test]
fn demo_check_public_hosts() {
    let mut d = Demo::start(&[
        "--nodes",
        "0",
        "--symmetric-nat",
        "0",
        "--public-nodes",
        "2",
        "--pods-per-node",
        "1",
        "--check",
    ]);
    let code = d.wait(Duration::from_secs(120));
    let out = d.output();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("host VIPs: 2/2 reached, pods: 2/2 reached"),
        "{out}"
    );
    assert!(out.contains("direct via 198.18.2."), "{out}");
    assert!(out.contains("Mbit/s"), "no throughput sample:\n{out}");
    d.assert_nothing_left();
}

/// SIGINT (and SIGTERM) at several points of the start-up: the demo stops, tears down and exits 130,
/// leaving no namespace, process or file behind.
#[test]
fn demo_interrupted_during_start_up_leaves_nothing() {
    for (at, sig) in [
        ("internet with etcd", Signal::SIGINT),
        ("eviod on every host", Signal::SIGINT),
        ("pods through the CNI chain", Signal::SIGTERM),
    ] {
        let mut d = Demo::start(&["--nodes", "3", "--symmetric-nat", "1"]);
        wait_for_output(&d, at, Duration::from_secs(60));
        d.signal(sig);
        let code = d.wait(Duration::from_secs(60));
        let out = d.output();
        assert_eq!(
            code,
            Some(130),
            "signal {sig} at {at:?}: exit {code:?}\n{out}"
        );
        assert!(out.contains("tearing down"), "{out}");
        assert!(!out.contains("stays up until Ctrl-C"), "{out}");
        d.assert_nothing_left();
    }
}

/// Without --check the demo stays up (it prints how to look around) until SIGINT, then cleans up.
/// The body of `GET path` from `host:port` (HTTP/1.0, so the server closes the connection).
fn http_get(hostport: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_string()
}

#[test]
fn demo_stays_up_until_sigint() {
    let mut d = Demo::start(&[
        "--nodes",
        "0",
        "--symmetric-nat",
        "0",
        "--public-nodes",
        "2",
        "--pods-per-node",
        "1",
    ]);
    wait_for_output(&d, "ip netns list | grep", Duration::from_secs(120));
    let out = d.output();
    let pod_ns = out
        .lines()
        .skip_while(|l| !l.contains("# a shell in pod edge1/pod1"))
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no pod shell hint:\n{out}"));
    assert!(
        Path::new("/run/netns").join(&pod_ns).exists(),
        "{pod_ns} does not exist:\n{out}"
    );
    // The topology page answers with both nodes (the demo prints where it is).
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("topology page: http://"))
        .unwrap_or_else(|| panic!("no topology page line:\n{out}"))
        .trim_end_matches('/')
        .to_string();
    let body = http_get(&url, "/api/topology");
    let topo: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let names: Vec<&str> = topo["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        matches!(d.child.try_wait(), Ok(None)),
        "demo exited on its own:\n{}",
        d.output()
    );
    d.signal(Signal::SIGINT);
    assert_eq!(d.wait(Duration::from_secs(30)), Some(0), "{}", d.output());
    d.assert_nothing_left();
}

/// A demo killed with SIGKILL cannot clean up: its agents die with it (PR_SET_PDEATHSIG) and the next demo
/// removes its namespaces, etcd, coturn and temp dirs.
#[test]
fn killed_demo_is_cleaned_up_by_the_next_one() {
    let public = [
        "--nodes",
        "0",
        "--symmetric-nat",
        "0",
        "--public-nodes",
        "2",
        "--pods-per-node",
        "1",
    ];
    let mut d = Demo::start(&public);
    // Once the agents run (the demo plugs pods in first, then starts them).
    wait_for_output(&d, "tunnels between every pair", Duration::from_secs(60));
    d.signal(Signal::SIGKILL);
    assert_eq!(d.wait(Duration::from_secs(10)), None, "{}", d.output());
    let prefix = d.prefix();
    let left = || {
        std::fs::read_dir("/run/netns")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    };
    assert!(
        left() > 0,
        "a killed demo left nothing to clean up?\n{}",
        d.output()
    );
    // The agents died with the demo.
    let agents = || {
        processes_mentioning(&d.tmp.path().to_string_lossy())
            .into_iter()
            .filter(|p| p.contains("eviod"))
            .count()
    };
    assert!(
        evio_testbed::wait_until(Duration::from_secs(5), || agents() == 0),
        "agents outlived the demo: {:?}",
        processes_mentioning(&d.tmp.path().to_string_lossy())
    );
    let mut next = Demo::start_in(d.tmp.clone(), &[&public[..], &["--check"]].concat());
    let code = next.wait(Duration::from_secs(120));
    let out = next.output();
    assert_eq!(code, Some(0), "{out}");
    // Unless a demo of a parallel test got there first.
    assert!(left() == 0, "{out}");
    d.assert_nothing_left();
    next.assert_nothing_left();
}

/// An error half way (here: an agent that exits at once, injected by placing a failing `eviod` next to a
/// copy of evio-demo and the real evioctl and evio-cni): the demo reports it, exits 1 and leaves nothing
/// behind.
#[test]
fn error_half_way_leaves_nothing() {
    let real = evio_demo();
    let bins = tempfile::Builder::new()
        .prefix("evio-demo-bins")
        .tempdir()
        .unwrap();
    std::fs::copy(&real, bins.path().join("evio-demo")).unwrap();
    for b in ["evioctl", "evio-cni"] {
        std::fs::copy(real.parent().unwrap().join(b), bins.path().join(b)).unwrap();
    }
    let fake = bins.path().join("eviod");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'eviod: injected failure' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = Arc::new(
        tempfile::Builder::new()
            .prefix("evio-demo-test")
            .tempdir()
            .unwrap(),
    );
    let mut d = Demo::spawn(
        &bins.path().join("evio-demo"),
        tmp,
        &["--nodes", "2", "--symmetric-nat", "1", "--check"],
    );
    let code = d.wait(Duration::from_secs(60));
    let out = d.output();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("injected failure"),
        "the agent's log is not shown:\n{out}"
    );
    assert!(out.contains("FAILED"), "{out}");
    d.assert_nothing_left();
}

/// A missing package is named before anything is created.
#[test]
fn missing_packages_are_named() {
    evio_testbed::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(evio_demo())
        .args(["--check"])
        .env("PATH", tmp.path().join("empty"))
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for pkg in ["etcd-server", "coturn", "iproute2", "nftables"] {
        assert!(err.contains(pkg), "{pkg} not named: {err}");
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "created files"
    );
}

/// A dead data plane (issue 12: at 40 nodes the demo printed "1560/1560 peer paths up" while no packet
/// crossed a tunnel, and `--check` took 4 minutes to fail). Here one host's tunnel device drops every
/// packet in and out (nftables in that host's namespace, set up as soon as the lab exists): its agents
/// still handshake over the underlay, so they report their paths up, but nothing crosses them. The demo
/// must fail within a bounded time, say which paths the agents report up that carried no ping, and leave
/// nothing behind.
#[test]
fn dead_data_plane_fails_the_check_fast_and_says_so() {
    let mut d = Demo::start(&[
        "--nodes",
        "3",
        "--symmetric-nat",
        "0",
        "--pods-per-node",
        "1",
        "--probe-timeout",
        "5",
        "--check",
    ]);
    let t = Instant::now();
    // Printed when the lab (and so edge1's host namespace) exists, before any agent starts.
    wait_for_output(
        &d,
        "evioctl cni-config on every host",
        Duration::from_secs(60),
    );
    let host = format!("{}0-s0h0", d.prefix());
    let rules = "table ip evio_test_dead {\n\
        chain i { type filter hook input priority -10; iifname \"evio0\" drop; }\n\
        chain o { type filter hook output priority -10; oifname \"evio0\" drop; }\n\
        chain f { type filter hook forward priority -10; iifname \"evio0\" drop; oifname \"evio0\" drop; }\n\
        }\n";
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &host, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft in {host}");
    let code = d.wait(Duration::from_secs(90));
    let took = t.elapsed();
    let out = d.output();
    println!("{out}");
    assert_eq!(code, Some(1), "{out}");
    // The agents handshook over the underlay: every path reported up ...
    assert!(out.contains("6/6 peer paths up"), "{out}");
    // ... but the report says what the data plane carried, and which paths are dead.
    assert!(
        out.contains("host VIPs: 2/6 reached, pods: 2/6 reached — NOT every pair"),
        "{out}"
    );
    assert!(
        out.contains("data plane: 2 of the 6 peer paths the agents report up carried a ping"),
        "{out}"
    );
    for p in [
        "edge1 → edge2",
        "edge2 → edge1",
        "edge1 → edge3",
        "edge3 → edge1",
    ] {
        assert!(out.contains(p), "{p} not named:\n{out}");
    }
    assert!(!out.contains("every pair reaches every other"), "{out}");
    assert!(
        out.contains("check: FAILED (8 of 12 probes unanswered)"),
        "{out}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}:\n{out}");
    d.assert_nothing_left();
}

/// A cluster too big for the machine's neighbour table (one for all namespaces, 1024 entries by
/// default) is refused before anything is created, saying why and what to do; the limit is not touched.
#[test]
fn cluster_beyond_the_neighbour_table_is_refused_up_front() {
    evio_testbed::require_root();
    let limit = std::fs::read_to_string("/proc/sys/net/ipv4/neigh/default/gc_thresh3").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    // 200 nodes with 4 pods each: 200 x (6 + 8) = 2800 entries, more than any default table holds.
    let out = Command::new(evio_demo())
        .args(["--nodes", "200", "--pods-per-node", "4", "--check"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("neighbour (ARP) entries"), "{err}");
    assert!(err.contains("gc_thresh3"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/neigh/default/gc_thresh3").unwrap(),
        limit
    );
}

/// A status the demo cannot collect is an error, not a blank (issue 12: the 40-node demo printed an empty
/// node table). Once the agents answered with their VIPs, edge1's status socket is removed: its agent
/// keeps carrying traffic, but nobody can ask it any more. The demo must name edge1 as not collected and
/// fail the check, even though every ping gets through.
#[test]
fn status_not_collected_fails_the_check_and_says_so() {
    let mut d = Demo::start(&[
        "--nodes",
        "3",
        "--symmetric-nat",
        "0",
        "--pods-per-node",
        "1",
        "--paths-timeout",
        "3",
        "--check",
    ]);
    let t = Instant::now();
    wait_for_output(
        &d,
        "eviod on every host, joining with the token (certificate: VIP and pod subnet) ... ok",
        Duration::from_secs(60),
    );
    let demo_dir = std::fs::read_dir(d.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("evio-demo-")
        })
        .expect("the demo's temp dir");
    let sock = demo_dir.join("edge1/state/eviod.sock");
    std::fs::remove_file(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    let code = d.wait(Duration::from_secs(90));
    let out = d.output();
    println!("{out}");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("could not collect"), "{out}");
    assert!(out.contains("edge1: cannot reach the agent"), "{out}");
    assert!(
        out.contains("check: FAILED (1 statuses or mappings not collected)"),
        "{out}"
    );
    // Its peers' paths are not counted up on its behalf, and the pings still went through.
    assert!(!out.contains("6/6 peer paths up"), "{out}");
    assert!(out.contains("host VIPs: 6/6 reached"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(60), "{out}");
    d.assert_nothing_left();
}
