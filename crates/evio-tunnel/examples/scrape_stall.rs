//! How long a status scrape stalls forwarding, with the core shared without a lock (as eviod does now)
//! and behind one global mutex (as eviod did: `Mutex<Node>` around every packet and around the status
//! snapshot). One thread seals 1400-byte packets for a peer with a session, another takes status
//! snapshots of every peer in a loop; the sealing thread records each packet's latency.
//!
//! `cargo run --release -p evio-tunnel --example scrape_stall -- [PEERS] [SECONDS]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evio_tunnel::{Inbound, Node, NodeConfig, Outbound, PeerConfig, StaticSecret};

fn node(seed: u8) -> Node {
    Node::new(NodeConfig {
        private_key: StaticSecret::from([seed; 32]),
        preshared_key: None,
        persistent_keepalive: None,
    })
}

fn packet(dst: [u8; 4]) -> Vec<u8> {
    packet_from([10, 10, 0, 1], dst)
}

fn packet_from(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 1400];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1400u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

/// Moves control datagrams between the two nodes until neither has any.
fn settle(a: &Node, b: &Node, aa: SocketAddr, ba: SocketAddr) {
    let mut buf = vec![0u8; 65600];
    let now = Instant::now();
    for _ in 0..20 {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            moved = true;
            let _: Inbound = b.decapsulate(now, aa, &t.data, &mut buf);
        }
        while let Some(t) = b.poll_transmit() {
            moved = true;
            let _ = a.decapsulate(now, ba, &t.data, &mut buf);
        }
        if !moved {
            break;
        }
    }
}

struct Run {
    rate: f64,
    lat: Vec<Duration>,
    scrapes: u64,
    /// Median time of a scrape's snapshot (held the global lock for all of it, before).
    hold: Duration,
    /// Time the sealing thread waited for the global lock, per second.
    waited: Duration,
}

fn run(a: &Arc<Node>, global: bool, secs: u64) -> Run {
    let lock = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (a, lock, stop) = (a.clone(), lock.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut holds = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let g = global.then(|| lock.lock().unwrap());
                let t = Instant::now();
                let peers = a.peers();
                holds.push(t.elapsed());
                drop(g);
                // What status does with it afterwards (outside any lock, in both designs).
                let s: usize = peers.iter().map(|p| format!("{p:?}").len()).sum();
                std::hint::black_box(s);
            }
            holds.sort();
            (
                holds.len() as u64,
                holds.get(holds.len() / 2).copied().unwrap_or_default(),
            )
        })
    };
    let p = packet([10, 10, 0, 2]);
    let mut out = vec![0u8; 2048];
    let mut lat = Vec::new();
    let mut waited = Duration::ZERO;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        let t = Instant::now();
        let g = global.then(|| lock.lock().unwrap());
        waited += t.elapsed();
        let r = a.encapsulate(t, &p, &mut out);
        drop(g);
        lat.push(t.elapsed());
        assert!(matches!(r, Outbound::Send { .. }), "{r:?}");
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (scrapes, hold) = scraper.join().unwrap();
    let rate = lat.len() as f64 / elapsed;
    lat.sort();
    Run {
        rate,
        lat,
        scrapes,
        hold,
        waited: waited.div_f64(elapsed),
    }
}

