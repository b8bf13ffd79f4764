//! Protocol core tests on a simulated network in real time (no timers needed; with `mock-time` the
//! frozen clock would make every handshake timestamp equal, so they run without it).
#![cfg(not(feature = "mock-time"))]

mod common;

use std::time::Duration;

use common::{Sim, ipv4};
use evio_tunnel::{DropReason, Event, Inbound, Outbound, PathKind};

#[test]
fn handshake_then_data_both_ways() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    // Both sides initiated on peer add; both ended with a session.
    for i in 0..2 {
        let st = sim.nodes[i].node.peers();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].path, PathKind::Direct, "node {i}: {st:?}");
        assert!(st[0].last_handshake.is_some());
    }
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"hello from 1");
    assert!(matches!(sim.send(0, &p), Outbound::Send { .. }));
    sim.run();
    assert_eq!(sim.nodes[1].inbox, vec![p.clone()]);
    let q = ipv4([10, 244, 2, 5], [10, 244, 1, 7], b"pod reply");
    assert!(matches!(sim.send(1, &q), Outbound::Send { .. }));
    sim.run();
    assert_eq!(sim.nodes[0].inbox, vec![q.clone()]);
    let st = sim.nodes[0].node.peers();
    assert_eq!(st[0].tx_bytes, p.len() as u64);
    assert_eq!(st[0].rx_bytes, q.len() as u64);
    // Nothing on the wire carries the payload in clear.
    for (_, _, d) in &sim.captured {
        assert!(!d.windows(5).any(|w| w == b"hello" || w == b"reply"));
    }
}

#[test]
fn packets_sent_before_the_handshake_are_queued_and_delivered() {
    let mut sim = Sim::mesh(2, None);
    // The handshake messages are still on the wire: the packet waits in the session queue.
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"early");
    let r = sim.send(0, &p);
    assert!(
        matches!(r, Outbound::Queued | Outbound::Send { .. }),
        "{r:?}"
    );
    sim.run();
    assert_eq!(sim.nodes[1].inbox, vec![p]);
}

#[test]
fn three_nodes_route_by_longest_prefix() {
    let mut sim = Sim::mesh(3, Some([7u8; 32]));
    sim.run();
    for (src, dst) in [(0usize, 1usize), (0, 2), (1, 2), (2, 0), (1, 0), (2, 1)] {
        let s = [10, 244, src as u8 + 1, 9];
        let d = [10, 244, dst as u8 + 1, 9];
        let p = ipv4(s, d, format!("{src}->{dst}").as_bytes());
        assert!(matches!(sim.send(src, &p), Outbound::Send { .. }));
        sim.run();
        assert_eq!(sim.nodes[dst].inbox.pop(), Some(p));
    }
    assert!(sim.nodes.iter().all(|n| n.inbox.is_empty()));
}

#[test]
fn unknown_destination_is_dropped() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 99], b"x");
    assert_eq!(sim.send(0, &p), Outbound::Dropped(DropReason::NoRoute));
    assert_eq!(
        sim.send(0, b"not ip"),
        Outbound::Dropped(DropReason::Malformed)
    );
    assert_eq!(sim.nodes[0].node.drops().get(DropReason::NoRoute), 1);
}

#[test]
fn spoofed_inner_source_is_rejected() {
    let mut sim = Sim::mesh(3, None);
    sim.run();
    // Node 1 sends to node 0 a packet claiming node 2's pod address as source.
    let p = ipv4([10, 244, 3, 9], [10, 244, 1, 9], b"spoof");
    assert!(matches!(sim.send(1, &p), Outbound::Send { .. }));
    sim.run();
    assert!(sim.nodes[0].inbox.is_empty());
    assert_eq!(sim.nodes[0].node.drops().get(DropReason::SpoofedSource), 1);
    // Outside every peer's prefixes too.
    let p = ipv4([192, 168, 1, 1], [10, 244, 1, 9], b"spoof");
    sim.send(1, &p);
    sim.run();
    assert!(sim.nodes[0].inbox.is_empty());
    assert_eq!(sim.nodes[0].node.drops().get(DropReason::SpoofedSource), 2);
    // The genuine source still passes.
    let p = ipv4([10, 244, 2, 9], [10, 244, 1, 9], b"genuine");
    sim.send(1, &p);
    sim.run();
    assert_eq!(sim.nodes[0].inbox, vec![p]);
}

