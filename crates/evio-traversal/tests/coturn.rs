//! The sans-IO client and agent over real UDP sockets in lab namespaces, against a real coturn.
//! Run as root: `cargo test -p evio-traversal --test coturn -- --nocapture` (prints the measured times).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Node, drive, path_kind, tunnel_works};
use evio_testbed::lab::{Lab, NatKind, unique_prefix};
use evio_traversal::{CandidateKind, PathKind, TurnClient, TurnConfig, TurnEvent};
#[test]
fn stun_binding_behind_easy_nat_returns_the_nat_address() {
    let lab = Lab::builder(&unique_prefix("nt"))
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .build()
        .unwrap();
    let host = lab.site_host(0, 0);
    let mut nodes = vec![Node::new("a", host, &lab, false)];
    let port = nodes[0].sock.local_addr().unwrap().port();
    assert!(
        drive(&mut nodes, Duration::from_secs(10), |n| n[0]
            .srflx_at
            .is_some()),
        "no srflx"
    );
    let srflx: Vec<_> = nodes[0]
        .candidates
        .iter()
        .filter(|c| c.kind == CandidateKind::ServerReflexive)
        .collect();
    assert_eq!(srflx.len(), 1);
    assert_eq!(
        srflx[0].addr,
        SocketAddr::from((lab.site(0).wan_ip, port)),
        "port-preserving NAT mapping"
    );
    eprintln!(
        "BENCH time to srflx (easy NAT, coturn): {:?}",
        nodes[0].srflx_at.unwrap()
    );
}