/// One thread seals for one peer (b) while another opens what a second peer (c) sealed for us: with the
/// global mutex they take turns, without it they run at the same time. Returns (sealed/s, opened/s).
fn seal_and_open(a: &Arc<Node>, c: &Arc<Node>, global: bool, secs: u64) -> (f64, f64) {
    let lock = Arc::new(Mutex::new(()));
    let end = Instant::now() + Duration::from_secs(secs);
    let opener = {
        let (a, c, lock) = (a.clone(), c.clone(), lock.clone());
        std::thread::spawn(move || {
            let p = packet_from([10, 10, 0, 3], [10, 10, 0, 1]);
            let from: SocketAddr = "192.0.2.3:51820".parse().unwrap();
            let (mut wire, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
            let mut n = 0u64;
            let start = Instant::now();
            while Instant::now() < end {
                let Outbound::Send { len, .. } = c.encapsulate(start, &p, &mut wire) else {
                    panic!("c cannot seal");
                };
                let g = global.then(|| lock.lock().unwrap());
                let r = a.decapsulate(start, from, &wire[..len], &mut out);
                drop(g);
                assert!(matches!(r, Inbound::WriteTun { .. }), "{r:?}");
                n += 1;
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
    };
    let p = packet([10, 10, 0, 2]);
    let mut out = vec![0u8; 2048];
    let mut n = 0u64;
    let start = Instant::now();
    while Instant::now() < end {
        let g = global.then(|| lock.lock().unwrap());
        let r = a.encapsulate(start, &p, &mut out);
        drop(g);
        assert!(matches!(r, Outbound::Send { .. }), "{r:?}");
        n += 1;
    }
    let sealed = n as f64 / start.elapsed().as_secs_f64();
    (sealed, opener.join().unwrap())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let peers: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let (a, b) = (node(1), node(2));
    let (aa, ba): (SocketAddr, SocketAddr) = (
        "192.0.2.1:51820".parse().unwrap(),
        "192.0.2.2:51820".parse().unwrap(),
    );
    let now = Instant::now();
    let id = a.upsert_peer(
        now,
        PeerConfig {
            name: "b".into(),
            public_key: b.public_key(),
            allowed: vec!["10.10.0.2/32".parse().unwrap()],
        },
    );
    a.set_path(id, ba, evio_tunnel::PathKind::Direct);
    let id = b.upsert_peer(
        now,
        PeerConfig {
            name: "a".into(),
            public_key: a.public_key(),
            allowed: vec!["10.10.0.1/32".parse().unwrap()],
        },
    );
    b.set_path(id, aa, evio_tunnel::PathKind::Direct);
    settle(&a, &b, aa, ba);
    // A session both ways: a packet from b, then settle again.
    let mut buf = vec![0u8; 2048];
    let _ = a.encapsulate(now, &packet([10, 10, 0, 2]), &mut buf);
    settle(&a, &b, aa, ba);
    // A third node, c, with a session to a (a opens what c seals).
    let c = node(3);
    let ca: SocketAddr = "192.0.2.3:51820".parse().unwrap();
    let id = a.upsert_peer(
        now,
        PeerConfig {
            name: "c".into(),
            public_key: c.public_key(),
            allowed: vec!["10.10.0.3/32".parse().unwrap()],
        },
    );
    a.set_path(id, ca, evio_tunnel::PathKind::Direct);
    let id = c.upsert_peer(
        now,
        PeerConfig {
            name: "a".into(),
            public_key: a.public_key(),
            allowed: vec!["10.10.0.1/32".parse().unwrap()],
        },
    );
    c.set_path(id, aa, evio_tunnel::PathKind::Direct);
    settle(&a, &c, aa, ca);
    let _ = c.encapsulate(now, &packet_from([10, 10, 0, 3], [10, 10, 0, 1]), &mut buf);
    settle(&a, &c, aa, ca);
    for i in 0..peers {
        let key = StaticSecret::from({
            let mut k = [7u8; 32];
            k[1..5].copy_from_slice(&i.to_le_bytes());
            k
        });
        let id = a.upsert_peer(
            now,
            PeerConfig {
                name: format!("fake-{i}"),
                public_key: evio_tunnel::PublicKey::from(&key).to_bytes(),
                allowed: vec![
                    format!("10.11.{}.{}/32", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                ],
            },
        );
        a.set_path(
            id,
            format!("198.51.100.{}:51820", i % 250 + 1).parse().unwrap(),
            evio_tunnel::PathKind::Direct,
        );
    }
    while a.poll_transmit().is_some() {}
    println!(
        "{} peers, {secs} s per run, load {}",
        a.peer_count(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or("?")
    );
    println!(
        "| core shared | packets/s sealed | p99 µs | p99.9 µs | waited for the global lock, ms per s | scrapes | one snapshot, µs (median) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let a = Arc::new(a);
    for round in 0..3 {
        for global in [true, false] {
            let r = run(&a, global, secs);
            let lat = &r.lat;
            let q = |f: f64| {
                lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6
            };
            let waited = if global {
                format!("{:.1}", r.waited.as_secs_f64() * 1e3)
            } else {
                "none (no such lock)".to_string()
            };
            println!(
                "| {} (round {round}) | {:.0} | {:.1} | {:.1} | {waited} | {} | {:.0} |",
                if global {
                    "behind one mutex (before)"
                } else {
                    "no global lock (after)"
                },
                r.rate,
                q(0.99),
                q(0.999),
                r.scrapes,
                r.hold.as_secs_f64() * 1e6
            );
        }
    }
    println!();
    println!("| core shared | sealed for b, packets/s | opened from c, packets/s | total |");
    println!("|---|---|---|---|");
    let c = Arc::new(c);
    for round in 0..3 {
        for global in [true, false] {
            let (sealed, opened) = seal_and_open(&a, &c, global, secs);
            println!(
                "| {} (round {round}) | {sealed:.0} | {opened:.0} | {:.0} |",
                if global {
                    "behind one mutex (before)"
                } else {
                    "no global lock (after)"
                },
                sealed + opened
            );
        }
    }
}