#[test]
fn replayed_and_garbage_datagrams_are_rejected() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"once");
    sim.send(0, &p);
    sim.run();
    assert_eq!(sim.nodes[1].inbox.len(), 1);
    let (from, _, data) = sim.captured.last().cloned().unwrap();
    assert_eq!(
        sim.inject(1, from, &data),
        Inbound::Dropped(DropReason::Replay)
    );
    // Replayed handshake initiation: rejected (old timestamp), no new session.
    let (hfrom, _, hs) = sim
        .captured
        .iter()
        .find(|(_, _, d)| d.len() == 148 && d[0] == 1)
        .cloned()
        .unwrap();
    let before = sim.nodes[1].node.peers()[0].handshakes + sim.nodes[0].node.peers()[0].handshakes;
    let r0 = sim.inject(0, hfrom, &hs);
    let r1 = sim.inject(1, hfrom, &hs);
    assert!(
        matches!(r0, Inbound::Dropped(_)) || matches!(r1, Inbound::Dropped(_)),
        "{r0:?} {r1:?}"
    );
    let after = sim.nodes[1].node.peers()[0].handshakes + sim.nodes[0].node.peers()[0].handshakes;
    assert_eq!(before, after);
    // Garbage of every shape.
    let mut tampered = data.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    tampered[8] = tampered[8].wrapping_add(1); // new counter, bad tag
    assert_eq!(
        sim.inject(1, from, &tampered),
        Inbound::Dropped(DropReason::DecryptFailed)
    );
    assert_eq!(
        sim.inject(1, from, b""),
        Inbound::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        sim.inject(1, from, &[0xffu8; 200]),
        Inbound::Dropped(DropReason::Malformed)
    );
    let mut fake_hs = vec![0u8; 148];
    fake_hs[0] = 1;
    assert_eq!(
        sim.inject(1, from, &fake_hs),
        Inbound::Dropped(DropReason::HandshakeRejected)
    );
    let mut fake_data = vec![0u8; 64];
    fake_data[0] = 4;
    assert_eq!(
        sim.inject(1, from, &fake_data),
        Inbound::Dropped(DropReason::UnknownPeer)
    );
    // And the tunnel still works.
    let q = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"still fine");
    sim.send(0, &q);
    sim.run();
    assert_eq!(sim.nodes[1].inbox.last(), Some(&q));
    assert!(sim.nodes[1].node.drops().get(DropReason::Replay) >= 1);
}

#[test]
fn a_stranger_cannot_handshake() {
    let mut sim = Sim::mesh(2, None);
    // A third node that knows node 0 but node 0 does not know it.
    let stranger = evio_tunnel::Node::new(evio_tunnel::NodeConfig {
        private_key: common::key(99),
        preshared_key: None,
        persistent_keepalive: None,
    });
    let cfg = sim.peer_cfg(0);
    let id = stranger.upsert_peer(sim.now(), cfg);
    stranger.set_path(id, sim.nodes[0].addr, PathKind::Direct);
    let mut buf = vec![0u8; 2000];
    let p = ipv4([10, 10, 0, 99], [10, 10, 0, 1], b"let me in");
    let len = match stranger.poll_transmit() {
        Some(t) => {
            buf[..t.data.len()].copy_from_slice(&t.data);
            t.data.len()
        }
        None => match stranger.encapsulate(sim.now(), &p, &mut buf) {
            Outbound::Send { len, .. } => len,
            r => panic!("{r:?}"),
        },
    };
    assert_eq!(len, 148);
    let r = sim.inject(0, "192.0.2.99:1".parse().unwrap(), &buf[..len]);
    assert_eq!(r, Inbound::Dropped(DropReason::UnknownPeer));
}

