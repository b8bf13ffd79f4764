//! Paths chosen by NAT traversal (`Node::set_path`) on peers handed over without endpoints, as eviod
//! does: the first `set_path` starts the handshake (larger key), the path reads `connecting` until a
//! session exists and then the chosen kind, and the endpoint stays where NAT traversal put it.

use std::net::SocketAddr;
use std::time::Instant;

use evio_tunnel::{Inbound, Node, NodeConfig, Outbound, PathKind, PeerConfig, StaticSecret};

fn node(seed: u8) -> Node {
    Node::new(NodeConfig {
        private_key: StaticSecret::from([seed; 32]),
        preshared_key: None,
        persistent_keepalive: None,
    })
}

fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

/// Delivers every pending transmit of `from` to `to` (as if it came from `src`); returns how many.
fn shuttle(from: &mut Node, to: &mut Node, src: SocketAddr) -> usize {
    let mut n = 0;
    let mut buf = vec![0u8; 2048];
    while let Some(t) = from.poll_transmit() {
        n += 1;
        let _ = to.decapsulate(Instant::now(), src, &t.data, &mut buf);
    }
    n
}

#[test]
fn set_path_starts_the_session_and_owns_the_endpoint() {
    let (mut a, mut b) = (node(1), node(2));
    let (a_vip, b_vip) = ([10, 10, 0, 1], [10, 10, 0, 2]);
    let cfg = |n: &Node, name: &str, vip: [u8; 4]| PeerConfig {
        name: name.into(),
        public_key: n.public_key(),
        allowed: vec![
            format!("{}.{}.{}.{}/32", vip[0], vip[1], vip[2], vip[3])
                .parse()
                .unwrap(),
        ],
    };
    let now = Instant::now();
    let ib = a.upsert_peer(now, cfg(&b, "b", b_vip));
    let ia = b.upsert_peer(now, cfg(&a, "a", a_vip));
    // No path yet: nothing to send, no endpoint.
    assert!(a.poll_transmit().is_none() && b.poll_transmit().is_none());
    assert_eq!(a.peer(ib).unwrap().endpoint, None);

    // NAT traversal picked a relayed path on both sides (addresses as each side reaches the other).
    let (a_seen, b_seen): (SocketAddr, SocketAddr) = (
        "198.18.0.1:50001".parse().unwrap(),
        "198.18.0.1:50002".parse().unwrap(),
    );
    a.set_path(ib, b_seen, PathKind::Relay);
    b.set_path(ia, a_seen, PathKind::Relay);
    assert_eq!(
        a.peer(ib).unwrap().path,
        PathKind::Connecting,
        "no session yet"
    );
    // The side with the larger key has started the handshake on the new endpoint.
    let (big, small, big_src, small_src) = if a.public_key() > b.public_key() {
        (&mut a, &mut b, a_seen, b_seen)
    } else {
        (&mut b, &mut a, b_seen, a_seen)
    };
    assert_eq!(shuttle(big, small, big_src), 1, "one initiation");
    assert_eq!(shuttle(small, big, small_src), 1, "one response");
    assert_eq!(a.peer(ib).unwrap().path, PathKind::Relay);
    assert_eq!(b.peer(ia).unwrap().path, PathKind::Relay);

    // Data (from the initiator: its session is confirmed) arriving from an unexpected address is accepted,
    // but the receiver's endpoint stays NAT traversal's.
    let a_big = a.public_key() > b.public_key();
    let (tx, rx, tx_vip, rx_vip, rx_id, rx_seen_tx, tx_seen_rx) = if a_big {
        (&mut a, &mut b, a_vip, b_vip, ia, a_seen, b_seen)
    } else {
        (&mut b, &mut a, b_vip, a_vip, ib, b_seen, a_seen)
    };
    let mut buf = vec![0u8; 2048];
    let p = ipv4(tx_vip, rx_vip);
    let Outbound::Send { to, len, .. } = tx.encapsulate(Instant::now(), &p, &mut buf) else {
        panic!("no data")
    };
    assert_eq!(to, tx_seen_rx);
    let mut out = vec![0u8; 2048];
    let r = rx.decapsulate(
        Instant::now(),
        "203.0.113.9:4444".parse().unwrap(),
        &buf[..len],
        &mut out,
    );
    assert!(matches!(r, Inbound::WriteTun { .. }), "{r:?}");
    assert_eq!(rx.peer(rx_id).unwrap().endpoint, Some(rx_seen_tx));

    // A later choice moves it (here: back to direct).
    let direct: SocketAddr = "198.18.1.1:51820".parse().unwrap();
    b.set_path(ia, direct, PathKind::Direct);
    let st = b.peer(ia).unwrap();
    assert_eq!((st.endpoint, st.path), (Some(direct), PathKind::Direct));
}
