//! The multi-peer node: sessions, routing, filtering, endpoints.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use crate::PeerId;
use crate::route::{RouteTable, packet_addrs};

/// Smallest output buffer for [`Node::encapsulate`] / [`Node::decapsulate`] (a handshake initiation is
/// 148 bytes); for data the buffer must also hold the packet plus 32 bytes.
pub const MIN_BUFFER: usize = 148;

/// Handshakes per second the node answers before it asks for cookies (DoS protection, WireGuard §5.3).
const NODE_HANDSHAKE_RATE_LIMIT: u64 = 100;

/// How the current endpoint of a peer is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// No session yet (or it expired): handshakes are being tried on the candidates.
    Connecting,
    /// A session over the peer's own address (host or server-reflexive candidate).
    Direct,
    /// A session through a relay (TURN); set by NAT traversal with [`Node::set_path`].
    Relay,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Connecting => "connecting",
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
        }
    }
}

/// Why a packet or datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Outbound packet to an address no peer owns.
    NoRoute,
    /// Outbound packet for a peer with no endpoint to send to.
    NoEndpoint,
    /// Not an IP packet (outbound) or not a WireGuard message (inbound).
    Malformed,
    /// A message for a session index or public key we do not know.
    UnknownPeer,
    /// Authentication failed (bad AEAD tag, no session for the index).
    DecryptFailed,
    /// A replayed data counter or handshake timestamp.
    Replay,
    /// A handshake that does not verify (bad MAC, wrong key).
    HandshakeRejected,
    /// A decrypted packet whose inner source is not owned by the peer that sent it.
    SpoofedSource,
    /// Handshake refused because the node is under load (a cookie was sent instead).
    UnderLoad,
    /// The session expired.
    Expired,
    /// Anything else boringtun reports.
    Other,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::HandshakeRejected,
        DropReason::SpoofedSource,
        DropReason::UnderLoad,
        DropReason::Expired,
        DropReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::HandshakeRejected => "handshake_rejected",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::UnderLoad => "under_load",
            DropReason::Expired => "expired",
            DropReason::Other => "other",
        }
    }

    fn from_wg(e: &WireGuardError) -> DropReason {
        use WireGuardError as E;
        match e {
            E::DuplicateCounter | E::InvalidCounter | E::WrongTai64nTimestamp => DropReason::Replay,
            E::InvalidAeadTag | E::NoCurrentSession | E::WrongIndex => DropReason::DecryptFailed,
            E::InvalidMac | E::WrongKey | E::InvalidTai64nTimestamp | E::UnexpectedPacket => {
                DropReason::HandshakeRejected
            }
            E::InvalidPacket | E::IncorrectPacketLength | E::WrongPacketType => {
                DropReason::Malformed
            }
            E::UnderLoad => DropReason::UnderLoad,
            E::ConnectionExpired => DropReason::Expired,
            _ => DropReason::Other,
        }
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Default, Debug, Clone)]
pub struct Drops {
    counts: [u64; DropReason::ALL.len()],
}

impl Drops {
    pub fn get(&self, r: DropReason) -> u64 {
        self.counts[r as usize]
    }

    fn add(&mut self, r: DropReason) {
        self.counts[r as usize] += 1;
    }

    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.counts[*r as usize]))
    }
}

/// Something that happened, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session was established (either side initiated).
    HandshakeCompleted { peer: PeerId, endpoint: SocketAddr },
    /// The peer's current endpoint changed (roaming, or the next candidate is tried).
    EndpointChanged { peer: PeerId, endpoint: SocketAddr },
    /// The session expired (no new keys within the protocol's limits): back to `connecting`.
    SessionExpired { peer: PeerId },
}

/// A datagram to send that did not fit the hot-path return values (handshakes, cookies, queued packets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// Result of [`Node::encapsulate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send `out[..len]` to `to` (a data message, or a handshake initiation while the packet waits).
    Send {
        to: SocketAddr,
        len: usize,
        peer: PeerId,
    },
    /// The packet is queued until a handshake completes; nothing to send now.
    Queued,
    Dropped(DropReason),
}

/// Result of [`Node::decapsulate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Write `out[..len]` to the TUN device.
    WriteTun {
        len: usize,
        peer: PeerId,
    },
    /// A control message or keepalive, handled (check [`Node::poll_transmit`]).
    Done,
    Dropped(DropReason),
}

