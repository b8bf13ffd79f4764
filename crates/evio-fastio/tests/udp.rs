//! Batched UDP on loopback: GSO runs, sendmmsg for the rest, GRO splitting on receive, with and
//! without offloads. Every datagram must arrive whole, in order per destination.

mod common;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use evio_fastio::{GRO_BUF, RecvBatch, SendBatch, UdpBatch, wait_readable};

fn datagram(tag: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| (i as u32 * 7 + tag) as u8).collect();
    if len >= 4 {
        d[..4].copy_from_slice(&tag.to_be_bytes());
    }
    d
}

/// Receives until `want` datagrams arrived (or 5 s passed).
fn recv_all(u: &mut UdpBatch, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut rb = RecvBatch::new(32, GRO_BUF);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < want && Instant::now() < deadline {
        wait_readable(&[u.as_raw_fd()], 100).unwrap();
        match u.recv_batch(&mut rb) {
            Ok(_) => got.extend(rb.iter().map(|(a, d)| (a, d.to_vec()))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    got
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    /// `[::]` sockets talking to IPv4 addresses.
    DualStack,
    V6,
}

fn run(offload: bool, fam: Family) {
    let (any, other, loopback): (&str, &str, std::net::IpAddr) = match fam {
        Family::V4 => ("127.0.0.1:0", "127.0.0.1:0", [127, 0, 0, 1].into()),
        Family::DualStack => ("[::]:0", "127.0.0.1:0", [127, 0, 0, 1].into()),
        Family::V6 => ("[::1]:0", "[::1]:0", std::net::Ipv6Addr::LOCALHOST.into()),
    };
    let open =
        |a: &str| UdpBatch::with_offloads(UdpSocket::bind(a).unwrap(), offload, offload).unwrap();
    let (mut tx, mut rx1, mut rx2) = (open(any), open(any), open(other));
    for u in [&tx, &rx1, &rx2] {
        u.set_buffer_sizes(4 << 20).unwrap();
    }
    let lo = |a: SocketAddr| SocketAddr::new(loopback, a.port());
    let (d1, d2) = (lo(rx1.local_addr().unwrap()), rx2.local_addr().unwrap());
    let mut sb = SendBatch::new(256, 256 * 1500);
    let mut want1 = Vec::new();
    let mut want2 = Vec::new();
    let mut tag = 0;
    let mut push = |sb: &mut SendBatch, dest: SocketAddr, len: usize, want: &mut Vec<Vec<u8>>| {
        let d = datagram(tag, len);
        tag += 1;
        assert!(sb.push(dest, &d));
        want.push(d);
    };
    // A GSO run (last shorter), then sizes that break runs, then another destination, then back.
    for _ in 0..20 {
        push(&mut sb, d1, 1200, &mut want1);
    }
    push(&mut sb, d1, 700, &mut want1);
    for len in [100, 1300, 5, 1300, 1300, 0] {
        push(&mut sb, d1, len, &mut want1);
    }
    for i in 0..30 {
        push(
            &mut sb,
            if i % 2 == 0 { d2 } else { d1 },
            64,
            if i % 2 == 0 { &mut want2 } else { &mut want1 },
        );
    }
    for _ in 0..70 {
        push(&mut sb, d2, 1400, &mut want2);
    }
    let n = tx.send_batch(&sb).unwrap();
    assert_eq!(n, sb.len());
    let got1 = recv_all(&mut rx1, want1.len());
    let got2 = recv_all(&mut rx2, want2.len());
    let me = lo(tx.local_addr().unwrap());
    assert!(
        got1.iter().chain(&got2).all(|(a, _)| *a == me),
        "source address (IPv4, unmapped)"
    );
    let g1: Vec<Vec<u8>> = got1.into_iter().map(|(_, d)| d).collect();
    let g2: Vec<Vec<u8>> = got2.into_iter().map(|(_, d)| d).collect();
    assert_eq!(g1.len(), want1.len());
    assert!(g1 == want1, "datagrams to rx1 differ");
    assert!(g2 == want2, "datagrams to rx2 differ");
    let s = tx.stats();
    assert_eq!(s.sent_datagrams as usize, sb.len());
    assert!(s.max_mmsg_batch > 1, "no sendmmsg batch: {s:?}");
    if offload {
        assert!(tx.max_gso_segments() > 1, "kernel without UDP GSO?");
        assert!(s.gso_sends >= 3 && s.max_gso_batch >= 21, "{s:?}");
        let r = rx2.stats();
        assert!(r.gro_msgs > 0, "no GRO message: {r:?}");
    } else {
        assert_eq!(s.gso_sends, 0);
        assert_eq!(rx2.stats().gro_msgs, 0);
        assert!(
            s.send_calls < sb.len() as u64 / 10,
            "sendmmsg should batch: {s:?}"
        );
    }
}

#[test]
fn gso_gro_batches_arrive_whole() {
    run(true, Family::V4);
}

/// IPv4 destinations and sources through dual-stack IPv6 sockets (mapped addresses).
#[test]
fn dual_stack_sockets() {
    run(true, Family::DualStack);
    run(false, Family::DualStack);
}

/// eviod's socket: one port, both families, whatever `net.ipv6.bindv6only` says.
#[test]
fn a_dual_stack_socket_takes_both_families() {
    let mut u = UdpBatch::new(evio_fastio::bind_dual_stack(0).unwrap()).unwrap();
    let port = u.local_addr().unwrap().port();
    let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let v6 = UdpSocket::bind("[::1]:0").unwrap();
    v4.send_to(b"four", ("127.0.0.1", port)).unwrap();
    v6.send_to(b"six", ("::1", port)).unwrap();
    let mut got = recv_all(&mut u, 2);
    got.sort();
    assert_eq!(
        got,
        vec![
            (v4.local_addr().unwrap(), b"four".to_vec()),
            (v6.local_addr().unwrap(), b"six".to_vec())
        ]
    );
}

#[test]
fn ipv6_sockets() {
    run(true, Family::V6);
    run(false, Family::V6);
}

#[test]
fn without_offloads_sendmmsg_recvmmsg() {
    run(false, Family::V4);
}

/// A GSO run the kernel refuses (EMSGSIZE: datagrams above the path MTU) is resent unsegmented, so
/// the datagrams that fit still go, and GSO stays on. Needs root (a veth between two namespaces).
#[test]
fn gso_refusals_fall_back() {
    let na = evio_testbed::Netns::new("fg");
    let nb = evio_testbed::Netns::new("fh");
    na.veth_to("ua", &nb, "ub");
    na.exec_ok(&["ip", "addr", "add", "192.0.2.1/24", "dev", "ua"]);
    nb.exec_ok(&["ip", "addr", "add", "192.0.2.2/24", "dev", "ub"]);
    let b_name = nb.name().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        common::enter_netns(&b_name);
        let mut u = UdpBatch::new(UdpSocket::bind("192.0.2.2:7000").unwrap()).unwrap();
        tx.send(()).unwrap();
        recv_all(&mut u, 10 + 20)
    });
    rx.recv().unwrap();
    let a_name = na.name().to_string();
    let stats = std::thread::spawn(move || {
        common::enter_netns(&a_name);
        let mut u = UdpBatch::new(UdpSocket::bind("192.0.2.1:0").unwrap()).unwrap();
        let dest: SocketAddr = "192.0.2.2:7000".parse().unwrap();
        let mut sb = SendBatch::new(64, 64 * 2000);
        // 1600-byte datagrams do not fit the 1500 MTU: the GSO run (3 x 1600 + 1000) is refused, then
        // sent singly: three EMSGSIZE (dropped, counted), the 1000-byte one goes; GSO stays on.
        for _ in 0..3 {
            sb.push(dest, &[1u8; 1600]);
        }
        for i in 0..10u8 {
            sb.push(dest, &[i; 1000]);
        }
        let n = u.send_batch(&sb).unwrap();
        assert_eq!(n, 10, "{:?}", u.stats());
        let s1 = u.stats();
        assert_eq!(s1.gso_retries, 1, "{s1:?}");
        assert_eq!(s1.send_errors, 3, "{s1:?}");
        assert_eq!(s1.gso_sends, 1, "the 1000-byte run still uses GSO: {s1:?}");
        assert!(u.max_gso_segments() > 1);
        // (EIO, GSO off for good, is not tested: this kernel checksums UDP GSO in software even
        // with `ethtool -K ua tx off`, so it never answers EIO.)
        sb.clear();
        for i in 0..20u8 {
            sb.push(dest, &[100 + i; 1000]);
        }
        assert_eq!(u.send_batch(&sb).unwrap(), 20);
        u.stats()
    })
    .join()
    .expect("sender");
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 30, "every datagram that fits the MTU arrives");
    assert_eq!(stats.gso_sends, 2, "{stats:?}");
    let mut firsts: Vec<u8> = got.iter().map(|(_, d)| d[0]).collect();
    firsts.sort();
    let want: Vec<u8> = (0..10).chain(100..120).collect();
    assert_eq!(firsts, want);
}
