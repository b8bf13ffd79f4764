//! `evioctl cni-config`, `nodes` and `release` as real processes against a real etcd.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evio_store::etcd_client::GetOptions;
use evio_store::{EtcdOptions, NodeRecord, Store, SubnetClaim, keys};
use evio_testbed::Etcd;
use serde_json::Value;

const EVIOCTL: &str = env!("CARGO_BIN_EXE_evioctl");

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::Builder::new()
            .prefix("evio-cniconf")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("net.d")).unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        // Stands in for the plugin binary: the install mechanics do not depend on its content, and
        // cni-config asks it only for its versions.
        let src = dir.path().join("evio-cni-src");
        std::fs::write(
            &src,
            stub_plugin(&["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        )
        .unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
        Node { dir }
    }
    fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }
    fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    fn net_conf(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("net-conf.json");
        std::fs::write(&p, text).unwrap();
        p
    }
    fn cmd(&self, net_conf: &Path, node: &str, endpoints: Option<&str>) -> Command {
        let mut c = Command::new(EVIOCTL);
        c.arg("cni-config")
            .arg("--net-conf")
            .arg(net_conf)
            .args(["--node-name", node])
            .arg("--cni-conf-dir")
            .arg(self.conf_dir())
            .arg("--cni-bin-dir")
            .arg(self.bin_dir())
            .arg("--plugin-binary")
            .arg(self.dir.path().join("evio-cni-src"))
            .env_remove("EVIO_ETCD_ENDPOINTS")
            .env_remove("NODE_NAME");
        if let Some(e) = endpoints {
            c.args(["--etcd-endpoints", e]);
        }
        c
    }
    fn written(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.conf_dir())
            .unwrap()
            .chain(std::fs::read_dir(self.bin_dir()).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// A shell script that answers the CNI `VERSION` verb with `versions`.
fn stub_plugin(versions: &[&str]) -> String {
    format!(
        "#!/bin/sh\nif [ \"$CNI_COMMAND\" = VERSION ]; then echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":{}}}'; exit 0; fi\necho plugin\n",
        serde_json::to_string(versions).unwrap()
    )
}

