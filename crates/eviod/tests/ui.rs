//! `evioctl ui` against a real lab: etcd and three agents in network namespaces, the UI server in the
//! underlay namespace, and headless Chromium loading the page inside that namespace (which has no default
//! route, so the browser cannot reach anything else). Needs root, `chromium` and `curl` (scripts/deps.sh),
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

/// The page's DOM after its scripts ran, from headless Chromium inside `ns`.
fn dump_dom(ns: &Netns, profile: &std::path::Path) -> String {
    let user_data = format!("--user-data-dir={}", profile.display());
    let url = format!("{}/", base());
    let out = ns.exec(&[
        "timeout",
        "30",
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
        "--timeout=3000",
        "--dump-dom",
        &url,
    ]);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Dumps the page until `ready` holds for the DOM (a first start of Chromium with a fresh profile can take
/// longer than the dump timeout), at most 4 times; returns the last DOM.
fn dump_until(ns: &Netns, profile: &std::path::Path, ready: impl Fn(&str) -> bool) -> String {
    let mut dom = String::new();
    for _ in 0..4 {
        dom = dump_dom(ns, profile);
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
        assert!(
            metrics.contains(&format!("# TYPE {m} ")),
            "the dashboard queries {m}, which eviod does not export:\n{metrics}"
        );
    }

    let ui = Killed(
        c.underlay
            .command(common::evioctl().to_str().unwrap())
            .args(["ui", "--etcd-endpoints", &c.etcd_url()])
            .args(["--listen", &format!("{ETCD_IP}:{PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start evioctl ui"),
    );

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
    let d: Value = serde_json::from_str(&get(&c.underlay, "/api/nodes/host-1").unwrap()).unwrap();
    let st = c.hosts[0].status().unwrap();
    let peers = d["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{d:#}");
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
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    c.hosts[2].kill9();
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
        "/evio/v1/paths/zz-evil",
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