/// A bare TURN client over a real socket: allocate, permission, channel, data both ways.
#[test]
fn turn_relays_between_symmetric_nat_host_and_public_host() {
    let lab = Lab::builder(&unique_prefix("nt"))
        .turn(true)
        .site(NatKind::Symmetric, 1)
        .public_hosts(1)
        .build()
        .unwrap();
    let t = lab.turn().unwrap();
    let a = lab.site_host(0, 0).udp_socket(0).unwrap();
    let p = lab.public_hosts()[0].udp_socket(7000).unwrap();
    let p_addr = SocketAddr::from((lab.public_hosts()[0].ip, 7000));
    a.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    p.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    let cfg = TurnConfig {
        server: t.addr,
        user: t.user.clone(),
        password: t.password.clone(),
    };
    let t0 = Instant::now();
    let mut c = TurnClient::new(cfg, rand::random(), t0);
    let mut buf = [0u8; 2048];
    let mut data_in = Vec::new();
    let mut events = Vec::new();
    let step = |c: &mut TurnClient,
                data_in: &mut Vec<(SocketAddr, Vec<u8>)>,
                events: &mut Vec<TurnEvent>| {
        while let Some(tx) = c.poll_transmit() {
            a.send_to(&tx.payload, tx.dst).unwrap();
        }
        let mut rbuf = [0u8; 2048];
        if let Ok((n, from)) = a.recv_from(&mut rbuf)
            && let evio_traversal::turn::TurnInput::Data { peer, payload } =
                c.handle_input(from, &rbuf[..n], Instant::now())
        {
            data_in.push((peer, payload.to_vec()));
        }
        let now = Instant::now();
        if c.poll_timeout().is_some_and(|x| x <= now) {
            c.handle_timeout(now);
        }
        while let Some(e) = c.poll_event() {
            events.push(e);
        }
    };
    let end = Instant::now() + Duration::from_secs(10);
    while c.relayed().is_none() && Instant::now() < end {
        step(&mut c, &mut data_in, &mut events);
    }
    let relayed = c
        .relayed()
        .unwrap_or_else(|| panic!("no allocation; coturn log:\n{}", t.log()));
    let alloc_time = t0.elapsed();
    assert_eq!(relayed.ip(), t.addr.ip());
    let mapped = c.mapped().unwrap();
    assert_eq!(mapped.ip(), std::net::IpAddr::V4(lab.site(0).wan_ip));
    assert!(matches!(events[0], TurnEvent::Allocated { .. }));

    // Permission first: a Send indication reaches the public host from the relayed address.
    c.want_permission(p_addr.ip(), Instant::now());
    let end = Instant::now() + Duration::from_secs(5);
    while !c.can_send(p_addr) && Instant::now() < end {
        step(&mut c, &mut data_in, &mut events);
    }
    let tx = c
        .wrap(p_addr, b"via send indication")
        .expect("permission installed");
    assert!(evio_traversal::stun::is_stun(&tx.payload));
    a.send_to(&tx.payload, tx.dst).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (n, from) = p.recv_from(&mut buf).expect("relayed datagram");
    assert_eq!((&buf[..n], from), (&b"via send indication"[..], relayed));

    // A reply to the relayed address comes back as a Data indication.
    p.send_to(b"reply 1", relayed).unwrap();
    let end = Instant::now() + Duration::from_secs(3);
    while data_in.is_empty() && Instant::now() < end {
        step(&mut c, &mut data_in, &mut events);
    }
    assert_eq!(data_in.first(), Some(&(p_addr, b"reply 1".to_vec())));

    // Channel: ChannelData both ways.
    let t1 = Instant::now();
    c.want_channel(p_addr, Instant::now());
    let end = Instant::now() + Duration::from_secs(5);
    while c.channel(p_addr).is_none() && Instant::now() < end {
        step(&mut c, &mut data_in, &mut events);
    }
    let ch = c.channel(p_addr).expect("channel bound");
    let channel_time = t1.elapsed();
    let tx = c.wrap(p_addr, b"via channel").unwrap();
    assert_eq!(
        evio_traversal::demux::channel_data(&tx.payload),
        Some((ch, &b"via channel"[..]))
    );
    a.send_to(&tx.payload, tx.dst).unwrap();
    let (n, from) = p.recv_from(&mut buf).expect("relayed datagram");
    assert_eq!((&buf[..n], from), (&b"via channel"[..], relayed));
    p.send_to(b"reply 2", relayed).unwrap();
    let end = Instant::now() + Duration::from_secs(3);
    while data_in.len() < 2 && Instant::now() < end {
        step(&mut c, &mut data_in, &mut events);
    }
    assert_eq!(data_in.get(1), Some(&(p_addr, b"reply 2".to_vec())));

    // Refresh is accepted (authenticated with the current nonce) and the allocation stays.
    c.probe(Instant::now());
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        step(&mut c, &mut data_in, &mut events);
    }
    assert_eq!(c.relayed(), Some(relayed));
    assert_eq!(events.len(), 1, "{events:?}");
    eprintln!(
        "BENCH time to TURN allocation (symmetric NAT, coturn): {alloc_time:?}; channel bind: {channel_time:?}"
    );

    // A wrong password gets no allocation.
    let bad = TurnConfig {
        server: t.addr,
        user: t.user.clone(),
        password: "wrong".into(),
    };
    let mut c2 = TurnClient::new(bad, rand::random(), Instant::now());
    let end = Instant::now() + Duration::from_secs(2);
    let mut ev2 = Vec::new();
    while Instant::now() < end {
        step(&mut c2, &mut data_in, &mut ev2);
    }
    assert!(c2.relayed().is_none());
}

#[test]
fn hole_punching_between_easy_nats_not_between_symmetric_nats() {
    let lab = Lab::builder(&unique_prefix("nt"))
        .turn(true)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::Symmetric, 1)
        .site(NatKind::Symmetric, 1)
        .build()
        .unwrap();
    // No TURN: only direct paths are possible.
    let mut nodes: Vec<Node> = (0..4)
        .map(|i| Node::new(&format!("n{i}"), lab.site_host(i, 0), &lab, false))
        .collect();
    // Wait for the srflx candidates before introducing (as eviod publishes after gathering).
    assert!(drive(&mut nodes, Duration::from_secs(10), |n| n
        .iter()
        .all(|x| x.srflx_at.is_some())));
    let t0 = Instant::now();
    let direct = drive(&mut nodes, Duration::from_secs(10), |n| {
        path_kind(n, 0, 1) == Some(PathKind::Direct) && path_kind(n, 1, 0) == Some(PathKind::Direct)
    });
    assert!(direct, "easy <-> easy: no direct path");
    let punch = t0.elapsed();
    assert!(tunnel_works(&mut nodes, 0, 1));
    // Symmetric <-> symmetric never gets a path without a relay (and neither does symmetric <-> easy with
    // port-restricted filtering).
    drive(&mut nodes, Duration::from_secs(8), |_| false);
    assert_eq!(path_kind(&nodes, 2, 3), None);
    assert_eq!(path_kind(&nodes, 3, 2), None);
    assert_eq!(path_kind(&nodes, 0, 2), None);
    eprintln!("BENCH time to direct path (easy <-> easy, hole punching): {punch:?}");
}

