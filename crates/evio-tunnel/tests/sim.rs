//! Simulation tests with a fake clock (boringtun's timers read `mock_instant`):
//! `cargo test -p evio-tunnel --features mock-time`.
#![cfg(feature = "mock-time")]

mod common;

use std::time::Duration;

use common::{Sim, ipv4};
use evio_tunnel::{Event, Outbound, PathKind};

const S: Duration = Duration::from_secs(1);
const STEP: Duration = Duration::from_millis(250);

fn handshakes(sim: &Sim, i: usize) -> u64 {
    sim.nodes[i].node.peers().iter().map(|p| p.handshakes).sum()
}

#[test]
fn rekey_after_two_minutes_keeps_traffic_flowing() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let h0 = handshakes(&sim, 0) + handshakes(&sim, 1);
    // Steady traffic for 5 minutes: sessions are renewed (REKEY_AFTER_TIME = 120 s) without loss.
    let mut delivered = 0;
    for k in 0..300 {
        let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], format!("k{k}").as_bytes());
        assert!(matches!(
            sim.send(0, &p),
            Outbound::Send { .. } | Outbound::Queued
        ));
        sim.run();
        let q = ipv4([10, 10, 0, 2], [10, 10, 0, 1], b"ack");
        sim.send(1, &q);
        sim.advance(S, STEP);
        delivered = sim.nodes[1].inbox.len();
    }
    assert_eq!(delivered, 300);
    let h1 = handshakes(&sim, 0) + handshakes(&sim, 1);
    assert!(h1 >= h0 + 2, "expected rekeys: {h0} -> {h1}");
    assert_eq!(sim.nodes[0].node.peers()[0].path, PathKind::Direct);
}

#[test]
fn handshake_retried_under_loss() {
    let mut sim = Sim::mesh(2, None);
    // Drop the first 3 handshake initiations (and all responses to them).
    let mut dropped = 0;
    sim.loss = Box::new(move |_, _, d: &[u8]| {
        if d.len() == 148 && d[0] == 1 && dropped < 3 {
            dropped += 1;
            return true;
        }
        false
    });
    sim.run();
    // Only node 0 has the initiative now: make node 1's first init lost too (it was, 2 of 3 drops used).
    assert_eq!(sim.nodes[0].node.peers()[0].path, PathKind::Connecting);
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"after retry");
    sim.send(0, &p);
    sim.run();
    assert!(sim.nodes[1].inbox.is_empty());
    // Retries every REKEY_TIMEOUT (5 s): within 20 s a session exists and the queued packet arrives.
    sim.advance(Duration::from_secs(20), STEP);
    assert_eq!(sim.nodes[0].node.peers()[0].path, PathKind::Direct);
    assert_eq!(sim.nodes[1].inbox, vec![p]);
}

#[test]
fn session_expires_when_the_peer_is_gone_and_recovers_when_it_returns() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    assert_eq!(sim.nodes[0].node.peers()[0].path, PathKind::Direct);
    // Node 1 vanishes (every datagram to or from it is lost) while node 0 keeps sending.
    let gone = sim.nodes[1].addr;
    sim.loss = Box::new(move |f, t, _| *f == gone || *t == gone);
    for _ in 0..200 {
        let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"anyone?");
        sim.send(0, &p);
        sim.advance(S, Duration::from_millis(500));
    }
    // REJECT_AFTER_TIME and REKEY_ATTEMPT_TIME passed: the session is dead, the peer is connecting.
    let st = &sim.nodes[0].node.peers()[0];
    assert_eq!(st.path, PathKind::Connecting, "{st:?}");
    let id = sim.id_of(0, 1);
    let evs: Vec<Event> = std::iter::from_fn(|| sim.nodes[0].node.poll_event()).collect();
    assert!(evs.contains(&Event::SessionExpired { peer: id }), "{evs:?}");
    // It comes back: new traffic starts a new handshake and flows again.
    sim.loss = Box::new(|_, _, _| false);
    sim.nodes[1].inbox.clear();
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"welcome back");
    sim.send(0, &p);
    sim.advance(Duration::from_secs(6), STEP);
    assert_eq!(sim.nodes[0].node.peers()[0].path, PathKind::Direct);
    assert!(sim.nodes[1].inbox.contains(&p));
}

#[test]
fn restarted_peer_reconnects() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    // Node 1 restarts: same key, new state (no sessions).
    sim.nodes[1].node = evio_tunnel::Node::new(evio_tunnel::NodeConfig {
        private_key: common::key(2),
        preshared_key: None,
        persistent_keepalive: None,
    });
    sim.advance(S, STEP);
    sim.add_peer(1, 0);
    sim.flush_transmits();
    sim.run();
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"hi again");
    sim.send(0, &p);
    sim.run();
    assert_eq!(sim.nodes[1].inbox, vec![p]);
    let q = ipv4([10, 10, 0, 2], [10, 10, 0, 1], b"hi");
    sim.send(1, &q);
    sim.run();
    assert_eq!(sim.nodes[0].inbox, vec![q]);
}
