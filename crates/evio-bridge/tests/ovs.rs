//! The Open vSwitch backend against real ovsdb-server + ovs-vswitchd (userspace datapath) running inside
//! a throw-away node netns. Every backend call runs on a thread inside that netns, as the plugin would.

use evio_bridge::ovs::{OvsBridge, OvsClient};
use evio_bridge::{Bridge, BridgeError, BridgeSpec, DatapathType, PortOwner};
use evio_testbed::ovs::{Ovs, in_netns, tcp_transfer};
use evio_testbed::{Netns, unique};
use std::path::Path;
use std::time::{Duration, Instant};

fn spec(ovs_socket: &Path, name: &str, datapath: &str, mtu: Option<u32>) -> BridgeSpec {
    BridgeSpec {
        name: name.to_string(),
        mtu,
        ovs_datapath_type: DatapathType::parse(datapath).expect("a datapath type"),
        ovsdb_socket: ovs_socket.to_path_buf(),
    }
}

fn owner(c: &str, i: &str) -> PortOwner {
    PortOwner {
        container_id: c.to_string(),
        ifname: i.to_string(),
    }
}

/// Runs `f` with a fresh backend for `spec` on a thread inside `node`.
fn with<T: Send + 'static>(
    node: &Netns,
    spec: &BridgeSpec,
    client: OvsClient,
    f: impl FnOnce(&OvsBridge) -> T + Send + 'static,
) -> T {
    let spec = spec.clone();
    in_netns(node.name(), move || {
        let b = OvsBridge::new(spec)
            .with_client(client)
            .with_timeout(Duration::from_secs(10));
        f(&b)
    })
}

fn setup() -> (Netns, Ovs) {
    let node = Netns::new("ovn");
    let ovs = Ovs::start(&node);
    (node, ovs)
}

fn get(ovs: &Ovs, args: &[&str]) -> String {
    ovs.vsctl_ok(args).trim().trim_matches('"').to_string()
}

/// A veth pair with `host` in the node and `peer` in `ns` (or in the node too when None).
fn veth(node: &Netns, host: &str, peer: &str, ns: Option<&Netns>) {
    match ns {
        Some(ns) => node.veth_to(host, ns, peer),
        None => {
            node.exec_ok(&[
                "ip", "link", "add", host, "type", "veth", "peer", "name", peer,
            ]);
            node.exec_ok(&["ip", "link", "set", host, "up"]);
        }
    }
}

#[test]
fn ensure_creates_a_netdev_bridge_once_with_stable_mac_and_mtu() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", Some(1400));
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure again");
    assert_eq!(ovs.names("Bridge"), vec![br.clone()]);
    assert_eq!(ovs.names("Port"), vec![br.clone()]);
    assert_eq!(ovs.names("Interface"), vec![br.clone()]);
    assert_eq!(
        get(&ovs, &["get", "Bridge", &br, "datapath_type"]),
        "netdev"
    );
    assert_eq!(get(&ovs, &["get", "Interface", &br, "type"]), "internal");
    let hwaddr = get(&ovs, &["get", "Bridge", &br, "other_config:hwaddr"]);
    let link = node.exec_ok(&["ip", "-o", "link", "show", &br]);
    assert!(
        link.contains(&hwaddr),
        "bridge MAC is not the stable hwaddr {hwaddr}: {link}"
    );
    assert!(
        link.contains(",UP") || link.contains("<UP"),
        "bridge not up: {link}"
    );
    assert!(link.contains("mtu 1400"), "{link}");

    // Adding a port (with a lower MAC or not) does not change the gateway MAC.
    let pod = Netns::new("ovp");
    veth(&node, "ovh0", "eth0", Some(&pod));
    let port_owner = owner("c0", "eth0");
    with(&node, &s, OvsClient::JsonRpc, move |b| {
        b.attach("ovh0", &port_owner)
    })
    .expect("attach");
    let link = node.exec_ok(&["ip", "-o", "link", "show", &br]);
    assert!(
        link.contains(&hwaddr),
        "bridge MAC changed after a port was added: {link}"
    );

    // A different MTU in the configuration is applied to the existing bridge.
    let s2 = spec(&ovs.socket(), &br, "netdev", Some(1300));
    with(&node, &s2, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure mtu");
    assert!(
        node.exec_ok(&["ip", "-o", "link", "show", &br])
            .contains("mtu 1300")
    );

    // The configuration and the existing bridge disagree on the datapath: a clear error.
    let s3 = spec(&ovs.socket(), &br, "system", None);
    let e = with(&node, &s3, OvsClient::JsonRpc, |b| b.ensure()).unwrap_err();
    assert!(e.to_string().contains("datapath_type"), "{e}");
}