/// The matrix of issue 5 at the NAT layer, with the relay: same-NAT, easy/easy, symmetric, public.
#[test]
fn matrix_relay_flush_and_turn_loss() {
    let mut lab = Lab::builder(&unique_prefix("nt"))
        .turn(true)
        .site(NatKind::EasyNat, 2)
        .site(NatKind::EasyNat, 1)
        .site(NatKind::Symmetric, 1)
        .public_hosts(1)
        .build()
        .unwrap();
    let hosts = [
        lab.site_host(0, 0),
        lab.site_host(0, 1),
        lab.site_host(1, 0),
        lab.site_host(2, 0),
        &lab.public_hosts()[0],
    ];
    let mut nodes: Vec<Node> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Node::new(&format!("n{i}"), h, &lab, true))
        .collect();
    // (a, b, expected): 0,1 same NAT; 0,2 easy-easy; 2,3 easy-symmetric; 3,4 symmetric-public; 0,4 easy-public.
    let expect = [
        (0, 1, PathKind::Direct),
        (0, 2, PathKind::Direct),
        (1, 2, PathKind::Direct),
        (2, 3, PathKind::Relay),
        (0, 3, PathKind::Relay),
        (3, 4, PathKind::Direct),
        (0, 4, PathKind::Direct),
        (2, 4, PathKind::Direct),
    ];
    let t0 = Instant::now();
    let ok = drive(&mut nodes, Duration::from_secs(20), |n| {
        expect
            .iter()
            .all(|&(a, b, k)| path_kind(n, a, b) == Some(k) && path_kind(n, b, a) == Some(k))
    });
    let got: Vec<_> = expect
        .iter()
        .map(|&(a, b, _)| (a, b, path_kind(&nodes, a, b), path_kind(&nodes, b, a)))
        .collect();
    assert!(ok, "paths: {got:?}");
    let all_paths = t0.elapsed();
    // Give relayed pairs a moment to settle, then check every expected pair carries tunnel datagrams.
    drive(&mut nodes, Duration::from_secs(1), |_| false);
    for &(a, b, _) in &expect {
        assert!(tunnel_works(&mut nodes, a, b), "tunnel {a} <-> {b}");
    }
    let same_nat = nodes[0].agent.path(&nodes[1].key).unwrap();
    assert_eq!(same_nat.remote_kind, CandidateKind::Host);
    eprintln!(
        "BENCH matrix: srflx {:?}, relay {:?}, all paths {all_paths:?}",
        // The public host's reflexive address is its host address: no separate srflx candidate.
        nodes.iter().filter_map(|n| n.srflx_at).max(),
        nodes.iter().filter_map(|n| n.relay_at).max()
    );

    // Flush the symmetric NAT: every mapping of node 3 changes, its relayed paths heal.
    lab.site(2).flush_conntrack().unwrap();
    let t1 = Instant::now();
    let healed = (0..30).any(|_| tunnel_works(&mut nodes, 2, 3) && tunnel_works(&mut nodes, 3, 4));
    assert!(healed, "symmetric NAT flush did not heal");
    eprintln!(
        "BENCH heal after conntrack flush of the symmetric NAT: {:?}",
        t1.elapsed()
    );
    // Flush an easy NAT too.
    lab.site(1).flush_conntrack().unwrap();
    let t2 = Instant::now();
    assert!(
        (0..30).any(|_| tunnel_works(&mut nodes, 0, 2)),
        "easy NAT flush did not heal"
    );
    eprintln!(
        "BENCH heal after conntrack flush of an easy NAT: {:?}",
        t2.elapsed()
    );

    // Kill coturn: direct paths keep working, on the same path.
    let before: Vec<_> = [(0, 2), (3, 4), (0, 1)]
        .iter()
        .map(|&(a, b)| nodes[a].agent.path(&nodes[b].key))
        .collect();
    lab.turn_mut().unwrap().kill();
    drive(&mut nodes, Duration::from_secs(12), |_| false);
    for (i, &(a, b)) in [(0, 2), (3, 4), (0, 1)].iter().enumerate() {
        assert_eq!(
            nodes[a]
                .agent
                .path(&nodes[b].key)
                .map(|p| (p.kind, p.remote)),
            before[i].map(|p| (p.kind, p.remote))
        );
        assert!(
            tunnel_works(&mut nodes, a, b),
            "direct {a} <-> {b} broke with the relay down"
        );
    }

    // coturn comes back (empty: every allocation lost): the relayed pairs come back by themselves, with
    // new allocations (a 437 or a failed keepalive tells each client to allocate again).
    assert_eq!(
        path_kind(&nodes, 2, 3),
        None,
        "a relayed path survived the relay's death? {:?} {:#?}",
        nodes[2].agent.path(&nodes[3].key),
        nodes[2].agent.pairs(&nodes[3].key)
    );
    lab.turn_mut().unwrap().restart().unwrap();
    let t3 = Instant::now();
    let back = drive(&mut nodes, Duration::from_secs(60), |n| {
        path_kind(n, 2, 3) == Some(PathKind::Relay) && path_kind(n, 3, 2) == Some(PathKind::Relay)
    });
    assert!(
        back,
        "relayed paths did not come back after the TURN server restarted"
    );
    assert!(
        (0..50).any(|_| tunnel_works(&mut nodes, 2, 3)),
        "relayed tunnel after TURN restart"
    );
    eprintln!(
        "BENCH relayed path back after a TURN server restart: {:?}",
        t3.elapsed()
    );
}