/// This node's identity.
pub struct NodeConfig {
    pub private_key: StaticSecret,
    /// Cluster pre-shared key (WireGuard's PSK), if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Persistent keepalive in seconds (keeps NAT mappings open), if any.
    pub persistent_keepalive: Option<u16>,
}

/// What the control plane knows about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: [u8; 32],
    /// Prefixes the peer owns: its VIP/32 and its pod subnet. Outbound routing and the inbound filter.
    pub allowed: Vec<IpNet>,
    /// Candidate endpoints, best first.
    pub candidates: Vec<SocketAddr>,
}

/// A snapshot of one peer, for status and metrics.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub id: PeerId,
    pub name: String,
    pub public_key: [u8; 32],
    pub allowed: Vec<IpNet>,
    pub candidates: Vec<SocketAddr>,
    pub endpoint: Option<SocketAddr>,
    pub path: PathKind,
    pub last_handshake: Option<Instant>,
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

struct Peer {
    id: PeerId,
    cfg: PeerConfig,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    candidate_idx: usize,
    path: PathKind,
    /// Set by [`Node::set_path`]: NAT traversal owns the endpoint (no roaming, no candidate rotation).
    managed: Option<PathKind>,
    last_handshake: Option<Instant>,
    last_nudge: Option<Instant>,
    handshakes: u64,
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
}

impl Peer {
    fn status(&self) -> PeerStatus {
        PeerStatus {
            id: self.id,
            name: self.cfg.name.clone(),
            public_key: self.cfg.public_key,
            allowed: self.cfg.allowed.clone(),
            candidates: self.cfg.candidates.clone(),
            endpoint: self.endpoint,
            path: self.path,
            last_handshake: self.last_handshake,
            handshakes: self.handshakes,
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
        }
    }
}

/// One node: its key, its peers, their sessions and routes.
pub struct Node {
    private_key: StaticSecret,
    public_key: PublicKey,
    preshared_key: Option<[u8; 32]>,
    persistent_keepalive: Option<u16>,
    peers: HashMap<PeerId, Peer>,
    by_key: HashMap<[u8; 32], PeerId>,
    routes: RouteTable,
    next_id: PeerId,
    rate_limiter: Arc<RateLimiter>,
    last_rate_reset: Option<Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    drops: Drops,
    scratch: Vec<u8>,
}

fn is_handshake(buf: &[u8]) -> bool {
    buf.len() >= 4 && u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) == 1
}