fn out_text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok_json(o: Output) -> Value {
    assert!(o.status.success(), "{}", out_text(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    assert_eq!(s.lines().count(), 1, "one JSON line expected: {s}");
    serde_json::from_str(&s).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn store(etcd: &Etcd) -> (tokio::runtime::Runtime, Store) {
    let r = rt();
    let s = r
        .block_on(Store::connect(&EtcdOptions::new([etcd.endpoint()])))
        .unwrap();
    (r, s)
}

/// Both indexes of the subnet claims, raw: by-node and by-subnet must describe the same claims.
fn assert_consistent(r: &tokio::runtime::Runtime, s: &Store) -> Vec<SubnetClaim> {
    r.block_on(async {
        let mut c = s.client();
        // Both at one revision: a killed claimer's last request may reach etcd after the process died
        // (it was in the socket) and commit between two reads, which would look like a half claim.
        let list = |p: &'static str, rev: i64| {
            let mut c = c.clone();
            async move {
                c.get(p, Some(GetOptions::new().with_prefix().with_revision(rev)))
                    .await
                    .unwrap()
            }
        };
        let by_node = list(keys::SUBNETS_BY_NODE, 0).await;
        let rev = by_node.header().unwrap().revision();
        let by_subnet = list(keys::SUBNETS_BY_SUBNET, rev).await;
        let _ = &mut c;
        let mut a: HashMap<String, String> = HashMap::new();
        for kv in by_node.kvs() {
            let claim: SubnetClaim = serde_json::from_slice(kv.value()).unwrap();
            assert_eq!(kv.key_str().unwrap(), keys::subnet_by_node(&claim.node));
            a.insert(
                keys::subnet_by_subnet(&claim.subnet),
                kv.value_str().unwrap().to_string(),
            );
        }
        let mut b: HashMap<String, String> = HashMap::new();
        for kv in by_subnet.kvs() {
            b.insert(
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            );
        }
        assert_eq!(a, b, "by-node and by-subnet disagree (half claim)");
        by_node
            .kvs()
            .iter()
            .map(|kv| serde_json::from_slice(kv.value()).unwrap())
            .collect()
    })
}

#[test]
fn writes_the_conflist_installs_the_plugin_and_is_stable() {
    let etcd = Etcd::start();
    let n = Node::new();
    let conf = n.net_conf(
        r#"{"name":"evio","podCIDR":"10.244.0.0/16","nodeBits":"8","bridge":"eviobr0","bridgeType":"linux",
            "isIPMasq":true,"hairpinMode":true,"logFile":"/var/log/evio-cni.log","logLevel":"debug"}"#,
    );
    // A stale evio config under another name, an unrelated config, and a temp file of a killed run.
    std::fs::write(
        n.conf_dir().join("05-old-evio.conf"),
        r#"{"cniVersion":"0.3.1","name":"x","type":"evio-cni"}"#,
    )
    .unwrap();
    std::fs::write(
        n.conf_dir().join("99-other.conflist"),
        r#"{"name":"o","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    std::fs::write(
        n.conf_dir().join(".evio-tmp-999999999-10-evio.conflist"),
        b"junk",
    )
    .unwrap();

    let o = n
        .cmd(&conf, "node-a", Some(&etcd.endpoint()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let line = ok_json(o);
    assert_eq!(line["node"], "node-a");
    assert_eq!(line["subnet"], "10.244.0.0/24");
    assert_eq!(line["gateway"], "10.244.0.1");
    assert_eq!(line["rangeStart"], "10.244.0.2");
    assert_eq!(line["rangeEnd"], "10.244.0.254");
    assert!(
        stderr.contains("host-local") && stderr.contains("not in"),
        "host-local warning expected: {stderr}"
    );

    let path = n.conf_dir().join("10-evio.conflist");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let l: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // No portmap in the bin dir to ask: the default, 1.0.0.
    assert_eq!(l["cniVersion"], "1.0.0");
    assert_eq!(l["name"], "evio");
    let p = &l["plugins"][0];
    assert_eq!(p["type"], "evio-cni");
    assert_eq!(p["bridge"], "eviobr0");
    assert_eq!(p["ipMasq"], true);
    assert_eq!(p["hairpinMode"], true);
    assert_eq!(p["mtu"], 1420);
    assert_eq!(p["logLevel"], "debug");
    assert_eq!(p["ipam"]["type"], "host-local");
    let range = &p["ipam"]["ranges"][0][0];
    assert_eq!(range["subnet"], "10.244.0.0/24");
    assert_eq!(range["gateway"], "10.244.0.1");
    assert_eq!(range["rangeStart"], "10.244.0.2");
    assert_eq!(range["rangeEnd"], "10.244.0.254");
    assert_eq!(
        l["plugins"][1],
        serde_json::json!({"type":"portmap","capabilities":{"portMappings":true}})
    );

    assert_eq!(
        n.written(),
        vec!["10-evio.conflist", "99-other.conflist", "evio-cni"]
    );
    let plugin = n.bin_dir().join("evio-cni");
    assert_eq!(
        std::fs::metadata(&plugin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read(&plugin).unwrap(),
        std::fs::read(n.dir.path().join("evio-cni-src")).unwrap()
    );

    // Another node, then node-a again (its files gone): it gets its own subnet back.
    let b = ok_json(
        n.cmd(&conf, "node-b", Some(&etcd.endpoint()))
            .output()
            .unwrap(),
    );
    assert_eq!(b["subnet"], "10.244.1.0/24");
    std::fs::remove_file(&path).unwrap();
    let again = ok_json(
        n.cmd(&conf, "node-a", Some(&etcd.endpoint()))
            .output()
            .unwrap(),
    );
    assert_eq!(again, line);

    // A new plugin build replaces the installed one by rename (a running plugin keeps its old inode).
    let ino = std::fs::metadata(&plugin)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let v2 = stub_plugin(&["0.4.0", "1.0.0"]) + "# v2\n";
    std::fs::write(n.dir.path().join("evio-cni-src"), &v2).unwrap();
    ok_json(
        n.cmd(&conf, "node-a", Some(&etcd.endpoint()))
            .output()
            .unwrap(),
    );
    assert_eq!(std::fs::read(&plugin).unwrap(), v2.as_bytes());
    assert_ne!(
        std::fs::metadata(&plugin)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        ino
    );
}

#[test]
fn data_store_is_the_default_and_flags_win() {
    let etcd = Etcd::start();
    let n = Node::new();
    let dead = format!("http://127.0.0.1:{}", evio_testbed::free_port());
    let conf = n.net_conf(&format!(
        r#"{{"podCIDR":"10.50.0.0/16","nodeBits":4,"dataStore":"{}"}}"#,
        etcd.endpoint()
    ));
    let a = ok_json(n.cmd(&conf, "ds-a", None).output().unwrap());
    assert_eq!(a["subnet"], "10.50.0.0/20");
    let conf = n.net_conf(&format!(
        r#"{{"podCIDR":"10.50.0.0/16","nodeBits":4,"dataStore":"{dead}"}}"#
    ));
    let b = ok_json(
        n.cmd(&conf, "ds-b", Some(&etcd.endpoint()))
            .output()
            .unwrap(),
    );
    assert_eq!(b["subnet"], "10.50.16.0/20");
}

/// The conflist's version follows what the chained portmap answers to VERSION; a portmap that cannot answer
/// (or lacks a named version) stops cni-config before anything is claimed or written.
#[test]
fn the_version_follows_the_chained_plugins() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let n = Node::new();
    let portmap = n.bin_dir().join("portmap");
    std::fs::write(&portmap, stub_plugin(&["0.3.0", "0.3.1", "0.4.0"])).unwrap();
    std::fs::set_permissions(&portmap, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = n.net_conf(r#"{"podCIDR":"10.51.0.0/16"}"#);
    let line = ok_json(n.cmd(&conf, "v-a", Some(&ep)).output().unwrap());
    assert_eq!(line["cniVersion"], "0.4.0");
    let l: Value =
        serde_json::from_slice(&std::fs::read(n.conf_dir().join("10-evio.conflist")).unwrap())
            .unwrap();
    assert_eq!(l["cniVersion"], "0.4.0");

    std::fs::remove_file(n.conf_dir().join("10-evio.conflist")).unwrap();
    std::fs::remove_file(n.bin_dir().join("evio-cni")).unwrap();
    let named = n.net_conf(r#"{"podCIDR":"10.51.0.0/16","cniVersion":"1.0.0"}"#);
    let o = n.cmd(&named, "v-b", Some(&ep)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cniVersion 1.0.0") && err.contains("portmap"),
        "{}",
        out_text(&o)
    );
    std::fs::write(&portmap, "#!/bin/sh\necho garbage\n").unwrap();
    let o = n.cmd(&conf, "v-b", Some(&ep)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot ask the portmap plugin"),
        "{}",
        out_text(&o)
    );
    assert_eq!(n.written(), vec!["portmap".to_string()]);
    let (r, s) = store(&etcd);
    let claims = assert_consistent(&r, &s);
    assert_eq!(claims.len(), 1, "only v-a claimed: {claims:?}");
}

#[test]
fn bad_configs_and_unreachable_etcd_write_nothing() {
    let etcd = Etcd::start();
    let n = Node::new();
    let ep = etcd.endpoint();
    for (conf, want) in [
        ("{not json", "not valid JSON"),
        (r#"{"nodeBits":8}"#, "no podCIDR"),
        (r#"{"podCIDR":"10.244.3.0/16","nodeBits":8}"#, "host bits"),
        (
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":"lots"}"#,
            "nodeBits",
        ),
        (
            r#"{"podCIDR":"10.244.0.0/24","nodeBits":8}"#,
            "fewer than 2 host bits",
        ),
        (r#"{"podCIDR":"10.244.0.0/16","mtu":"big"}"#, "mtu"),
    ] {
        let p = n.net_conf(conf);
        let o = n.cmd(&p, "bad", Some(&ep)).output().unwrap();
        assert!(!o.status.success(), "{conf} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{conf}: {err}");
        assert!(o.stdout.is_empty());
        assert!(n.written().is_empty(), "{conf} wrote {:?}", n.written());
    }
    let good = n.net_conf(r#"{"podCIDR":"10.244.0.0/16","nodeBits":8}"#);
    // Bad node name, missing plugin binary, no endpoints.
    let o = n.cmd(&good, "a/b", Some(&ep)).output().unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("invalid node name"),
        "{}",
        out_text(&o)
    );
    let src = n.dir.path().join("evio-cni-src");
    std::fs::rename(&src, n.dir.path().join("moved")).unwrap();
    let o = n.cmd(&good, "x", Some(&ep)).output().unwrap();
    std::fs::rename(n.dir.path().join("moved"), &src).unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("missing"),
        "{}",
        out_text(&o)
    );
    let o = n.cmd(&good, "x", None).output().unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no etcd endpoints"),
        "{}",
        out_text(&o)
    );
    assert!(n.written().is_empty());

    // Unreachable etcd (nothing listening): a clear error within the bound; not even the directories appear.
    std::fs::remove_dir(n.conf_dir()).unwrap();
    std::fs::remove_dir(n.bin_dir()).unwrap();
    let dead = format!("http://127.0.0.1:{}", evio_testbed::free_port());
    let t = Instant::now();
    let o = n
        .cmd(&good, "x", Some(&dead))
        .args(["--etcd-timeout", "1.5"])
        .output()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{}",
        out_text(&o)
    );
    assert!(!n.conf_dir().exists() && !n.bin_dir().exists());
    std::fs::create_dir(n.conf_dir()).unwrap();
    std::fs::create_dir(n.bin_dir()).unwrap();
    // A frozen etcd (accepts nothing, answers nothing): the same.
    etcd.freeze();
    let t = Instant::now();
    let o = n
        .cmd(&good, "x", Some(&ep))
        .args(["--etcd-timeout", "1"])
        .output()
        .unwrap();
    let took = t.elapsed();
    etcd.thaw();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{}",
        out_text(&o)
    );
    assert!(n.written().is_empty(), "{:?}", n.written());
    let (r, s) = store(&etcd);
    assert!(assert_consistent(&r, &s).is_empty());
}

#[test]
fn exhausted_pool_is_refused_and_release_frees_a_subnet() {
    let etcd = Etcd::start();
    let n = Node::new();
    let ep = etcd.endpoint();
    let conf = n.net_conf(r#"{"podCIDR":"10.60.0.0/24","nodeBits":1}"#);
    assert_eq!(
        ok_json(n.cmd(&conf, "e1", Some(&ep)).output().unwrap())["subnet"],
        "10.60.0.0/25"
    );
    assert_eq!(
        ok_json(n.cmd(&conf, "e2", Some(&ep)).output().unwrap())["subnet"],
        "10.60.0.128/25"
    );
    let n3 = Node::new();
    let conf3 = n3.net_conf(r#"{"podCIDR":"10.60.0.0/24","nodeBits":1}"#);
    let o = n3.cmd(&conf3, "e3", Some(&ep)).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exhausted") && err.contains("2 nodes"),
        "{err}"
    );
    assert!(n3.written().is_empty());

    // e1's agent is alive: release refuses unless --force.
    let (r, s) = store(&etcd);
    let reg = r
        .block_on(s.register(NodeRecord::new("e1"), Duration::from_secs(30)))
        .unwrap();
    let rel = |node: &str, force: bool| {
        let mut c = Command::new(EVIOCTL);
        c.args(["release", node, "--etcd-endpoints", &ep]);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let o = rel("e1", false);
    assert!(!o.status.success(), "{}", out_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("alive"),
        "{}",
        out_text(&o)
    );
    assert!(r.block_on(s.subnet_of("e1")).unwrap().is_some());

    // nodes --json shows the claims and who is alive.
    let o = Command::new(EVIOCTL)
        .args(["nodes", "--json", "--etcd-endpoints", &ep])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["node"], "e1");
    assert_eq!(rows[0]["subnet"], "10.60.0.0/25");
    assert_eq!(rows[0]["alive"], true);
    assert!(rows[0]["since"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(rows[1]["node"], "e2");
    assert_eq!(rows[1]["alive"], false);
    let o = Command::new(EVIOCTL)
        .args(["nodes", "--etcd-endpoints", &ep])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("e1") && table.contains("10.60.0.128/25") && table.contains("yes"),
        "{table}"
    );

    // e2 is not registered: released; then e3 gets its subnet.
    let o = rel("e2", false);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("10.60.0.128/25"));
    assert_eq!(
        ok_json(n3.cmd(&conf3, "e3", Some(&ep)).output().unwrap())["subnet"],
        "10.60.0.128/25"
    );
    // --force frees a live node's claim.
    let o = rel("e1", true);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(r.block_on(s.subnet_of("e1")).unwrap().is_none());
    r.block_on(reg.revoke()).unwrap();
    assert_consistent(&r, &s);
}

/// Claimers killed at random moments never leave half a claim; finishing them all afterwards gives every node
/// one distinct subnet.
#[test]
fn killed_claimers_leave_no_half_claims() {
    let mut etcd = Etcd::start();
    let n = Node::new();
    let ep = etcd.endpoint();
    let conf = n.net_conf(r#"{"podCIDR":"10.70.0.0/16","nodeBits":8}"#);
    let (mut r, mut s) = store(&etcd);
    let mut seed = std::process::id() as u64
        ^ Instant::now().elapsed().as_nanos() as u64
        ^ 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let nodes: Vec<String> = (0..48).map(|i| format!("k{i}")).collect();
    // Kill moments are spread over twice the time one claimer takes alone on this machine (48 at once take
    // longer), so kills land before, during and after the claim whether the machine is idle or loaded.
    let t0 = Instant::now();
    ok_json(n.cmd(&conf, &nodes[0], Some(&ep)).output().unwrap());
    let window = (2 * t0.elapsed().as_millis() as u64).max(5);
    let mut killed = 0;
    for round in 0..3 {
        let mut kids = Vec::new();
        for node in &nodes {
            let child = n
                .cmd(&conf, node, Some(&ep))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            kids.push((child, Duration::from_millis(rnd(window))));
        }
        let start = Instant::now();
        for (mut c, at) in kids {
            if let Some(left) = at.checked_sub(start.elapsed()) {
                std::thread::sleep(left);
            }
            if c.try_wait().unwrap().is_none() {
                c.kill().unwrap();
                killed += 1;
            }
            c.wait().unwrap();
        }
        let claims = assert_consistent(&r, &s);
        eprintln!(
            "round {round}: {} claims, {killed} kills so far",
            claims.len()
        );
        if round == 1 {
            // etcd restarted mid-run keeps every claim.
            etcd.restart();
            let (r2, s2) = store(&etcd);
            let mut after = assert_consistent(&r2, &s2);
            let mut before = claims;
            before.sort_by_key(|c| c.node.clone());
            after.sort_by_key(|c| c.node.clone());
            assert_eq!(before, after);
            (r, s) = (r2, s2);
        }
    }
    assert!(
        killed > 0,
        "no claimer was killed mid-run; the test proved nothing"
    );
    // Finish every node; each gets exactly one subnet, all distinct.
    let mut subnets = HashSet::new();
    for node in &nodes {
        let v = ok_json(n.cmd(&conf, node, Some(&ep)).output().unwrap());
        assert!(subnets.insert(v["subnet"].as_str().unwrap().to_string()));
    }
    let claims = assert_consistent(&r, &s);
    assert_eq!(claims.len(), nodes.len());
}