/// coturn with 1-second nonces: requests after that get 438 and the client retries with the new nonce.
#[test]
fn turn_stale_nonce_is_renewed() {
    let lab = Lab::builder(&unique_prefix("nt"))
        .turn(true)
        .turn_stale_nonce(1)
        .site(NatKind::EasyNat, 1)
        .build()
        .unwrap();
    let t = lab.turn().unwrap();
    let a = lab.site_host(0, 0).udp_socket(0).unwrap();
    a.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    let cfg = TurnConfig {
        server: t.addr,
        user: t.user.clone(),
        password: t.password.clone(),
    };
    let mut c = TurnClient::new(cfg, rand::random(), Instant::now());
    let mut buf = [0u8; 2048];
    let mut run = |c: &mut TurnClient, d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            while let Some(tx) = c.poll_transmit() {
                a.send_to(&tx.payload, tx.dst).unwrap();
            }
            if let Ok((n, from)) = a.recv_from(&mut buf) {
                c.handle_input(from, &buf[..n], Instant::now());
            }
            let now = Instant::now();
            if c.poll_timeout().is_some_and(|x| x <= now) {
                c.handle_timeout(now);
            }
        }
    };
    run(&mut c, Duration::from_millis(500));
    let relayed = c.relayed().expect("allocated");
    std::thread::sleep(Duration::from_millis(2500));
    c.probe(Instant::now());
    c.want_permission("198.18.2.1".parse().unwrap(), Instant::now());
    run(&mut c, Duration::from_secs(1));
    assert!(
        c.stale_nonces() >= 1,
        "coturn did not answer 438; log:\n{}",
        t.log()
    );
    assert!(
        c.can_send("198.18.2.1:9".parse().unwrap()),
        "permission after a stale nonce"
    );
    assert_eq!((c.relayed(), c.allocations()), (Some(relayed), 1));
}

