//! The overlay node: see the crate docs.
//!
//! - Demultiplexing: a WireGuard datagram goes straight to the tunnel core; everything else (STUN checks
//!   and answers, TURN responses, ChannelData and Data indications from our TURN allocation) to the NAT
//!   agent. A WireGuard datagram that arrived through our relay comes back unwrapped, with a relay
//!   endpoint as its source (a slot: bounded, made only for addresses the agent checks through the relay,
//!   i.e. of authenticated peers, never re-pointed while a path or the tunnel core may use it). A relayed
//!   datagram from any other address gets a provisional endpoint (a ring of [`PENDING`]) so that the tunnel
//!   can authenticate it: nothing is sent there but the answer to an authenticated handshake initiation
//!   (through our allocation, [`OverlayNode::process`]'s caller drains it).
//! - Path selection is the agent's: each `PathChanged` event becomes `Node::set_path` in the tunnel core.
//! - NAT rebinding: when the tunnel core authenticates a datagram of a peer from an address that is not
//!   the peer's endpoint, [`OverlayNode::process`] tells the agent (`tunnel_from`): it checks the new
//!   address at once and probes the selected pair, so a rebinding heals in a check round trip plus the
//!   agent's fail-over, not at the next scheduled check.
//! - Lazy peers: a peer the tunnel core has packets for (`Event::Wanted`) or that checks us is taken up;
//!   one whose inner packet count did not move for the idle timeout is put to rest (the agent forgets it,
//!   the tunnel core drops its session).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use evio_traversal::demux::{self, Kind};
use evio_traversal::{
    Agent, AgentConfig, Base, Candidate, CandidateKind, Event, Input, Path, PathKind, PeerKey,
    RelaySlots, Source, Timers, TurnConfig, check_key,
};
use evio_tunnel::{Inbound, Node, NodeConfig, Outbound, PeerId, PublicKey, StaticSecret};

use crate::relay::{Dst, Transmit, is_provisional, is_relay, provisional_endpoint, relay_endpoint};

/// Provisional endpoints kept (a ring: more than one receive batch, so an entry outlives the batch that
/// made it, and [`OverlayNode::process`] runs after every batch).
pub const PENDING: usize = 64;
/// The tunnel core's timers (WireGuard's are seconds apart; boringtun's own device ticks every 250 ms): a
/// pass over every peer, so not at every NAT deadline.
const TUNNEL_TICK: Duration = Duration::from_millis(250);
/// How often lazy peers' activity is sampled.
const SWEEP: Duration = Duration::from_secs(1);

/// What the node is made of.
pub struct Config {
    pub private_key: StaticSecret,
    /// The cluster's pre-shared key (WireGuard's PSK; also keys the connectivity checks), if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Persistent keepalive in seconds, if any.
    pub persistent_keepalive: Option<u16>,
    /// The UDP port of the socket (host candidates are the host addresses with it).
    pub port: u16,
    pub hosts: Vec<IpAddr>,
    pub stun: Vec<SocketAddr>,
    pub turn: Option<TurnConfig>,
    /// Lazy peers: only peers with packets to send, checking us, or pinned are checked and keyed.
    pub lazy: bool,
    /// How long a lazy peer stays up without inner packets.
    pub idle_timeout: Duration,
    /// The wall clock (Unix time) at `now` of [`OverlayNode::new`], for the checks' timestamps.
    pub unix_time: Duration,
    /// Seeds the agent's transaction ids and tie-breakers.
    pub seed: u64,
}

/// What a received datagram was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// An inner packet, decrypted into `out[..len]`: write it to the TUN device.
    Packet { len: usize },
    /// Control traffic handled (handshake, keepalive, check, STUN/TURN): drain
    /// [`OverlayNode::poll_transmit`] after the batch.
    Control,
    /// Dropped (counted by the tunnel core by reason).
    Dropped,
}

/// Events kept for [`OverlayNode::poll_event`] at most (a caller that never drains them loses the oldest,
/// counted in [`Counters::events_dropped`]).
pub const EVENTS_MAX: usize = 4096;

/// What happened in the node, for the I/O layer to log or act on ([`OverlayNode::poll_event`]). Peers are
/// named by key; the tunnel core's stand-in endpoints never appear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// Our candidates changed ([`OverlayNode::candidates`] has them, with a new version: publish).
    LocalCandidates(Vec<Candidate>),
    /// NAT traversal chose a path to `peer`; `None`: no working path, every pair is re-checked.
    PathChanged { peer: PeerKey, path: Option<Path> },
    /// A WireGuard session with `peer` was established.
    HandshakeCompleted { peer: PeerKey },
    /// The session with `peer` expired (no new handshake in time: the peer is silent or unreachable).
    SessionExpired { peer: PeerKey },
    /// A lazy peer was taken up, by a packet to it (`by_packet`) or by its connectivity check.
    PeerWoken { peer: PeerKey, by_packet: bool },
    /// A lazy peer moved no packet for the idle timeout and was put to rest.
    PeerIdled { peer: PeerKey },
}