impl Node {
    pub fn new(cfg: NodeConfig) -> Node {
        let public_key = PublicKey::from(&cfg.private_key);
        // Session indices are `peer id << 8 | n`; start the ids at a random point so a restarted node does
        // not reuse the indices of its previous life.
        let seed = {
            let mut b = [0u8; 4];
            // Not a secret: any value works, the randomness only avoids index reuse across restarts.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
                .unwrap_or(1);
            b.copy_from_slice(&t.to_le_bytes());
            u32::from_le_bytes(b) & 0x00ff_ffff
        };
        Node {
            rate_limiter: Arc::new(RateLimiter::new(&public_key, NODE_HANDSHAKE_RATE_LIMIT)),
            private_key: cfg.private_key,
            public_key,
            preshared_key: cfg.preshared_key,
            persistent_keepalive: cfg.persistent_keepalive,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            routes: RouteTable::new(),
            next_id: seed.max(1),
            last_rate_reset: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            drops: Drops::default(),
            scratch: vec![0u8; 65536 + 64],
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public_key.as_bytes()
    }

    fn alloc_id(&mut self) -> PeerId {
        loop {
            let id = self.next_id;
            self.next_id = (self.next_id + 1) & 0x00ff_ffff;
            if self.next_id == 0 {
                self.next_id = 1;
            }
            if !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    fn rebuild_routes(&mut self) {
        let mut t = RouteTable::new();
        // Deterministic when two peers claim the same prefix: the lower id wins (logged by the caller).
        let mut ids: Vec<_> = self.peers.keys().copied().collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids {
            for net in &self.peers[&id].cfg.allowed {
                t.insert(*net, id);
            }
        }
        self.routes = t;
    }

    /// Adds a peer, or updates the one with the same public key (its session is kept). A new peer starts
    /// a handshake at once on its first candidate.
    pub fn upsert_peer(&mut self, now: Instant, cfg: PeerConfig) -> PeerId {
        if let Some(&id) = self.by_key.get(&cfg.public_key) {
            let p = self.peers.get_mut(&id).expect("indexed peer");
            if p.cfg != cfg {
                let candidates_changed = p.cfg.candidates != cfg.candidates;
                let routes_changed = p.cfg.allowed != cfg.allowed;
                p.cfg = cfg;
                if candidates_changed && p.path == PathKind::Connecting && p.managed.is_none() {
                    p.candidate_idx = 0;
                    p.endpoint = p.cfg.candidates.first().copied();
                }
                if candidates_changed && p.endpoint.is_none() {
                    p.endpoint = p.cfg.candidates.first().copied();
                }
                if routes_changed {
                    self.rebuild_routes();
                }
            }
            return id;
        }
        let id = self.alloc_id();
        let tunn = Tunn::new(
            self.private_key.clone(),
            PublicKey::from(cfg.public_key),
            self.preshared_key,
            self.persistent_keepalive,
            id,
            None,
        );
        let endpoint = cfg.candidates.first().copied();
        self.by_key.insert(cfg.public_key, id);
        self.peers.insert(
            id,
            Peer {
                id,
                cfg,
                tunn,
                endpoint,
                candidate_idx: 0,
                path: PathKind::Connecting,
                managed: None,
                last_handshake: None,
                last_nudge: None,
                handshakes: 0,
                rx_bytes: 0,
                tx_bytes: 0,
                rx_packets: 0,
                tx_packets: 0,
            },
        );
        self.rebuild_routes();
        // One side starts at once (the larger key), so that both do not race with crossing initiations
        // (an initiation received drops the one in flight); the other starts on its first packet.
        if self.public_key.as_bytes() > &self.peers[&id].cfg.public_key {
            self.initiate(now, id);
        }
        id
    }

    /// Starts a handshake with `peer` unless one is in progress.
    fn initiate(&mut self, _now: Instant, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(to) = p.endpoint else { return };
        if let TunnResult::WriteToNetwork(b) =
            p.tunn.format_handshake_initiation(&mut self.scratch, false)
        {
            self.transmits.push_back(Transmit {
                to,
                data: b.to_vec(),
            });
        }
    }

    /// Removes the peer with this public key (and its routes). Returns whether it existed.
    pub fn remove_peer(&mut self, public_key: &[u8; 32]) -> bool {
        let Some(id) = self.by_key.remove(public_key) else {
            return false;
        };
        self.peers.remove(&id);
        self.routes.remove_peer(id);
        self.rebuild_routes();
        true
    }

    /// Sets the path chosen by NAT traversal: where to send and how it is reached. From then on NAT
    /// traversal owns this peer's endpoint: authenticated packets from elsewhere no longer move it
    /// (roaming) and handshake retries no longer rotate through the candidates. The path shows `kind` while
    /// a session exists (`connecting` otherwise). A peer without a session gets a handshake at once on the
    /// new endpoint (from the side with the larger key, as in [`Node::upsert_peer`]).
    pub fn set_path(&mut self, id: PeerId, endpoint: SocketAddr, kind: PathKind) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let changed = p.endpoint != Some(endpoint);
        if changed {
            self.events
                .push_back(Event::EndpointChanged { peer: id, endpoint });
        }
        p.endpoint = Some(endpoint);
        p.managed = Some(kind);
        if p.path != PathKind::Connecting {
            p.path = kind;
        }
        let start = changed
            && p.path == PathKind::Connecting
            && self.public_key.as_bytes() > &p.cfg.public_key;
        if start {
            self.initiate(Instant::now(), id);
        }
    }

    pub fn peer_id(&self, public_key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    pub fn peer(&self, id: PeerId) -> Option<PeerStatus> {
        self.peers.get(&id).map(Peer::status)
    }

    /// Snapshots of every peer.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut v: Vec<_> = self.peers.values().map(Peer::status).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn drops(&self) -> &Drops {
        &self.drops
    }

    /// The peer owning `ip` (cryptokey routing).
    pub fn route(&self, ip: IpAddr) -> Option<PeerId> {
        self.routes.lookup(ip)
    }

    /// The endpoint a packet from the TUN device would be sent to (its destination's peer), if any.
    #[inline]
    pub fn endpoint_for(&self, packet: &[u8]) -> Option<SocketAddr> {
        let (_, dst) = packet_addrs(packet)?;
        self.peers.get(&self.routes.lookup(dst)?)?.endpoint
    }

    /// Encrypts a packet read from the TUN device for the peer owning its destination, into `out`
    /// (at least `packet.len() + 32` and [`MIN_BUFFER`] bytes).
    pub fn encapsulate(&mut self, _now: Instant, packet: &[u8], out: &mut [u8]) -> Outbound {
        if out.len() < MIN_BUFFER || out.len() < packet.len() + 32 {
            self.drops.add(DropReason::Other);
            return Outbound::Dropped(DropReason::Other);
        }
        let Some((_, dst)) = packet_addrs(packet) else {
            self.drops.add(DropReason::Malformed);
            return Outbound::Dropped(DropReason::Malformed);
        };
        let Some(id) = self.routes.lookup(dst) else {
            self.drops.add(DropReason::NoRoute);
            return Outbound::Dropped(DropReason::NoRoute);
        };
        let p = self.peers.get_mut(&id).expect("routed peer exists");
        let Some(to) = p.endpoint else {
            self.drops.add(DropReason::NoEndpoint);
            return Outbound::Dropped(DropReason::NoEndpoint);
        };
        match p.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                if !is_handshake(b) {
                    p.tx_bytes += packet.len() as u64;
                    p.tx_packets += 1;
                }
                Outbound::Send { to, len, peer: id }
            }
            TunnResult::Done => Outbound::Queued,
            TunnResult::Err(e) => {
                let r = DropReason::from_wg(&e);
                self.drops.add(r);
                Outbound::Dropped(r)
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                self.drops.add(DropReason::Other);
                Outbound::Dropped(DropReason::Other)
            }
        }
    }

