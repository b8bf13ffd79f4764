//! Tests of the lab itself: NAT behaviours as built, reachability, teardown (also after errors and panics).
//! Run as root: `cargo test -p evio-testbed --test lab`.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use evio_testbed::lab::{Lab, NatKind, SERVICES_IP, unique_prefix};

fn netns_list() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

fn exists(ns: &str) -> bool {
    netns_list()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(ns))
}

/// Sends one datagram from `src` to each of `dsts` and returns the source address each destination saw.
fn observed_sources(src: &UdpSocket, dsts: &[UdpSocket]) -> Vec<SocketAddr> {
    let addrs: Vec<SocketAddr> = dsts.iter().map(|d| d.local_addr().unwrap()).collect();
    observed_at(src, dsts, &addrs)
}

/// Like [`observed_sources`] with the destination addresses given (for sockets bound to 0.0.0.0).
fn observed_at(src: &UdpSocket, dsts: &[UdpSocket], addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut seen = Vec::new();
    for (d, addr) in dsts.iter().zip(addrs) {
        d.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        src.send_to(b"hello", addr).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = d.recv_from(&mut buf).expect("datagram through the NAT");
        assert_eq!(&buf[..n], b"hello");
        seen.push(from);
    }
    seen
}

fn echo_sockets(lab: &Lab, ports: &[u16]) -> Vec<UdpSocket> {
    lab.in_internet(|| {
        ports
            .iter()
            .map(|p| UdpSocket::bind((SERVICES_IP, *p)).unwrap())
            .collect()
    })
    .unwrap()
}