/// Counters of NAT traversal and the relay (metrics).
#[derive(Default)]
pub struct Counters {
    /// Bytes sent through our TURN allocation (framing included).
    pub relay_tx_bytes: AtomicU64,
    /// Bytes received through our TURN allocation (framing included).
    pub relay_rx_bytes: AtomicU64,
    /// Path changes chosen by NAT traversal (direct, relay, none).
    pub path_changes: AtomicU64,
    /// STUN/TURN datagrams handled by NAT traversal.
    pub checks_rx: AtomicU64,
    /// Lazy peers taken up.
    pub peers_woken: AtomicU64,
    /// Lazy peers put to rest.
    pub peers_idled: AtomicU64,
    /// Events dropped because nobody drained them ([`EVENTS_MAX`]).
    pub events_dropped: AtomicU64,
}

/// What status shows of NAT traversal ([`OverlayNode::view`]).
pub struct NatView {
    paths: HashMap<PeerKey, Option<Path>>,
    turn_server: Option<SocketAddr>,
    lazy: bool,
}

impl NatView {
    /// The path NAT traversal chose to `peer`, if any.
    pub fn path(&self, peer: &PeerKey) -> Option<Path> {
        self.paths.get(peer).copied().flatten()
    }

    /// True if `peer` is a lazy peer at rest (not checked, no session).
    pub fn idle(&self, peer: &PeerKey) -> bool {
        self.lazy && !self.paths.contains_key(peer)
    }

    /// True if NAT traversal knows `peer` and has no working path to it.
    pub fn no_path(&self, peer: &PeerKey) -> bool {
        matches!(self.paths.get(peer), Some(None))
    }

    /// The endpoint to show for a tunnel core endpoint: where datagrams go, so the TURN server for a peer
    /// reached through our relay.
    pub fn display_endpoint(&self, ep: SocketAddr) -> SocketAddr {
        match self.turn_server {
            Some(server) if is_relay(&ep) => server,
            _ => ep,
        }
    }
}

struct PeerEntry {
    candidates: Vec<Candidate>,
    path: Option<Path>,
    /// The connectivity checks' key (from an X25519 with the peer's key: computed once per peer).
    check_key: [u8; 32],
    /// The peer's inner packets (sent + received) at the last idle sweep, and since when unchanged.
    activity: (u64, Instant),
}

/// NAT traversal's state, behind one mutex.
struct Nat {
    agent: Agent,
    /// Relay endpoint slot -> the peer's address as our relay sees it.
    slots: RelaySlots,
    /// Relay endpoint slots the tunnel core's peers had as endpoints at the last [`OverlayNode::set_peers`].
    core_slots: HashSet<u16>,
    /// The peers NAT traversal works on (with lazy peers: those wanted or pinned; else all).
    peers: HashMap<PeerKey, PeerEntry>,
    /// Every peer the cluster allows, with its candidates (lazy peers start from here).
    known: HashMap<PeerKey, Vec<Candidate>>,
    /// Peers always kept up with lazy peers.
    pinned: HashSet<PeerKey>,
    candidates: Vec<Candidate>,
    /// Provisional endpoint `[100::2]:i` -> the relayed address it stands for (a ring of [`PENDING`]).
    pending: Vec<SocketAddr>,
    next_pending: usize,
}

impl Nat {
    /// The relay endpoint of `remote`: its slot, made if `remote` is one of the agent's relay pairs.
    /// `None` for any other address, or if the table is full of slots still in use.
    fn slot(&mut self, remote: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let core = &self.core_slots;
        self.slots
            .slot_for(&self.agent, remote, now, |s| core.contains(&s))
            .map(relay_endpoint)
    }

    /// A provisional endpoint for a relayed address without a slot (reused while it is in the ring).
    fn provisional(&mut self, remote: SocketAddr) -> SocketAddr {
        let i = match self.pending.iter().position(|a| *a == remote) {
            Some(i) => i,
            None if self.pending.len() < PENDING => {
                self.pending.push(remote);
                self.pending.len() - 1
            }
            None => {
                let i = self.next_pending;
                self.next_pending = (i + 1) % PENDING;
                self.pending[i] = remote;
                i
            }
        };
        provisional_endpoint(i as u16)
    }