    /// Handles a datagram received from `from`; a data packet is decrypted into `out` (at least
    /// `datagram.len()` and [`MIN_BUFFER`] bytes) and accepted only if its inner source is the sending
    /// peer's.
    pub fn decapsulate(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Inbound {
        if out.len() < MIN_BUFFER || out.len() < datagram.len() {
            // Larger than anything a peer sends into our MTU: not ours to decrypt (and boringtun would panic).
            return self.drop(DropReason::Malformed);
        }
        // Check MAC1 (and cookies under load) before any expensive work, for the whole node.
        let mut cookie = [0u8; 64];
        let packet = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(c)) => {
                self.transmits.push_back(Transmit {
                    to: from,
                    data: c.to_vec(),
                });
                self.drops.add(DropReason::UnderLoad);
                return Inbound::Dropped(DropReason::UnderLoad);
            }
            Err(TunnResult::Err(e)) => return self.drop(DropReason::from_wg(&e)),
            Err(_) => return self.drop(DropReason::Other),
        };
        let (id, handshake) = match &packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.private_key, &self.public_key, init) {
                    Ok(half) => match self.by_key.get(&half.peer_static_public) {
                        Some(&id) => (id, true),
                        None => return self.drop(DropReason::UnknownPeer),
                    },
                    Err(e) => return self.drop(DropReason::from_wg(&e)),
                }
            }
            Packet::HandshakeResponse(r) => (r.receiver_idx >> 8, true),
            Packet::PacketCookieReply(c) => (c.receiver_idx >> 8, false),
            Packet::PacketData(d) => (d.receiver_idx >> 8, false),
        };
        let is_data = matches!(packet, Packet::PacketData(_));
        let Some(p) = self.peers.get_mut(&id) else {
            if is_data {
                self.nudge(now, from);
            }
            return self.drop(DropReason::UnknownPeer);
        };
        match p.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => {
                // Keepalive or cookie reply: authenticated (cookie replies are, by MAC) traffic from `from`.
                Inbound::Done
            }
            TunnResult::WriteToNetwork(b) => {
                self.transmits.push_back(Transmit {
                    to: from,
                    data: b.to_vec(),
                });
                // Flush packets queued while the handshake was in flight.
                while let TunnResult::WriteToNetwork(b) =
                    p.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    if !is_handshake(b) {
                        p.tx_packets += 1;
                        p.tx_bytes += (b.len().saturating_sub(32)) as u64;
                    }
                    self.transmits.push_back(Transmit {
                        to: from,
                        data: b.to_vec(),
                    })
                }
                if handshake {
                    p.handshakes += 1;
                    p.last_handshake = Some(now);
                    if let Some(kind) = p.managed {
                        p.path = kind;
                    } else if p.path != PathKind::Relay {
                        p.path = PathKind::Direct;
                        if p.endpoint != Some(from) {
                            p.endpoint = Some(from);
                            self.events.push_back(Event::EndpointChanged {
                                peer: id,
                                endpoint: from,
                            });
                        }
                    }
                    self.events.push_back(Event::HandshakeCompleted {
                        peer: id,
                        endpoint: from,
                    });
                }
                Inbound::Done
            }
            TunnResult::WriteToTunnelV4(b, src) => Self::accept(
                p,
                &self.routes,
                &mut self.drops,
                &mut self.events,
                from,
                IpAddr::V4(src),
                b.len(),
            ),
            TunnResult::WriteToTunnelV6(b, src) => Self::accept(
                p,
                &self.routes,
                &mut self.drops,
                &mut self.events,
                from,
                IpAddr::V6(src),
                b.len(),
            ),
            TunnResult::Err(e) => {
                let r = DropReason::from_wg(&e);
                self.drops.add(r);
                if is_data
                    && matches!(
                        e,
                        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex
                    )
                {
                    self.nudge(now, from);
                }
                Inbound::Dropped(r)
            }
        }
    }

    /// Data for a session we do not have, from a peer's endpoint: the peer kept a session from before we
    /// restarted. Start a handshake at once (at most once a second per peer) instead of letting it wait
    /// for its own rekey timeout (15 s).
    fn nudge(&mut self, now: Instant, from: SocketAddr) {
        let Some(p) = self
            .peers
            .values_mut()
            .find(|p| p.endpoint == Some(from) || p.cfg.candidates.contains(&from))
        else {
            return;
        };
        if p.last_nudge
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        p.last_nudge = Some(now);
        if p.endpoint.is_none() {
            p.endpoint = Some(from);
        }
        let to = p.endpoint.unwrap_or(from);
        if let TunnResult::WriteToNetwork(b) =
            p.tunn.format_handshake_initiation(&mut self.scratch, false)
        {
            self.transmits.push_back(Transmit {
                to,
                data: b.to_vec(),
            });
        }
    }

    #[inline]
    fn accept(
        p: &mut Peer,
        routes: &RouteTable,
        drops: &mut Drops,
        events: &mut VecDeque<Event>,
        from: SocketAddr,
        src: IpAddr,
        len: usize,
    ) -> Inbound {
        if routes.lookup(src) != Some(p.id) {
            drops.add(DropReason::SpoofedSource);
            return Inbound::Dropped(DropReason::SpoofedSource);
        }
        p.rx_bytes += len as u64;
        p.rx_packets += 1;
        // Roaming: an authenticated packet tells where the peer is now (not for relayed paths).
        if p.managed.is_none() && p.path == PathKind::Direct && p.endpoint != Some(from) {
            p.endpoint = Some(from);
            events.push_back(Event::EndpointChanged {
                peer: p.id,
                endpoint: from,
            });
        }
        Inbound::WriteTun { len, peer: p.id }
    }

    fn drop(&mut self, r: DropReason) -> Inbound {
        self.drops.add(r);
        Inbound::Dropped(r)
    }

    /// Runs the protocol timers of every peer (call every 100-250 ms): handshake retries (moving to the
    /// next candidate endpoint while connecting), rekeys, keepalives, expiry.
    pub fn tick(&mut self, now: Instant) {
        if self
            .last_rate_reset
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.rate_limiter.reset_count();
            self.last_rate_reset = Some(now);
        }
        for p in self.peers.values_mut() {
            match p.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(b) => {
                    if is_handshake(b)
                        && p.path == PathKind::Connecting
                        && p.managed.is_none()
                        && p.cfg.candidates.len() > 1
                    {
                        // A retry: the previous candidate did not answer, try the next one.
                        p.candidate_idx = (p.candidate_idx + 1) % p.cfg.candidates.len();
                        let ep = p.cfg.candidates[p.candidate_idx];
                        if p.endpoint != Some(ep) {
                            p.endpoint = Some(ep);
                            self.events.push_back(Event::EndpointChanged {
                                peer: p.id,
                                endpoint: ep,
                            });
                        }
                    }
                    if let Some(to) = p.endpoint {
                        self.transmits.push_back(Transmit {
                            to,
                            data: b.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired)
                    if p.path != PathKind::Connecting =>
                {
                    p.path = PathKind::Connecting;
                    self.events.push_back(Event::SessionExpired { peer: p.id });
                }
                _ => {}
            }
        }
    }

    /// Next datagram to send that the hot-path results did not carry.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}