#[test]
fn psk_mismatch_prevents_a_session() {
    let mut sim = Sim::mesh(2, Some([1u8; 32]));
    // Replace node 1 with one that has another PSK but the same key.
    let cfg0 = sim.peer_cfg(0);
    sim.nodes[1].node = evio_tunnel::Node::new(evio_tunnel::NodeConfig {
        private_key: common::key(2),
        preshared_key: Some([2u8; 32]),
        persistent_keepalive: None,
    });
    let now = sim.now();
    let id = sim.nodes[1].node.upsert_peer(now, cfg0);
    sim.wire.clear();
    let addr = sim.nodes[0].addr;
    sim.nodes[1].node.set_path(id, addr, PathKind::Direct);
    sim.flush_transmits();
    sim.run();
    assert_eq!(sim.nodes[1].node.peers()[0].path, PathKind::Connecting);
    assert!(sim.nodes[1].node.peers()[0].last_handshake.is_none());
}

#[test]
fn peer_update_and_removal() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    // New pod subnet for node 1: routes follow, the session stays.
    let mut cfg = sim.peer_cfg(1);
    cfg.allowed[1] = "10.244.9.0/24".parse().unwrap();
    let hs_before = sim.nodes[0].node.peers()[0].handshakes;
    let now = sim.now();
    sim.nodes[0].node.upsert_peer(now, cfg);
    assert_eq!(
        sim.nodes[0].node.route("10.244.9.3".parse().unwrap()),
        Some(sim.id_of(0, 1))
    );
    assert_eq!(sim.nodes[0].node.route("10.244.2.3".parse().unwrap()), None);
    assert_eq!(sim.nodes[0].node.peers()[0].handshakes, hs_before);
    let pk = sim.nodes[1].node.public_key();
    assert!(sim.nodes[0].node.remove_peer(&pk));
    assert!(!sim.nodes[0].node.remove_peer(&pk));
    assert_eq!(sim.nodes[0].node.peer_count(), 0);
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"gone");
    assert_eq!(sim.send(0, &p), Outbound::Dropped(DropReason::NoRoute));
    // Data from the removed peer is no longer accepted.
    let q = ipv4([10, 10, 0, 2], [10, 10, 0, 1], b"zombie");
    sim.send(1, &q);
    sim.run();
    assert!(sim.nodes[0].inbox.is_empty());
    assert!(sim.nodes[0].node.drops().get(DropReason::UnknownPeer) >= 1);
}

#[test]
fn data_for_a_forgotten_session_triggers_a_new_handshake() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    // Node 0 has the larger key or not: restart whichever does not initiate eagerly, so only the nudge helps.
    let (a, b) = if sim.nodes[0].node.public_key() > sim.nodes[1].node.public_key() {
        (0, 1)
    } else {
        (1, 0)
    };
    // `b` restarts (same key, no sessions) and does not initiate by itself; `a` keeps its old session.
    sim.nodes[b].node = evio_tunnel::Node::new(evio_tunnel::NodeConfig {
        private_key: common::key(b as u8 + 1),
        preshared_key: None,
        persistent_keepalive: None,
    });
    sim.add_peer(b, a);
    sim.flush_transmits();
    assert!(
        sim.wire.is_empty(),
        "the smaller key does not initiate eagerly"
    );
    let va = sim.nodes[a].vip;
    let vb = sim.nodes[b].vip;
    let p = ipv4(va, vb, b"stale session");
    sim.send(a, &p);
    sim.run();
    // The first packet was lost (old session), but b answered with a handshake: the next one arrives.
    let q = ipv4(va, vb, b"fresh session");
    sim.send(a, &q);
    sim.run();
    assert_eq!(sim.nodes[b].inbox, vec![q]);
}

