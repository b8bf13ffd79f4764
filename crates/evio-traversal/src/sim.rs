//! A simulated network for the agent: a fake clock, hosts with [`Agent`]s, NATs (endpoint-independent
//! port-preserving or symmetric, both with port-restricted filtering and idle timeouts, like Linux
//! `masquerade` / `masquerade random`), a STUN/TURN server model, latency and packet loss. Used by the unit
//! tests and the simulation tests.
//!
//! The TURN server model follows RFC 8656 closely enough to exercise the client (401 + realm/nonce,
//! long-term MESSAGE-INTEGRITY, 437 on a second Allocate, permissions by IP, channels, Send/Data
//! indications, ChannelData), but it is a test model: the integration tests run the real coturn. The NAT and
//! TURN models are public: `evio-overlay`'s simulation routes whole overlay nodes through them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::agent::{Agent, AgentConfig, Event, Input, PeerKey, Source, Timers, check_key};
use crate::candidate::Candidate;
use crate::demux;
use crate::stun::{self, Builder, Class, Message, attr, method};
use crate::turn::TurnConfig;

/// How a simulated NAT maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatType {
    /// Endpoint-independent, port-preserving mapping (`masquerade`).
    Easy,
    /// A new random port per destination (`masquerade random`).
    Symmetric,
}

#[derive(Debug)]
struct Mapping {
    internal: SocketAddr,
    /// Remote endpoints the inside has sent to through this mapping (port-restricted filtering).
    contacted: HashSet<SocketAddr>,
    last: Instant,
}

/// A simulated NAT.
#[derive(Debug)]
pub struct Nat {
    pub kind: NatType,
    pub public_ip: IpAddr,
    /// Idle timeout of a mapping.
    pub timeout: Duration,
    out: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    ports: HashMap<u16, Mapping>,
    /// Mappings are expired at most once a simulated second (a pass over all of them), so up to a
    /// second late: what keeps a NAT with thousands of mappings from costing a pass per datagram.
    next_expiry: Option<Instant>,
}

impl Nat {
    /// A NAT of `kind` with public address `ip` and a 30 s mapping timeout.
    pub fn new(kind: NatType, ip: IpAddr) -> Nat {
        Nat {
            kind,
            public_ip: ip,
            timeout: Duration::from_secs(30),
            out: HashMap::new(),
            ports: HashMap::new(),
            next_expiry: None,
        }
    }

    /// Translates a datagram from inside (`src`) to `dst`: its public source.
    pub fn outbound(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        now: Instant,
        rng: &mut StdRng,
    ) -> SocketAddr {
        self.expire(now);
        let key = (
            src,
            if self.kind == NatType::Symmetric {
                Some(dst)
            } else {
                None
            },
        );
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                let mut p = if self.kind == NatType::Easy {
                    src.port()
                } else {
                    rng.random_range(1024..65535)
                };
                while self.ports.contains_key(&p) {
                    p = rng.random_range(1024..65535);
                }
                self.out.insert(key, p);
                self.ports.insert(
                    p,
                    Mapping {
                        internal: src,
                        contacted: HashSet::new(),
                        last: now,
                    },
                );
                p
            }
        };
        let m = self.ports.get_mut(&port).expect("mapping");
        m.contacted.insert(dst);
        m.last = now;
        SocketAddr::new(self.public_ip, port)
    }

    /// Where a datagram from `src` to the public `port` goes inside, if the mapping exists and lets `src`
    /// in (port-restricted filtering).
    pub fn inbound(&mut self, src: SocketAddr, port: u16, now: Instant) -> Option<SocketAddr> {
        self.expire(now);
        let m = self.ports.get_mut(&port)?;
        if !m.contacted.contains(&src) {
            return None;
        }
        m.last = now;
        Some(m.internal)
    }

    fn expire(&mut self, now: Instant) {
        if self.next_expiry.is_some_and(|t| now < t) {
            return;
        }
        self.next_expiry = Some(now + Duration::from_secs(1));
        let timeout = self.timeout;
        let before = self.ports.len();
        self.ports
            .retain(|_, m| now.duration_since(m.last) <= timeout);
        if self.ports.len() != before {
            let ports = &self.ports;
            self.out.retain(|_, v| ports.contains_key(v));
        }
    }

    /// Drops every mapping (`conntrack -F`).
    pub fn flush(&mut self) {
        self.out.clear();
        self.ports.clear();
        self.next_expiry = None;
    }
}

