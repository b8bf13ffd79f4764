//! A node speaks only for itself (docs/security.md): an impostor agent with a live node's name is refused,
//! and forged records and claims written straight into etcd become no peer and no route on any host. Real
//! agents in network namespaces, real etcd.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use common::Cluster;
use evio_testbed::wait_until;

const POD_CIDR: &str = "10.244.0.0/16";

/// Prefixes routed through evio0 in the host's namespace, except the overlay's connected route.
fn tunnel_routes(h: &common::Host) -> BTreeSet<String> {
    h.tun_routes()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|p| p != "10.10.0.0/16")
        .collect()
}

fn key(i: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([i; 32])
}

/// Writes a claim the way evio-store does (the same value under both index keys).
fn claim(c: &Cluster, node: &str, address: Option<&str>, subnet: Option<&str>) {
    if let Some(a) = address {
        let v = format!(r#"{{"node":"{node}","address":"{a}","since":1}}"#);
        c.etcdctl(&["put", &format!("/evio/v1/addresses/by-address/{a}"), &v]);
        c.etcdctl(&["put", &format!("/evio/v1/addresses/by-node/{node}"), &v]);
    }
    if let Some(s) = subnet {
        let v = format!(r#"{{"node":"{node}","subnet":"{s}","since":1}}"#);
        let seg = s.replace('/', "-");
        c.etcdctl(&["put", &format!("/evio/v1/subnets/by-subnet/{seg}"), &v]);
        c.etcdctl(&["put", &format!("/evio/v1/subnets/by-node/{node}"), &v]);
    }
}

/// A registration record written straight into etcd (no lease).
fn record(c: &Cluster, key_name: &str, node: &str, k: u8, extra: &str) {
    let v = format!(
        r#"{{"node":"{node}","publicKey":"{}","endpoints":["10.99.0.200:51820"],"listenPort":51820{extra}}}"#,
        key(k)
    );
    c.etcdctl(&["put", &format!("/evio/v1/nodes/{key_name}"), &v]);
}

/// Two agents with host-1's pod subnet claimed; `pod_cidr[i]` says whether host i gets `--pod-cidr`.
fn two_hosts(pod_cidr: [bool; 2], spare: usize) -> Cluster {
    let mut c = Cluster::new(2 + spare);
    for (i, on) in pod_cidr.iter().enumerate() {
        if *on {
            c.hosts[i].extra = vec!["--pod-cidr".into(), POD_CIDR.into()];
        }
    }
    c.start(0);
    c.start(1);
    assert!(
        wait_until(Duration::from_secs(20), || c.hosts[..2]
            .iter()
            .all(|h| h.peers_with_path("direct") == 1)),
        "no mesh:\n{}",
        c.logs()
    );
    claim(&c, "host-1", None, Some("10.244.1.0/24"));
    assert!(
        wait_until(Duration::from_secs(10), || tunnel_routes(&c.hosts[1])
            .contains("10.244.1.0/24")),
        "host-2 has no route to host-1's pods:\n{}",
        c.logs()
    );
    c
}

#[test]
fn an_impostor_with_a_live_name_is_refused() {
    let c = two_hosts([true, true], 1);
    let (victim, other, imp) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);
    let vip = victim.vip();
    let victim_key = victim.status().unwrap()["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    victim.enable_forwarding();
    let pod = victim.add_pod("10.244.1.2", "10.244.1.1", 24);
    assert!(other.ping_until(&vip, Duration::from_secs(5)));
    assert!(other.ping_until(&pod.ip, Duration::from_secs(5)));

    // Another agent (its own state dir, so its own key) started with host-1's name, asking for another VIP
    // (which would move host-1's address claim).
    let log = c.dir.path().join("impostor.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut impostor = imp
        .ns
        .command(common::eviod())
        .args(["--node-name", "host-1", "--etcd-endpoints", &c.etcd_url()])
        .arg("--state-dir")
        .arg(&imp.state_dir)
        .args(["--listen-port", "51820", "--address", "10.10.0.200"])
        .args(["--pod-cidr", POD_CIDR])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(15), || text()
            .contains("registered with another public key")),
        "impostor not refused:\n{}",
        text()
    );
    // It waits (an operator sees why) and claims nothing: host-1's record, VIP and subnet are untouched.
    std::thread::sleep(Duration::from_secs(3));
    assert!(impostor.try_wait().unwrap().is_none(), "{}", text());
    let rec = c.etcdctl(&["get", "--print-value-only", "/evio/v1/nodes/host-1"]);
    assert!(rec.contains(&victim_key), "{rec}");
    let a = c.etcdctl(&[
        "get",
        "--print-value-only",
        "/evio/v1/addresses/by-node/host-1",
    ]);
    assert!(a.contains(&format!("\"{vip}\"")), "{a}");
    assert!(
        c.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            "/evio/v1/addresses/by-address/10.10.0.200"
        ])
        .trim()
        .is_empty()
    );
    assert!(other.ping(&vip), "{}", c.logs());
    assert!(other.ping(&pod.ip), "{}", c.logs());
    assert_eq!(other.peer_names(), BTreeSet::from(["host-1".to_string()]));

    // The name is free again only when host-1's registration ends: killed (no revoke), its lease expires
    // after the TTL and the waiting agent takes the name over (what a reinstalled node with a new key
    // does), with the VIP it asked for.
    let mut c = c;
    c.hosts[0].kill9();
    let t = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let rec = c.etcdctl(&["get", "--print-value-only", "/evio/v1/nodes/host-1"]);
            !rec.trim().is_empty() && !rec.contains(&victim_key)
        }),
        "the name was not taken over:\n{}",
        text()
    );
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "taken over before the lease expired"
    );
    assert!(
        c.hosts[1].ping_until("10.10.0.200", Duration::from_secs(15)),
        "{}\n{}",
        text(),
        c.logs()
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
}