#[test]
fn buffers_too_small_are_refused_not_panicking() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let now = sim.now();
    let big = vec![4u8; 3000];
    let mut small = vec![0u8; 1500];
    let from = sim.nodes[0].addr;
    assert_eq!(
        sim.nodes[1].node.decapsulate(now, from, &big, &mut small),
        Inbound::Dropped(DropReason::Malformed)
    );
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], &[0u8; 1480]);
    assert!(matches!(
        sim.nodes[0].node.encapsulate(now, &p, &mut small),
        Outbound::Dropped(_)
    ));
    assert_eq!(sim.nodes[0].node.endpoint_for(&p), Some(sim.nodes[1].addr));
}

#[test]
fn every_completed_handshake_is_reported_as_an_event() {
    let mut sim = Sim::mesh(3, None);
    sim.run();
    for i in 0..3 {
        let evs: Vec<Event> = std::iter::from_fn(|| sim.nodes[i].node.poll_event()).collect();
        let n = evs
            .iter()
            .filter(|e| matches!(e, Event::HandshakeCompleted { .. }))
            .count() as u64;
        let per_peer: u64 = sim.nodes[i].node.peers().iter().map(|p| p.handshakes).sum();
        assert_eq!(n, per_peer, "node {i}: {evs:?}");
        assert_eq!(sim.nodes[i].node.handshakes_total(), per_peer);
        assert!(n >= 2, "node {i}: {evs:?}");
    }
}

#[test]
fn a_path_set_by_nat_traversal_stays_when_the_peer_sends_from_elsewhere() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let id = sim.id_of(1, 0);
    assert_eq!(
        sim.nodes[1].node.peer_key(id),
        Some(sim.nodes[0].node.public_key())
    );
    // NAT traversal decides node 0 is reached through a relay (here: its own address stands in for it).
    let relay = sim.nodes[0].addr;
    sim.nodes[1].node.set_path(id, relay, PathKind::Relay);
    // Node 0 now sends from another address: data is accepted, the chosen path stays.
    sim.nodes[0].addr = "192.0.2.200:1234".parse().unwrap();
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"via somewhere else");
    sim.send(0, &p);
    sim.run();
    assert_eq!(sim.nodes[1].inbox, vec![p]);
    let st = sim.nodes[1].node.peer(id).unwrap();
    assert_eq!(st.endpoint, Some(relay));
    assert_eq!(st.path, PathKind::Relay);
}

#[test]
fn new_sources_of_a_managed_peer_are_reported_once() {
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let id = sim.id_of(1, 0);
    let relay = sim.nodes[0].addr;
    sim.nodes[1].node.set_path(id, relay, PathKind::Relay);
    while sim.nodes[1].node.poll_source().is_some() {}
    // From the endpoint: nothing to report.
    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], b"from the endpoint");
    sim.send(0, &p);
    sim.run();
    assert_eq!(sim.nodes[1].inbox.len(), 1);
    assert_eq!(sim.nodes[1].node.poll_source(), None);
    // Node 0's NAT rebinds: the first authenticated datagram from the new address is reported, once.
    let moved: std::net::SocketAddr = "192.0.2.201:4321".parse().unwrap();
    sim.nodes[0].addr = moved;
    for _ in 0..3 {
        sim.send(0, &p);
        sim.run();
    }
    assert_eq!(sim.nodes[1].inbox.len(), 4);
    assert_eq!(sim.nodes[1].node.poll_source(), Some((id, moved)));
    assert_eq!(sim.nodes[1].node.poll_source(), None);
    // Unauthenticated datagrams from yet another address are never reported.
    let forged = sim.captured.last().unwrap().2.clone();
    let r = sim.inject(1, "192.0.2.202:1".parse().unwrap(), &forged);
    assert!(matches!(r, Inbound::Dropped(_)), "{r:?}");
    sim.send(0, &p);
    let mut garbage = sim.wire.pop_back().unwrap().2;
    let n = garbage.len();
    garbage[n - 1] ^= 1;
    let r = sim.inject(1, "192.0.2.203:1".parse().unwrap(), &garbage);
    assert_eq!(r, Inbound::Dropped(DropReason::DecryptFailed));
    assert_eq!(sim.nodes[1].node.poll_source(), None);
    // Once NAT traversal moved the endpoint there, nothing more to report.
    sim.nodes[1].node.set_path(id, moved, PathKind::Direct);
    sim.send(0, &p);
    sim.run();
    assert_eq!(sim.nodes[1].node.poll_source(), None);
}