/// Which of coturn's answers carry MESSAGE-INTEGRITY, the rule the TURN client enforces (RFC 8489
/// §9.2.5): successes and errors to signed requests are signed, the challenges (401, 438) are not, and
/// neither is the 437 to an Allocate on a 5-tuple that already has an allocation (coturn checks that
/// before the credentials), which is why the client takes that one unsigned. Then a client on the same
/// socket gets past the leftover allocation by itself.
#[test]
fn coturn_signs_what_the_client_requires() {
    use evio_traversal::stun::{self, Builder, Class, Message, TransactionId, attr, method};
    let lab = Lab::builder(&unique_prefix("nt"))
        .turn(true)
        .public_hosts(1)
        .build()
        .unwrap();
    let t = lab.turn().unwrap();
    let s = lab.public_hosts()[0].udp_socket(0).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer = SocketAddr::from(([198, 18, 2, 99], 0));
    let mut buf = [0u8; 2048];
    // One request, its answer: (class, error code, has MESSAGE-INTEGRITY, verifies, REALM, NONCE).
    let mut ask = |b: Builder| {
        let req = b.fingerprint().unwrap();
        let tid = Message::decode(&req).unwrap().tid;
        s.send_to(&req, t.addr).unwrap();
        loop {
            let (n, _) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no answer ({e}); coturn log:\n{}", t.log()));
            let m = Message::decode(&buf[..n]).unwrap();
            if m.tid == tid {
                return (buf[..n].to_vec(), m.class, m.error_code());
            }
        }
    };
    let tid = || TransactionId(rand::random());
    let allocate = |tid| {
        Builder::new(Class::Request, method::ALLOCATE, tid)
            .u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24)
    };
    let (r, class, code) = ask(allocate(tid()));
    let m = Message::decode(&r).unwrap();
    assert_eq!(
        (class, code, m.has_integrity()),
        (Class::Error, Some(401), false)
    );
    let realm = m.text(attr::REALM).unwrap().to_string();
    let nonce = m.text(attr::NONCE).unwrap().to_string();
    let key = stun::long_term_key(&t.user, &realm, &t.password);
    let sign = |b: Builder, nonce: &str| {
        b.attr(attr::USERNAME, t.user.as_bytes())
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
            .integrity(&key)
    };
    let signed = |r: &[u8]| Message::decode(r).unwrap().verify(&key);
    let unsigned = |r: &[u8]| !Message::decode(r).unwrap().has_integrity();

    let (r, class, _) = ask(sign(allocate(tid()), &nonce));
    assert_eq!(class, Class::Success);
    assert!(signed(&r), "Allocate success unsigned");
    // A second Allocate, another transaction, same 5-tuple: 437, unsigned.
    let (r, _, code) = ask(sign(allocate(tid()), &nonce));
    assert_eq!(code, Some(437));
    assert!(unsigned(&r), "coturn now signs the 437 to Allocate");
    let perm = |tid| {
        Builder::new(Class::Request, method::CREATE_PERMISSION, tid)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
    };
    let (r, class, _) = ask(sign(perm(tid()), &nonce));
    assert_eq!(class, Class::Success);
    assert!(signed(&r), "CreatePermission success unsigned");
    // A wrong nonce: 438, unsigned, with the right one.
    let (r, _, code) = ask(sign(perm(tid()), "not-the-nonce"));
    assert_eq!(code, Some(438));
    assert!(unsigned(&r));
    // Another socket, never allocated: a signed Refresh gets a signed 437.
    let s2 = lab.public_hosts()[0].udp_socket(0).unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let refresh =
        || Builder::new(Class::Request, method::REFRESH, tid()).u32_attr(attr::LIFETIME, 600);
    let ask2 = |b: Builder| {
        let req = b.fingerprint().unwrap();
        s2.send_to(&req, t.addr).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = s2.recv_from(&mut buf).expect("an answer");
        let m = Message::decode(&buf[..n]).unwrap();
        (buf[..n].to_vec(), m.error_code())
    };
    let (r, code) = ask2(refresh());
    assert_eq!(code, Some(401));
    let nonce2 = Message::decode(&r)
        .unwrap()
        .text(attr::NONCE)
        .unwrap()
        .to_string();
    let (r, code) = ask2(sign(refresh(), &nonce2));
    assert_eq!(code, Some(437));
    assert!(signed(&r), "437 to an authenticated Refresh unsigned");

    // The allocation left on the first socket's 5-tuple: a new client deletes it (Refresh 0) and
    // allocates.
    s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    let cfg = TurnConfig {
        server: t.addr,
        user: t.user.clone(),
        password: t.password.clone(),
    };
    let t0 = Instant::now();
    let mut c = TurnClient::new(cfg, rand::random(), t0);
    let end = Instant::now() + Duration::from_secs(10);
    while c.relayed().is_none() && Instant::now() < end {
        while let Some(tx) = c.poll_transmit() {
            s.send_to(&tx.payload, tx.dst).unwrap();
        }
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            c.handle_input(from, &buf[..n], Instant::now());
        }
        let now = Instant::now();
        if c.poll_timeout().is_some_and(|x| x <= now) {
            c.handle_timeout(now);
        }
    }
    assert!(
        c.relayed().is_some(),
        "no allocation over a leftover one; coturn log:\n{}",
        t.log()
    );
    eprintln!(
        "BENCH allocation over a leftover allocation of the same 5-tuple: {:?}",
        t0.elapsed()
    );
}