#[derive(Debug)]
struct Alloc {
    relayed: SocketAddr,
    /// Permission expiry per peer IP (5 minutes, RFC 8656 §9).
    perms: HashMap<IpAddr, Instant>,
    /// Channel binding and its expiry (10 minutes, RFC 8656 §12).
    channels: HashMap<u16, (SocketAddr, Instant)>,
    expires: Instant,
}

impl Alloc {
    fn permits(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.get(&ip).is_some_and(|t| now < *t)
    }
    fn channel_of(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|(_, (p, t))| *p == peer && now < *t)
            .map(|(n, _)| *n)
    }
}

const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// A STUN + TURN server model.
#[derive(Debug)]
pub struct TurnModel {
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    pub realm: String,
    pub up: bool,
    nonce: String,
    allocs: HashMap<SocketAddr, Alloc>,
    by_relayed: HashMap<SocketAddr, SocketAddr>,
    next_port: u16,
    /// Datagrams relayed (both directions), for assertions.
    pub relayed_datagrams: u64,
    /// Allocates answered 437 because the 5-tuple already had an allocation.
    pub allocate_mismatches: u64,
    /// Datagrams from one relayed address to another (they cross the server twice).
    pub relay_to_relay_datagrams: u64,
}

impl TurnModel {
    fn key(&self) -> [u8; 16] {
        stun::long_term_key(&self.user, &self.realm, &self.password)
    }

    /// Starts a new nonce: requests with the old one get 438 (stale nonce).
    pub fn rotate_nonce(&mut self) {
        self.nonce = format!("{}x", self.nonce);
    }

    /// Forgets every allocation (a server restart).
    pub fn reset(&mut self) {
        self.allocs.clear();
        self.by_relayed.clear();
    }

    /// A server at `addr` whose long-term credentials are `evio` / `secret` (realm `evio`).
    pub fn new(addr: SocketAddr) -> TurnModel {
        TurnModel {
            addr,
            user: "evio".into(),
            password: "secret".into(),
            realm: "evio".into(),
            up: true,
            nonce: "n0".into(),
            allocs: HashMap::new(),
            by_relayed: HashMap::new(),
            next_port: 50000,
            relayed_datagrams: 0,
            allocate_mismatches: 0,
            relay_to_relay_datagrams: 0,
        }
    }

    /// True if a datagram to `dst` is the server's (its own address or a relayed address).
    pub fn owns(&self, dst: SocketAddr) -> bool {
        dst == self.addr || self.by_relayed.contains_key(&dst)
    }

