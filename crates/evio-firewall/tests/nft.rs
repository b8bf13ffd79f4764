//! The real nft in a throw-away namespace: add, remove by address and by key, GC, concurrent adds.

use std::collections::HashSet;
use std::net::IpAddr;

use evio_testbed::Netns;

/// Runs `f` inside `ns` on a helper thread (nft runs in the caller's netns).
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: valid fd kept open by `file`; only this helper thread changes namespace.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn add_remove_gc() {
    let ns = Netns::new("fw");
    in_ns(&ns, || {
        let k1 = evio_firewall::attachment_key("net1", "c1", "eth0");
        let k2 = evio_firewall::attachment_key("net1", "c2", "eth0");
        let k3 = evio_firewall::attachment_key("net2", "c3", "eth0");
        let sub = ["10.5.0.0/24".parse().unwrap()];
        evio_firewall::add(&k1, &[ip("10.5.0.2"), ip("fd05::2")], &sub).unwrap();
        evio_firewall::add(&k2, &[ip("10.5.0.3")], &sub).unwrap();
        evio_firewall::add(&k3, &[ip("10.6.0.3")], &["10.6.0.0/24".parse().unwrap()]).unwrap();
        // Idempotent, and a re-add with another key takes over the address.
        evio_firewall::add(&k2, &[ip("10.5.0.3")], &sub).unwrap();
        let l = evio_firewall::list().unwrap();
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l.contains(&(ip("fd05::2"), k1.clone())));

        evio_firewall::remove(&[ip("10.5.0.2"), ip("fd05::2")]).unwrap();
        evio_firewall::remove(&[ip("10.5.0.2")]).unwrap(); // already gone: fine
        assert_eq!(evio_firewall::remove_key(&k2).unwrap(), 1);
        assert_eq!(evio_firewall::remove_key(&k2).unwrap(), 0);
        evio_firewall::add(&k1, &[ip("10.5.0.2")], &sub).unwrap();
        let keep: HashSet<String> = [k1.clone()].into();
        assert_eq!(evio_firewall::gc("net1", &keep).unwrap(), 0);
        assert_eq!(evio_firewall::gc("net1", &HashSet::new()).unwrap(), 1);
        let l = evio_firewall::list().unwrap();
        assert_eq!(
            l,
            vec![(ip("10.6.0.3"), k3.clone())],
            "GC of net1 leaves net2 alone"
        );
    });
    let rules = ns.exec_ok(&["nft", "list", "table", "inet", "evio_cni"]);
    assert_eq!(rules.matches("masquerade").count(), 2, "{rules}");
    assert!(
        rules.contains("10.5.0.0/24") && rules.contains("10.6.0.0/24"),
        "{rules}"
    );
}

#[test]
fn removal_without_table_and_concurrent_adds() {
    let ns = Netns::new("fw");
    in_ns(&ns, || {
        evio_firewall::remove(&[ip("10.7.0.9")]).unwrap();
        assert_eq!(evio_firewall::remove_key("evio x y eth0").unwrap(), 0);
        std::thread::scope(|s| {
            for i in 0..12 {
                s.spawn(move || {
                    let k = evio_firewall::attachment_key("n", &format!("c{i}"), "eth0");
                    evio_firewall::add(
                        &k,
                        &[ip(&format!("10.7.0.{}", i + 2))],
                        &["10.7.0.0/24".parse().unwrap()],
                    )
                    .unwrap();
                });
            }
        });
        assert_eq!(evio_firewall::list().unwrap().len(), 12);
    });
    let rules = ns.exec_ok(&["nft", "list", "chain", "inet", "evio_cni", "postrouting"]);
    assert_eq!(
        rules.matches("masquerade").count(),
        2,
        "concurrent adds keep one rule pair: {rules}"
    );
}
