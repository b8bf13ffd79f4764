//! Two network namespaces, each with a real TUN from evio-fastio and a forwarder thread that moves
//! packets between its TUN and a real UDP socket (no crypto) with the batch APIs; a real kernel TCP
//! connection crosses and must arrive byte-exact. Needs root.

mod common;

use common::{Topology, transfer};
use evio_fastio::udp::UdpStats;

const MB: usize = 1 << 20;

#[test]
fn tcp_v4_through_offload_tunnels() {
    let t = Topology::new(true, true, true);
    transfer(&t, false, 24 * MB);
    let (a, b) = t.stop();
    eprintln!("a: {a:?}\nb: {b:?}");
    assert!(
        a.tun.super_packets > 0,
        "sender TUN never handed over a TSO super-packet: {:?}",
        a.tun
    );
    assert!(a.tun.max_segments > 1);
    assert!(
        a.udp.gso_sends > 0 && a.udp.max_gso_batch > 1,
        "no GSO send: {:?}",
        a.udp
    );
    assert!(
        b.udp.gro_msgs > 0,
        "receiver never got a GRO message: {:?}",
        b.udp
    );
    assert!(
        b.tun.coalesced_writes > 0 && b.tun.max_coalesced > 1,
        "no coalesced TUN write: {:?}",
        b.tun
    );
    assert_eq!(a.tun.drops + b.tun.drops, 0);
}

#[test]
fn tcp_v6_through_offload_tunnels() {
    let t = Topology::new(true, true, true);
    transfer(&t, true, 16 * MB);
    let (a, b) = t.stop();
    assert!(a.tun.super_packets > 0, "{:?}", a.tun);
    assert!(b.tun.coalesced_writes > 0, "{:?}", b.tun);
    assert_eq!(a.tun.drops + b.tun.drops, 0);
}

/// The receiver has no offloads, so its kernel verifies the checksums of every segment the
/// sender cut; UDP runs without GSO/GRO (fallback paths) but still batched by recvmmsg.
#[test]
fn offload_sender_plain_receiver_without_udp_offloads() {
    let t = Topology::new(true, false, false);
    transfer(&t, false, 16 * MB);
    let (a, b) = t.stop();
    assert!(a.tun.super_packets > 0, "{:?}", a.tun);
    assert_eq!(b.tun.coalesced_writes, 0);
    let none = |u: &UdpStats| u.gso_sends == 0 && u.gro_msgs == 0;
    assert!(
        none(&a.udp) && none(&b.udp),
        "offloads used although off: {:?} {:?}",
        a.udp,
        b.udp
    );
    assert!(
        b.udp.max_recv_batch > 1,
        "recvmmsg never returned more than one datagram: {:?}",
        b.udp
    );
}

/// Data from a plain TUN into an offload TUN: plain reads, coalesced writes on the far side.
#[test]
fn plain_sender_offload_receiver() {
    let t = Topology::new(false, true, true);
    transfer(&t, false, 16 * MB);
    let (a, b) = t.stop();
    assert_eq!(a.tun.super_packets, 0);
    assert!(b.tun.coalesced_writes > 0, "{:?}", b.tun);
}

/// Batches smaller than a super-packet: segments are delivered over several reads.
#[test]
fn small_batches_deliver_super_packets_in_pieces() {
    let t = Topology::with_batch(true, true, true, 8);
    transfer(&t, false, 8 * MB);
    let (a, b) = t.stop();
    assert!(
        a.tun.max_segments > 8,
        "no super-packet larger than the batch: {:?}",
        a.tun
    );
    assert!(
        b.tun.max_coalesced > 1 && b.tun.max_coalesced <= 8,
        "{:?}",
        b.tun
    );
    assert_eq!(a.tun.drops + b.tun.drops, 0);
}

/// An application in a sending UDP GSO (like QUIC): the kernel hands the TUN USO super-packets,
/// which the forwarder segments; the receiving kernel checks every UDP checksum.
#[test]
fn udp_gso_application_traffic_is_segmented() {
    use evio_fastio::{GRO_BUF, RecvBatch, SendBatch, UdpBatch, wait_readable};
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    let t = Topology::new(true, true, true);
    let (sends, per_send, size) = (40usize, 30usize, 1000usize);
    let nb = t.b.ns.name().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        common::enter_netns(&nb);
        let mut u = UdpBatch::new(UdpSocket::bind((common::B_V4, 7000)).unwrap()).unwrap();
        u.set_buffer_sizes(8 << 20).unwrap();
        tx.send(()).unwrap();
        let mut rb = RecvBatch::new(32, GRO_BUF);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < sends * per_send && Instant::now() < deadline {
            wait_readable(&[u.as_raw_fd()], 100).unwrap();
            if u.recv_batch(&mut rb).is_ok() {
                got.extend(rb.iter().map(|(_, d)| d.to_vec()));
            }
        }
        got
    });
    rx.recv().unwrap();
    let na = t.a.ns.name().to_string();
    std::thread::spawn(move || {
        common::enter_netns(&na);
        let mut u = UdpBatch::new(UdpSocket::bind((common::A_V4, 0)).unwrap()).unwrap();
        assert!(u.max_gso_segments() > 1);
        let dest: SocketAddr = format!("{}:7000", common::B_V4).parse().unwrap();
        let mut sb = SendBatch::new(per_send, per_send * size);
        for s in 0..sends {
            sb.clear();
            for k in 0..per_send {
                let tag = (s * per_send + k) as u32;
                let mut d = vec![(tag % 251) as u8; size];
                d[..4].copy_from_slice(&tag.to_be_bytes());
                sb.push(dest, &d);
            }
            assert_eq!(u.send_batch(&sb).unwrap(), per_send);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(u.stats().gso_sends as usize, sends);
    })
    .join()
    .expect("sender");
    let mut got = receiver.join().expect("receiver");
    let (a, _b) = t.stop();
    assert!(
        a.tun.super_packets > 0,
        "the TUN never handed over a USO super-packet: {:?}",
        a.tun
    );
    assert_eq!(got.len(), sends * per_send, "datagrams lost");
    got.sort();
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.len(), size);
        assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize, i);
        assert!(d[4..].iter().all(|b| *b == (i % 251) as u8));
    }
}