    /// Handles a datagram from `src` to `dst` (which the server owns); returns the datagrams it sends.
    pub fn handle(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Vec<Packet> {
        if !self.up {
            return vec![];
        }
        // Allocations that were not refreshed in time are gone.
        let dead: Vec<SocketAddr> = self
            .allocs
            .iter()
            .filter(|(_, a)| now >= a.expires)
            .map(|(c, _)| *c)
            .collect();
        for c in dead {
            if let Some(a) = self.allocs.remove(&c) {
                self.by_relayed.remove(&a.relayed);
            }
        }
        if dst != self.addr {
            // From a peer to a relayed address.
            let Some(client) = self.by_relayed.get(&dst).copied() else {
                return vec![];
            };
            let a = &self.allocs[&client];
            if !a.permits(src.ip(), now) {
                return vec![];
            }
            self.relayed_datagrams += 1;
            if self.by_relayed.contains_key(&src) {
                self.relay_to_relay_datagrams += 1;
            }
            let payload = match a.channel_of(src, now) {
                Some(n) => {
                    let mut out = Vec::new();
                    demux::encode_channel_data(n, data, &mut out).map(|()| out)
                }
                None => Builder::new(
                    Class::Indication,
                    method::DATA,
                    stun::TransactionId([9; 12]),
                )
                .xor_addr(attr::XOR_PEER_ADDRESS, src)
                .attr(attr::DATA, data)
                .finish(),
            };
            let Ok(payload) = payload else {
                return vec![];
            };
            return vec![Packet {
                src: self.addr,
                dst: client,
                payload,
            }];
        }
        if let Some((n, payload)) = demux::channel_data(data) {
            let Some(a) = self.allocs.get(&src) else {
                return vec![];
            };
            let Some((peer, until)) = a.channels.get(&n).copied() else {
                return vec![];
            };
            if now >= until || !a.permits(peer.ip(), now) {
                return vec![];
            }
            self.relayed_datagrams += 1;
            return vec![Packet {
                src: a.relayed,
                dst: peer,
                payload: payload.to_vec(),
            }];
        }
        let Ok(msg) = Message::decode(data) else {
            return vec![];
        };
        let reply = |b: Builder| {
            b.fingerprint()
                .map(|payload| Packet {
                    src: self.addr,
                    dst: src,
                    payload,
                })
                .into_iter()
                .collect::<Vec<_>>()
        };
        if msg.method == method::BINDING && msg.class == Class::Request {
            return reply(
                Builder::new(Class::Success, method::BINDING, msg.tid)
                    .xor_addr(attr::XOR_MAPPED_ADDRESS, src),
            );
        }
        if msg.class == Class::Indication && msg.method == method::SEND {
            let (Some(peer), Some(d)) =
                (msg.xor_addr(attr::XOR_PEER_ADDRESS), msg.attr(attr::DATA))
            else {
                return vec![];
            };
            let Some(a) = self.allocs.get(&src) else {
                return vec![];
            };
            if !a.permits(peer.ip(), now) {
                return vec![];
            }
            self.relayed_datagrams += 1;
            return vec![Packet {
                src: a.relayed,
                dst: peer,
                payload: d.to_vec(),
            }];
        }
        if msg.class != Class::Request {
            return vec![];
        }
        let key = self.key();
        // Like coturn: the challenges (401, 438) and a 437 to Allocate, which coturn decides before it
        // checks the credentials, are unsigned; every other answer to an authenticated request is signed.
        let challenge = |code: u16| {
            reply(
                Builder::new(Class::Error, msg.method, msg.tid)
                    .error(code, "error")
                    .attr(attr::REALM, self.realm.as_bytes())
                    .attr(attr::NONCE, self.nonce.as_bytes()),
            )
        };
        let err = |code: u16| {
            reply(
                Builder::new(Class::Error, msg.method, msg.tid)
                    .error(code, "error")
                    .integrity(&key),
            )
        };
        if msg.method == method::ALLOCATE && self.allocs.contains_key(&src) {
            self.allocate_mismatches += 1;
            return reply(Builder::new(Class::Error, msg.method, msg.tid).error(437, "error"));
        }
        if msg.text(attr::USERNAME) != Some(self.user.as_str()) || !msg.verify(&key) {
            return challenge(401);
        }
        if msg.text(attr::NONCE) != Some(self.nonce.as_str()) {
            return challenge(438);
        }
        let ok = |b: Builder| reply(b.integrity(&key));
        match msg.method {
            method::ALLOCATE => {
                let relayed = SocketAddr::new(self.addr.ip(), self.next_port);
                self.next_port += 1;
                self.allocs.insert(
                    src,
                    Alloc {
                        relayed,
                        perms: HashMap::new(),
                        channels: HashMap::new(),
                        expires: now + Duration::from_secs(600),
                    },
                );
                self.by_relayed.insert(relayed, src);
                ok(Builder::new(Class::Success, method::ALLOCATE, msg.tid)
                    .xor_addr(attr::XOR_RELAYED_ADDRESS, relayed)
                    .xor_addr(attr::XOR_MAPPED_ADDRESS, src)
                    .u32_attr(attr::LIFETIME, 600))
            }
            method::REFRESH => {
                if !self.allocs.contains_key(&src) {
                    return err(437);
                }
                if msg.u32_attr(attr::LIFETIME) == Some(0) {
                    let a = self.allocs.remove(&src).expect("alloc");
                    self.by_relayed.remove(&a.relayed);
                } else if let Some(a) = self.allocs.get_mut(&src) {
                    a.expires = now + Duration::from_secs(600);
                }
                ok(Builder::new(Class::Success, method::REFRESH, msg.tid)
                    .u32_attr(attr::LIFETIME, 600))
            }
            method::CREATE_PERMISSION => {
                let Some(a) = self.allocs.get_mut(&src) else {
                    return err(437);
                };
                let peers = msg.xor_addrs(attr::XOR_PEER_ADDRESS);
                for p in peers {
                    a.perms.insert(p.ip(), now + PERMISSION_LIFETIME);
                }
                ok(Builder::new(
                    Class::Success,
                    method::CREATE_PERMISSION,
                    msg.tid,
                ))
            }
            method::CHANNEL_BIND => {
                let Some(a) = self.allocs.get_mut(&src) else {
                    return err(437);
                };
                let (Some(n), Some(peer)) = (
                    msg.u32_attr(attr::CHANNEL_NUMBER),
                    msg.xor_addr(attr::XOR_PEER_ADDRESS),
                ) else {
                    return err(400);
                };
                a.channels
                    .insert((n >> 16) as u16, (peer, now + CHANNEL_LIFETIME));
                a.perms.insert(peer.ip(), now + PERMISSION_LIFETIME);
                ok(Builder::new(Class::Success, method::CHANNEL_BIND, msg.tid))
            }
            _ => err(400),
        }
    }
}

/// A datagram in flight.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// A simulated host running an agent.
#[derive(Debug)]
pub struct Node {
    pub key: PeerKey,
    /// The socket's address (private behind a NAT).
    pub addr: SocketAddr,
    pub nat: Option<usize>,
    pub agent: Agent,
    /// Tunnel datagrams received: (identified peer, source, payload).
    pub tunnel_rx: Vec<(Option<PeerKey>, Source, Vec<u8>)>,
    /// Path changes seen, with the time.
    pub path_events: Vec<(Duration, PeerKey, Option<crate::Path>)>,
    /// Candidate lists published.
    pub published: Vec<Vec<Candidate>>,
    /// Checks from nodes this one does not know ([`Event::CheckFromUnknown`]), with the time.
    pub unknown_checks: Vec<(Duration, PeerKey)>,
}

/// The simulated wall clock at the start of a simulation (Unix time; any fixed value would do).
pub const SIM_EPOCH: Duration = Duration::from_secs(1_790_000_000);

/// The simulated world.
pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    pub nodes: Vec<Node>,
    pub nats: Vec<Nat>,
    pub turn: Option<TurnModel>,
    /// One-way latency of every hop.
    pub latency: Duration,
    /// Probability of losing a datagram (0.0..1.0).
    pub loss: f64,
    /// Datagrams dropped by NAT filtering or routing (not by `loss`).
    pub dropped: u64,
    /// Datagrams sent by anyone (nodes and the server), for traffic budgets.
    pub datagrams: u64,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    packets: HashMap<usize, (Packet, Hop)>,
    seq: u64,
    rng: StdRng,
    /// Exchange candidates automatically when a node publishes them (the etcd watch).
    pub auto_introduce: bool,
    /// Run the agents' timers on this tick instead of at their exact deadlines ([`Sim::set_timer_tick`]).
    timer_tick: Option<Duration>,
    /// Nodes by (socket address, NAT) and NATs by public address: routing a datagram is a lookup, not a
    /// pass over every node (what made large simulations grow faster than N²).
    by_addr: HashMap<(SocketAddr, Option<usize>), usize>,
    nat_by_ip: HashMap<IpAddr, usize>,
    next_tick: Instant,
}