#[test]
fn forged_records_and_claims_become_no_peer_and_no_route() {
    // host-1 knows the pod CIDR; host-2 does not (the rules without --pod-cidr).
    let c = two_hosts([true, false], 0);
    let vip1 = c.hosts[0].vip();

    // A record under one name speaking for another (claims exist for both names).
    record(&c, "alias", "host-9", 10, "");
    claim(&c, "host-9", Some("10.10.0.91"), Some("10.244.91.0/24"));
    claim(&c, "alias", Some("10.10.0.90"), Some("10.244.90.0/24"));
    // The whole address space.
    record(&c, "world", "world", 11, "");
    claim(&c, "world", Some("10.10.0.92"), Some("0.0.0.0/0"));
    // A /32 of the etcd server.
    record(&c, "etcd", "etcd", 12, "");
    claim(&c, "etcd", Some("10.10.0.93"), Some("10.99.0.254/32"));
    // An overlap with host-1's subnet.
    record(&c, "overlap", "overlap", 13, "");
    claim(&c, "overlap", Some("10.10.0.94"), Some("10.244.1.128/25"));
    // Self-declared prefixes, no claim.
    record(
        &c,
        "noclaim",
        "noclaim",
        14,
        r#","address":"10.10.0.95","podSubnet":"10.244.95.0/24""#,
    );
    // Claims under the by-node keys only (the by-item keys were never created).
    record(&c, "lonely", "lonely", 15, "");
    c.etcdctl(&[
        "put",
        "/evio/v1/addresses/by-node/lonely",
        r#"{"node":"lonely","address":"10.10.0.96"}"#,
    ]);
    c.etcdctl(&[
        "put",
        "/evio/v1/subnets/by-node/lonely",
        r#"{"node":"lonely","subnet":"10.244.96.0/24"}"#,
    ]);
    // host-1's VIP, claimed under another node's key (its by-address key holds host-1's claim).
    record(&c, "stolen", "stolen", 16, "");
    c.etcdctl(&[
        "put",
        "/evio/v1/addresses/by-node/stolen",
        &format!(r#"{{"node":"stolen","address":"{vip1}"}}"#),
    ]);
    // Outside the pod CIDR: refused where the pod CIDR is known, accepted where it is not.
    record(&c, "outside", "outside", 17, "");
    claim(&c, "outside", Some("10.10.0.97"), Some("172.20.0.0/24"));
    // A well-formed one, accepted everywhere: shows the forgeries above were seen and judged.
    record(&c, "good", "good", 18, "");
    claim(&c, "good", Some("10.10.0.98"), Some("10.244.98.0/24"));

    let want1: BTreeSet<String> = ["host-2", "good"].map(String::from).into();
    let want2: BTreeSet<String> = ["host-1", "good", "outside"].map(String::from).into();
    assert!(
        wait_until(Duration::from_secs(15), || c.hosts[0].peer_names() == want1
            && c.hosts[1].peer_names() == want2),
        "peers {:?} {:?}:\n{}",
        c.hosts[0].peer_names(),
        c.hosts[1].peer_names(),
        c.logs()
    );
    // Let any late change land, then check the routes in both host namespaces.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.hosts[0].peer_names(), want1);
    assert_eq!(c.hosts[1].peer_names(), want2);
    assert_eq!(
        tunnel_routes(&c.hosts[0]),
        ["10.244.98.0/24"].map(String::from).into()
    );
    assert_eq!(
        tunnel_routes(&c.hosts[1]),
        ["10.244.1.0/24", "10.244.98.0/24", "172.20.0.0/24"]
            .map(String::from)
            .into()
    );
    for h in &c.hosts {
        let all =
            String::from_utf8_lossy(&h.ns.exec(&["ip", "route", "show", "table", "all"]).stdout)
                .into_owned();
        assert!(!all.contains("default dev evio0"), "{all}");
        let get =
            String::from_utf8_lossy(&h.ns.exec(&["ip", "route", "get", "10.99.0.254"]).stdout)
                .into_owned();
        assert!(get.contains("dev eth0"), "{get}");
        let log = h.log_text();
        for name in ["world", "etcd", "overlap", "noclaim"] {
            assert!(
                log.lines().any(|l| l.contains("registration not accepted")
                    && l.contains(&format!("node={name}"))),
                "{} did not judge {name}:\n{log}",
                h.name
            );
        }
    }
    // The rejections are counted (host-1: alias is dropped by the store; world, etcd, overlap, noclaim,
    // lonely, stolen (no believed claim) and outside are judged and refused).
    assert_eq!(
        c.hosts[0].metric("evio_registrations_rejected"),
        7,
        "{}",
        c.hosts[0].metrics()
    );
    assert_eq!(
        c.hosts[1].metric("evio_registrations_rejected"),
        6,
        "{}",
        c.hosts[1].metrics()
    );
    // And the real peers still reach each other.
    let vip2 = c.hosts[1].vip();
    assert!(
        c.hosts[0].ping_until(&vip2, Duration::from_secs(5)),
        "{}",
        c.logs()
    );
    assert!(
        c.hosts[1].ping_until(&vip1, Duration::from_secs(5)),
        "{}",
        c.logs()
    );
}
