//! evio-cni end to end with the real host-local IPAM, in throw-away node and pod namespaces (root).

use std::path::Path;
use std::thread;

use evio_testbed::Netns;
use evio_testbed::cni::CniSandbox;
use serde_json::{Value, json};

const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn sandbox(extra: Value) -> CniSandbox {
    CniSandbox::new(Path::new(env!("CARGO_BIN_EXE_evio-cni")), extra)
}

fn pod_ip(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().unwrap();
    a.split('/').next().unwrap().to_string()
}

fn ping(ns: &Netns, ip: &str) -> bool {
    ns.exec(&["ping", "-c1", "-W2", ip]).status.success()
}

/// Every verb in one version: ADD (result shape), CHECK, STATUS, GC, DEL, VERSION.
fn all_verbs(version: &str) {
    let sb = sandbox(
        json!({"ipMasq": true, "mtu": 1400, "hairpinMode": true, "podCIDR": "10.244.0.0/16"}),
    );
    let conf = sb.conf(version);
    let pod = sb.pod();
    let cid = sb.cid();
    let r = sb.add(&pod, &cid, version);
    assert_eq!(r["cniVersion"], version);
    let ip0 = &r["ips"][0];
    assert_eq!(
        ip0.get("version").is_some(),
        version.starts_with("0."),
        "{r}"
    );
    assert_eq!(ip0["gateway"], "10.244.3.1");
    assert_eq!(ip0["interface"], 2);
    assert_eq!(r["interfaces"][0]["name"], "eviobr0");
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(
        r["interfaces"][2]["sandbox"],
        pod.path().display().to_string()
    );
    assert_eq!(r["interfaces"][2].get("mtu").is_some(), version == "1.1.0");
    assert!(
        r["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["dst"] == "0.0.0.0/0")
    );
    let ip = pod_ip(&r);
    assert!(ping(&pod, "10.244.3.1"), "pod reaches the gateway");
    assert!(ping(&sb.node, &ip), "node reaches the pod");
    assert!(
        pod.exec_ok(&["ip", "link", "show", "eth0"])
            .contains("mtu 1400")
    );
    let veth = r["interfaces"][1]["name"].as_str().unwrap().to_string();
    assert!(
        sb.node
            .exec_ok(&["ip", "-d", "link", "show", &veth])
            .contains("hairpin on")
    );
    assert_eq!(
        sb.node
            .exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .trim(),
        "1"
    );
    assert_eq!(sb.reservations(), vec![ip.clone()]);
    assert_eq!(sb.nft_pod_entries().len(), 1);

    // CHECK against prevResult (0.4.0+); older versions do not have CHECK.
    let mut cconf = conf.clone();
    cconf["prevResult"] = r.clone();
    let netns = pod.path().display().to_string();
    let out = sb.run("CHECK", &cid, &netns, "eth0", &cconf, &[]);
    if version.starts_with("0.3") {
        assert_eq!(out.code(), 1);
    } else {
        assert!(
            out.ok && out.stdout.is_empty(),
            "CHECK: {out:?}\n{}",
            sb.log()
        );
        // CHECK notices a missing address.
        pod.exec_ok(&["ip", "addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
        assert_eq!(
            sb.run("CHECK", &cid, &netns, "eth0", &cconf, &[]).code(),
            102
        );
        pod.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        pod.exec_ok(&["ip", "route", "replace", "default", "via", "10.244.3.1"]);
    }

    // STATUS and GC exist from 1.1.0 on.
    let out = sb.run("STATUS", "", "", "", &conf, &[]);
    if version == "1.1.0" {
        assert!(out.ok && out.stdout.is_empty(), "STATUS: {out:?}");
        // A second attachment that GC must remove, keeping the first.
        let pod2 = sb.pod();
        let cid2 = sb.cid();
        sb.add(&pod2, &cid2, version);
        assert_eq!(sb.reservations().len(), 2);
        let mut g = conf.clone();
        g["cni.dev/valid-attachments"] = json!([{"containerID": cid, "ifname": "eth0"}]);
        let out = sb.run("GC", "", "", "", &g, &[]);
        assert!(out.ok, "GC: {out:?}\n{}", sb.log());
        assert_eq!(
            sb.reservations(),
            vec![ip.clone()],
            "GC released only the stale address"
        );
        assert_eq!(sb.veths(), vec![veth.clone()]);
        let entries = sb.nft_pod_entries();
        assert!(
            entries.len() == 1
                && entries[0].contains(&format!("\"{ip}\""))
                && entries[0].contains(cid.as_str()),
            "only the valid attachment's masquerade entry is left: {entries:?}"
        );
        assert_eq!(
            sb.state_files(),
            vec![format!("{cid}-eth0.json")],
            "GC removed only the stale attachment's state"
        );
        assert!(
            !pod2.links().contains(&"eth0".to_string()),
            "the stale pod interface went with its host veth"
        );
        assert!(
            ping(&pod, "10.244.3.1"),
            "the valid attachment still works after GC"
        );
    } else {
        assert_eq!(out.code(), 1);
        assert_eq!(sb.run("GC", "", "", "", &conf, &[]).code(), 1);
    }

    sb.del(&netns, &cid, version);
    sb.assert_clean();

    let v = sb.run_raw(
        &[("CNI_COMMAND", Some("VERSION"))],
        json!({"cniVersion": version}).to_string().as_bytes(),
    );
    assert!(v.ok);
    assert_eq!(v.json()["cniVersion"], version);
    assert_eq!(v.json()["supportedVersions"], json!(VERSIONS));
}

#[test]
fn verbs_0_3_0() {
    all_verbs("0.3.0");
}
#[test]
fn verbs_0_3_1() {
    all_verbs("0.3.1");
}
#[test]
fn verbs_0_4_0() {
    all_verbs("0.4.0");
}
#[test]
fn verbs_1_0_0() {
    all_verbs("1.0.0");
}
#[test]
fn verbs_1_1_0() {
    all_verbs("1.1.0");
}

#[test]
fn version_without_config() {
    let sb = sandbox(json!({}));
    let v = sb.run_raw(&[("CNI_COMMAND", Some("VERSION"))], b"");
    assert!(v.ok, "{v:?}");
    assert_eq!(v.json()["cniVersion"], "1.1.0");
}

#[test]
fn del_cases() {
    let sb = sandbox(json!({"ipMasq": true}));
    let v = "1.0.0";
    // No prior ADD, with and without a netns.
    let pod = sb.pod();
    let netns = pod.path().display().to_string();
    sb.del(&netns, "never-added", v);
    sb.del("", "never-added", v);

    // Empty CNI_NETNS (containerd), with the netns still alive.
    let cid = sb.cid();
    sb.add(&pod, &cid, v);
    sb.del("", &cid, v);
    sb.assert_clean();
    assert!(
        !pod.links().contains(&"eth0".to_string()),
        "the pod side went with the host veth"
    );

    // Netns gone.
    let pod2 = sb.pod();
    let cid2 = sb.cid();
    let netns2 = pod2.path().display().to_string();
    sb.add(&pod2, &cid2, v);
    drop(pod2);
    sb.del(&netns2, &cid2, v);
    sb.assert_clean();

    // veth removed by hand, then DEL twice.
    let pod3 = sb.pod();
    let cid3 = sb.cid();
    let netns3 = pod3.path().display().to_string();
    let r = sb.add(&pod3, &cid3, v);
    let veth = r["interfaces"][1]["name"].as_str().unwrap();
    sb.node.exec_ok(&["ip", "link", "del", veth]);
    sb.del(&netns3, &cid3, v);
    sb.del(&netns3, &cid3, v);
    sb.assert_clean();

    // State lost (e.g. a wiped state dir) and empty CNI_NETNS: the owner tags still find everything.
    let cid4 = sb.cid();
    sb.add(&pod3, &cid4, v);
    std::fs::remove_dir_all(sb.state_dir().join(&sb.name)).unwrap();
    sb.del("", &cid4, v);
    sb.assert_clean();
}

#[test]
fn rollback_after_each_step() {
    let sb = sandbox(json!({"ipMasq": true, "hairpinMode": true}));
    let pod = sb.pod();
    let netns = pod.path().display().to_string();
    sb.fail_add_after_each_step(&pod, || sb.assert_clean());
    // And a real ADD still works afterwards.
    let cid = sb.cid();
    let r = sb.add(&pod, &cid, "1.1.0");
    assert!(ping(&pod, "10.244.3.1"));
    assert_eq!(sb.reservations(), vec![pod_ip(&r)]);
    sb.del(&netns, &cid, "1.1.0");
    sb.assert_clean();
}

#[test]
fn concurrent_adds_and_dels() {
    const N: usize = 24;
    let sb = sandbox(json!({"ipMasq": true}));
    let pods: Vec<Netns> = (0..N).map(|_| sb.pod()).collect();
    let cids: Vec<String> = (0..N).map(|_| sb.cid()).collect();
    let results: Vec<Value> = thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .zip(&cids)
            .map(|(p, c)| s.spawn(|| sb.add(p, c, "1.1.0")))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = results.iter().map(pod_ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), N, "distinct addresses");
    assert_eq!(sb.reservations().len(), N);
    assert_eq!(sb.veths().len(), N);
    assert_eq!(sb.nft_pod_entries().len(), N);
    let gw = sb.node.exec_ok(&["ip", "-br", "addr", "show", "eviobr0"]);
    assert_eq!(
        gw.matches("10.244.3.1/24").count(),
        1,
        "one gateway address: {gw}"
    );
    for ip in &ips {
        assert!(ping(&sb.node, ip), "node reaches {ip}");
    }
    // Pod to pod across the bridge (results are in the order of `pods`, so this is never a self-ping).
    let (ip0, ip_last) = (pod_ip(&results[0]), pod_ip(&results[N - 1]));
    assert_ne!(ip0, ip_last);
    assert!(ping(&pods[0], &ip_last), "pod {ip0} reaches pod {ip_last}");
    thread::scope(|s| {
        for (p, c) in pods.iter().zip(&cids) {
            let netns = p.path().display().to_string();
            let sb = &sb;
            s.spawn(move || sb.del(&netns, c, "1.1.0"));
        }
    });
    sb.assert_clean();
}

#[test]
fn bad_input_creates_nothing() {
    let sb = sandbox(json!({}));
    let pod = sb.pod();
    let netns = pod.path().display().to_string();
    let path = sb.cni_path();
    let good = sb.conf("1.0.0");
    let full_env = |cmd: &'static str| -> Vec<(&'static str, Option<String>)> {
        vec![
            ("CNI_COMMAND", Some(cmd.to_string())),
            ("CNI_CONTAINERID", Some("bad1".into())),
            ("CNI_NETNS", Some(netns.clone())),
            ("CNI_IFNAME", Some("eth0".into())),
            ("CNI_PATH", Some(path.clone())),
        ]
    };
    let run = |env: &[(&'static str, Option<String>)], stdin: &[u8]| {
        let e: Vec<(&str, Option<&str>)> = env.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        sb.run_raw(&e, stdin)
    };
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string().into_bytes()
    };
    type Case = (
        &'static str,
        Vec<(&'static str, Option<String>)>,
        Vec<u8>,
        u64,
    );
    let mut cases: Vec<Case> = vec![
        ("garbage JSON", full_env("ADD"), b"{not json".to_vec(), 6),
        ("empty stdin", full_env("ADD"), Vec::new(), 6),
        (
            "unknown version",
            full_env("ADD"),
            with("cniVersion", json!("0.2.0")),
            1,
        ),
        (
            "future version",
            full_env("ADD"),
            with("cniVersion", json!("9.0.0")),
            1,
        ),
        (
            "path in ipam type",
            full_env("ADD"),
            {
                let mut c = good.clone();
                c["ipam"]["type"] = json!("/usr/lib/cni/host-local");
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "dotdot ipam type",
            full_env("ADD"),
            {
                let mut c = good.clone();
                c["ipam"]["type"] = json!("../cni/host-local");
                c.to_string().into_bytes()
            },
            7,
        ),
        (
            "bridge name over 15",
            full_env("ADD"),
            with("bridge", json!("abcdefghijklmnop")),
            7,
        ),
        (
            "bad podCIDR",
            full_env("ADD"),
            with("podCIDR", json!("10.244.0.0/40")),
            7,
        ),
        (
            "bad ipam subnet",
            full_env("ADD"),
            {
                let mut c = good.clone();
                c["ipam"]["subnet"] = json!("10.244.3.0/99");
                c.to_string().into_bytes()
            },
            7,
        ),
        ("bad mtu", full_env("ADD"), with("mtu", json!(-5)), 7),
        (
            "bad bridgeType",
            full_env("ADD"),
            with("bridgeType", json!("xdp")),
            7,
        ),
        ("no ipam", full_env("ADD"), with("ipam", json!({})), 7),
        (
            "unknown command",
            full_env("FROB"),
            good.to_string().into_bytes(),
            4,
        ),
        (
            "ipam not on CNI_PATH",
            full_env("ADD"),
            {
                let mut c = good.clone();
                c["ipam"]["type"] = json!("no-such-ipam");
                c.to_string().into_bytes()
            },
            5,
        ),
    ];
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
    ] {
        let env: Vec<_> = full_env("ADD")
            .into_iter()
            .filter(|(k, _)| *k != var)
            .collect();
        cases.push(("missing env", env, good.to_string().into_bytes(), 4));
    }
    let mut bad_ns = full_env("ADD");
    bad_ns[2].1 = Some("/run/netns/evio-no-such-netns".into());
    cases.push((
        "netns does not exist",
        bad_ns,
        good.to_string().into_bytes(),
        4,
    ));
    let mut bad_args = full_env("ADD");
    bad_args.push(("CNI_ARGS", Some("novalue".into())));
    cases.push((
        "malformed CNI_ARGS",
        bad_args,
        good.to_string().into_bytes(),
        4,
    ));
    for (what, env, stdin, code) in cases {
        let out = run(&env, &stdin);
        assert_eq!(out.code(), code, "{what}: {out:?}");
        assert_eq!(
            out.stdout.lines().count(),
            1,
            "{what}: exactly one JSON object: {out:?}"
        );
        assert_eq!(
            sb.node.links(),
            vec!["lo".to_string()],
            "{what}: nothing created in the node"
        );
        sb.assert_clean();
    }
    // CNI_IFNAME already in the pod: ADD fails before touching anything.
    pod.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    let out = sb.run("ADD", "bad2", &netns, "eth0", &good, &[]);
    assert_eq!(out.code(), 100, "{out:?}");
    assert_eq!(sb.node.links(), vec!["lo".to_string()]);
    sb.assert_clean();
}

#[test]
fn masquerade_only_when_leaving_the_cluster() {
    let sb = sandbox(json!({"ipMasq": true, "podCIDR": "10.244.0.0/16"}));
    // An "outside" netns on a link from the node: a public-looking address and a remote pod subnet address.
    let outside = Netns::new("co");
    sb.node.veth_to("up0", &outside, "eth0");
    sb.node
        .exec_ok(&["ip", "addr", "add", "198.51.100.1/24", "dev", "up0"]);
    sb.node
        .exec_ok(&["ip", "route", "add", "10.244.7.0/24", "dev", "up0"]);
    outside.exec_ok(&["ip", "addr", "add", "198.51.100.2/24", "dev", "eth0"]);
    outside.exec_ok(&["ip", "addr", "add", "10.244.7.5/24", "dev", "eth0"]);
    outside.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.3.0/24",
        "via",
        "198.51.100.1",
        "src",
        "10.244.7.5",
    ]);
    // A UDP echo of the sender's address, as seen by the outside.
    let mut server = outside
        .command("socat")
        .args([
            "UDP4-RECVFROM:9999,fork",
            "SYSTEM:read x; echo $SOCAT_PEERADDR",
        ])
        .spawn()
        .unwrap();
    let pod = sb.pod();
    let cid = sb.cid();
    let r = sb.add(&pod, &cid, "1.1.0");
    let ip = pod_ip(&r);
    let seen = |dst: &str| -> String {
        for _ in 0..20 {
            let out = pod.exec(&[
                "sh",
                "-c",
                &format!("echo hi | socat -T1 - UDP4:{dst}:9999"),
            ]);
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !s.is_empty() {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = pod.exec(&[
            "sh",
            "-c",
            &format!("echo hi | socat -T1 - UDP4:{dst}:9999"),
        ]);
        panic!(
            "no answer from {dst}: {out:?}\nnode: {}\nroutes: {}",
            sb.node.exec_ok(&["nft", "list", "ruleset"]),
            pod.exec_ok(&["ip", "route"])
        );
    };
    assert_eq!(
        seen("198.51.100.2"),
        "198.51.100.1",
        "leaving the cluster: the node's address"
    );
    assert_eq!(
        seen("10.244.7.5"),
        ip,
        "to the pod CIDR: the pod's own address"
    );
    sb.del(&pod.path().display().to_string(), &cid, "1.1.0");
    sb.assert_clean();
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn ovs_without_ovsdb_fails_cleanly() {
    // OVS asked for but no OVSDB there: ADD fails with an error object and creates nothing.
    let sb = sandbox(json!({"bridgeType": "OVS", "ovsdbSocket": "/nonexistent/db.sock"}));
    let pod = sb.pod();
    let out = sb.run(
        "ADD",
        "ovs1",
        &pod.path().display().to_string(),
        "eth0",
        &sb.conf("1.0.0"),
        &[],
    );
    assert!(!out.ok, "{out:?}");
    sb.assert_clean();
}

#[test]
fn gratuitous_arp_updates_a_stale_neighbour() {
    let sb = sandbox(json!({}));
    let a = sb.pod();
    let ra = sb.add(&a, &sb.cid(), "1.0.0");
    assert_eq!(pod_ip(&ra), "10.244.3.2");
    // The node remembers 10.244.3.3 at an old MAC (a pod that had the address before).
    sb.node.exec_ok(&[
        "ip",
        "neigh",
        "replace",
        "10.244.3.3",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eviobr0",
        "nud",
        "stale",
    ]);
    let b = sb.pod();
    let rb = sb.add(&b, &sb.cid(), "1.0.0");
    assert_eq!(pod_ip(&rb), "10.244.3.3");
    let mac = rb["interfaces"][2]["mac"].as_str().unwrap().to_string();
    let updated = evio_testbed::wait_until(std::time::Duration::from_secs(3), || {
        sb.node
            .exec_ok(&["ip", "neigh", "show", "10.244.3.3", "dev", "eviobr0"])
            .contains(&mac)
    });
    assert!(
        updated,
        "{}",
        sb.node.exec_ok(&["ip", "neigh", "show", "dev", "eviobr0"])
    );
    assert_eq!(
        b.exec_ok(&["sysctl", "-n", "net.ipv4.conf.eth0.arp_notify"])
            .trim(),
        "1"
    );
}

#[test]
fn dual_stack() {
    let sb = sandbox(json!({"ipMasq": true}));
    let mut conf = sb.conf("1.1.0");
    conf["ipam"] = json!({
        "type": "host-local",
        "dataDir": sb.ipam_dir(),
        "ranges": [[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:3::/64"}]],
    });
    let pod = sb.pod();
    let netns = pod.path().display().to_string();
    let out = sb.run("ADD", "ds1", &netns, "eth0", &conf, &[]);
    assert!(out.ok, "{out:?}\n{}", sb.log());
    let r = out.json();
    let ips: Vec<&str> = r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(ips, vec!["10.244.3.2/24", "fd00:3::2/64"], "{r}");
    let routes: Vec<&str> = r["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["dst"].as_str().unwrap())
        .collect();
    assert!(
        routes.contains(&"0.0.0.0/0") && routes.contains(&"::/0"),
        "{r}"
    );
    assert!(ping(&pod, "10.244.3.1"));
    let out = pod.exec(&["ping", "-6", "-c1", "-W3", "fd00:3::1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(sb.nft_pod_entries().len(), 2);
    let mut cconf = conf.clone();
    cconf["prevResult"] = r.clone();
    let c = sb.run("CHECK", "ds1", &netns, "eth0", &cconf, &[]);
    assert!(c.ok, "{c:?}\n{}", sb.log());
    let d = sb.run("DEL", "ds1", &netns, "eth0", &conf, &[]);
    assert!(d.ok, "{d:?}");
    sb.assert_clean();
}

/// The rollback and bad-input checks on the dual-stack path (issue 15): every ADD step failing in turn
/// leaves no veth, reservation (of either family), masquerade entry (pods4 or pods6) or state; a bad IPv6
/// range creates nothing; and a real dual-stack ADD still works afterwards.
#[test]
fn dual_stack_rollback_and_bad_input() {
    let mut sb = sandbox(json!({"ipMasq": true}));
    let ranges = json!([[{"subnet": "10.244.3.0/24"}], [{"subnet": "fd00:3::/64"}]]);
    sb.extra["ipam"] = json!({"type": "host-local", "dataDir": sb.ipam_dir(), "ranges": ranges});
    let pod = sb.pod();
    let netns = pod.path().display().to_string();
    sb.fail_add_after_each_step(&pod, || sb.assert_clean());
    let mut bad = sb.conf("1.1.0");
    bad["ipam"]["ranges"][1][0]["subnet"] = json!("fd00:3::/129");
    let out = sb.run("ADD", &sb.cid(), &netns, "eth0", &bad, &[]);
    assert!(!out.ok, "{out:?}");
    sb.assert_clean();
    let cid = sb.cid();
    let r = sb.add(&pod, &cid, "1.1.0");
    assert_eq!(r["ips"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(sb.nft_pod_entries().len(), 2);
    sb.del(&netns, &cid, "1.1.0");
    sb.assert_clean();
}

#[test]
fn status_and_gc_errors() {
    let sb = sandbox(json!({}));
    let mut conf = sb.conf("1.1.0");
    conf["ipam"]["type"] = json!("no-such-ipam");
    let out = sb.run("STATUS", "", "", "", &conf, &[]);
    assert_eq!(out.code(), 50, "{out:?}");
    // GC without the list of valid attachments would remove everything: refused.
    let out = sb.run("GC", "", "", "", &sb.conf("1.1.0"), &[]);
    assert_eq!(out.code(), 7, "{out:?}");
    // CHECK without prevResult.
    let pod = sb.pod();
    let out = sb.run(
        "CHECK",
        "x",
        &pod.path().display().to_string(),
        "eth0",
        &sb.conf("1.0.0"),
        &[],
    );
    assert_eq!(out.code(), 7, "{out:?}");
}

#[test]
fn concurrent_adds_while_others_are_deleted() {
    const N: usize = 10;
    let sb = sandbox(json!({"ipMasq": true}));
    let old: Vec<(Netns, String)> = (0..N).map(|_| (sb.pod(), sb.cid())).collect();
    for (p, c) in &old {
        sb.add(p, c, "1.1.0");
    }
    let new: Vec<(Netns, String)> = (0..N).map(|_| (sb.pod(), sb.cid())).collect();
    let results: Vec<Value> = thread::scope(|s| {
        for (p, c) in &old {
            let netns = p.path().display().to_string();
            let sb = &sb;
            s.spawn(move || sb.del(&netns, c, "1.1.0"));
        }
        let hs: Vec<_> = new
            .iter()
            .map(|(p, c)| s.spawn(|| sb.add(p, c, "1.1.0")))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sb.reservations().len(), N);
    assert_eq!(sb.veths().len(), N);
    assert_eq!(sb.nft_pod_entries().len(), N);
    assert_eq!(sb.state_files().len(), N);
    let entries = sb.nft_pod_entries();
    for (r, (_, c)) in results.iter().zip(&new) {
        assert!(ping(&sb.node, &pod_ip(r)), "{r}");
        let ip = format!("\"{}\"", pod_ip(r));
        assert!(
            entries
                .iter()
                .any(|e| e.contains(&ip) && e.contains(c.as_str())),
            "{ip} {c}: {entries:?}"
        );
    }
    for (p, c) in &new {
        sb.del(&p.path().display().to_string(), c, "1.1.0");
    }
    sb.assert_clean();
}
