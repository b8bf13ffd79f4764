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

/// The table as nft sees it after netlink declared it: the two rules, the sets with their types and
/// `auto-merge`, CIDRs merged as nft would (overlapping and adjacent ones become one), concurrent adds of
/// different CIDRs (their merges race and are retried), and a table deleted by someone else declared again.
#[test]
fn the_table_is_declared_and_cidrs_merged() {
    let ns = Netns::new("fw");
    let sub: Vec<ipnet::IpNet> = vec![
        "10.8.0.0/24".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    ns.run(|| {
        let k = |i: u32| evio_firewall::attachment_key("n", &format!("c{i}"), "eth0");
        evio_firewall::add(&k(1), &[ip("10.8.0.2")], &sub).unwrap();
        // Comments visible to nft, a re-add with another key takes the address over.
        evio_firewall::add(&k(2), &[ip("10.8.0.3"), ip("fd08::3")], &sub).unwrap();
        evio_firewall::add(&k(3), &[ip("10.8.0.3")], &sub).unwrap();
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
        // Adjacent to 10.0.0.0/8: merged into one interval; an IPv6 pool too.
        let more: Vec<ipnet::IpNet> = vec![
            "11.0.0.0/24".parse().unwrap(),
            "fd00:10:244::/48".parse().unwrap(),
        ];
        evio_firewall::add(&k(4), &[ip("11.0.0.2")], &more).unwrap();
        // Concurrent adds, each with its own CIDR.
        std::thread::scope(|s| {
            for i in 0..8u32 {
                s.spawn(move || {
                    let cidr = format!("192.168.{i}.0/24").parse().unwrap();
                    let a = ip(&format!("192.168.{i}.2"));
                    evio_firewall::add(&k(10 + i), &[a], &[cidr]).unwrap();
                });
            }
        });
        assert_eq!(evio_firewall::list().unwrap().len(), 10);
        // Their intervals may sit side by side unmerged (each add read the set before the others wrote);
        // a CIDR covering all of them merges them into one.
        let all = ["192.168.0.0/21".parse().unwrap()];
        evio_firewall::add(&k(20), &[ip("192.168.7.9")], &all).unwrap();
    });
    let table = ns.exec_ok(&["nft", "list", "table", "inet", "evio_cni"]);
    for want in [
        "type ipv4_addr",
        "type ipv6_addr",
        "auto-merge",
        "10.0.0.0-11.0.0.255",
        "192.168.0.0/21",
        "224.0.0.0/4",
        "255.255.255.255",
        "ff00::/8",
        "fd00:10:244::/48",
        "ip saddr @pods4 ip daddr != @nomasq4 masquerade",
        "ip6 saddr @pods6 ip6 daddr != @nomasq6 masquerade",
        "type nat hook postrouting priority srcnat; policy accept;",
        "evio-cni: pods leaving the cluster",
    ] {
        assert!(table.contains(want), "no {want:?} in\n{table}");
    }
    // The table deleted by someone else: the next ADD declares it again.
    ns.exec_ok(&["nft", "delete", "table", "inet", "evio_cni"]);
    ns.run(|| {
        evio_firewall::remove(&[ip("10.8.0.2")]).unwrap(); // no table: nothing to do
        assert_eq!(
            evio_firewall::list().unwrap(),
            vec![],
            "no table: nothing listed"
        );
        evio_firewall::add("evio n c5 eth0", &[ip("10.8.0.5")], &sub).unwrap();
    });
    let rules = ns.exec_ok(&["nft", "list", "table", "inet", "evio_cni"]);
    assert!(
        rules.contains("masquerade") && rules.contains("10.0.0.0/8") && rules.contains("10.8.0.5"),
        "{rules}"
    );
}

/// A table made by `nft` (as evio's earlier versions and an operator would write it) is taken over: the
/// sets are declared again without error, the CIDRs merged, the rules replaced by ours (not doubled).
#[test]
fn a_table_made_by_nft_is_taken_over() {
    let ns = Netns::new("fw");
    let script = "add table inet evio_cni\n\
         add set inet evio_cni pods4 { type ipv4_addr; }\n\
         add set inet evio_cni pods6 { type ipv6_addr; }\n\
         add set inet evio_cni nomasq4 { type ipv4_addr; flags interval; auto-merge; }\n\
         add set inet evio_cni nomasq6 { type ipv6_addr; flags interval; auto-merge; }\n\
         add element inet evio_cni nomasq4 { 224.0.0.0/4, 255.255.255.255/32, 10.244.0.0/16 }\n\
         add element inet evio_cni nomasq6 { ff00::/8 }\n\
         add chain inet evio_cni postrouting { type nat hook postrouting priority srcnat; policy accept; }\n\
         add rule inet evio_cni postrouting ip saddr @pods4 ip daddr != @nomasq4 masquerade\n\
         add rule inet evio_cni postrouting ip6 saddr @pods6 ip6 daddr != @nomasq6 masquerade\n\
         add element inet evio_cni pods4 { 10.244.3.9 comment \"evio n old eth0\" }\n";
    let path = ns.path().display().to_string();
    let mut nft = std::process::Command::new("nsenter")
        .args([&format!("--net={path}"), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success());
    ns.run(|| {
        // A CIDR the table lacks: the whole declaration runs over nft's table.
        let k = evio_firewall::attachment_key("n", "c1", "eth0");
        let cidrs = [
            "10.244.0.0/16".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
        ];
        evio_firewall::add(&k, &[ip("10.244.3.2")], &cidrs).unwrap();
        let mut l = evio_firewall::list().unwrap();
        l.sort();
        assert_eq!(
            l,
            vec![
                (ip("10.244.3.2"), k),
                (ip("10.244.3.9"), "evio n old eth0".into())
            ]
        );
    });
    let table = ns.exec_ok(&["nft", "list", "table", "inet", "evio_cni"]);
    assert_eq!(table.matches("masquerade").count(), 2, "{table}");
    assert!(
        table.contains("10.96.0.0/12") && table.contains("10.244.0.0/16"),
        "{table}"
    );
}
