//! The real nft in a throw-away namespace: add, remove by address and by key, GC, concurrent adds.

use std::collections::HashSet;
use std::net::IpAddr;

use evio_testbed::Netns;

/// Runs `f` inside `ns` on a helper thread (nft runs in the caller's netns).
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn add_remove_gc() {
    let ns = Netns::new("fw");
    ns.run(|| {
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
    ns.run(|| {
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

#[test]
fn fast_path_after_the_first_full_run() {
    let ns = Netns::new("fw");
    let sub: Vec<ipnet::IpNet> = vec![
        "10.8.0.0/24".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    ns.run(|| {
        let k = |i: u32| evio_firewall::attachment_key("n", &format!("c{i}"), "eth0");
        // First: no table yet, so the full nft run (creates the table with the CIDRs).
        let p = evio_firewall::start_add(&k(1), &[ip("10.8.0.2")], &sub).unwrap();
        assert!(!p.is_done(), "no table: the full run");
        p.wait().unwrap();
        // Then netlink batches: comment visible to nft, re-add with another key takes the address over.
        let p = evio_firewall::start_add(&k(2), &[ip("10.8.0.3"), ip("fd08::3")], &sub).unwrap();
        assert!(p.is_done(), "netlink fast path");
        p.wait().unwrap();
        evio_firewall::start_add(&k(3), &[ip("10.8.0.3")], &sub)
            .unwrap()
            .wait()
            .unwrap();
        let mut l = evio_firewall::list().unwrap();
        l.sort();
        assert_eq!(
            l,
            vec![
                (ip("10.8.0.2"), k(1)),
                (ip("10.8.0.3"), k(3)),
                (ip("fd08::3"), k(2))
            ],
        );
        evio_firewall::remove(&[ip("10.8.0.3"), ip("fd08::3"), ip("10.8.0.99")]).unwrap();
        assert_eq!(evio_firewall::list().unwrap(), vec![(ip("10.8.0.2"), k(1))]);
        // A CIDR inside one the set holds (10.0.0.0/8): the fast path. One it does not: a full run,
        // which adds it.
        let inside = vec!["10.99.0.0/24".parse().unwrap()];
        let p = evio_firewall::start_add(&k(6), &[ip("10.99.0.2")], &inside).unwrap();
        assert!(p.is_done(), "covered by 10.0.0.0/8");
        let more = vec!["192.168.9.0/24".parse().unwrap()];
        let p = evio_firewall::start_add(&k(4), &[ip("192.168.9.2")], &more).unwrap();
        assert!(!p.is_done(), "a CIDR the table lacks: the full run");
        p.wait().unwrap();
        let p = evio_firewall::start_add(&k(7), &[ip("192.168.9.3")], &more).unwrap();
        assert!(p.is_done(), "now held");
    });
    let set = ns.exec_ok(&["nft", "list", "set", "inet", "evio_cni", "nomasq4"]);
    assert!(set.contains("10.0.0.0/8"), "{set}");
    // The table deleted by someone else: the next ADD sees its sets gone and the full run restores it.
    ns.exec_ok(&["nft", "delete", "table", "inet", "evio_cni"]);
    ns.run(|| {
        evio_firewall::remove(&[ip("10.8.0.2")]).unwrap(); // no table: nothing to do
        assert_eq!(
            evio_firewall::list().unwrap(),
            vec![],
            "no table: nothing listed"
        );
        let p = evio_firewall::start_add("evio n c5 eth0", &[ip("10.8.0.5")], &sub).unwrap();
        assert!(!p.is_done());
        p.wait().unwrap();
    });
    let rules = ns.exec_ok(&["nft", "list", "table", "inet", "evio_cni"]);
    assert!(
        rules.contains("masquerade") && rules.contains("10.0.0.0/8") && rules.contains("10.8.0.5"),
        "{rules}"
    );
}
