//! Lazy peers (`--lazy-peers`): agents that know each other exchange nothing until a packet wants a peer;
//! the first packet is queued, not lost, and arrives within a second; a peer without traffic goes back to
//! rest after `--peer-idle-timeout`; pinned peers stay up. Hosts on one underlay segment (direct paths).

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use evio_testbed::wait_until;

/// The path host `i` shows for peer `name` in its status.
fn path(c: &Cluster, i: usize, name: &str) -> String {
    c.hosts[i]
        .status()
        .and_then(|s| {
            s["peers"].as_array().and_then(|p| {
                p.iter()
                    .find(|p| p["node"] == name)
                    .and_then(|p| p["path"].as_str().map(String::from))
            })
        })
        .unwrap_or_default()
}

fn lazy_cluster(n: usize, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(n);
    for h in &mut c.hosts {
        h.extra = ["--lazy-peers", "--peer-idle-timeout", "3"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
    }
    c.start_all();
    let all_known = wait_until(Duration::from_secs(20), || {
        c.hosts.iter().all(|h| h.peer_names().len() == n - 1)
    });
    assert!(all_known, "peers not known: {}", c.logs());
    c
}

#[test]
fn lazy_peers_rest_until_a_packet_wants_them_and_rest_again_when_idle() {
    let c = lazy_cluster(3, &[]);
    // At rest: no session, no handshake, every peer idle (checked for a while: nothing wakes them).
    std::thread::sleep(Duration::from_secs(2));
    for (i, h) in c.hosts.iter().enumerate() {
        for j in 0..3 {
            if j != i {
                assert_eq!(path(&c, i, &c.hosts[j].name), "idle", "{}", c.logs());
            }
        }
        assert_eq!(h.metric("evio_handshakes_total"), 0, "{}", h.log_text());
    }

    // The first packet to a peer is queued and arrives within a second.
    let vip2 = c.hosts[1].vip();
    let t0 = Instant::now();
    let o = c.hosts[0].ns.exec(&["ping", "-c", "1", "-W", "1", &vip2]);
    let took = t0.elapsed();
    assert!(
        o.status.success(),
        "first ping lost after {took:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        c.logs()
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Status follows (NAT traversal's view settles a moment after the first packets).
    assert!(
        wait_until(Duration::from_secs(3), || path(&c, 0, "host-2") == "direct"
            && path(&c, 1, "host-1") == "direct"),
        "host-1 sees host-2 as {}, host-2 sees host-1 as {}",
        path(&c, 0, "host-2"),
        path(&c, 1, "host-1")
    );
    // The third host was never wanted.
    assert_eq!(path(&c, 0, "host-3"), "idle");
    assert_eq!(path(&c, 2, "host-1"), "idle");
    assert_eq!(c.hosts[2].metric("evio_handshakes_total"), 0);
    assert!(c.hosts[0].metric("evio_lazy_peers_woken_total") >= 1);

    // Without traffic both sides go back to rest after the idle timeout (3 s here).
    assert!(
        wait_until(Duration::from_secs(10), || path(&c, 0, "host-2") == "idle"
            && path(&c, 1, "host-1") == "idle"),
        "still up: {} / {}",
        path(&c, 0, "host-2"),
        path(&c, 1, "host-1")
    );
    assert!(c.hosts[0].metric("evio_lazy_peers_idled_total") >= 1);
    // And wake again on the next packet.
    assert!(
        c.hosts[0].ping_until(&vip2, Duration::from_secs(2)),
        "{}",
        c.logs()
    );
}

#[test]
fn pinned_peers_stay_up_without_traffic() {
    let c = lazy_cluster(3, &["--pin-peer", "host-1"]);
    // Every host pins host-1: its paths come up without traffic and stay up past the idle timeout.
    for i in 1..3 {
        assert!(
            wait_until(Duration::from_secs(10), || path(&c, i, "host-1")
                == "direct"),
            "host {i} -> host-1: {}\n{}",
            path(&c, i, "host-1"),
            c.logs()
        );
    }
    std::thread::sleep(Duration::from_secs(5));
    for i in 1..3 {
        assert_eq!(path(&c, i, "host-1"), "direct");
    }
    assert_eq!(path(&c, 1, "host-3"), "idle");
    assert_eq!(path(&c, 2, "host-2"), "idle");
}
