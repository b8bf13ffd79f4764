//! A simulated network of evio-tunnel nodes: every node has an underlay address, datagrams travel through
//! a queue that can drop them, packets written to a node's "TUN" land in its inbox.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use evio_tunnel::{
    Inbound, Node, NodeConfig, Outbound, PathKind, PeerConfig, PeerId, StaticSecret,
};

pub struct SimNode {
    pub node: Node,
    pub addr: SocketAddr,
    pub vip: [u8; 4],
    pub inbox: Vec<Vec<u8>>,
    pub name: String,
}

/// Decides whether a datagram (from, to, bytes) is lost.
pub type LossFn = Box<dyn FnMut(&SocketAddr, &SocketAddr, &[u8]) -> bool>;

pub struct Sim {
    pub nodes: Vec<SimNode>,
    pub wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Every datagram that crossed the wire, for replay attacks and captures.
    pub captured: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Drop every datagram for which this returns true.
    pub loss: LossFn,
    pub base: Instant,
    pub offset: Duration,
    buf: Vec<u8>,
}

pub fn key(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

/// An IPv4/UDP packet with the given source, destination and payload (checksums are not checked here).
pub fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&1000u16.to_be_bytes());
    p[22..24].copy_from_slice(&2000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

impl Sim {
    /// `n` nodes, fully meshed: node i has VIP 10.10.0.(i+1)/32 and pod subnet 10.244.(i+1).0/24.
    pub fn mesh(n: usize, psk: Option<[u8; 32]>) -> Sim {
        let mut sim = Sim {
            nodes: Vec::new(),
            wire: VecDeque::new(),
            captured: Vec::new(),
            loss: Box::new(|_, _, _| false),
            base: Instant::now(),
            offset: Duration::ZERO,
            buf: vec![0u8; 70000],
        };
        for i in 0..n {
            let node = Node::new(NodeConfig {
                private_key: key(i as u8 + 1),
                preshared_key: psk,
                persistent_keepalive: None,
            });
            sim.nodes.push(SimNode {
                node,
                addr: format!("192.0.2.{}:51820", i + 1).parse().unwrap(),
                vip: [10, 10, 0, i as u8 + 1],
                inbox: Vec::new(),
                name: format!("n{i}"),
            });
        }
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    sim.add_peer(i, j);
                }
            }
        }
        sim.flush_transmits();
        sim
    }

    /// Node `i` learns node `j` and reaches it directly at its address (what NAT traversal would choose
    /// here): the larger key starts a handshake. Returns `j`'s id at `i`.
    pub fn add_peer(&mut self, i: usize, j: usize) -> PeerId {
        let (cfg, addr) = (self.peer_cfg(j), self.nodes[j].addr);
        let now = self.now();
        let node = &self.nodes[i].node;
        let id = node.upsert_peer(now, cfg);
        node.set_path(id, addr, PathKind::Direct);
        id
    }

    pub fn peer_cfg(&self, j: usize) -> PeerConfig {
        let n = &self.nodes[j];
        PeerConfig {
            name: n.name.clone(),
            public_key: n.node.public_key(),
            allowed: vec![
                format!("10.10.0.{}/32", j + 1).parse().unwrap(),
                format!("10.244.{}.0/24", j + 1).parse().unwrap(),
            ],
        }
    }

    pub fn now(&self) -> Instant {
        self.base + self.offset
    }

    pub fn id_of(&self, at: usize, peer: usize) -> PeerId {
        self.nodes[at]
            .node
            .peer_id(&self.nodes[peer].node.public_key())
            .unwrap()
    }

    /// Moves the node's pending transmits onto the wire.
    pub fn flush_transmits(&mut self) {
        for n in &mut self.nodes {
            while let Some(t) = n.node.poll_transmit() {
                self.wire.push_back((n.addr, t.to, t.data));
            }
        }
    }

    /// Packet from node `i`'s TUN.
    pub fn send(&mut self, i: usize, packet: &[u8]) -> Outbound {
        let now = self.now();
        let n = &mut self.nodes[i];
        let r = n.node.encapsulate(now, packet, &mut self.buf);
        if let Outbound::Send { to, len, .. } = r {
            self.wire.push_back((n.addr, to, self.buf[..len].to_vec()));
        }
        self.flush_transmits();
        r
    }

    /// Injects a raw datagram into node `to_idx` from `from`; returns what the node did.
    pub fn inject(&mut self, to_idx: usize, from: SocketAddr, data: &[u8]) -> Inbound {
        let now = self.now();
        let n = &mut self.nodes[to_idx];
        let r = n.node.decapsulate(now, from, data, &mut self.buf);
        if let Inbound::WriteTun { len, .. } = r {
            n.inbox.push(self.buf[..len].to_vec());
        }
        self.flush_transmits();
        r
    }

    /// Delivers datagrams until the wire is empty (with loss applied).
    pub fn run(&mut self) {
        let mut guard = 0;
        while let Some((from, to, data)) = self.wire.pop_front() {
            guard += 1;
            assert!(guard < 100_000, "datagram storm");
            self.captured.push((from, to, data.clone()));
            if (self.loss)(&from, &to, &data) {
                continue;
            }
            if let Some(i) = self.nodes.iter().position(|n| n.addr == to) {
                self.inject(i, from, &data);
            }
        }
    }

    /// Advances time by `d` in steps of `step`, ticking every node and delivering datagrams.
    pub fn advance(&mut self, d: Duration, step: Duration) {
        let mut left = d;
        while !left.is_zero() {
            let s = step.min(left);
            left -= s;
            self.offset += s;
            #[cfg(feature = "mock-time")]
            mock_instant::MockClock::advance(s);
            let now = self.now();
            for n in &mut self.nodes {
                n.node.tick(now);
            }
            self.flush_transmits();
            self.run();
        }
    }
}
