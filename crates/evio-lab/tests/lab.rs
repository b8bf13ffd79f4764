//! Tests of the lab itself: NAT behaviours as built, reachability, teardown (also after errors and panics).
//! Run as root: `cargo test -p evio-lab`.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use evio_lab::{Lab, NatKind, SERVICES_IP, unique_prefix};

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
    let v = evio_lab::sysctl_read(&sym.nat_ns, "net/netfilter/nf_conntrack_udp_timeout").unwrap();
    assert_eq!(v, "2");
    assert_eq!(
        evio_lab::sysctl_read(&sym.nat_ns, "net/ipv4/ip_forward").unwrap(),
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
    evio_lab::run(std::process::Command::new("ip").args(["netns", "add", &blocker])).unwrap();
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
    evio_lab::run(std::process::Command::new("ip").args(["netns", "del", &blocker])).unwrap();
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
    evio_lab::run(std::process::Command::new("ip").args(["netns", "add", &other])).unwrap();
    let mut removed = evio_lab::remove_leftovers(&prefix).unwrap();
    removed.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(removed, want);
    assert!(exists(&other));
    evio_lab::run(std::process::Command::new("ip").args(["netns", "del", &other])).unwrap();
    assert!(names.iter().all(|n| !exists(n)));
    // The forgotten value's temp dir (processes in the lab were killed with its namespaces).
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tools_are_found() {
    for t in ["ip", "nft", "turnserver", "etcd", "conntrack"] {
        assert!(evio_lab::find_tool(t).is_some(), "{t} missing");
    }
    assert!(evio_lab::find_tool("no-such-tool-evio").is_none());
}
