//! What the `tunnel` fuzz target runs (`fuzz/fuzz_targets/tunnel.rs` includes this file) and what
//! `tests/never_panics.rs` runs on stable: one copy, so CI checks the properties the fuzzer does.
//!
//! Two nodes A and B with a session between them. The fuzzer's bytes are a script of: raw datagrams
//! from the network into B, inner packets (from a pod, untrusted) that A encrypts and B decrypts, replays
//! and bit flips of A's last datagram, time passing, and the packet address parser alone. Properties:
//! nothing panics; a packet B accepts is a prefix of what A sent and its inner source belongs to A; a
//! replayed or altered datagram is never accepted.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use evio_tunnel::{
    Inbound, MIN_BUFFER, Node, NodeConfig, Outbound, PathKind, PeerConfig, PeerId, StaticSecret,
    packet_addrs,
};

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";
const A_VIP: [u8; 4] = [10, 10, 0, 1];
const B_VIP: [u8; 4] = [10, 10, 0, 2];

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn peer_cfg(node: &Node, n: u8) -> PeerConfig {
    PeerConfig {
        name: format!("n{n}"),
        public_key: node.public_key(),
        allowed: vec![
            format!("10.10.0.{n}/32").parse().unwrap(),
            format!("10.244.{n}.0/24").parse().unwrap(),
            format!("fd00:{n}::/64").parse().unwrap(),
        ],
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn byte(&mut self) -> u8 {
        self.u8().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    /// A chunk of up to 2047 bytes (two bytes of length).
    fn chunk(&mut self) -> &'a [u8] {
        let n = (self.u16() & 0x7FF) as usize;
        self.take(n)
    }
}

pub struct Pair {
    a: Node,
    b: Node,
    /// A's id in B's table.
    a_in_b: PeerId,
    now: Instant,
    out: Vec<u8>,
    /// A's last data datagram to B (for replays and bit flips).
    last: Option<Vec<u8>>,
}

impl Pair {
    pub fn new() -> Pair {
        let node = |seed: u8| {
            Node::new(NodeConfig {
                private_key: StaticSecret::from([seed; 32]),
                preshared_key: None,
                persistent_keepalive: None,
            })
        };
        let (a, b) = (node(1), node(2));
        let now = Instant::now();
        let b_in_a = a.upsert_peer(now, peer_cfg(&b, 2));
        a.set_path(b_in_a, sa(B_ADDR), PathKind::Direct);
        let a_in_b = b.upsert_peer(now, peer_cfg(&a, 1));
        b.set_path(a_in_b, sa(A_ADDR), PathKind::Direct);
        let mut p = Pair {
            a,
            b,
            a_in_b,
            now,
            out: vec![0u8; 65536 + 64],
            last: None,
        };
        p.exchange();
        assert!(
            p.b.peer(a_in_b).is_some_and(|s| s.last_handshake.is_some()),
            "the two nodes have a session"
        );
        p
    }

    /// Delivers every pending transmit between A and B until both are quiet.
    fn exchange(&mut self) {
        for _ in 0..8 {
            let mut quiet = true;
            while let Some(t) = self.a.poll_transmit() {
                quiet = false;
                let _ = self
                    .b
                    .decapsulate(self.now, sa(A_ADDR), &t.data, &mut self.out);
            }
            while let Some(t) = self.b.poll_transmit() {
                quiet = false;
                let _ = self
                    .a
                    .decapsulate(self.now, sa(B_ADDR), &t.data, &mut self.out);
            }
            if quiet {
                return;
            }
        }
    }

    /// B receives `d` from A's address: returns the accepted packet, if any.
    fn deliver_to_b(&mut self, d: &[u8]) -> Option<Vec<u8>> {
        match self.b.decapsulate(self.now, sa(A_ADDR), d, &mut self.out) {
            Inbound::WriteTun { len, peer } => {
                assert_eq!(peer, self.a_in_b, "accepted from the sending peer");
                Some(self.out[..len].to_vec())
            }
            Inbound::Done | Inbound::Dropped(_) => None,
        }
    }

    fn step(&mut self, r: &mut Reader<'_>) -> bool {
        let Some(op) = r.u8() else {
            return false;
        };
        match op % 6 {
            // A raw datagram from the network, from A's address or another one.
            0 => {
                let from = if r.byte() & 1 == 0 {
                    sa(A_ADDR)
                } else {
                    sa("198.51.100.9:4444")
                };
                let d = r.chunk();
                let _ = self.b.decapsulate(self.now, from, d, &mut self.out);
                let _ = self.b.decapsulate(self.now, from, d, &mut [0u8; 16]);
            }
            // A packet from a pod on A: raw, or with a valid IPv4/IPv6 header around fuzzed fields.
            1 => {
                let flags = r.byte();
                let mut p = r.chunk().to_vec();
                fix_header(&mut p, flags);
                let mut out = vec![0u8; (p.len() + 32).max(MIN_BUFFER)];
                if let Outbound::Send { len, .. } = self.a.encapsulate(self.now, &p, &mut out) {
                    let d = out[..len].to_vec();
                    if let Some(got) = self.deliver_to_b(&d) {
                        // What A sent, cut to the length its IP header claims; a header claiming more
                        // than was sent can only reach into the zero padding of the last AEAD block.
                        let n = got.len().min(p.len());
                        assert_eq!(got[..n], p[..n], "what was sent");
                        assert!(got[n..].iter().all(|b| *b == 0), "padding is zeros");
                        assert!(got.len() <= p.len().div_ceil(16) * 16, "within the padding");
                        let (src, _) = packet_addrs(&got).expect("an IP packet was accepted");
                        assert_eq!(
                            self.b.route(src),
                            Some(self.a_in_b),
                            "inner source {src} belongs to the sender"
                        );
                    }
                    if d.first() == Some(&4) {
                        self.last = Some(d);
                    }
                }
                self.exchange();
            }
            // A's last data datagram again: a replay is never accepted.
            2 => {
                if let Some(d) = self.last.clone() {
                    assert_eq!(self.deliver_to_b(&d), None, "a replay was accepted");
                }
            }
            // A's last data datagram with bytes changed: never accepted.
            3 => {
                if let Some(mut d) = self.last.clone() {
                    let at = r.u16() as usize % d.len();
                    let x = r.byte().max(1);
                    d[at] ^= x;
                    if r.byte() & 1 == 1 {
                        d.truncate(at.max(1));
                    }
                    assert_eq!(
                        self.deliver_to_b(&d),
                        None,
                        "an altered datagram was accepted"
                    );
                }
            }
            // Time passes: timers of both nodes, whatever they send is delivered.
            4 => {
                self.now += Duration::from_millis(r.u16() as u64);
                self.a.tick(self.now);
                self.b.tick(self.now);
                self.exchange();
            }
            // The address parser and routing alone.
            _ => {
                let p = r.chunk();
                if let Some((s, d)) = packet_addrs(p) {
                    assert_eq!(s.is_ipv4(), d.is_ipv4());
                    assert_eq!(p[0] >> 4, if s.is_ipv4() { 4 } else { 6 });
                    let _ = self.b.route(s);
                }
                let _ = self.a.endpoint_for(p);
            }
        }
        true
    }
}

/// Makes `p` an IPv4 (flags bit 1 clear) or IPv6 packet from A to B with the right length fields, when
/// flags bit 0 is set; leaves it raw otherwise. Bit 2 makes the source foreign (the inbound filter's case).
fn fix_header(p: &mut Vec<u8>, flags: u8) {
    if flags & 1 == 0 {
        return;
    }
    let foreign = flags & 4 != 0;
    if flags & 2 == 0 {
        if p.len() < 20 {
            p.resize(20, 0);
        }
        p[0] = 0x45;
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[12..16].copy_from_slice(if foreign { &[10, 10, 0, 9] } else { &A_VIP });
        p[16..20].copy_from_slice(&B_VIP);
    } else {
        if p.len() < 40 {
            p.resize(40, 0);
        }
        p[0] = 0x60;
        let len = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        let src: IpAddr = if foreign { "fd00:9::1" } else { "fd00:1::1" }
            .parse()
            .unwrap();
        let IpAddr::V6(s) = src else { unreachable!() };
        p[8..24].copy_from_slice(&s.octets());
        let d: std::net::Ipv6Addr = "fd00:2::1".parse().unwrap();
        p[24..40].copy_from_slice(&d.octets());
    }
}

impl Pair {
    /// Runs one script (see the module docs) on this pair. Returns how many inner packets B accepted
    /// so far.
    pub fn run(&mut self, data: &[u8]) -> u64 {
        let mut r = Reader(data);
        for _ in 0..64 {
            if !self.step(&mut r) {
                break;
            }
        }
        self.b.peer(self.a_in_b).map_or(0, |s| s.rx_packets)
    }
}

/// Runs one script on a fresh pair (what the fuzz target does; the stable test reuses pairs, as the
/// handshake costs more than a script).
pub fn tunnel(data: &[u8]) -> u64 {
    Pair::new().run(data)
}

/// Seeds: packets both ways through the session, replays, bit flips, garbage, time.
pub fn seeds() -> Vec<Vec<u8>> {
    let pkt = |flags: u8, body: &[u8]| {
        let mut v = vec![1, flags];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    let mut s1 = pkt(1, &[0u8; 40]);
    s1.extend(pkt(3, &[0u8; 60]));
    s1.extend([2, 3, 0, 20, 0xFF, 0]);
    let mut s2 = pkt(5, &[0u8; 28]);
    s2.extend([4, 0x03, 0xE8]);
    s2.extend(pkt(0, &[0x45; 24]));
    s2.extend([0, 0, 0, 4, 1, 0, 0, 0]);
    s2.extend(pkt(3, &[0u8; 8]));
    let mut s3 = vec![5, 0, 20, 0x45];
    s3.extend([0u8; 19]);
    s3.extend([0, 1, 0, 148, 1]);
    s3.extend([0u8; 147]);
    s3.extend(pkt(1, &[0u8; 20]));
    vec![s1, s2, s3]
}