/// Sealing (two threads), opening and status run at the same time on shared nodes: every packet arrives,
/// counters add up, nothing deadlocks.
#[test]
fn seal_open_and_status_in_parallel() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    let mut sim = Sim::mesh(2, None);
    sim.run();
    let b = Arc::new(sim.nodes.pop().unwrap().node);
    let a = Arc::new(sim.nodes.pop().unwrap().node);
    let now = std::time::Instant::now();
    const PER_THREAD: usize = 3000;
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(64);
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2u8)
        .map(|t| {
            let (a, tx) = (a.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut out = vec![0u8; 2048];
                for i in 0..PER_THREAD {
                    let mut payload = [(i % 251) as u8; 600];
                    payload[0] = t;
                    let p = ipv4([10, 10, 0, 1], [10, 10, 0, 2], &payload);
                    match a.encapsulate(now, &p, &mut out) {
                        Outbound::Send { len, .. } => tx.send(out[..len].to_vec()).unwrap(),
                        r => panic!("{r:?}"),
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let scraper = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += a.peers().len() as u64 + b.peers().len() as u64;
                let _ = (a.drops(), b.handshakes_total());
                a.tick(std::time::Instant::now());
            }
            n
        })
    };
    let from = "192.0.2.1:51820".parse().unwrap();
    let mut out = vec![0u8; 2048];
    let (mut got, mut late) = (0, 0);
    for d in rx {
        match b.decapsulate(now, from, &d, &mut out) {
            Inbound::WriteTun { len, .. } => {
                assert_eq!(len, 628);
                got += 1;
            }
            // A sender preempted between sealing and queueing can be overtaken by more packets than the
            // replay window holds (a busy machine): WireGuard drops those, as it must. Nothing else may go.
            Inbound::Dropped(DropReason::Replay) => late += 1,
            r => panic!("{r:?}"),
        }
    }
    for s in senders {
        s.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(scraper.join().unwrap() > 0);
    assert_eq!(got + late, 2 * PER_THREAD);
    assert!(got >= PER_THREAD, "only {got} of {} opened", 2 * PER_THREAD);
    let (sa, sb) = (&a.peers()[0], &b.peers()[0]);
    assert!(sa.tx_packets >= 2 * PER_THREAD as u64);
    assert_eq!(sb.rx_packets, got as u64);
    assert_eq!(sb.rx_bytes, 628 * got as u64);
}

/// Lazy peers: a peer without an endpoint queues packets (bounded, in boringtun) and reports `Wanted`
/// once; the path set afterwards starts a handshake at once from the wanting side, whichever key is
/// larger, and the queued packets arrive. `set_idle` drops the session: the next packet wants it again.
#[test]
fn a_peer_without_a_path_queues_packets_wants_a_path_and_goes_idle() {
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let mut sim = Sim::mesh(2, None);
        sim.wire.clear();
        // The peers again, without paths (as eviod adds them: NAT traversal chooses the paths).
        for i in 0..2 {
            let cfg = sim.peer_cfg(1 - i);
            let now = sim.now();
            sim.nodes[i].node.remove_peer(&cfg.public_key);
            sim.nodes[i].node.upsert_peer(now, cfg);
        }
        sim.flush_transmits();
        assert!(sim.wire.is_empty(), "a peer without a path sent something");
        for n in &sim.nodes {
            while n.node.poll_event().is_some() {}
        }
        let src = [10, 10, 0, from as u8 + 1];
        let dst = [10, 10, 0, to as u8 + 1];
        let (p1, p2) = (ipv4(src, dst, b"first"), ipv4(src, dst, b"second"));
        assert_eq!(sim.send(from, &p1), Outbound::Queued);
        assert_eq!(sim.send(from, &p2), Outbound::Queued);
        let id = sim.id_of(from, to);
        let events: Vec<Event> = std::iter::from_fn(|| sim.nodes[from].node.poll_event()).collect();
        assert_eq!(events, vec![Event::Wanted { peer: id }]);
        assert!(sim.wire.is_empty());

        let addr = sim.nodes[to].addr;
        sim.nodes[from].node.set_path(id, addr, PathKind::Direct);
        sim.flush_transmits();
        assert_eq!(sim.wire.len(), 1, "one handshake initiation");
        sim.run();
        assert_eq!(sim.nodes[to].inbox, vec![p1, p2]);

        // At rest again: no session, no endpoint; nothing leaves on timers; the next packet wants it.
        sim.nodes[from].node.set_idle(id);
        let st = sim.nodes[from].node.peer(id).unwrap();
        assert_eq!((st.endpoint, st.path), (None, PathKind::Connecting));
        let before = sim.captured.len();
        sim.advance(Duration::from_secs(30), Duration::from_secs(1));
        let me = sim.nodes[from].addr;
        let sent: Vec<_> = sim.captured[before..]
            .iter()
            .filter(|(f, _, _)| *f == me)
            .collect();
        assert!(sent.is_empty(), "an idle peer kept sending: {sent:?}");
        let _ = std::iter::from_fn(|| sim.nodes[from].node.poll_event()).count();
        assert_eq!(sim.send(from, &ipv4(src, dst, b"third")), Outbound::Queued);
        let events: Vec<Event> = std::iter::from_fn(|| sim.nodes[from].node.poll_event()).collect();
        assert!(events.contains(&Event::Wanted { peer: id }), "{events:?}");
    }
}