#[test]
fn racing_ensures_create_one_bridge() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            let n = node.name().to_string();
            std::thread::spawn(move || in_netns(&n, move || OvsBridge::new(s).ensure()))
        })
        .collect();
    for h in handles {
        h.join().unwrap().expect("concurrent ensure");
    }
    assert_eq!(ovs.names("Bridge"), vec![br.clone()]);
    assert_eq!(ovs.names("Port"), vec![br.clone()]);
    assert_eq!(ovs.names("Interface"), vec![br.clone()]);
    assert!(node.links().contains(&br));
}

#[test]
fn system_datapath_without_kernel_module_fails_and_leaves_no_bridge() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "", None);
    let t = Instant::now();
    let e = with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, BridgeError::Bridge { .. }), "{e:?}");
    assert!(e.to_string().contains("kernel module"), "{e}");
    assert!(
        ovs.names("Bridge").is_empty(),
        "the failed bridge was left: {:?}",
        ovs.names("Bridge")
    );
    assert!(!node.links().contains(&br));
}

#[test]
fn attach_tags_the_port_and_detach_removes_it() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    let pod = Netns::new("ovp");
    veth(&node, "ovh1", "eth0", Some(&pod));
    let o = owner("cid-1", "eth0");
    let o2 = o.clone();
    with(&node, &s, OvsClient::JsonRpc, move |b| {
        b.attach("ovh1", &o2)
    })
    .expect("attach");
    assert_eq!(ovs.ports(&br), ["ovh1"]);
    let ids = ovs.vsctl_ok(&["get", "Port", "ovh1", "external_ids"]);
    for want in [
        "evio-owner=evio-cni",
        "evio-container-id=cid-1",
        "evio-ifname=eth0",
    ] {
        assert!(ids.contains(want), "{want} missing in {ids}");
    }
    let ofport: i64 = get(&ovs, &["get", "Interface", "ovh1", "ofport"])
        .parse()
        .unwrap();
    assert!(ofport >= 1);
    let o5 = o.clone();
    with(&node, &s, OvsClient::JsonRpc, move |b| {
        b.check_port("ovh1", &o5)
    })
    .expect("check");
    let e = with(&node, &s, OvsClient::JsonRpc, |b| {
        b.check_port("ovh1", &owner("cid-2", "eth0"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("owner"), "{e}");
    // A port that left the bridge fails CHECK.
    ovs.vsctl_ok(&["del-port", &br, "ovh1"]);
    let o6 = o.clone();
    let e = with(&node, &s, OvsClient::JsonRpc, move |b| {
        b.check_port("ovh1", &o6)
    })
    .unwrap_err();
    assert!(e.to_string().contains("not in OVSDB"), "{e}");
    let o7 = o.clone();
    with(&node, &s, OvsClient::JsonRpc, move |b| {
        b.attach("ovh1", &o7)
    })
    .expect("re-attach");
    let link = node.exec_ok(&["ip", "-d", "link", "show", "ovh1"]);
    assert!(
        link.contains("alias evio cid-1 eth0") && link.contains(",UP"),
        "{link}"
    );

    // Attaching the same device again fails and does not remove the existing port.
    let o3 = owner("cid-other", "eth0");
    let e = with(&node, &s, OvsClient::JsonRpc, move |b| {
        b.attach("ovh1", &o3)
    })
    .unwrap_err();
    assert!(e.to_string().contains("another attachment"), "{e}");
    let link = node.exec_ok(&["ip", "-d", "link", "show", "ovh1"]);
    assert!(
        link.contains("alias evio cid-1 eth0"),
        "the owner tag was overwritten: {link}"
    );
    // A port name clash in OVSDB (an untagged port of the same name) fails without touching it.
    veth(&node, "ovh9", "ovh9p", None);
    ovs.vsctl_ok(&["add-port", &br, "ovh9"]);
    let e = with(&node, &s, OvsClient::JsonRpc, |b| {
        b.attach("ovh9", &owner("c9", "eth0"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    ovs.vsctl_ok(&["del-port", &br, "ovh9"]);
    assert_eq!(ovs.ports(&br), ["ovh1"]);

    // Another owner's detach removes nothing; ours removes the port; repeating is fine.
    with(&node, &s, OvsClient::JsonRpc, |b| {
        b.detach(&owner("cid-1", "eth1"))
    })
    .expect("detach other");
    assert_eq!(ovs.ports(&br), ["ovh1"]);
    let o4 = o.clone();
    with(&node, &s, OvsClient::JsonRpc, move |b| b.detach(&o4)).expect("detach");
    assert!(ovs.ports(&br).is_empty());
    assert_eq!(ovs.names("Interface"), vec![br.clone()]);
    assert!(
        !node.links().contains(&"ovh1".to_string()),
        "the owner's host veth was left"
    );
    assert!(!pod.links().contains(&"eth0".to_string()));
    with(&node, &s, OvsClient::JsonRpc, move |b| b.detach(&o)).expect("detach again");
}

#[test]
fn attach_of_a_missing_device_or_to_a_missing_bridge_fails_and_leaves_no_row() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    veth(&node, "ovh2", "ovh2p", None);
    let e = with(&node, &s, OvsClient::JsonRpc, |b| {
        b.attach("ovh2", &owner("c", "eth0"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(ovs.names("Port").is_empty() && ovs.names("Interface").is_empty());

    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    let e = with(&node, &s, OvsClient::JsonRpc, |b| {
        b.attach("nosuchdev0", &owner("c", "eth0"))
    })
    .unwrap_err();
    assert!(matches!(e, BridgeError::Port { .. }), "{e:?}");
    assert!(e.to_string().contains("no such device"), "{e}");
    assert_eq!(ovs.names("Port"), vec![br.clone()]);
    assert_eq!(ovs.names("Interface"), vec![br.clone()]);
}

#[test]
fn gc_removes_only_our_stale_ports_on_this_bridge() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let br2 = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    let s2 = spec(&ovs.socket(), &br2, "netdev", None);
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    with(&node, &s2, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure 2");
    for (h, p) in [
        ("gva", "gvap"),
        ("gvb", "gvbp"),
        ("gvc", "gvcp"),
        ("gvd", "gvdp"),
    ] {
        veth(&node, h, p, None);
    }
    with(&node, &s, OvsClient::JsonRpc, |b| {
        b.attach("gva", &owner("valid", "eth0"))
    })
    .expect("a");
    with(&node, &s, OvsClient::JsonRpc, |b| {
        b.attach("gvb", &owner("stale", "eth0"))
    })
    .expect("b");
    ovs.vsctl_ok(&["add-port", &br, "gvc"]); // not ours: untagged
    with(&node, &s2, OvsClient::JsonRpc, |b| {
        b.attach("gvd", &owner("other-net", "eth0"))
    })
    .expect("d");

    with(&node, &s, OvsClient::JsonRpc, |b| {
        b.gc(&[owner("valid", "eth0")])
    })
    .expect("gc");
    let mut p = ovs.ports(&br);
    p.sort();
    assert_eq!(p, ["gva", "gvc"]);
    assert_eq!(ovs.ports(&br2), ["gvd"]);
    let links = node.links();
    assert!(
        !links.contains(&"gvb".to_string()),
        "the stale port's veth was left"
    );
    for kept in ["gva", "gvc", "gvd"] {
        assert!(links.contains(&kept.to_string()), "{kept} was removed");
    }
    // An empty valid list removes all of ours on this bridge, still not the untagged one.
    with(&node, &s, OvsClient::JsonRpc, |b| b.gc(&[])).expect("gc all");
    assert_eq!(ovs.ports(&br), ["gvc"]);
    // GC on a bridge that does not exist is a no-op.
    let s3 = spec(&ovs.socket(), "nobr0", "netdev", None);
    with(&node, &s3, OvsClient::JsonRpc, |b| b.gc(&[])).expect("gc missing bridge");
}

#[test]
fn tcp_flows_between_two_namespaces_on_the_ovs_bridge() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    let a = Netns::new("ovp");
    let b = Netns::new("ovp");
    for (ns, host, ip, c) in [
        (&a, "tch0", "10.231.0.2/24", "ca"),
        (&b, "tch1", "10.231.0.3/24", "cb"),
    ] {
        veth(&node, host, "eth0", Some(ns));
        ns.exec_ok(&["ip", "addr", "add", ip, "dev", "eth0"]);
        let h = host.to_string();
        let o = owner(c, "eth0");
        with(&node, &s, OvsClient::JsonRpc, move |b| b.attach(&h, &o)).expect("attach");
    }
    let bytes = 8 << 20;
    let took = tcp_transfer(
        a.name(),
        "10.231.0.2",
        b.name(),
        bytes,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("TCP over OVS failed: {e}\n{}", ovs.log()));
    eprintln!("8 MiB over OVS netdev in {took:?}");
    let back = tcp_transfer(
        b.name(),
        "10.231.0.3",
        a.name(),
        bytes,
        Duration::from_secs(30),
    );
    assert!(back.is_ok(), "{back:?}");
}

#[test]
fn vsctl_fallback_client_does_the_same() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", Some(1450));
    let c = OvsClient::Vsctl;
    with(&node, &s, c, |b| b.ensure()).expect("ensure");
    with(&node, &s, c, |b| b.ensure()).expect("ensure again");
    assert_eq!(ovs.names("Bridge"), vec![br.clone()]);
    assert_eq!(
        get(&ovs, &["get", "Bridge", &br, "datapath_type"]),
        "netdev"
    );
    let link = node.exec_ok(&["ip", "-o", "link", "show", &br]);
    assert!(link.contains("mtu 1450") && link.contains("UP"), "{link}");

    veth(&node, "vsa", "vsap", None);
    veth(&node, "vsb", "vsbp", None);
    with(&node, &s, c, |b| b.attach("vsa", &owner("keep", "eth0"))).expect("attach a");
    with(&node, &s, c, |b| b.attach("vsb", &owner("drop", "eth0"))).expect("attach b");
    with(&node, &s, c, |b| {
        b.check_port("vsa", &owner("keep", "eth0"))
    })
    .expect("check");
    let e = with(&node, &s, c, |b| {
        b.check_port("vsa", &owner("drop", "eth0"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("owner"), "{e}");
    let ids = ovs.vsctl_ok(&["get", "Port", "vsa", "external_ids"]);
    assert!(ids.contains("evio-container-id=keep"), "{ids}");
    let e = with(&node, &s, c, |b| {
        b.attach("nosuchdev1", &owner("x", "eth0"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("no such device"), "{e}");
    let mut p = ovs.ports(&br);
    p.sort();
    assert_eq!(p, ["vsa", "vsb"]);
    with(&node, &s, c, |b| b.gc(&[owner("keep", "eth0")])).expect("gc");
    assert_eq!(ovs.ports(&br), ["vsa"]);
    with(&node, &s, c, |b| b.detach(&owner("keep", "eth0"))).expect("detach");
    with(&node, &s, c, |b| b.detach(&owner("keep", "eth0"))).expect("detach again");
    assert!(ovs.ports(&br).is_empty());

    // With the system datapath the fallback reports the failure too.
    let s2 = spec(&ovs.socket(), &unique("ob"), "system", None);
    assert!(with(&node, &s2, c, |b| b.ensure()).is_err());
    assert_eq!(
        ovs.names("Bridge"),
        vec![br.clone()],
        "the failed bridge was left"
    );
}

/// Rows of the Open_vSwitch table (ovs-vsctl itself waits for the row, so ask ovsdb-client).
fn root_rows(ovs: &Ovs) -> usize {
    let q =
        r#"["Open_vSwitch",{"op":"select","table":"Open_vSwitch","where":[],"columns":["_uuid"]}]"#;
    let db = format!("unix:{}", ovs.socket().display());
    let out = evio_testbed::run_ok(&["ovsdb-client", "--timeout=10", "transact", &db, q]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ovsdb-client output");
    v[0]["rows"].as_array().map(Vec::len).unwrap_or(0)
}

#[test]
fn without_vswitchd_calls_fail_in_bounded_time_and_roll_back() {
    let (node, mut ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    veth(&node, "nva", "nvap", None);
    ovs.stop_vswitchd();
    let short = |s: &BridgeSpec| {
        OvsBridge::new(s.clone())
            .with_client(OvsClient::JsonRpc)
            .with_timeout(Duration::from_secs(1))
    };
    let sc = s.clone();
    let t = Instant::now();
    let e = in_netns(node.name(), move || {
        short(&sc).attach("nva", &owner("c", "eth0"))
    })
    .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("did not apply"), "{e}");
    assert_eq!(
        ovs.names("Port"),
        vec![br.clone()],
        "the port of a failed attach was left"
    );

    let s2 = spec(&ovs.socket(), &unique("ob"), "netdev", None);
    let e = in_netns(node.name(), move || short(&s2).ensure()).unwrap_err();
    assert!(e.to_string().contains("did not apply"), "{e}");
    assert_eq!(
        ovs.names("Bridge"),
        vec![br.clone()],
        "the bridge of a failed ensure was left"
    );
    // Detach and GC only touch the database: they work without ovs-vswitchd.
    let sc = s.clone();
    in_netns(node.name(), move || short(&sc).detach(&owner("c", "eth0"))).expect("detach");

    // A database without its root row (never initialised): racing ensures add exactly one.
    ovs.vsctl_ok(&["--no-wait", "destroy", "Open_vSwitch", "."]);
    assert_eq!(root_rows(&ovs), 0);
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let sp = spec(&ovs.socket(), &unique("ob"), "netdev", None);
            let n = node.name().to_string();
            std::thread::spawn(move || in_netns(&n, move || short(&sp).ensure()))
        })
        .collect();
    for h in hs {
        let e = h.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("did not apply"), "{e}");
    }
    assert_eq!(root_rows(&ovs), 1);
    assert!(
        ovs.names("Bridge").is_empty(),
        "failed bridges were left: {:?}",
        ovs.names("Bridge")
    );

    // No ovsdb-server at all: a transport error, quickly, naming the socket.
    let s3 = spec(Path::new("/nonexistent/db.sock"), &br, "netdev", None);
    let e = in_netns(node.name(), move || short(&s3).ensure()).unwrap_err();
    assert!(matches!(e, BridgeError::Ovsdb { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/db.sock"), "{e}");
    // ... while detach (DEL) succeeds without any OVSDB and still removes the owner's veth; and a socket
    // that exists but does not answer stays an error.
    node.exec_ok(&[
        "ip", "link", "add", "gone0", "type", "veth", "peer", "name", "gone0p",
    ]);
    node.exec_ok(&["ip", "link", "set", "gone0", "alias", "evio cgone eth0"]);
    let s4 = spec(Path::new("/nonexistent/db.sock"), &br, "netdev", None);
    in_netns(node.name(), move || {
        short(&s4).detach(&owner("cgone", "eth0"))
    })
    .expect("detach without OVSDB");
    assert!(
        !node.links().contains(&"gone0".to_string()),
        "the owner's veth was left"
    );
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap()); // the file stays, nobody listens
    let s5 = spec(&dead, &br, "netdev", None);
    let e = in_netns(node.name(), move || {
        short(&s5).detach(&owner("cgone", "eth0"))
    })
    .unwrap_err();
    assert!(matches!(e, BridgeError::Ovsdb { .. }), "{e:?}");
}

#[test]
fn concurrent_attaches_and_detaches_of_different_owners() {
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    let n = 16;
    for i in 0..n {
        veth(&node, &format!("cc{i}"), &format!("cc{i}p"), None);
    }
    let run = |detach: bool| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let s = s.clone();
                let ns = node.name().to_string();
                std::thread::spawn(move || {
                    in_netns(&ns, move || {
                        let b = OvsBridge::new(s).with_client(OvsClient::JsonRpc);
                        let o = owner(&format!("c{i}"), "eth0");
                        if detach {
                            b.detach(&o)
                        } else {
                            b.attach(&format!("cc{i}"), &o)
                        }
                    })
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap().expect("concurrent call");
        }
    };
    run(false);
    assert_eq!(ovs.ports(&br).len(), n);
    let ofports = ovs.vsctl_ok(&["--bare", "--columns=ofport", "list", "Interface"]);
    assert!(!ofports.contains("-1"), "{ofports}");
    run(true);
    assert!(ovs.ports(&br).is_empty());
    assert_eq!(ovs.names("Interface"), vec![br.clone()]);
}

#[test]
fn attach_that_vswitchd_cannot_open_is_rolled_back() {
    // The caller sees the device, ovs-vswitchd (in the node netns) does not: it reports the error after
    // the transaction committed, and attach must delete the rows it added.
    let (node, ovs) = setup();
    let br = unique("ob");
    let s = spec(&ovs.socket(), &br, "netdev", None);
    with(&node, &s, OvsClient::JsonRpc, |b| b.ensure()).expect("ensure");
    let elsewhere = Netns::new("ove");
    elsewhere.exec_ok(&[
        "ip", "link", "add", "xdev0", "type", "veth", "peer", "name", "xdev0p",
    ]);
    let e = with(&elsewhere, &s, OvsClient::JsonRpc, |b| {
        b.attach("xdev0", &owner("c", "eth0"))
    })
    .unwrap_err();
    assert!(matches!(e, BridgeError::Port { .. }), "{e:?}");
    assert!(e.to_string().contains("No such device"), "{e}");
    assert_eq!(
        ovs.names("Port"),
        vec![br.clone()],
        "the port of a failed attach was left"
    );
    assert_eq!(ovs.names("Interface"), vec![br.clone()]);
}

/// A unix-socket proxy in front of ovsdb-server that answers its FIRST connection with garbage (a broken
/// JSON-RPC conversation) and forwards every later one. Stops when dropped.
struct CorruptingProxy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl CorruptingProxy {
    fn start(listen: &Path, upstream: &Path) -> CorruptingProxy {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let l = UnixListener::bind(listen).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, up) = (stop.clone(), upstream.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut n = 0;
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                n += 1;
                if n == 1 {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(b"}{ not json");
                    continue;
                }
                let s = UnixStream::connect(&up).unwrap();
                let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                let (mut c3, mut s3) = (c, s);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s3, &mut c3);
                    let _ = c3.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CorruptingProxy {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn auto_client_falls_back_to_ovs_vsctl_when_json_rpc_breaks() {
    let (node, ovs) = setup();
    let dir = tempfile::tempdir().unwrap();
    let proxy_sock = dir.path().join("proxy.sock");
    let _proxy = CorruptingProxy::start(&proxy_sock, &ovs.socket());
    let br = unique("ob");
    let s = spec(&proxy_sock, &br, "netdev", None);
    // The first (JSON-RPC) conversation breaks; ensure still succeeds through ovs-vsctl.
    with(&node, &s, OvsClient::Auto, |b| b.ensure()).expect("ensure through the fallback");
    assert_eq!(ovs.names("Bridge"), vec![br.clone()]);
    assert!(node.links().contains(&br));
    // Later conversations are clean: JSON-RPC does the rest.
    veth(&node, "fb0", "fb0p", None);
    with(&node, &s, OvsClient::Auto, |b| {
        b.attach("fb0", &owner("c", "eth0"))
    })
    .expect("attach");
    assert_eq!(ovs.ports(&br), ["fb0"]);
    with(&node, &s, OvsClient::Auto, |b| {
        b.detach(&owner("c", "eth0"))
    })
    .expect("detach");
    assert!(ovs.ports(&br).is_empty());

    // JSON-RPC only: the broken conversation is an OVSDB error, nothing falls back.
    let dir2 = tempfile::tempdir().unwrap();
    let sock2 = dir2.path().join("proxy.sock");
    let _proxy2 = CorruptingProxy::start(&sock2, &ovs.socket());
    let s2 = spec(&sock2, &unique("ob"), "netdev", None);
    let e = with(&node, &s2, OvsClient::JsonRpc, |b| b.ensure()).unwrap_err();
    assert!(matches!(e, BridgeError::Ovsdb { .. }), "{e:?}");
    assert!(e.to_string().contains("JSON"), "{e}");
    assert_eq!(ovs.names("Bridge"), vec![br.clone()]);
}
