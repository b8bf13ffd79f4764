//! eviod end to end: hosts as network namespaces on one underlay bridge, real etcd, real TUN devices.

mod common;

use std::time::Duration;

use common::Cluster;

#[test]
fn three_hosts_reach_each_others_vips() {
    let mut c = Cluster::new(3);
    c.start_all();
    assert!(c.wait_mesh(Duration::from_secs(20)), "no full mesh:\n{}", c.logs());
    let vips: Vec<String> = c.hosts.iter().map(|h| h.vip()).collect();
    for v in &vips {
        assert!(v.starts_with("10.10."), "{vips:?}");
    }
    for (i, h) in c.hosts.iter().enumerate() {
        for (j, v) in vips.iter().enumerate() {
            if i != j {
                assert!(h.ping_until(v, Duration::from_secs(5)), "{} cannot reach {v}:\n{}", h.name, c.logs());
            }
        }
    }
    let st = c.hosts[0].status().unwrap();
    let peers = st["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert_eq!(p["path"], "direct");
        assert!(p["lastHandshake"].as_u64().unwrap() > 1_700_000_000);
        assert!(p["rxBytes"].as_u64().unwrap() > 0);
        assert!(p["endpoint"].as_str().unwrap().ends_with(":51820"));
    }
}