/// The first handshake of a new path, lost, is sent again after `FIRST_HANDSHAKE_RETRY` (2 s), not after
/// boringtun's 5 s; one that is answered is not sent again.
#[test]
fn a_lost_first_handshake_is_sent_again_after_two_seconds() {
    let initiations = |sim: &common::Sim| sim.captured.iter().filter(|(_, _, d)| d[0] == 1).count();
    let step = Duration::from_millis(250);
    // Answered: one initiation, nothing more.
    let mut sim = Sim::mesh(2, None);
    sim.run();
    sim.advance(Duration::from_secs(3), step);
    assert_eq!(initiations(&sim), 1);
    // The first initiation lost.
    let mut sim = Sim::mesh(2, None);
    let mut lost = false;
    sim.loss = Box::new(move |_, _, d| {
        let first = d[0] == 1 && !lost;
        lost |= first;
        first
    });
    sim.run();
    assert!(
        sim.nodes
            .iter()
            .all(|n| n.node.peers()[0].last_handshake.is_none())
    );
    sim.advance(Duration::from_millis(1750), step);
    assert_eq!(initiations(&sim), 1, "not before 2 s");
    sim.advance(Duration::from_millis(500), step);
    assert_eq!(initiations(&sim), 2);
    for n in &sim.nodes {
        assert!(n.node.peers()[0].last_handshake.is_some(), "{}", n.name);
    }
    sim.advance(Duration::from_secs(3), step);
    assert_eq!(initiations(&sim), 2, "once");
}
