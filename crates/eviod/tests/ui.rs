//! `evioctl ui` against a real lab: etcd and three agents in network namespaces, the UI server in the
//! underlay namespace, and headless Chromium loading the page inside that namespace (which has no default
//! route, so the browser cannot reach anything else). Needs root, `chromium`, `chromedriver` (Debian's
//! `chromium-driver`) and `curl` (scripts/deps.sh),
//! and `cargo build -p evioctl --bins` first.

mod common;

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, ETCD_IP};
use evio_testbed::{Netns, wait_until};
use serde_json::Value;

const PORT: u16 = 18080;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn base() -> String {
    format!("http://{ETCD_IP}:{PORT}")
}

fn get(ns: &Netns, path: &str) -> Option<String> {
    let url = format!("{}{path}", base());
    let out = ns.exec(&["curl", "-sSf", "--max-time", "3", &url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn topology(ns: &Netns) -> Option<Value> {
    serde_json::from_str(&get(ns, "/api/topology")?).ok()
}

fn node<'a>(t: &'a Value, name: &str) -> Option<&'a Value> {
    t["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

/// One Chromium at a time in this test binary: two at once on a busy 2-core machine (the whole suite runs 4
/// tests in parallel) can take longer than their time limit.
static CHROMIUM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The page's DOM after its scripts ran, from headless Chromium inside `ns`; empty if Chromium failed (the
/// callers retry), with its stderr kept for the final message.
fn dump_dom(ns: &Netns, profile: &std::path::Path, ms: u32) -> String {
    let _one = CHROMIUM.lock().unwrap_or_else(|e| e.into_inner());
    let out = chromium(ns, profile, ms).wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!(
            "chromium failed ({}), retrying: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.contains("dbus"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        return String::new();
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chromium(ns: &Netns, profile: &std::path::Path, ms: u32) -> Child {
    let user_data = format!("--user-data-dir={}", profile.display());
    let timeout = format!("--timeout={ms}");
    let url = format!("{}/", base());
    ns.command("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &user_data,
            // Not --virtual-time-budget: virtual time stops while a request is pending, and the page keeps its
            // event stream open, so the dump would never come. --timeout dumps the DOM after 3 s of real time.
            &timeout,
            "--dump-dom",
            &url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium")
}

/// Dumps the page until `ready` holds for the DOM (a first start of Chromium with a fresh profile can take
/// longer than the dump timeout), at most 4 times; returns the last DOM.
fn dump_until(ns: &Netns, profile: &std::path::Path, ready: impl Fn(&str) -> bool) -> String {
    let mut dom = String::new();
    // A busy machine can need more than 3 s to run the page's script: each retry waits longer.
    for attempt in 1..=4u32 {
        dom = dump_dom(ns, profile, 3000 * attempt);
        if ready(&dom) {
            break;
        }
    }
    dom
}

/// The `<g class="node ...">` element of `name` in a dumped DOM (its opening tag).
fn node_tag<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let i = dom.find(&format!("data-node=\"{name}\""))?;
    let start = dom[..i].rfind('<')?;
    let end = i + dom[i..].find('>')?;
    Some(&dom[start..=end])
}

/// One page kept open in headless Chromium through ChromeDriver's WebDriver HTTP API (Debian's
/// `chromium-driver`, driven with curl inside `ns`): what the page shows later, without reloading it.
struct LivePage<'a> {
    /// No other Chromium of this test binary runs meanwhile (see `CHROMIUM`).
    _one: std::sync::MutexGuard<'static, ()>,
    ns: &'a Netns,
    driver: Killed,
    url: String,
    session: String,
}

impl<'a> LivePage<'a> {
    fn open(ns: &'a Netns, profile: &std::path::Path) -> LivePage<'a> {
        let one = CHROMIUM.lock().unwrap_or_else(|e| e.into_inner());
        let port = 19515;
        let driver = Killed(
            ns.command("chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver (Debian's chromium-driver)"),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut page = LivePage {
            _one: one,
            ns,
            driver,
            url,
            session: String::new(),
        };
        assert!(
            wait_until(Duration::from_secs(10), || page
                .call("GET", "/status", None)
                .is_some_and(|v| v["value"]["ready"] == true)),
            "chromedriver not ready"
        );
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.display())]
        }}}});
        let v = page
            .call("POST", "/session", Some(&caps))
            .expect("WebDriver session");
        page.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        let nav = serde_json::json!({ "url": format!("{}/", base()) });
        let path = format!("/session/{}/url", page.session);
        page.call("POST", &path, Some(&nav)).expect("navigate");
        page
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Option<Value> {
        let url = format!("{}{path}", self.url);
        let mut args = vec!["curl", "-sS", "--max-time", "30", "-X", method, &url];
        let data = body.map(|b| b.to_string());
        if let Some(d) = &data {
            args.extend(["-H", "Content-Type: application/json", "-d", d]);
        }
        let out = self.ns.exec(&args);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The page's DOM now (the same page, never reloaded).
    fn dom(&self) -> String {
        let script = serde_json::json!({
            "script": "return document.documentElement.outerHTML", "args": []
        });
        let path = format!("/session/{}/execute/sync", self.session);
        self.call("POST", &path, Some(&script))
            .and_then(|v| v["value"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

impl Drop for LivePage<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.0.kill();
    }
}

/// `evioctl ui` for the cluster's etcd, in its underlay namespace on `PORT`.
fn start_ui(c: &Cluster) -> Killed {
    Killed(
        c.underlay
            .command(common::evioctl().to_str().unwrap())
            .args(["ui", "--etcd-endpoints", &c.etcd_url()])
            .args(["--listen", &format!("{ETCD_IP}:{PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start evioctl ui"),
    )
}

#[test]
fn topology_page_shows_nodes_paths_and_a_dead_agent() {
    evio_testbed::require_root();
    let t0 = Instant::now();
    let mut c = Cluster::new(3);
    for h in &mut c.hosts {
        h.extra = vec!["--lease-ttl".into(), "3".into()];
    }
    c.hosts[0]
        .extra
        .extend(["--metrics-addr".to_string(), "127.0.0.1:9109".to_string()]);
    c.start_all();
    assert!(
        c.wait_mesh(Duration::from_secs(20)),
        "no mesh:\n{}",
        c.logs()
    );
    // Inner traffic on every path, so none is idle.
    let vips: Vec<String> = c.hosts.iter().map(|h| h.vip()).collect();
    for (i, h) in c.hosts.iter().enumerate() {
        for (j, v) in vips.iter().enumerate() {
            if i != j {
                assert!(h.ping_until(v, Duration::from_secs(5)), "{} -> {v}", h.name);
            }
        }
    }

    // Every evio metric the Grafana dashboard queries is one eviod exports.
    let metrics = c.hosts[0].ns.exec_ok(&[
        "curl",
        "-sSf",
        "--max-time",
        "3",
        "http://127.0.0.1:9109/metrics",
    ]);
    let dash = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana-evio.json"),
    )
    .unwrap();
    let dash: Value = serde_json::from_str(&dash).unwrap();
    let mut used = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap();
            for (i, _) in e.match_indices("evio_") {
                let name: String = e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used.push(name);
            }
        }
    }
    assert!(used.len() > 10, "{used:?}");
    for m in &used {
        // A sample of it (OpenMetrics names a counter's family without `_total` in `# TYPE`).
        assert!(
            metrics.lines().any(|l| l
                .strip_prefix(m.as_str())
                .is_some_and(|r| r.starts_with([' ', '{']))),
            "the dashboard queries {m}, which eviod does not export:\n{metrics}"
        );
    }
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");

    let ui = start_ui(&c);

    // The API: three live nodes with their VIPs and versions, and the three paths, all direct.
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        let Some(t) = topology(&c.underlay) else {
            return false;
        };
        last = t.clone();
        let nodes_ok = c.hosts.iter().zip(&vips).all(|(h, v)| {
            node(&t, &h.name).is_some_and(|n| {
                n["up"] == true && n["address"] == v.as_str() && n["version"].is_string()
            })
        });
        let edges = t["edges"].as_array().cloned().unwrap_or_default();
        nodes_ok && edges.len() == 3 && edges.iter().all(|e| e["kind"] == "direct")
    });
    assert!(ok, "topology never complete: {last:#}\n{}", c.logs());
    assert_eq!(last["etcdConnected"], true);
    assert!(
        last["edges"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["rttMs"].as_f64().is_some_and(|r| r >= 0.0)),
        "{last:#}"
    );

    // A node's detail is its peers as `evioctl status` has them.
    // (host-1 registered first, so its first summary had no peers: wait for the one with its peers.)
    let mut d = Value::Null;
    wait_until(Duration::from_secs(5), || {
        d = get(&c.underlay, "/api/nodes/host-1")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        d["peers"].as_array().is_some_and(|p| p.len() == 2)
    });
    let st = c.hosts[0].status().unwrap();
    let peers = d["peers"].as_array().unwrap();
    assert_eq!(
        peers.len(),
        2,
        "{d:#}\n{}\n{}",
        c.etcdctl(&["get", "--prefix", "/evio/status/v1/paths/"]),
        c.logs()
    );
    for p in peers {
        let s = st["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["node"] == p["peer"])
            .unwrap_or_else(|| panic!("{p} not in status {st}"));
        assert_eq!(p["endpoint"], s["endpoint"], "{d:#} {st:#}");
        assert!(p["lastHandshake"].as_u64().is_some(), "{p}");
        assert!(p["rxBytes"].as_u64().unwrap() > 0, "{p}");
    }
    assert!(get(&c.underlay, "/api/nodes/nope").is_none());

    // The page, in a browser: every node up, three direct paths.
    let profile = tempfile::tempdir().unwrap();
    let dom = dump_until(&c.underlay, profile.path(), |d| {
        d.matches("class=\"edge k-direct").count() == 3
    });
    for h in &c.hosts {
        let tag =
            node_tag(&dom, &h.name).unwrap_or_else(|| panic!("{} not in page:\n{dom}", h.name));
        assert!(tag.contains("data-up=\"true\""), "{tag}");
    }
    assert_eq!(dom.matches("class=\"edge k-direct").count(), 3, "{dom}");
    for v in &vips {
        assert!(dom.contains(&format!(">{v}<")), "VIP {v} not shown:\n{dom}");
    }

    // Live: the event stream announces changes; a killed agent is down within 5 s in the API.
    let mut events = Killed(
        c.underlay
            .command("curl")
            .args([
                "-sSN",
                "--max-time",
                "20",
                &format!("{}/api/events", base()),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The same page, loaded once and kept open: it must follow the change by itself (live updates).
    let live_profile = tempfile::tempdir().unwrap();
    let live = LivePage::open(&c.underlay, live_profile.path());
    assert!(
        wait_until(Duration::from_secs(15), || node_tag(&live.dom(), "host-3")
            .is_some_and(|t| t.contains("data-up=\"true\""))),
        "the live page never showed host-3 up: {}",
        live.dom()
    );
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    c.hosts[2].kill9();
    let live_down = wait_until(Duration::from_secs(5), || {
        node_tag(&live.dom(), "host-3").is_some_and(|t| t.contains("data-up=\"false\""))
    });
    let live_took = killed_at.elapsed();
    assert!(
        live_down,
        "the open page did not show host-3 down within 5 s of kill -9: {}",
        live.dom()
    );
    eprintln!("host-3 down in the open page {live_took:?} after kill -9");
    drop(live);
    let down = wait_until(Duration::from_secs(5), || {
        topology(&c.underlay).is_some_and(|t| node(&t, "host-3").is_some_and(|n| n["up"] == false))
    });
    let took = killed_at.elapsed();
    assert!(
        down,
        "host-3 not down within 5 s: {:#}",
        topology(&c.underlay).unwrap_or_default()
    );
    eprintln!("host-3 down in the API {took:?} after kill -9");
    // And in the page.
    let dom = dump_until(&c.underlay, profile.path(), |d| {
        node_tag(d, "host-3").is_some_and(|t| t.contains("data-up=\"false\""))
    });
    let tag = node_tag(&dom, "host-3").unwrap();
    assert!(
        tag.contains("data-up=\"false\"") && tag.contains("down"),
        "{tag}"
    );
    assert!(
        node_tag(&dom, "host-1")
            .unwrap()
            .contains("data-up=\"true\"")
    );
    let _ = events.0.kill();
    let mut text = String::new();
    let _ = events.0.stdout.take().unwrap().read_to_string(&mut text);
    assert!(
        text.matches("event: topology").count() >= 2,
        "no change announced on the event stream:\n{text}"
    );

    // Attacker-written etcd values are shown as text, bounded and validated.
    c.etcdctl(&[
        "put",
        "/evio/v1/nodes/zz-evil",
        r#"{"node":"zz-evil","address":"10.10.0.250"}"#,
    ]);
    c.etcdctl(&[
        "put",
        "/evio/status/v1/paths/zz-evil",
        r#"{"node":"zz-evil","version":"<img src=x onerror=alert(1)>","peers":[{"peer":"host-1","kind":"<script>"},{"peer":"<b>x</b>","kind":"direct"}]}"#,
    ]);
    assert!(wait_until(Duration::from_secs(3), || topology(&c.underlay)
        .is_some_and(
            |t| node(&t, "zz-evil").is_some_and(|n| n["version"].is_string())
        )));
    let dom = dump_until(&c.underlay, profile.path(), |d| d.contains("zz-evil"));
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(!dom.contains("<img") && !dom.contains("<b>x"), "{dom}");
    assert!(
        dom.contains("data-a=\"host-1\" data-b=\"zz-evil\" data-kind=\"unknown\""),
        "{dom}"
    );
    drop(ui);
    eprintln!("ui test took {:?}", t0.elapsed());
}

/// Drops all traffic between two NATs' public addresses (in `site`'s NAT), as a firewall between them would.
fn block_between(lab: &evio_testbed::lab::Lab, site: usize, other: std::net::Ipv4Addr) {
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

/// Two sites behind NATs and a public host on the lab's internet (STUN and TURN there): the page shows the
/// NAT kinds and public mappings, and the sites' path turns from direct to relay when a firewall blocks it.
#[test]
fn nat_kinds_and_a_relayed_path() {
    use evio_testbed::lab::{Lab, NatKind, unique_prefix, wait_until};
    evio_testbed::require_root();
    let t0 = Instant::now();
    let lab = Lab::builder(&unique_prefix("eui"))
        .etcd(true)
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .public_hosts(1)
        .build()
        .expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let turn = lab.turn().unwrap();
    let etcd = lab.etcd_endpoint().unwrap();
    let hosts = [
        ("a", lab.site_host(0, 0)),
        ("b", lab.site_host(1, 0)),
        ("p", &lab.public_hosts()[0]),
    ];
    let mut agents = Vec::new();
    for (name, host) in hosts {
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        let mut c = host.command(common::eviod());
        c.args([
            "--node-name",
            name,
            "--etcd-endpoints",
            &etcd,
            "--state-dir",
        ])
        .arg(dir.path().join(name))
        .args(["--listen-port", "51820"])
        .args([
            "--stun",
            &turn.addr.to_string(),
            "--turn",
            &turn.addr.to_string(),
        ])
        .args(["--turn-user", &turn.user, "--turn-password-file"])
        .arg(&turn.password_file)
        .env("EVIO_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        agents.push(Killed(c.spawn().expect("start eviod")));
    }
    let logs = || -> String {
        ["a", "b", "p"]
            .iter()
            .map(|n| {
                let t = std::fs::read_to_string(dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(30).collect();
                format!(
                    "=== {n} ===\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    };

    // The UI on the lab's internet, next to etcd (no default route there: nothing else is reachable).
    let ip = etcd
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("http://{ip}:{PORT}");
    let _ui = Killed(
        evio_testbed::lab::netns_command(lab.internet_ns(), common::evioctl().to_str().unwrap())
            .args([
                "ui",
                "--etcd-endpoints",
                &etcd,
                "--listen",
                &format!("{ip}:{PORT}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let inet = |args: &[&str]| -> std::process::Output {
        evio_testbed::lab::netns_command(lab.internet_ns(), args[0])
            .args(&args[1..])
            .output()
            .unwrap()
    };
    let fetch = |path: &str| -> Option<Value> {
        let out = inet(&["curl", "-sSf", "--max-time", "3", &format!("{url}{path}")]);
        serde_json::from_slice(&out.stdout).ok()
    };
    let edge_kind = |t: &Value, a: &str, b: &str| -> Option<String> {
        t["edges"]
            .as_array()?
            .iter()
            .find(|e| e["a"] == a && e["b"] == b)
            .and_then(|e| e["kind"].as_str().map(String::from))
    };
    let mut last = Value::Null;
    let direct = wait_until(Duration::from_secs(30), || {
        let Some(t) = fetch("/api/topology") else {
            return false;
        };
        last = t.clone();
        [("a", "b"), ("a", "p"), ("b", "p")]
            .iter()
            .all(|(x, y)| edge_kind(&t, x, y).as_deref() == Some("direct"))
    });
    assert!(direct, "not all direct: {last:#}\n{}", logs());
    // NAT kinds and public mappings: the sites' mappings are their NATs' public addresses.
    let n = |name: &str| node(&last, name).cloned().unwrap();
    for (name, site) in [("a", 0), ("b", 1)] {
        assert_eq!(n(name)["nat"], "nat", "{last:#}");
        let wan = lab.site(site).wan_ip.to_string();
        assert!(
            n(name)["publicMapping"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m.as_str().unwrap().starts_with(&format!("{wan}:"))),
            "{name}: {last:#}"
        );
        assert_eq!(n(name)["relay"], true, "{last:#}");
    }
    assert_eq!(n("p")["nat"], "none", "{last:#}");

    // A firewall between the sites: their path is relayed, in the API and on the page.
    block_between(&lab, 1, lab.site(0).wan_ip);
    let relayed = wait_until(Duration::from_secs(25), || {
        fetch("/api/topology").is_some_and(|t| {
            last = t.clone();
            edge_kind(&t, "a", "b").as_deref() == Some("relay")
        })
    });
    assert!(relayed, "a-b not relayed: {last:#}\n{}", logs());
    let profile = tempfile::tempdir().unwrap();
    let user_data = format!("--user-data-dir={}", profile.path().display());
    let mut dom = String::new();
    for attempt in 1..=4u32 {
        let _one = CHROMIUM.lock().unwrap_or_else(|e| e.into_inner());
        let wait = format!("--timeout={}", 3000 * attempt);
        let out = inet(&[
            "timeout",
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &user_data,
            &wait,
            "--dump-dom",
            &format!("{url}/"),
        ]);
        dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if dom.contains("data-a=\"a\" data-b=\"b\" data-kind=\"relay\"") {
            break;
        }
    }
    assert!(dom.contains("class=\"edge k-relay\" x1="), "{dom}");
    assert!(
        dom.contains("data-a=\"a\" data-b=\"b\" data-kind=\"relay\""),
        "{dom}"
    );
    assert_eq!(dom.matches("class=\"edge k-direct\"").count(), 2, "{dom}");

    // --etcd-netns (the demo's way): served on this namespace's loopback, etcd read in the lab's internet.
    let port = evio_testbed::free_port();
    let _local = Killed(
        std::process::Command::new(common::evioctl())
            .args([
                "ui",
                "--etcd-endpoints",
                &etcd,
                "--etcd-netns",
                lab.internet_ns(),
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let local = wait_until(Duration::from_secs(5), || {
        let out = std::process::Command::new("curl")
            .args(["-sSf", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{port}/api/topology"))
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .is_ok_and(|t| edge_kind(&t, "a", "b").as_deref() == Some("relay"))
    });
    assert!(local, "evioctl ui --etcd-netns: no topology on loopback");
    eprintln!("relay ui test took {:?}", t0.elapsed());
}

/// Lazy peers on the page: agents with `--lazy-peers` that never exchanged a packet show idle edges (API
/// and DOM); a ping between two of them turns their edge direct while the others stay idle.
#[test]
fn lazy_peers_are_idle_edges_until_traffic_wakes_them() {
    evio_testbed::require_root();
    let mut c = Cluster::new(3);
    for h in &mut c.hosts {
        h.extra = ["--lazy-peers", "--peer-idle-timeout", "60"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    c.start_all();
    assert!(
        wait_until(Duration::from_secs(20), || c
            .hosts
            .iter()
            .all(|h| h.peer_names().len() == 2)),
        "peers not known: {}",
        c.logs()
    );
    let _ui = start_ui(&c);
    let kinds = |t: &Value| -> Vec<(String, String, String)> {
        let mut v: Vec<_> = t["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("a"), s("b"), s("kind"))
            })
            .collect();
        v.sort();
        v
    };
    let idle = |a: &str, b: &str| (a.to_string(), b.to_string(), "idle".to_string());
    let mut last = Value::Null;
    let all_idle = wait_until(Duration::from_secs(15), || {
        last = topology(&c.underlay).unwrap_or_default();
        kinds(&last)
            == vec![
                idle("host-1", "host-2"),
                idle("host-1", "host-3"),
                idle("host-2", "host-3"),
            ]
    });
    assert!(all_idle, "edges not all idle: {last:#}\n{}", c.logs());
    // Resting peers (the agents' own status says so, and no handshake happened), not merely quiet paths.
    for h in &c.hosts {
        let st = h.status().unwrap();
        for p in st["peers"].as_array().unwrap() {
            assert_eq!(p["path"], "idle", "{}: {st:#}", h.name);
        }
        assert_eq!(h.metric("evio_handshakes_total"), 0, "{}", h.name);
    }
    let profile = tempfile::tempdir().unwrap();
    let dom = dump_until(&c.underlay, profile.path(), |d| {
        d.matches("class=\"edge k-idle").count() == 3
    });
    assert_eq!(dom.matches("class=\"edge k-idle").count(), 3, "{dom}");

    // Traffic wakes one pair: its edge turns direct, the others stay idle.
    let vip2 = c.hosts[1].vip();
    assert!(c.hosts[0].ping_until(&vip2, Duration::from_secs(5)));
    let woke = wait_until(Duration::from_secs(10), || {
        last = topology(&c.underlay).unwrap_or_default();
        kinds(&last)
            == vec![
                ("host-1".into(), "host-2".into(), "direct".into()),
                idle("host-1", "host-3"),
                idle("host-2", "host-3"),
            ]
    });
    assert!(woke, "the woken pair is not direct: {last:#}\n{}", c.logs());
    let dom = dump_until(&c.underlay, profile.path(), |d| {
        d.matches("class=\"edge k-direct").count() == 1
    });
    assert_eq!(dom.matches("class=\"edge k-idle").count(), 2, "{dom}");
}