#[test]
fn easy_nat_preserves_ports_symmetric_nat_does_not() {
    let lab = Lab::builder(&unique_prefix("lb"))
        .site(NatKind::EasyNat, 1)
        .site(NatKind::Symmetric, 1)
        .build()
        .unwrap();
    let echo = echo_sockets(&lab, &[7000, 7001, 7002]);

    // Easy NAT: the same public port (the host's own) towards every destination.
    let easy = lab.site(0);
    let s = easy.hosts[0].udp_socket(40000).unwrap();
    let seen = observed_sources(&s, &echo[..2]);
    assert_eq!(
        seen,
        vec![SocketAddr::from((easy.wan_ip, 40000)); 2],
        "easy NAT mappings: {seen:?}"
    );
    let ct = easy.conntrack_udp().unwrap();
    assert!(
        ct.iter()
            .any(|l| l.contains("sport=40000") && l.contains("dport=7001")),
        "conntrack: {ct:?}"
    );

    // Port-restricted filtering: an endpoint the host never sent to cannot get in, a contacted one can.
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    echo[2].send_to(b"unsolicited", seen[0]).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        s.recv_from(&mut buf).is_err(),
        "an uncontacted endpoint got through the easy NAT"
    );
    echo[0].send_to(b"reply", seen[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (n, from) = s
        .recv_from(&mut buf)
        .expect("reply from a contacted endpoint");
    assert_eq!(
        (&buf[..n], from),
        (&b"reply"[..], echo[0].local_addr().unwrap())
    );

    // Symmetric NAT: a different public port per destination.
    let sym = lab.site(1);
    let s = sym.hosts[0].udp_socket(40000).unwrap();
    let seen = observed_sources(&s, &echo[..2]);
    assert!(
        seen.iter()
            .all(|a| a.ip() == std::net::IpAddr::V4(sym.wan_ip)),
        "{seen:?}"
    );
    assert_ne!(
        seen[0].port(),
        seen[1].port(),
        "symmetric NAT reused a port: {seen:?}"
    );

    // Flushing conntrack drops the mappings.
    sym.flush_conntrack().unwrap();
    let ct = sym.conntrack_udp().unwrap();
    assert!(
        !ct.iter().any(|l| l.contains("sport=40000")),
        "mappings survived the flush: {ct:?}"
    );
    sym.set_udp_timeout(2).unwrap();
    let v = evio_testbed::lab::sysctl_read(&sym.nat_ns, "net/netfilter/nf_conntrack_udp_timeout")
        .unwrap();
    assert_eq!(v, "2");
    assert_eq!(
        evio_testbed::lab::sysctl_read(&sym.nat_ns, "net/ipv4/ip_forward").unwrap(),
        "1"
    );
    // The root namespace's values are untouched (ours are per namespace).
    let root_timeout = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_udp_timeout")
        .unwrap_or_default();
    assert_ne!(
        root_timeout.trim(),
        "2",
        "the root namespace's conntrack timeout changed"
    );
}

#[test]
fn reachability_lan_public_and_nothing_inbound() {
    let lab = Lab::builder(&unique_prefix("lb"))
        .site(NatKind::EasyNat, 2)
        .public_hosts(1)
        .build()
        .unwrap();
    let a = lab.site_host(0, 0);
    let b = lab.site_host(0, 1);
    let p = &lab.public_hosts()[0];
    // Same site: over the LAN, with private source addresses.
    let sa = a.udp_socket(5000).unwrap();
    let sb = b.udp_socket(5000).unwrap();
    let sp = p.udp_socket(5000).unwrap();
    let seen = observed_at(
        &sa,
        std::slice::from_ref(&sb),
        &[SocketAddr::from((b.ip, 5000))],
    );
    assert_eq!(seen[0], SocketAddr::from((a.ip, 5000)));
    // Sending to the private address doesn't work from a public host, only via the NAT's mapping.
    let seen = observed_at(
        &sa,
        std::slice::from_ref(&sp),
        &[SocketAddr::from((p.ip, 5000))],
    );
    assert_eq!(seen[0], SocketAddr::from((lab.site(0).wan_ip, 5000)));
    assert!(
        p.exec(&["ping", "-c1", "-W1", &a.ip.to_string()]).is_err(),
        "private address reachable"
    );
    // Every namespace has only what the lab gave it: the public host has no default route.
    assert!(
        p.exec(&["ip", "route", "show", "default"])
            .unwrap()
            .trim()
            .is_empty()
    );
    assert!(
        a.exec(&["ip", "route", "show", "default"])
            .unwrap()
            .contains("192.168.1.1")
    );
}

#[test]
fn services_and_teardown_leave_nothing() {
    let prefix = unique_prefix("lb");
    let mut lab = Lab::builder(&prefix)
        .etcd(true)
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::Symmetric, 1)
        .public_hosts(1)
        .build()
        .unwrap();
    // etcd answers from behind a NAT.
    let url = format!("{}/health", lab.etcd_endpoint().unwrap());
    let h = lab
        .site_host(1, 0)
        .exec(&["curl", "-sf", "--max-time", "3", &url])
        .unwrap();
    assert!(h.contains("true"), "{h}");
    // The TURN password file is private.
    use std::os::unix::fs::PermissionsExt;
    let turn = lab.turn().unwrap();
    let mode = std::fs::metadata(&turn.password_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&turn.password_file).unwrap(),
        turn.password
    );
    // Kill and restart coturn.
    lab.turn_mut().unwrap().kill();
    assert!(
        !lab.internet_exec(&["ss", "-Hnul"])
            .unwrap()
            .contains("198.18.0.1:3478")
    );
    lab.turn_mut().unwrap().restart().unwrap();
    assert!(
        lab.internet_exec(&["ss", "-Hnul"])
            .unwrap()
            .contains("198.18.0.1:3478")
    );
    // A stray process in a host must die too.
    let mut stray = lab
        .site_host(0, 0)
        .command("sleep")
        .arg("600")
        .spawn()
        .unwrap();

    let names = lab.namespaces().to_vec();
    let dir = lab.dir().to_path_buf();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.iter().all(|n| exists(n)));
    drop(lab);
    assert!(
        names.iter().all(|n| !exists(n)),
        "left behind: {}",
        netns_list()
    );
    assert!(!dir.exists());
    let status = stray.wait().unwrap();
    assert!(!status.success());
    let ps = String::from_utf8_lossy(
        &std::process::Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !ps.contains(&dir.to_string_lossy().to_string()),
        "a lab process survived"
    );
}

