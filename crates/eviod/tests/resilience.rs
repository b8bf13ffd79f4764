//! eviod under trouble: garbage on its port, etcd frozen, kill -9 and restart, a node that stops, a VIP
//! conflict.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use evio_testbed::wait_until;

/// Sends `n` datagrams of junk and of well-formed-looking WireGuard headers to `ip:51820` from the underlay.
fn garbage(c: &Cluster, ip: &str, n: usize) {
    let to: std::net::SocketAddr = format!("{ip}:51820").parse().unwrap();
    c.underlay.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        };
        for i in 0..n {
            let (kind, len) = match i % 5 {
                0 => (None, 1 + i % 1400),
                1 => (Some(1u32), 148), // handshake initiation shape
                2 => (Some(2), 92),     // handshake response shape
                3 => (Some(4), 116),    // data shape
                _ => (None, 0),
            };
            let mut d = vec![0u8; len];
            rnd(&mut d);
            if let Some(k) = kind {
                d[..4].copy_from_slice(&k.to_le_bytes());
            }
            let _ = s.send_to(&d, to);
        }
    });
}

#[test]
fn survives_garbage_etcd_freeze_kill9_and_peers_leaving() {
    let mut c = Cluster::new(3);
    let etcd = c.etcd_url();
    let dir = c.dir.path().to_path_buf();
    let net3 = c.hosts[2].cni_config(&etcd, &dir);
    let sub3 = net3["subnet"].as_str().unwrap().to_string();
    c.start_all();
    assert!(
        c.wait_mesh(Duration::from_secs(20)),
        "no full mesh:\n{}",
        c.logs()
    );
    let vips: Vec<String> = c.hosts.iter().map(|h| h.vip()).collect();
    let key2 = c.hosts[1].status().unwrap()["publicKey"].clone();
    assert!(c.hosts[0].ping_until(&vips[1], Duration::from_secs(5)));

    // Garbage datagrams: counted and dropped, the agent and its tunnels carry on.
    garbage(&c, &c.hosts[0].ip, 2000);
    assert!(
        c.hosts[0].ping(&vips[1]),
        "tunnel broken by garbage:\n{}",
        c.logs()
    );
    assert!(
        c.hosts[1].ping(&vips[0]),
        "tunnel broken by garbage:\n{}",
        c.logs()
    );
    let m = c.hosts[0].metrics();
    let dropped: u64 = m
        .lines()
        .filter(|l| l.starts_with("evio_drops_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(dropped >= 1500, "drops not counted:\n{m}");

    // etcd frozen for 6 s: traffic keeps flowing the whole time, and the control plane recovers.
    c.etcd.freeze();
    let start = Instant::now();
    let mut lost = 0;
    while start.elapsed() < Duration::from_secs(6) {
        if !c.hosts[0].ping(&vips[2]) {
            lost += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    c.etcd.thaw();
    assert_eq!(lost, 0, "pings lost while etcd was frozen:\n{}", c.logs());
    assert!(c.hosts[2].ping_until(&vips[1], Duration::from_secs(5)));

    // kill -9 and restart host-2: same key, same VIP, tunnels back within seconds.
    c.hosts[1].kill9();
    c.start(1);
    let t0 = Instant::now();
    assert_eq!(c.hosts[1].vip(), vips[1], "VIP changed after restart");
    assert_eq!(
        c.hosts[1].status().unwrap()["publicKey"],
        key2,
        "key changed after restart"
    );
    assert!(
        c.hosts[0].ping_until(&vips[1], Duration::from_secs(10)),
        "host-1 cannot reach restarted host-2:\n{}",
        c.logs()
    );
    assert!(
        c.hosts[1].ping_until(&vips[2], Duration::from_secs(5)),
        "restarted host-2 cannot reach host-3"
    );
    eprintln!("tunnels back {:?} after restart", t0.elapsed());

    // host-2 killed and restarted while etcd is frozen: it comes back from its cached VIP and peers.
    c.etcd.freeze();
    c.hosts[1].kill9();
    c.start(1);
    let back = c.hosts[0].ping_until(&vips[1], Duration::from_secs(15));
    let vip_cached = c.hosts[1].vip();
    c.etcd.thaw();
    assert!(
        back,
        "restart without etcd: host-1 cannot reach host-2:\n{}",
        c.logs()
    );
    assert_eq!(vip_cached, vips[1]);
    assert!(
        c.hosts[1].ping_until(&vips[2], Duration::from_secs(10)),
        "host-2 -> host-3 after etcd thawed"
    );

    // host-3 dies (kill -9: its lease is not revoked): its peers drop it and its pod route after the TTL.
    // etcd does not extend leases over a pause: a freeze longer than what a lease had left expires it as
    // soon as etcd runs again, and its holder then registers again under a new lease. So wait until
    // host-3 is registered (again) and host-1 routes to it before killing it.
    assert!(
        wait_until(Duration::from_secs(15), || lease_seconds_left(
            &c.etcd, "host-3"
        )
        .is_some()),
        "host-3 not registered after etcd thawed:\n{}",
        c.logs()
    );
    assert!(
        wait_until(Duration::from_secs(5), || c.hosts[0]
            .tun_routes()
            .contains(&sub3)),
        "no route to {sub3}:\n{}",
        c.logs()
    );
    // The etcd freezes above may have left host-3's lease with less than a full TTL: measure what it has
    // left, so the check below is "not removed before its lease expired", whatever the freezes did.
    let left = lease_seconds_left(&c.etcd, "host-3")
        .unwrap_or_else(|| panic!("host-3 lost its registration again:\n{}", c.logs()));
    c.hosts[2].kill9();
    let t0 = Instant::now();
    let gone = wait_until(Duration::from_secs(25), || {
        let st = c.hosts[0].status().unwrap();
        let listed = st["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == "host-3");
        !listed && !c.hosts[0].tun_routes().contains(&sub3)
    });
    assert!(
        gone,
        "host-3 still a peer of host-1 after 25 s:\n{}",
        c.logs()
    );
    let took = t0.elapsed();
    eprintln!("dead peer removed after {took:?}");
    eprintln!("host-3's lease had {left} s left when it was killed");
    assert!(
        took + Duration::from_secs(1) >= Duration::from_secs(left),
        "removed before its lease could expire ({took:?}, the lease had {left} s left)"
    );
    // The others are untouched.
    assert!(c.hosts[0].ping(&vips[1]));

    // A clean stop (SIGTERM) revokes the lease: host-2 disappears from host-1 at once.
    let key = "/evio/v1/nodes/host-2";
    assert!(
        !c.etcd.etcdctl(&["get", key]).trim().is_empty(),
        "host-2 not registered before its stop"
    );
    c.hosts[1].stop();
    // The registration went with the revoked lease at once, not with its expiry.
    let reg = c.etcd.etcdctl(&["get", key]);
    assert!(
        reg.trim().is_empty(),
        "host-2 still registered after a clean stop: {reg}"
    );
    assert!(
        wait_until(Duration::from_secs(6), || {
            c.hosts[0].status().unwrap()["peers"]
                .as_array()
                .unwrap()
                .is_empty()
        }),
        "stopped host-2 still listed:\n{}",
        c.logs()
    );
    // And its TUN device went away with it.
    assert!(!c.hosts[1].ns.links().iter().any(|l| l == "evio0"));
}

#[test]
fn a_vip_held_by_another_node_is_refused() {
    let mut c = Cluster::new(2);
    c.hosts[0].extra = vec!["--address".into(), "10.10.3.3".into()];
    c.start(0);
    assert_eq!(c.hosts[0].vip(), "10.10.3.3");
    c.hosts[1].extra = vec!["--address".into(), "10.10.3.3".into()];
    let etcd = c.etcd_url();
    let h = &mut c.hosts[1];
    let log = std::fs::File::create(&h.log).unwrap();
    let out =
        h.ns.command(common::eviod())
            .args([
                "--node-name",
                &h.name,
                "--etcd-endpoints",
                &etcd,
                "--state-dir",
            ])
            .arg(&h.state_dir)
            .args(["--address", "10.10.3.3"])
            .stderr(log)
            .status()
            .unwrap();
    assert!(!out.success());
    let text = h.log_text();
    assert!(
        text.contains("10.10.3.3 is already held by node host-1"),
        "{text}"
    );
    // The key file exists with mode 0600 (created before the claim).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.state_dir.join("private.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

/// Seconds left on the lease of `node`'s registration, read with etcdctl (the etcd-client package).
fn lease_seconds_left(etcd: &evio_testbed::Etcd, node: &str) -> Option<u64> {
    let get = etcd.etcdctl(&["get", &format!("/evio/v1/nodes/{node}"), "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&get).expect("etcdctl json");
    let kv = &v["kvs"][0];
    if kv.is_null() {
        return None;
    }
    let lease = kv["lease"]
        .as_i64()
        .unwrap_or_else(|| panic!("{node} is registered without a lease: {get}"));
    let ttl = etcd.etcdctl(&["lease", "timetolive", &format!("{lease:x}")]);
    // "lease 694d... granted with TTL(10s), remaining(8s)"; "lease 694d... already expired" when it went
    // between the two calls.
    if ttl.contains("expired") {
        return None;
    }
    Some(
        ttl.split("remaining(")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the lease's TTL: {ttl}")),
    )
}