    /// The source a tunnel endpoint stands for: a relayed address for relay and provisional endpoints.
    fn source_of(&self, ep: SocketAddr) -> Option<Source> {
        if is_provisional(&ep) {
            return self
                .pending
                .get(ep.port() as usize)
                .copied()
                .map(Source::Relay);
        }
        if is_relay(&ep) {
            return self.slots.remote(ep.port()).map(Source::Relay);
        }
        Some(Source::Direct(ep))
    }

    /// How to reach relay endpoint `ep` now: `Ok(dst)` with a channel, `Err(Some(remote))` before one is
    /// bound (a Send indication), `Err(None)` for an unknown slot or without an allocation.
    fn relay_route(&self, ep: &SocketAddr) -> Result<Dst, Option<SocketAddr>> {
        let remote = self.slots.remote(ep.port()).ok_or(None)?;
        let turn = self.agent.turn().ok_or(None)?;
        turn.relayed().ok_or(None)?;
        match turn.channel(remote) {
            Some(channel) => Ok(Dst::Relay {
                server: turn.server(),
                channel,
            }),
            None => Err(Some(remote)),
        }
    }

    /// The tunnel core's endpoint and path kind for a selected path (`None`: a relay endpoint is needed
    /// and the table is full).
    fn target(&mut self, p: &Path, now: Instant) -> Option<(SocketAddr, evio_tunnel::PathKind)> {
        Some(match (p.base, p.kind) {
            (Base::Relay, _) => (self.slot(p.remote, now)?, evio_tunnel::PathKind::Relay),
            (Base::Socket, PathKind::Relay) => (p.remote, evio_tunnel::PathKind::Relay),
            (Base::Socket, PathKind::Direct) => (p.remote, evio_tunnel::PathKind::Direct),
        })
    }
}

/// When the tunnel core's timers and the lazy-peer sweep are next due.
struct Clock {
    tunnel_tick: Instant,
    sweep: Instant,
}

/// The overlay node (see the crate docs).
pub struct OverlayNode {
    tunnel: Node,
    nat: Mutex<Nat>,
    clock: Mutex<Clock>,
    /// The agent's datagrams waiting for [`OverlayNode::poll_transmit`], and whether there are any.
    out: Mutex<VecDeque<Transmit>>,
    has_out: AtomicBool,
    events: Mutex<VecDeque<NodeEvent>>,
    /// NAT input was handled since the last [`OverlayNode::process`].
    work: AtomicBool,
    secret: StaticSecret,
    public: PeerKey,
    psk: Option<[u8; 32]>,
    port: u16,
    version: AtomicU64,
    lazy: bool,
    idle_timeout: Duration,
    counters: Counters,
}

/// True if the receive path must hand `data` to NAT traversal instead of the tunnel core.
#[inline]
fn needs_nat(data: &[u8]) -> bool {
    demux::classify(data) != Kind::WireGuard
}