#[test]
fn failed_build_and_panic_clean_up() {
    // A build that fails half way (the second NAT's name is taken) removes what it made.
    let prefix = unique_prefix("lb");
    let blocker = format!("{prefix}-nat1");
    evio_testbed::lab::run(std::process::Command::new("ip").args(["netns", "add", &blocker]))
        .unwrap();
    let r = Lab::builder(&prefix)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .build();
    assert!(r.is_err());
    let left: Vec<String> = netns_list()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    evio_testbed::lab::run(std::process::Command::new("ip").args(["netns", "del", &blocker]))
        .unwrap();
    assert_eq!(left.len(), 1, "left behind: {left:?}");

    // A panic while the lab is alive unwinds through its Drop.
    let prefix = unique_prefix("lb");
    let p2 = prefix.clone();
    let r = std::thread::spawn(move || {
        let _lab = Lab::builder(&p2)
            .turn(true)
            .site(NatKind::Symmetric, 1)
            .build()
            .unwrap();
        assert!(exists(&format!("{p2}-nat0")));
        panic!("test panics half way");
    })
    .join();
    assert!(r.is_err());
    assert!(
        !netns_list().contains(&prefix),
        "left behind: {}",
        netns_list()
    );
}

#[test]
fn leftovers_of_a_killed_lab_are_removed() {
    let prefix = unique_prefix("lb");
    let lab = Lab::builder(&prefix)
        .site(NatKind::EasyNat, 1)
        .public_hosts(1)
        .build()
        .unwrap();
    let names = lab.namespaces().to_vec();
    let dir = lab.dir().to_path_buf();
    // Simulate a SIGKILLed owner: the namespaces outlive the value.
    std::mem::forget(lab);
    // A namespace that merely shares the prefix is not ours and stays.
    let other = format!("{prefix}-mine");
    evio_testbed::lab::run(std::process::Command::new("ip").args(["netns", "add", &other]))
        .unwrap();
    let mut removed = evio_testbed::lab::remove_leftovers(&prefix).unwrap();
    removed.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(removed, want);
    assert!(exists(&other));
    evio_testbed::lab::run(std::process::Command::new("ip").args(["netns", "del", &other]))
        .unwrap();
    assert!(names.iter().all(|n| !exists(n)));
    // The forgotten value's temp dir (processes in the lab were killed with its namespaces).
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tools_are_found() {
    for t in ["ip", "nft", "turnserver", "etcd", "conntrack"] {
        assert!(evio_testbed::lab::find_tool(t).is_some(), "{t} missing");
    }
    assert!(evio_testbed::lab::find_tool("no-such-tool-evio").is_none());
}

/// The lab at scale (the bug of issue 12: every NAT's WAN on one shared L2 segment made each NAT keep an
/// ARP entry for every other NAT it talked to, N·(N-1) entries in the machine-wide neighbour table of
/// 1024, which overflowed at about 35 sites). 40 sites and 2 public hosts, every host sending to every
/// other site's public address and to the services: every host reaches the services through its NAT
/// (seen from its NAT's public address), and the neighbour tables stay small: a NAT knows its host and
/// the router, the router one neighbour per link.
#[test]
fn forty_sites_keep_neighbour_tables_small_and_reach_the_services() {
    const SITES: usize = 40;
    const PUBLIC: usize = 2;
    let t = std::time::Instant::now();
    let mut b = Lab::builder(&unique_prefix("lb"));
    for i in 0..SITES {
        let kind = if i % 10 == 9 {
            NatKind::Symmetric
        } else {
            NatKind::EasyNat
        };
        b = b.site(kind, 1);
    }
    let lab = b.public_hosts(PUBLIC).build().unwrap();
    println!(
        "{SITES} sites, {PUBLIC} public hosts built in {:?}",
        t.elapsed()
    );
    let before = evio_testbed::lab::arp_table_stats();
    let server = lab
        .in_internet(|| UdpSocket::bind((SERVICES_IP, 7100)).unwrap())
        .unwrap();
    let wans: Vec<std::net::Ipv4Addr> = lab.sites().iter().map(|s| s.wan_ip).collect();
    let hosts = lab.hosts();
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for h in &hosts {
            let wans = &wans;
            s.spawn(move || {
                let sock = h.udp_socket(0).unwrap();
                // To every other site's public address: dropped by that NAT's input chain, but routed
                // (and, on a shared segment, ARP-resolved NAT to NAT) on the way.
                for w in wans {
                    let _ = sock.send_to(b"x", (*w, 9));
                }
                sock.send_to(h.ns.as_bytes(), (SERVICES_IP, 7100)).unwrap();
            });
        }
    });
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut buf = [0u8; 256];
    while seen.len() < hosts.len() {
        let Ok((n, from)) = server.recv_from(&mut buf) else {
            break;
        };
        seen.insert(String::from_utf8_lossy(&buf[..n]).into_owned(), from);
    }
    println!(
        "{} datagrams host to host and {} to the services in {:?}",
        hosts.len() * SITES,
        hosts.len(),
        t.elapsed()
    );
    for h in &hosts {
        let want = match h.site {
            Some(i) => lab.site(i).wan_ip,
            None => h.ip,
        };
        let from = seen
            .get(&h.ns)
            .unwrap_or_else(|| panic!("{} did not reach the services", h.ns));
        assert_eq!(from.ip(), std::net::IpAddr::V4(want), "{}", h.ns);
    }
    // Neighbour tables: a NAT holds its host and the router; the router one entry per link at most.
    let mut max_nat = 0;
    for site in lab.sites() {
        let n = evio_testbed::lab::neighbours(&site.nat_ns).unwrap();
        assert!(
            n.len() <= 1 + site.hosts.len(),
            "{}: {} neighbour entries: {n:#?}",
            site.nat_ns,
            n.len()
        );
        max_nat = max_nat.max(n.len());
    }
    let router = evio_testbed::lab::neighbours(lab.internet_ns()).unwrap();
    assert!(
        router.len() <= SITES + PUBLIC,
        "router: {} neighbour entries",
        router.len()
    );
    for h in &hosts {
        let n = evio_testbed::lab::neighbours(&h.ns).unwrap();
        assert!(n.len() <= 1, "{}: {n:?}", h.ns);
    }
    println!(
        "neighbour entries: at most {max_nat} per NAT, {} in the router; machine-wide before/after: {before:?} / {:?}",
        router.len(),
        evio_testbed::lab::arp_table_stats()
    );
}

