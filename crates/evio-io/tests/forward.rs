//! Two network namespaces, each with a real TUN from evio-io and a forwarder thread that moves
//! packets between its TUN and a real UDP socket (no crypto) with the batch APIs; a real kernel TCP
//! connection crosses and must arrive byte-exact. Needs root.

mod common;

use common::{Topology, transfer};
use evio_io::udp::UdpStats;

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