#[derive(Clone, Copy, Debug)]
enum Hop {
    /// Sent by node i (before its NAT).
    FromNode(usize),
    /// On the internet, with a public source.
    Internet,
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let now = Instant::now();
        Sim {
            start: now,
            now,
            nodes: Vec::new(),
            nats: Vec::new(),
            turn: None,
            latency: Duration::from_millis(10),
            loss: 0.0,
            dropped: 0,
            datagrams: 0,
            queue: BinaryHeap::new(),
            packets: HashMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            auto_introduce: true,
            timer_tick: None,
            next_tick: now,
            by_addr: HashMap::new(),
            nat_by_ip: HashMap::new(),
        }
    }

    /// Runs the agents' timers every `tick` (eviod's timer thread: 100 ms) rather than at their exact
    /// deadlines: what a large simulation needs, since finding the next exact deadline asks every agent
    /// about every pair at every step.
    pub fn set_timer_tick(&mut self, tick: Duration) {
        self.timer_tick = Some(tick);
        self.next_tick = self.now + tick;
    }

    /// Adds the STUN/TURN server at `addr`.
    pub fn add_turn(&mut self, addr: &str) {
        self.turn = Some(TurnModel::new(addr.parse().expect("addr")));
    }

    /// Adds a NAT with public address `ip`; returns its index.
    pub fn add_nat(&mut self, kind: NatType, ip: &str) -> usize {
        let ip: IpAddr = ip.parse().expect("ip");
        self.nats.push(Nat::new(kind, ip));
        self.nat_by_ip.entry(ip).or_insert(self.nats.len() - 1);
        self.nats.len() - 1
    }

    /// Adds a host with socket `addr` behind `nat` (or public), using the server for STUN and, if
    /// `use_turn`, TURN. Returns its index.
    pub fn add_node(&mut self, addr: &str, nat: Option<usize>, use_turn: bool) -> usize {
        let addr: SocketAddr = addr.parse().expect("addr");
        let mut key = [0u8; 32];
        self.rng.fill(&mut key);
        let (stun_servers, turn) = match &self.turn {
            Some(t) => (
                vec![t.addr],
                use_turn.then(|| TurnConfig {
                    server: t.addr,
                    user: t.user.clone(),
                    password: t.password.clone(),
                }),
            ),
            None => (vec![], None),
        };
        let cfg = AgentConfig {
            local_key: key,
            host_candidates: vec![addr],
            stun_servers,
            turn,
            timers: Timers::default(),
            unix_time: self.unix_time(),
        };
        let seed = self.rng.random();
        let agent = Agent::new(cfg, seed, self.now);
        self.nodes.push(Node {
            key,
            addr,
            nat,
            agent,
            tunnel_rx: Vec::new(),
            path_events: Vec::new(),
            unknown_checks: Vec::new(),
            published: Vec::new(),
        });
        let i = self.nodes.len() - 1;
        self.by_addr.entry((addr, nat)).or_insert(i);
        self.flush_node(i);
        i
    }

    /// The simulated wall clock now: every node's clock agrees ([`SIM_EPOCH`] at the start).
    pub fn unix_time(&self) -> Duration {
        SIM_EPOCH + self.now.saturating_duration_since(self.start)
    }

    /// The check key two simulated nodes share (a stand-in for their X25519 shared secret).
    pub fn pair_key(a: &PeerKey, b: &PeerKey) -> [u8; 32] {
        let mut secret = [0u8; 32];
        for (i, s) in secret.iter_mut().enumerate() {
            *s = a[i] ^ b[i];
        }
        check_key(&secret, a, b, None)
    }

    /// Tells every node about every other node's current candidates (what etcd does).
    pub fn introduce_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.introduce(i);
        }
    }

    /// Tells every other node about node `i`'s candidates.
    pub fn introduce(&mut self, i: usize) {
        let cands = self.nodes[i].agent.local_candidates();
        let key = self.nodes[i].key;
        for j in 0..self.nodes.len() {
            if j != i {
                let k = Self::pair_key(&key, &self.nodes[j].key);
                let now = self.now;
                self.nodes[j].agent.set_peer(key, k, cands.clone(), now);
                self.flush_node(j);
            }
        }
    }

    /// Tells node `i` about one peer (what a lazy node's control plane does when it wants the peer).
    pub fn set_peer(
        &mut self,
        i: usize,
        peer: PeerKey,
        check_key: [u8; 32],
        cands: Vec<Candidate>,
    ) {
        let now = self.now;
        self.nodes[i].agent.set_peer(peer, check_key, cands, now);
        self.flush_node(i);
    }

    fn enqueue(&mut self, p: Packet, hop: Hop) {
        self.datagrams += 1;
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        self.seq += 1;
        let id = self.seq as usize;
        self.packets.insert(id, (p, hop));
        self.queue
            .push(Reverse((self.now + self.latency, self.seq, id)));
    }

    /// Collects a node's datagrams and events.
    fn flush_node(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].agent.poll_transmit() {
            let src = self.nodes[i].addr;
            self.enqueue(
                Packet {
                    src,
                    dst: t.dst,
                    payload: t.payload,
                },
                Hop::FromNode(i),
            );
        }
        let mut republish = false;
        while let Some(e) = self.nodes[i].agent.poll_event() {
            let at = self.now - self.start;
            match e {
                Event::LocalCandidates(c) => {
                    self.nodes[i].published.push(c);
                    republish = true;
                }
                Event::PathChanged { peer, path } => {
                    self.nodes[i].path_events.push((at, peer, path))
                }
                Event::CheckFromUnknown(k) => self.nodes[i].unknown_checks.push((at, k)),
            }
        }
        if republish && self.auto_introduce && self.nodes.len() > 1 {
            self.introduce(i);
        }
    }

    /// Sends a tunnel datagram from node `i` to node `j` along `i`'s selected path; false if none.
    ///
    /// The datagram is a stand-in for a WireGuard message: type 4, then the sender's key (which plays the
    /// part of the tunnel's authentication: the receiver then calls [`Agent::tunnel_from`]), then `payload`.
    pub fn send_tunnel(&mut self, i: usize, j: usize, payload: &[u8]) -> bool {
        let peer = self.nodes[j].key;
        let mut wg = vec![4, 0, 0, 0];
        wg.extend_from_slice(&self.nodes[i].key);
        wg.extend_from_slice(payload);
        let Some(t) = self.nodes[i].agent.wrap(&peer, &wg) else {
            return false;
        };
        let src = self.nodes[i].addr;
        self.enqueue(
            Packet {
                src,
                dst: t.dst,
                payload: t.payload,
            },
            Hop::FromNode(i),
        );
        true
    }

    fn node_by_addr(&self, a: SocketAddr, nat: Option<usize>) -> Option<usize> {
        self.by_addr.get(&(a, nat)).copied()
    }

    fn route(&mut self, p: Packet, hop: Hop) {
        let now = self.now;
        match hop {
            Hop::FromNode(i) => {
                let nat = self.nodes[i].nat;
                // Same LAN (or same public segment): straight to the node.
                if let Some(j) = self.node_by_addr(p.dst, nat) {
                    return self.deliver(j, p);
                }
                match nat {
                    Some(n) => {
                        if p.dst.ip() == self.nats[n].public_ip
                            || crate::candidate::is_private(p.dst.ip())
                        {
                            self.dropped += 1; // no hairpinning; private addresses do not route
                            return;
                        }
                        let src = self.nats[n].outbound(p.src, p.dst, now, &mut self.rng);
                        self.route(Packet { src, ..p }, Hop::Internet);
                    }
                    None => self.route(p, Hop::Internet),
                }
            }
            Hop::Internet => {
                if let Some(t) = &mut self.turn
                    && t.owns(p.dst)
                {
                    for out in t.handle(p.src, p.dst, &p.payload, now) {
                        self.enqueue(out, Hop::Internet);
                    }
                    return;
                }
                if let Some(&n) = self.nat_by_ip.get(&p.dst.ip()) {
                    match self.nats[n].inbound(p.src, p.dst.port(), now) {
                        Some(internal) => match self.node_by_addr(internal, Some(n)) {
                            Some(j) => self.deliver(j, Packet { dst: internal, ..p }),
                            None => self.dropped += 1,
                        },
                        None => self.dropped += 1,
                    }
                    return;
                }
                match self.node_by_addr(p.dst, None) {
                    Some(j) => self.deliver(j, p),
                    None => self.dropped += 1,
                }
            }
        }
    }

    fn deliver(&mut self, j: usize, p: Packet) {
        let now = self.now;
        let node = &mut self.nodes[j];
        let mut authenticated = None;
        match node.agent.handle_input(p.src, &p.payload, now) {
            Input::Tunnel {
                peer,
                from,
                payload,
            } if payload.len() >= 36 => {
                let mut sender = [0u8; 32];
                sender.copy_from_slice(&payload[4..36]);
                node.tunnel_rx.push((peer, from, payload[36..].to_vec()));
                authenticated = Some((sender, from));
            }
            Input::Tunnel { .. } | Input::Handled | Input::Unknown => {}
        }
        if let Some((sender, from)) = authenticated {
            node.agent.tunnel_from(&sender, from, now);
        }
        self.flush_node(j);
    }

    /// Runs the world until `self.now + d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let (mut last_timer_at, mut spins) = (None, 0u32);
        loop {
            let next_pkt = self.queue.peek().map(|Reverse((t, _, _))| *t);
            // Exact timers ask every agent for its next deadline at every step (O(nodes x pairs));
            // with a tick, the agents' timers run at most once per tick, as eviod's timer thread does.
            let next_timer = match self.timer_tick {
                Some(tick) => {
                    while self.next_tick <= self.now {
                        self.next_tick += tick;
                    }
                    Some(self.next_tick)
                }
                None => self
                    .nodes
                    .iter()
                    .filter_map(|n| n.agent.poll_timeout())
                    .min(),
            };
            let next = [next_pkt, next_timer].into_iter().flatten().min();
            let Some(next) = next.filter(|t| *t <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(next);
            if next_pkt == Some(next) {
                let Reverse((_, _, id)) = self.queue.pop().expect("peeked");
                let (p, hop) = self.packets.remove(&id).expect("packet");
                self.route(p, hop);
            } else {
                let now = self.now;
                if Some(now) == last_timer_at {
                    spins += 1;
                    assert!(
                        spins < 10_000,
                        "an agent's timer does not advance at {:?}",
                        self.elapsed()
                    );
                } else {
                    (last_timer_at, spins) = (Some(now), 0);
                }
                for i in 0..self.nodes.len() {
                    if self.nodes[i].agent.poll_timeout().is_some_and(|t| t <= now) {
                        self.nodes[i].agent.handle_timeout(now);
                        self.flush_node(i);
                    }
                }
            }
        }
    }

    /// The selected path of node `i` towards node `j`.
    pub fn path(&self, i: usize, j: usize) -> Option<crate::Path> {
        self.nodes[i].agent.path(&self.nodes[j].key)
    }

    /// Elapsed simulated time.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// A throw-away public address for tests.
    pub fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }
}