/// A site renumbered by its ISP: the NAT's new public address is routed, the old one no longer is.
#[test]
fn renumbered_wan_is_routed() {
    let mut lab = Lab::builder(&unique_prefix("lb"))
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .build()
        .unwrap();
    let echo = echo_sockets(&lab, &[7200]);
    let old = lab.site(0).wan_ip;
    let new = std::net::Ipv4Addr::new(198, 18, 1, 201);
    lab.renumber_wan(0, new).unwrap();
    lab.site(0).flush_conntrack().unwrap();
    assert_eq!(lab.site(0).wan_ip, new);
    let s = lab.site_host(0, 0).udp_socket(41000).unwrap();
    let seen = observed_sources(&s, &echo);
    assert_eq!(seen, vec![SocketAddr::from((new, 41000))]);
    let routes = lab.internet_exec(&["ip", "route"]).unwrap();
    assert!(routes.contains("198.18.1.201 dev n0"), "{routes}");
    assert!(!routes.contains(&format!("{old} ")), "{routes}");
    // The other site is untouched and still reachable from the renumbered one.
    let other = lab.site_host(1, 0).udp_socket(0).unwrap();
    let seen = observed_at(
        &other,
        &echo,
        &[SocketAddr::from((evio_testbed::lab::SERVICES_IP, 7200))],
    );
    assert_eq!(seen[0].ip(), std::net::IpAddr::V4(lab.site(1).wan_ip));
}
