//! Real kernel objects in throw-away namespaces: bridge, veth across namespaces, addresses, routes,
//! sysctl. Run as root.

use std::path::Path;

use evio_netlink::{LinkChange, Netlink, RouteSpec, netns, sysctl};
use evio_testbed::{Netns, unique};

#[test]
fn bridge_veth_address_route_lifecycle() {
    let node = Netns::new("nln");
    let pod = Netns::new("nlp");
    let mut nl = Netlink::in_netns(&node.path()).unwrap();
    let br = unique("br");
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    assert!(nl.create_bridge(&br, mac, Some(1400)).unwrap());
    assert!(
        !nl.create_bridge(&br, mac, Some(1400)).unwrap(),
        "second create reports existing"
    );
    let b = nl.link_by_name(&br).unwrap().expect("bridge exists");
    assert_eq!(b.kind.as_deref(), Some("bridge"));
    assert_eq!(b.mac, Some(mac));
    assert_eq!(b.mtu, 1400);

    let podns = netns::open(&pod.path()).unwrap();
    let host = unique("vh");
    nl.create_veth(&host, "eth0", &podns, Some(1400)).unwrap();
    let e = nl
        .create_veth(&unique("vh"), "eth0", &podns, None)
        .unwrap_err();
    assert!(e.is_exists(), "peer name taken in the pod netns: {e}");
    let h = nl.link_by_name(&host).unwrap().unwrap();
    nl.set_link(
        h.index,
        &LinkChange {
            up: true,
            mtu: Some(1400),
            master: Some(b.index),
            alias: Some("k/eth0".into()),
            mac: None,
        },
    )
    .unwrap();
    nl.set_hairpin(h.index, true).unwrap();
    let h = nl.link_by_index(h.index).unwrap().unwrap();
    assert_eq!(h.master, Some(b.index));
    assert!(h.up);
    assert_eq!(h.alias.as_deref(), Some("k/eth0"));
    assert!(
        node.exec_ok(&["ip", "-d", "link", "show", &host])
            .contains("hairpin on")
    );
    assert!(nl.links().unwrap().iter().any(|l| l.name == host));
    assert!(
        nl.link_by_name("eth0").unwrap().is_none(),
        "pod side is not in the node netns"
    );

    // Bridge address, idempotent.
    nl.set_link(
        b.index,
        &LinkChange {
            up: true,
            ..Default::default()
        },
    )
    .unwrap();
    let gw: ipnet::IpNet = "10.99.0.1/24".parse().unwrap();
    assert!(nl.add_address(b.index, &gw).unwrap());
    assert!(!nl.add_address(b.index, &gw).unwrap());
    assert!(nl.addresses(b.index).unwrap().iter().any(|(_, a)| *a == gw));

    // Pod side through a socket opened inside the pod netns.
    let mut pnl = Netlink::in_netns(&pod.path()).unwrap();
    let p = pnl.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(p.mtu, 1400);
    pnl.set_link(
        p.index,
        &LinkChange {
            up: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ip: ipnet::IpNet = "10.99.0.5/24".parse().unwrap();
    pnl.add_address(p.index, &ip).unwrap();
    let mut def = RouteSpec::new("0.0.0.0/0".parse().unwrap());
    def.gateway = Some("10.99.0.1".parse().unwrap());
    assert!(pnl.add_route(&def).unwrap());
    assert!(!pnl.add_route(&def).unwrap());
    assert!(
        pnl.routes(false)
            .unwrap()
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.gateway == def.gateway)
    );
    let v6: ipnet::IpNet = "fd00:99::5/64".parse().unwrap();
    pnl.add_address(p.index, &v6).unwrap();
    assert!(
        pnl.addresses(p.index)
            .unwrap()
            .iter()
            .any(|(_, a)| *a == v6)
    );
    let out = pod.exec_ok(&["ping", "-c1", "-W2", "10.99.0.1"]);
    assert!(out.contains("1 received"), "{out}");
    assert!(pnl.del_route(&def).unwrap());
    assert!(!pnl.del_route(&def).unwrap());
    assert!(pnl.del_address(p.index, &ip).unwrap());
    assert!(!pnl.del_address(p.index, &ip).unwrap());

    // Sysctls apply to the namespace of the thread.
    netns::run_in(&node.path(), || {
        sysctl::enable_ipv4_forwarding().unwrap();
        sysctl::disable_ipv6_ra(&br).unwrap();
    })
    .unwrap();
    assert_eq!(
        node.exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .trim(),
        "1"
    );
    assert_eq!(
        node.exec_ok(&["cat", &format!("/proc/sys/net/ipv6/conf/{br}/accept_ra")])
            .trim(),
        "0"
    );

    assert!(nl.delete_link(h.index).unwrap());
    assert!(!nl.delete_link(h.index).unwrap());
    assert!(
        pnl.link_by_name("eth0").unwrap().is_none(),
        "deleting the host side removes the pod side"
    );
    assert!(nl.delete_link_by_name(&br).unwrap());
    assert!(!nl.delete_link_by_name(&br).unwrap());
}

#[test]
fn missing_netns_is_an_error_not_a_panic() {
    assert!(Netlink::in_netns(Path::new("/run/netns/does-not-exist-evio")).is_err());
    assert!(!netns::exists(Path::new("/run/netns/does-not-exist-evio")));
    let n = Netns::new("nlx");
    assert!(netns::exists(&n.path()));
}