impl OverlayNode {
    pub fn new(cfg: Config, now: Instant) -> OverlayNode {
        let public = PublicKey::from(&cfg.private_key).to_bytes();
        let agent = Agent::new(
            AgentConfig {
                local_key: public,
                host_candidates: cfg
                    .hosts
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, cfg.port))
                    .collect(),
                stun_servers: cfg.stun,
                turn: cfg.turn,
                timers: Timers::default(),
                unix_time: cfg.unix_time,
            },
            cfg.seed,
            now,
        );
        let candidates = agent.local_candidates();
        OverlayNode {
            tunnel: Node::new(NodeConfig {
                private_key: cfg.private_key.clone(),
                preshared_key: cfg.preshared_key,
                persistent_keepalive: cfg.persistent_keepalive,
            }),
            nat: Mutex::new(Nat {
                agent,
                slots: RelaySlots::default(),
                core_slots: HashSet::new(),
                peers: HashMap::new(),
                known: HashMap::new(),
                pinned: HashSet::new(),
                candidates,
                pending: Vec::new(),
                next_pending: 0,
            }),
            clock: Mutex::new(Clock {
                tunnel_tick: now + TUNNEL_TICK,
                sweep: now + SWEEP,
            }),
            out: Mutex::new(VecDeque::new()),
            has_out: AtomicBool::new(false),
            events: Mutex::new(VecDeque::new()),
            work: AtomicBool::new(false),
            secret: cfg.private_key,
            public,
            psk: cfg.preshared_key,
            port: cfg.port,
            version: AtomicU64::new(1),
            lazy: cfg.lazy,
            idle_timeout: cfg.idle_timeout,
            counters: Counters::default(),
        }
    }

    /// The tunnel core: peers' sessions and routes (the control plane adds and removes peers there),
    /// status and drop counters.
    #[inline]
    pub fn tunnel(&self) -> &Node {
        &self.tunnel
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn lazy(&self) -> bool {
        self.lazy
    }

    fn lock(&self) -> MutexGuard<'_, Nat> {
        self.nat.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn clock(&self) -> MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, e: NodeEvent) {
        let mut q = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= EVENTS_MAX {
            q.pop_front();
            self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
    }

    /// The next event (see [`NodeEvent`]); drain them after [`OverlayNode::handle_timeout`] (events of the
    /// receive path wait until then).
    pub fn poll_event(&self) -> Option<NodeEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    // ---- control plane ----

    /// Our candidates and their version (bumped on every change): published in the node's record.
    pub fn candidates(&self) -> (u64, Vec<Candidate>) {
        let v = self.version.load(Ordering::Acquire);
        (v, self.lock().candidates.clone())
    }

    pub fn candidates_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// True once the candidates published are all the agent gathers (its STUN mappings and its relay).
    pub fn gathered(&self) -> bool {
        let g = self.lock();
        g.agent.gathered() && g.candidates == g.agent.local_candidates()
    }

    /// Whether a TURN allocation exists.
    pub fn relay_allocated(&self) -> bool {
        self.lock().agent.turn().and_then(|t| t.relayed()).is_some()
    }

    /// Our host addresses, each with its prefix length (the network it is on): host candidates, and
    /// which peers' private addresses are on our LAN.
    pub fn set_host_addresses(&self, hosts: &[IpNet]) {
        let networks = hosts.to_vec();
        let hosts: Vec<SocketAddr> = hosts
            .iter()
            .map(|n| SocketAddr::new(n.addr(), self.port))
            .collect();
        let mut g = self.lock();
        g.agent.set_host_networks(networks);
        if g.agent
            .local_candidates()
            .iter()
            .filter(|c| c.kind == CandidateKind::Host)
            .map(|c| c.addr)
            .ne(hosts.iter().copied())
        {
            g.agent.set_host_candidates(hosts);
        }
    }

    /// The peers kept up with lazy peers.
    pub fn set_pinned(&self, keys: HashSet<PeerKey>) {
        self.lock().pinned = keys;
    }

    /// The peers and their candidates as the control plane knows them (others are forgotten); then every
    /// peer the tunnel core has gets NAT traversal's selected path (peers added to the core after their
    /// path was chosen). Call after changing the tunnel core's peers.
    pub fn set_peers(&self, peers: &[(PeerKey, Vec<Candidate>)], now: Instant) {
        // With lazy peers, NAT traversal works only on the peers already up and the pinned ones.
        let up: Vec<(PeerKey, Vec<Candidate>)> = {
            let mut g = self.lock();
            g.known = peers.iter().cloned().collect();
            if !self.lazy {
                peers.to_vec()
            } else {
                // Resting peers behind NATs that only a relay crosses wake us through our relay.
                let resting: Vec<Candidate> = peers
                    .iter()
                    .filter(|(k, _)| !g.peers.contains_key(k))
                    .flat_map(|(_, c)| c.iter().copied())
                    .collect();
                g.agent.permit(&resting, now);
                peers
                    .iter()
                    .filter(|(k, _)| g.peers.contains_key(k) || g.pinned.contains(k))
                    .cloned()
                    .collect()
            }
        };
        self.set_active(&up, now);
        self.sync_paths(now);
    }

    /// Makes NAT traversal's peers exactly `peers`.
    fn set_active(&self, peers: &[(PeerKey, Vec<Candidate>)], now: Instant) {
        // Check keys of new peers (an X25519 each) outside the lock: the receive path takes it for
        // relayed datagrams.
        let known: HashSet<PeerKey> = self.lock().peers.keys().copied().collect();
        let mut fresh: HashMap<PeerKey, [u8; 32]> = peers
            .iter()
            .filter(|(k, _)| !known.contains(k))
            .map(|(k, _)| (*k, self.check_key_of(k)))
            .collect();
        let mut g = self.lock();
        let gone: Vec<PeerKey> = g
            .peers
            .keys()
            .filter(|k| !peers.iter().any(|(p, _)| p == *k))
            .copied()
            .collect();
        for k in gone {
            g.peers.remove(&k);
            g.agent.remove_peer(&k);
        }
        for (k, cands) in peers {
            if g.peers.get(k).is_some_and(|e| &e.candidates == cands) {
                continue;
            }
            let ck = match (g.peers.get(k), fresh.remove(k)) {
                (Some(e), _) => e.check_key,
                (None, Some(ck)) => ck,
                // Added by another caller since.
                (None, None) => self.check_key_of(k),
            };
            g.agent.set_peer(*k, ck, cands.clone(), now);
            let path = g.agent.path(k);
            g.peers
                .entry(*k)
                .or_insert(PeerEntry {
                    candidates: Vec::new(),
                    path,
                    check_key: ck,
                    activity: (0, now),
                })
                .candidates = cands.clone();
        }
    }

    /// Gives the tunnel core the selected path of every peer whose endpoint differs, and notes which relay
    /// endpoints the core uses (their slots are not reused).
    fn sync_paths(&self, now: Instant) {
        let mut g = self.lock();
        let paths: Vec<(PeerKey, Path)> = g
            .peers
            .iter()
            .filter_map(|(k, e)| e.path.map(|p| (*k, p)))
            .collect();
        for (k, p) in paths {
            let Some((ep, kind)) = g.target(&p, now) else {
                continue;
            };
            if let Some(id) = self.tunnel.peer_id(&k)
                && self.tunnel.peer(id).is_some_and(|p| p.endpoint != Some(ep))
            {
                self.tunnel.set_path(id, ep, kind);
            }
        }
        g.core_slots = self
            .tunnel
            .peers()
            .iter()
            .filter_map(|p| p.endpoint)
            .filter(is_relay)
            .map(|ep| ep.port())
            .collect();
    }

    fn check_key_of(&self, k: &PeerKey) -> [u8; 32] {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*k)).to_bytes();
        check_key(&shared, &self.public, k, self.psk.as_ref())
    }

    /// Starts NAT traversal with a lazy peer the cluster knows (its first packet, or its first check to
    /// us). Returns whether it was at rest.
    fn wake(&self, peer: &PeerKey, now: Instant) -> bool {
        if !self.lazy {
            return false;
        }
        let cands = {
            let g = self.lock();
            if g.peers.contains_key(peer) {
                return false;
            }
            match g.known.get(peer) {
                Some(c) => c.clone(),
                None => return false,
            }
        };
        let ck = self.check_key_of(peer);
        let mut g = self.lock();
        if g.peers.contains_key(peer) || !g.known.contains_key(peer) {
            return false;
        }
        g.agent.set_peer(*peer, ck, cands.clone(), now);
        g.peers.insert(
            *peer,
            PeerEntry {
                candidates: cands,
                path: None,
                check_key: ck,
                activity: (0, now),
            },
        );
        self.counters.peers_woken.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Lazy peers that moved no inner packet for the idle timeout go to rest: NAT traversal forgets them
    /// and the tunnel core drops their sessions (no keepalives).
    fn sweep(&self, now: Instant) {
        let packets: HashMap<PeerKey, u64> = self
            .tunnel
            .peers()
            .iter()
            .map(|p| (p.public_key, p.rx_packets + p.tx_packets))
            .collect();
        let idle: Vec<PeerKey> = {
            let mut g = self.lock();
            let g = &mut *g;
            let mut idle = Vec::new();
            for (k, e) in g.peers.iter_mut() {
                let n = packets.get(k).copied().unwrap_or(0);
                if n != e.activity.0 {
                    e.activity = (n, now);
                } else if !g.pinned.contains(k)
                    && now.saturating_duration_since(e.activity.1) >= self.idle_timeout
                {
                    idle.push(*k);
                }
            }
            for k in &idle {
                g.peers.remove(k);
                g.agent.remove_peer(k);
            }
            idle
        };
        self.counters
            .peers_idled
            .fetch_add(idle.len() as u64, Ordering::Relaxed);
        for k in idle {
            if let Some(id) = self.tunnel.peer_id(&k) {
                self.tunnel.set_idle(id);
            }
            self.emit(NodeEvent::PeerIdled { peer: k });
        }
    }

    fn name(&self, id: PeerId) -> String {
        self.tunnel.peer_name(id).unwrap_or_default()
    }

    /// What status shows of NAT traversal, for every peer at once (one lock per status, not one per peer).
    pub fn view(&self) -> NatView {
        let g = self.lock();
        NatView {
            paths: g.peers.iter().map(|(k, e)| (*k, e.path)).collect(),
            turn_server: g.agent.turn().map(|t| t.server()),
            lazy: self.lazy,
        }
    }

    // ---- the packet path ----

    /// Where a packet read from the TUN device goes, when it can be sent on the hot path
    /// ([`OverlayNode::encapsulate`]); `None` otherwise (no route, no path yet, or a relayed peer whose
    /// channel is not bound yet): use [`OverlayNode::encapsulate_slow`].
    #[inline]
    pub fn dst_for(&self, packet: &[u8]) -> Option<Dst> {
        let to = self.tunnel.endpoint_for(packet)?;
        if is_provisional(&to) {
            return None;
        }
        if !is_relay(&to) {
            return Some(Dst::Direct(to));
        }
        self.lock().relay_route(&to).ok()
    }

    /// Encrypts `packet` for `dst` (from [`OverlayNode::dst_for`]) into `buf`, framing included; returns the
    /// datagram's length, or `None` if nothing is to be sent now (queued for a handshake, or dropped and
    /// counted).
    #[inline]
    pub fn encapsulate(
        &self,
        now: Instant,
        packet: &[u8],
        dst: Dst,
        buf: &mut [u8],
    ) -> Option<usize> {
        let h = dst.header_len();
        let Outbound::Send { len, .. } = self.tunnel.encapsulate(now, packet, buf.get_mut(h..)?)
        else {
            return None;
        };
        if let Dst::Relay { channel, .. } = dst {
            // A ciphertext over 65,535 bytes (a TUN MTU near 64 KiB) cannot be framed: dropped.
            evio_traversal::demux::channel_header(buf, channel, len).ok()?;
            self.counters
                .relay_tx_bytes
                .fetch_add((len + h) as u64, Ordering::Relaxed);
        }
        Some(len + h)
    }

    /// Encrypts `packet` off the hot path (see [`OverlayNode::dst_for`]), using `scratch` (at least the
    /// packet's length plus 32 and `evio_tunnel::MIN_BUFFER` bytes): queued while the peer has no path (a
    /// lazy peer is woken at the next timeout), or returned as a transmit.
    pub fn encapsulate_slow(
        &self,
        now: Instant,
        packet: &[u8],
        scratch: &mut [u8],
    ) -> Option<Transmit> {
        match self.tunnel.encapsulate(now, packet, scratch) {
            Outbound::Send { to, len, .. } => self.typed(to, &scratch[..len]),
            Outbound::Queued | Outbound::Dropped(_) => None,
        }
    }

    /// A datagram of the tunnel core for endpoint `to`, typed (`None`: nowhere to send it now).
    fn typed(&self, to: SocketAddr, data: &[u8]) -> Option<Transmit> {
        if is_provisional(&to) {
            return self.answer_through_relay(to, data);
        }
        if !is_relay(&to) {
            return Some(Transmit {
                dst: Dst::Direct(to),
                payload: data.to_vec(),
            });
        }
        let mut g = self.lock();
        let t = match g.relay_route(&to) {
            Ok(dst) => Transmit {
                dst,
                payload: data.to_vec(),
            },
            Err(Some(remote)) => {
                let t = g.agent.turn_wrap(remote, data)?;
                Transmit {
                    dst: Dst::Direct(t.dst),
                    payload: t.payload,
                }
            }
            Err(None) => return None,
        };
        drop(g);
        self.counters
            .relay_tx_bytes
            .fetch_add(t.len() as u64, Ordering::Relaxed);
        Some(t)
    }

    /// The answer to a handshake initiation that came through our relay from an address without a slot
    /// yet (a provisional endpoint): sent back through our allocation to that address, so that the
    /// initiator does not wait 5 s for its retry. Only handshake responses: the tunnel core sends one only
    /// for an initiation it authenticated (a known peer's key, MAC1), it is smaller than the initiation,
    /// and the relay already has a permission for the address (it relayed the initiation). Anything else
    /// to a provisional endpoint is dropped.
    fn answer_through_relay(&self, to: SocketAddr, data: &[u8]) -> Option<Transmit> {
        const HANDSHAKE_RESPONSE: u8 = 2;
        if data.first() != Some(&HANDSHAKE_RESPONSE) {
            return None;
        }
        let mut g = self.lock();
        let remote = *g.pending.get(to.port() as usize)?;
        let t = g.agent.turn_wrap(remote, data)?;
        drop(g);
        self.counters
            .relay_tx_bytes
            .fetch_add(t.payload.len() as u64, Ordering::Relaxed);
        Some(Transmit {
            dst: Dst::Direct(t.dst),
            payload: t.payload,
        })
    }

    /// Handles a datagram received from `from`: an inner packet is decrypted into `out` (at least the
    /// datagram's length and `evio_tunnel::MIN_BUFFER` bytes). Call [`OverlayNode::process`] after each
    /// batch of received datagrams.
    pub fn decapsulate(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Received {
        let (from, data) = if needs_nat(datagram) {
            let mut g = self.lock();
            match g.agent.handle_input(from, datagram, now) {
                Input::Tunnel {
                    from: Source::Direct(a),
                    payload,
                    ..
                } => (a, payload),
                Input::Tunnel {
                    from: Source::Relay(remote),
                    payload,
                    ..
                } => {
                    self.counters
                        .relay_rx_bytes
                        .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                    // An address with no slot (no pair of ours: e.g. the peer's NAT rebound) gets a
                    // provisional endpoint, so that the tunnel can authenticate the datagram and
                    // `process` tell the agent.
                    let from = match g.slot(remote, now) {
                        Some(from) => from,
                        None => g.provisional(remote),
                    };
                    (from, payload)
                }
                Input::Handled => {
                    drop(g);
                    self.counters.checks_rx.fetch_add(1, Ordering::Relaxed);
                    self.work.store(true, Ordering::Release);
                    return Received::Control;
                }
                // Neither: the tunnel core counts it as malformed.
                Input::Unknown => (from, datagram),
            }
        } else {
            (from, datagram)
        };
        match self.tunnel.decapsulate(now, from, data, out) {
            Inbound::WriteTun { len, .. } => Received::Packet { len },
            Inbound::Done => Received::Control,
            Inbound::Dropped(_) => Received::Dropped,
        }
    }

    /// After a batch of received datagrams: tells NAT traversal about authenticated datagrams from new
    /// sources, and runs it if it handled input. Returns whether there may be transmits to drain. One
    /// atomic load or two when there is nothing.
    pub fn process(&self, now: Instant) -> bool {
        let mut any = false;
        // Sessions completed in this batch (a peer's handshake before our path to it is chosen).
        let mut events = false;
        while let Some(e) = self.tunnel.poll_event() {
            self.tunnel_event(&e, now);
            events = true;
        }
        while let Some((id, from)) = self.tunnel.poll_source() {
            let Some(key) = self.tunnel.peer_key(id) else {
                continue;
            };
            let mut g = self.lock();
            let Some(source) = g.source_of(from) else {
                continue;
            };
            tracing::debug!(peer = %self.name(id), ?source, "authenticated datagram from a new source");
            g.agent.tunnel_from(&key, source, now);
            any = true;
        }
        if self.work.swap(false, Ordering::AcqRel) || any {
            self.pump(now);
            return true;
        }
        events
    }

    // ---- timers ----

    /// When [`OverlayNode::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        let agent = self.lock().agent.poll_timeout();
        let c = self.clock();
        let mut t = c.tunnel_tick;
        if self.lazy {
            t = t.min(c.sweep);
        }
        agent.map_or(t, |a| a.min(t))
    }

    /// Runs whatever is due at `now`: NAT traversal's timers, the tunnel core's (every 250 ms), lazy peers
    /// wanted by packets and the idle sweep (every second).
    pub fn handle_timeout(&self, now: Instant) {
        let (tick, sweep) = {
            let mut c = self.clock();
            let tick = now >= c.tunnel_tick;
            if tick {
                c.tunnel_tick = now + TUNNEL_TICK;
            }
            let sweep = now >= c.sweep;
            if sweep {
                c.sweep = now + SWEEP;
            }
            (tick, sweep)
        };
        if tick {
            self.tunnel.tick(now);
        }
        while let Some(e) = self.tunnel.poll_event() {
            self.tunnel_event(&e, now);
        }
        if sweep && self.lazy {
            self.sweep(now);
        }
        self.pump(now);
    }

    fn tunnel_event(&self, e: &evio_tunnel::Event, now: Instant) {
        use evio_tunnel::Event as E;
        let key = |id: &PeerId| self.tunnel.peer_key(*id);
        match e {
            E::HandshakeCompleted { peer, endpoint } => {
                self.adopt_handshake_source(*peer, *endpoint);
                if let Some(k) = key(peer) {
                    self.emit(NodeEvent::HandshakeCompleted { peer: k });
                }
            }
            // Only ever the path this node set (the core no longer roams).
            E::EndpointChanged { .. } => {}
            E::SessionExpired { peer } => {
                if let Some(k) = key(peer) {
                    self.emit(NodeEvent::SessionExpired { peer: k });
                }
            }
            E::Wanted { peer } => {
                tracing::debug!(peer = %self.name(*peer), "packets wait for a path");
                if let Some(k) = key(peer)
                    && self.wake(&k, now)
                {
                    self.emit(NodeEvent::PeerWoken {
                        peer: k,
                        by_packet: true,
                    });
                }
            }
        }
    }

    /// A session with `peer` exists (it initiated, we answered) but NAT traversal has not chosen a path to
    /// it yet: the handshake's source, where our answer went, is a proven return path; it becomes the
    /// peer's endpoint until the agent chooses (its `PathChanged` then replaces it), so that our replies
    /// do not wait for our own checks. Never a provisional endpoint (a ring entry may be reused).
    fn adopt_handshake_source(&self, peer: PeerId, endpoint: SocketAddr) {
        if is_provisional(&endpoint) {
            return;
        }
        let Some(key) = self.tunnel.peer_key(peer) else {
            return;
        };
        let g = self.lock();
        let chosen = g.peers.get(&key).and_then(|e| e.path).is_some();
        if chosen || self.tunnel.peer(peer).is_none_or(|p| p.endpoint.is_some()) {
            return;
        }
        let kind = if is_relay(&endpoint) {
            evio_tunnel::PathKind::Relay
        } else {
            evio_tunnel::PathKind::Direct
        };
        tracing::debug!(peer = %self.name(peer), %endpoint, "path from the peer's handshake, until ours is chosen");
        self.tunnel.set_path(peer, endpoint, kind);
    }

    /// Runs NAT traversal: its due timers, its datagrams into the queue, its path changes into the tunnel
    /// core (under the NAT lock, so that they reach the core in order), lazy peers checking us taken up.
    fn pump(&self, now: Instant) {
        let mut unknown = Vec::new();
        let mut tx = Vec::new();
        let mut events = Vec::new();
        {
            let mut g = self.lock();
            if g.agent.poll_timeout().is_some_and(|t| t <= now) {
                g.agent.handle_timeout(now);
            }
            while let Some(t) = g.agent.poll_transmit() {
                // Not sendable (an unspecified destination): skipped.
                if !t.dst.ip().is_unspecified() {
                    tx.push(Transmit {
                        dst: Dst::Direct(t.dst),
                        payload: t.payload,
                    });
                }
            }
            while let Some(e) = g.agent.poll_event() {
                match e {
                    Event::LocalCandidates(c) => {
                        g.candidates = c.clone();
                        self.version.fetch_add(1, Ordering::AcqRel);
                        events.push(NodeEvent::LocalCandidates(c));
                    }
                    Event::PathChanged { peer, path } => {
                        self.counters.path_changes.fetch_add(1, Ordering::Relaxed);
                        if let Some(e) = g.peers.get_mut(&peer) {
                            e.path = path;
                        }
                        events.push(NodeEvent::PathChanged { peer, path });
                        let Some(id) = self.tunnel.peer_id(&peer) else {
                            continue;
                        };
                        if let Some(p) = path
                            && let Some((ep, kind)) = g.target(&p, now)
                        {
                            self.tunnel.set_path(id, ep, kind);
                        }
                    }
                    Event::CheckFromUnknown(k) => {
                        if self.lazy && g.known.contains_key(&k) {
                            unknown.push(k);
                        }
                    }
                }
            }
        }
        if !tx.is_empty() {
            let mut q = self.out.lock().unwrap_or_else(|e| e.into_inner());
            q.extend(tx);
            // Under the queue's lock, as the reset in `poll_transmit`: a flag never hides a datagram.
            self.has_out.store(true, Ordering::Release);
        }
        for e in events {
            self.emit(e);
        }
        // Lazy peers checking us: take them up, so that their next check is answered.
        for k in unknown {
            if self.wake(&k, now) {
                self.emit(NodeEvent::PeerWoken {
                    peer: k,
                    by_packet: false,
                });
            }
        }
    }

    /// The next datagram to send that the hot-path results did not carry. Drain it after
    /// [`OverlayNode::process`], [`OverlayNode::handle_timeout`], a [`Received::Control`] or
    /// [`OverlayNode::set_peers`]; one atomic load or two when there is none.
    pub fn poll_transmit(&self) -> Option<Transmit> {
        if self.has_out.load(Ordering::Acquire) {
            let mut q = self.out.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = q.pop_front() {
                return Some(t);
            }
            self.has_out.store(false, Ordering::Release);
        }
        while let Some(t) = self.tunnel.poll_transmit() {
            if let Some(t) = self.typed(t.to, &t.data) {
                return Some(t);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_node_is_shared_between_threads() {
        assert_send_sync::<OverlayNode>();
    }

    #[test]
    fn undrained_events_are_bounded() {
        let now = Instant::now();
        let node = OverlayNode::new(
            Config {
                private_key: StaticSecret::from([7; 32]),
                preshared_key: None,
                persistent_keepalive: None,
                port: 51820,
                hosts: vec![],
                stun: vec![],
                turn: None,
                lazy: true,
                idle_timeout: Duration::from_secs(60),
                unix_time: Duration::from_secs(1_790_000_000),
                seed: 1,
            },
            now,
        );
        for i in 0..EVENTS_MAX + 10 {
            node.emit(NodeEvent::PeerIdled {
                peer: [(i % 256) as u8; 32],
            });
        }
        let kept: Vec<NodeEvent> = std::iter::from_fn(|| node.poll_event()).collect();
        assert_eq!(kept.len(), EVENTS_MAX);
        assert_eq!(
            kept[0],
            NodeEvent::PeerIdled { peer: [10; 32] },
            "the oldest go"
        );
        assert_eq!(node.counters().events_dropped.load(Ordering::Relaxed), 10);
    }
}
