//! Measures NAT traversal times in the lab with a real coturn: agent start to server-reflexive candidate,
//! to TURN allocation, to a direct path between two easy NATs, to a relayed path between two symmetric
//! NATs, and the time to heal after a conntrack flush of a symmetric NAT. Medians over N runs.
//!
//! Run as root: `cargo run -p evio-traversal --example nat_bench -- 5`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Node, drive, path_kind, tunnel_works};
use evio_testbed::lab::{Lab, NatKind, unique_prefix};
use evio_traversal::PathKind;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn both(nodes: &[Node], a: usize, b: usize, k: PathKind) -> bool {
    path_kind(nodes, a, b) == Some(k) && path_kind(nodes, b, a) == Some(k)
}

/// Blasts `n` datagrams of `size` bytes from `a` to `b` along `a`'s selected path (keeping at most 256 in
/// flight), returns (goodput in Mbit/s, datagrams per second, share received).
fn blast(nodes: &mut [Node], a: usize, b: usize, n: usize, size: usize) -> (f64, f64, f64) {
    let to = nodes[b].key;
    let route = nodes[a].agent.route(&to).expect("route");
    let mut payload = vec![0xEEu8; size];
    payload[..4].copy_from_slice(&[4, 0, 0, 0]);
    let mut frame = Vec::with_capacity(size + 4);
    match route.channel {
        Some(ch) => {
            evio_traversal::demux::encode_channel_data(ch, &payload, &mut frame).expect("fits")
        }
        None => frame.extend_from_slice(&payload),
    }
    // `written_off`: datagrams presumed lost, so the in-flight window does not stall on them.
    let (mut sent, mut got, mut written_off) = (0usize, 0usize, 0usize);
    let mut buf = vec![0u8; 4096];
    let t0 = Instant::now();
    let mut last_rx = Instant::now();
    while got < n && last_rx.elapsed() < Duration::from_millis(500) {
        while sent < n && sent - got - written_off < 256 {
            if nodes[a].sock.send_to(&frame, route.dst).is_err() {
                break;
            }
            sent += 1;
        }
        while let Ok((len, _)) = nodes[b].sock.recv_from(&mut buf) {
            if len >= size {
                got += 1;
                last_rx = Instant::now();
            }
        }
        if sent - got - written_off >= 256 {
            std::thread::sleep(Duration::from_micros(200));
            if last_rx.elapsed() > Duration::from_millis(20) {
                written_off += (sent - got - written_off).min(32);
            }
        }
        if sent == n && got + written_off >= n {
            break;
        }
    }
    let secs = last_rx.duration_since(t0).as_secs_f64();
    (
        (got * size * 8) as f64 / secs / 1e6,
        got as f64 / secs,
        got as f64 / n as f64,
    )
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let names = [
        "srflx",
        "relay allocation",
        "direct easy<->easy",
        "relay sym<->sym",
        "heal after sym flush",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for run in 0..runs {
        let lab = Lab::builder(&unique_prefix("nb"))
            .turn(true)
            .site(NatKind::EasyNat, 1)
            .site(NatKind::EasyNat, 1)
            .site(NatKind::Symmetric, 1)
            .site(NatKind::Symmetric, 1)
            .build()
            .expect("lab");
        let mut nodes: Vec<Node> = (0..4)
            .map(|i| Node::new(&format!("n{i}"), lab.site_host(i, 0), &lab, true))
            .collect();
        let t0 = Instant::now();
        let (mut direct, mut relay) = (None, None);
        let ok = drive(&mut nodes, Duration::from_secs(30), |n| {
            if direct.is_none() && both(n, 0, 1, PathKind::Direct) {
                direct = Some(t0.elapsed());
            }
            if relay.is_none() && both(n, 2, 3, PathKind::Relay) {
                relay = Some(t0.elapsed());
            }
            direct.is_some()
                && relay.is_some()
                && n.iter()
                    .all(|x| x.srflx_at.is_some() && x.relay_at.is_some())
        });
        assert!(ok, "run {run}: paths not established");
        let srflx = nodes.iter().map(|n| n.srflx_at.unwrap()).max().unwrap();
        let alloc = nodes.iter().map(|n| n.relay_at.unwrap()).max().unwrap();
        assert!(tunnel_works(&mut nodes, 2, 3));
        if std::env::var_os("EVIO_NAT_DEBUG").is_some() {
            eprintln!("--- flush at {:?}", t0.elapsed());
        }
        lab.site(2).flush_conntrack().expect("flush");
        let t1 = Instant::now();
        assert!(
            (0..100).any(|_| tunnel_works(&mut nodes, 2, 3)),
            "run {run}: no heal"
        );
        let heal = t1.elapsed();
        let got = [srflx, alloc, direct.unwrap(), relay.unwrap(), heal];
        if run == 0 {
            // Raw datagram capacity of the two kinds of path (no WireGuard): direct easy<->easy, and
            // symmetric<->symmetric through coturn.
            drive(&mut nodes, Duration::from_millis(500), |_| false);
            let d = blast(&mut nodes, 0, 1, 50_000, 1200);
            let r = blast(&mut nodes, 2, 3, 50_000, 1200);
            println!(
                "datagrams of 1200 B, single thread, <= 256 in flight: direct {:.0} Mbit/s ({:.0} pkt/s, {:.1}% received), relayed via coturn {:.0} Mbit/s ({:.0} pkt/s, {:.1}% received)",
                d.0,
                d.1,
                d.2 * 100.0,
                r.0,
                r.1,
                r.2 * 100.0
            );
        }
        println!(
            "run {run}: {}",
            names
                .iter()
                .zip(got)
                .map(|(n, d)| format!("{n} {d:.1?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (s, d) in samples.iter_mut().zip(got) {
            s.push(d);
        }
    }
    println!("medians over {runs} runs (agent start = all four agents created at once):");
    for (n, s) in names.iter().zip(samples.iter_mut()) {
        println!("  {n:<22} {:.1?}", median(s));
    }
}
