//! The multi-peer node: sessions, routing, filtering, endpoints.
//!
//! Concurrency: every method takes `&self`, so one `Node` is shared by the data-plane threads, the timers,
//! the control plane, status and metrics without a lock around it. Inside:
//!
//! - the peer table (peers by id and by key, with their configuration, and the route table) is an
//!   immutable snapshot behind `RwLock<Arc<Table>>`: a packet holds the read lock only for the route
//!   lookup and to clone the peer's `Arc`; changes (`upsert_peer`, `remove_peer`) build a new table under
//!   the `writer` mutex and hold the write lock only to swap the pointer;
//! - each peer's session (boringtun's `Tunn`, which needs `&mut`) and endpoint live behind the peer's own
//!   mutex, so sealing for one peer and opening for another run at the same time, and status takes each
//!   peer's lock only to copy a few fields;
//! - byte, packet, handshake and drop counters are atomics;
//! - the queues of control datagrams, events and new sources have their own mutexes, taken only when
//!   something is queued or polled (an atomic flag tells the hot path whether to look).
//!
//! Lock order: table (read, brief) -> one peer -> a queue; `writer` -> table (write) or one peer. No
//! thread holds two peers' locks at once.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
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

    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.counts[*r as usize]))
    }
}

/// The live drop counters (atomics; [`Drops`] is a snapshot of them).
#[derive(Default)]
struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl DropCounters {
    #[inline]
    fn add(&self, r: DropReason) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Drops {
        let mut d = Drops::default();
        for (i, c) in self.0.iter().enumerate() {
            d.counts[i] = c.load(Ordering::Relaxed);
        }
        d
    }
}

/// Something that happened, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session was established (either side initiated).
    HandshakeCompleted { peer: PeerId, endpoint: SocketAddr },
    /// The peer's endpoint changed (NAT traversal chose another path: [`Node::set_path`]).
    EndpointChanged { peer: PeerId, endpoint: SocketAddr },
    /// The session expired (no new keys within the protocol's limits): back to `connecting`.
    SessionExpired { peer: PeerId },
    /// A packet for the peer arrived while it has no endpoint: it is queued (boringtun's bounded queue)
    /// until a path is set ([`Node::set_path`]), which then starts a handshake at once. Reported once
    /// until the peer is made idle again ([`Node::set_idle`]). Lazy peers start here.
    Wanted { peer: PeerId },
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
}

/// A snapshot of one peer, for status and metrics.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub id: PeerId,
    pub name: String,
    pub public_key: [u8; 32],
    pub allowed: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub path: PathKind,
    pub last_handshake: Option<Instant>,
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// How often the same new source of a peer is reported again by [`Node::poll_source`] while it stays
/// different from the peer's endpoint (e.g. a peer that sends over another path than we do).
const SOURCE_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// When the first handshake of a session we started on a new path is sent again if unanswered (once; then
/// boringtun's own schedule, `REKEY_TIMEOUT` = 5 s). At a 100-node start on 2 cores, 15% of the relayed
/// paths' first handshakes were lost in the TURN server's full queue and waited those 5 s: they were the
/// last paths up (issue 12). Longer than a round trip through a loaded relay (1-2 s measured), so that a
/// handshake merely slow is rarely replaced by a new one (which would make its answer useless).
pub const FIRST_HANDSHAKE_RETRY: Duration = Duration::from_secs(2);

/// The quick resend of a first handshake ([`FIRST_HANDSHAKE_RETRY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    None,
    /// Started by [`Node::set_path`]: the next tick sets the time.
    Armed,
    At(Instant),
}

/// What changes with every packet or timer of a peer: behind the peer's own mutex.
struct PeerState {
    tunn: Tunn,
    /// Where datagrams go: set by NAT traversal only ([`Node::set_path`]; a relayed datagram's source is
    /// the relay, so an authenticated source is reported, never adopted).
    endpoint: Option<SocketAddr>,
    /// What status shows: `connecting` until a session exists and a path is chosen, then `kind`.
    path: PathKind,
    /// The kind of the path NAT traversal chose.
    kind: Option<PathKind>,
    /// A session exists (a handshake completed and it has not expired).
    established: bool,
    last_handshake: Option<Instant>,
    last_nudge: Option<Instant>,
    /// The last source reported by [`Node::poll_source`], and when.
    reported: Option<(SocketAddr, Instant)>,
    /// Packets wait for a path ([`Event::Wanted`] was reported).
    wanted: bool,
    retry: Retry,
}

struct Peer {
    id: PeerId,
    state: Mutex<PeerState>,
    handshakes: AtomicU64,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    tx_packets: AtomicU64,
}

impl Peer {
    /// Locks the peer's session (a panicked holder does not stop the others: the state stays usable).
    #[inline]
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A peer in the table: its live state and its configuration (replaced, never changed in place).
#[derive(Clone)]
struct Entry {
    peer: Arc<Peer>,
    cfg: Arc<PeerConfig>,
}

impl Entry {
    fn status(&self) -> PeerStatus {
        let (endpoint, path, last_handshake) = {
            let s = self.peer.lock();
            (s.endpoint, s.path, s.last_handshake)
        };
        let p = &self.peer;
        PeerStatus {
            id: p.id,
            name: self.cfg.name.clone(),
            public_key: self.cfg.public_key,
            allowed: self.cfg.allowed.clone(),
            endpoint,
            path,
            last_handshake,
            handshakes: p.handshakes.load(Ordering::Relaxed),
            rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
            rx_packets: p.rx_packets.load(Ordering::Relaxed),
            tx_packets: p.tx_packets.load(Ordering::Relaxed),
        }
    }
}

/// The peer table: an immutable snapshot (copy on write, see the module docs).
#[derive(Clone, Default)]
struct Table {
    peers: HashMap<PeerId, Entry>,
    by_key: HashMap<[u8; 32], PeerId>,
    routes: RouteTable,
}

impl Table {
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
}

/// A queue with a flag the hot path reads without taking the queue's lock.
struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    nonempty: AtomicBool,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            items: Mutex::new(VecDeque::new()),
            nonempty: AtomicBool::new(false),
        }
    }
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, t: T) {
        let mut q = self.lock();
        q.push_back(t);
        self.nonempty.store(true, Ordering::Release);
    }

    #[inline]
    fn pop(&self) -> Option<T> {
        if !self.nonempty.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.lock();
        let t = q.pop_front();
        if q.is_empty() {
            self.nonempty.store(false, Ordering::Release);
        }
        t
    }
}

thread_local! {
    /// Room for handshakes, keepalives and queued packets leaving outside the caller's buffers (one per
    /// thread that runs timers or completes handshakes; the data path never uses it).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65536 + 64]);
}

/// One node: its key, its peers, their sessions and routes. Shared by reference between threads (see
/// the module docs); every method takes `&self`.
pub struct Node {
    private_key: StaticSecret,
    public_key: PublicKey,
    preshared_key: Option<[u8; 32]>,
    persistent_keepalive: Option<u16>,
    table: RwLock<Arc<Table>>,
    /// Serializes changes of the table; holds the next peer id.
    writer: Mutex<PeerId>,
    rate_limiter: Arc<RateLimiter>,
    last_rate_reset: Mutex<Option<Instant>>,
    transmits: Queue<Transmit>,
    events: Queue<Event>,
    sources: Queue<(PeerId, SocketAddr)>,
    drops: DropCounters,
    /// Handshakes of peers since removed (so the total never goes down).
    retired_handshakes: AtomicU64,
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
            // Not a secret: any value works, the randomness only avoids index reuse across restarts.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
                .unwrap_or(1);
            t & 0x00ff_ffff
        };
        Node {
            rate_limiter: Arc::new(RateLimiter::new(&public_key, NODE_HANDSHAKE_RATE_LIMIT)),
            private_key: cfg.private_key,
            public_key,
            preshared_key: cfg.preshared_key,
            persistent_keepalive: cfg.persistent_keepalive,
            table: RwLock::new(Arc::new(Table::default())),
            writer: Mutex::new(seed.max(1)),
            last_rate_reset: Mutex::new(None),
            transmits: Queue::default(),
            events: Queue::default(),
            sources: Queue::default(),
            drops: DropCounters::default(),
            retired_handshakes: AtomicU64::new(0),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public_key.as_bytes()
    }

    /// The current peer table (the read lock is held only to clone the pointer).
    #[inline]
    fn snapshot(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a new table; the old one is freed after the write lock is released.
    fn publish(&self, t: Table) {
        let old = {
            let mut g = self.table.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *g, Arc::new(t))
        };
        drop(old);
    }

    fn writer(&self) -> MutexGuard<'_, PeerId> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alloc_id(next: &mut PeerId, t: &Table) -> PeerId {
        loop {
            let id = *next;
            *next = (*next + 1) & 0x00ff_ffff;
            if *next == 0 {
                *next = 1;
            }
            if !t.peers.contains_key(&id) {
                return id;
            }
        }
    }

    /// Adds a peer, or updates the one with the same public key (its session is kept). A new peer has no
    /// endpoint: nothing is sent to it until NAT traversal sets its path ([`Node::set_path`]).
    pub fn upsert_peer(&self, _now: Instant, cfg: PeerConfig) -> PeerId {
        let mut next = self.writer();
        let cur = self.snapshot();
        if let Some(&id) = cur.by_key.get(&cfg.public_key) {
            let e = &cur.peers[&id];
            if *e.cfg == cfg {
                return id;
            }
            let routes_changed = e.cfg.allowed != cfg.allowed;
            let mut t = (*cur).clone();
            let peer = e.peer.clone();
            t.peers.insert(
                id,
                Entry {
                    peer,
                    cfg: Arc::new(cfg),
                },
            );
            if routes_changed {
                t.rebuild_routes();
            }
            self.publish(t);
            return id;
        }
        let id = Self::alloc_id(&mut next, &cur);
        let tunn = Tunn::new(
            self.private_key.clone(),
            PublicKey::from(cfg.public_key),
            self.preshared_key,
            self.persistent_keepalive,
            id,
            None,
        );
        let peer = Arc::new(Peer {
            id,
            state: Mutex::new(PeerState {
                tunn,
                endpoint: None,
                path: PathKind::Connecting,
                kind: None,
                established: false,
                last_handshake: None,
                last_nudge: None,
                reported: None,
                wanted: false,
                retry: Retry::None,
            }),
            handshakes: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
        });
        let mut t = (*cur).clone();
        t.by_key.insert(cfg.public_key, id);
        t.peers.insert(
            id,
            Entry {
                peer: peer.clone(),
                cfg: Arc::new(cfg),
            },
        );
        t.rebuild_routes();
        self.publish(t);
        id
    }

    /// Starts a handshake with `peer` unless one is in progress (`force`: even then, e.g. one started
    /// while the peer had no endpoint to send it to).
    fn initiate(&self, peer: &Peer, force: bool) {
        let mut s = peer.lock();
        let Some(to) = s.endpoint else { return };
        SCRATCH.with_borrow_mut(|buf| {
            if let TunnResult::WriteToNetwork(b) = s.tunn.format_handshake_initiation(buf, force) {
                self.transmits.push(Transmit {
                    to,
                    data: b.to_vec(),
                });
            }
        });
    }

    /// Removes the peer with this public key (and its routes). Returns whether it existed.
    pub fn remove_peer(&self, public_key: &[u8; 32]) -> bool {
        let _w = self.writer();
        let cur = self.snapshot();
        let Some(&id) = cur.by_key.get(public_key) else {
            return false;
        };
        let mut t = (*cur).clone();
        t.by_key.remove(public_key);
        if let Some(e) = t.peers.remove(&id) {
            self.retired_handshakes
                .fetch_add(e.peer.handshakes.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        t.rebuild_routes();
        self.publish(t);
        true
    }

    /// Sets the path chosen by NAT traversal: where to send and how it is reached. The peer's endpoint
    /// changes only through this call.
    pub fn set_path(&self, id: PeerId, endpoint: SocketAddr, kind: PathKind) {
        let t = self.snapshot();
        let Some(e) = t.peers.get(&id) else {
            return;
        };
        let start = {
            let mut s = e.peer.lock();
            let changed = s.endpoint != Some(endpoint);
            if changed {
                self.events
                    .push(Event::EndpointChanged { peer: id, endpoint });
            }
            s.endpoint = Some(endpoint);
            s.kind = Some(kind);
            // The path shows `kind` while a session exists; `connecting` until the first handshake
            // completes.
            if s.established {
                s.path = kind;
            }
            // A peer without a session gets a handshake at once on its new endpoint: from the side with
            // the larger key (so that both do not race with crossing initiations: an initiation received
            // drops the one in flight), or from the side with packets waiting (a lazy peer's first
            // packet: the other side has nothing to send).
            let start = changed
                && !s.established
                && (s.wanted || self.public_key.as_bytes() > &e.cfg.public_key);
            if start {
                s.retry = Retry::Armed;
            }
            (start, s.wanted)
        };
        if start.0 {
            self.initiate(&e.peer, start.1);
        }
    }

    /// Makes peer `id` idle (lazy peers with no traffic): its session, queued packets and endpoint are
    /// dropped, so no keepalive, rekey or handshake leaves for it until a packet wants it again
    /// ([`Event::Wanted`]) and a path is set. Its routes stay.
    pub fn set_idle(&self, id: PeerId) {
        let t = self.snapshot();
        let Some(e) = t.peers.get(&id) else {
            return;
        };
        let tunn = Tunn::new(
            self.private_key.clone(),
            PublicKey::from(e.cfg.public_key),
            self.preshared_key,
            self.persistent_keepalive,
            id,
            None,
        );
        let mut s = e.peer.lock();
        s.tunn = tunn;
        s.endpoint = None;
        s.kind = None;
        s.established = false;
        s.path = PathKind::Connecting;
        s.wanted = false;
        s.reported = None;
    }

    /// The public key of peer `id` (e.g. to tell NAT traversal which peer a datagram authenticated).
    pub fn peer_key(&self, id: PeerId) -> Option<[u8; 32]> {
        self.snapshot().peers.get(&id).map(|e| e.cfg.public_key)
    }

    pub fn peer_id(&self, public_key: &[u8; 32]) -> Option<PeerId> {
        self.snapshot().by_key.get(public_key).copied()
    }

    /// The name of peer `id` (for logs).
    pub fn peer_name(&self, id: PeerId) -> Option<String> {
        self.snapshot().peers.get(&id).map(|e| e.cfg.name.clone())
    }

    pub fn peer(&self, id: PeerId) -> Option<PeerStatus> {
        self.snapshot().peers.get(&id).map(Entry::status)
    }

    /// Snapshots of every peer, sorted by name. Takes each peer's lock in turn, only to copy its endpoint
    /// and path: never more than one at a time, never the table's.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let t = self.snapshot();
        let mut v: Vec<_> = t.peers.values().map(Entry::status).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn peer_count(&self) -> usize {
        self.snapshot().peers.len()
    }

    /// Completed handshakes since the node started, over all peers (removed ones included).
    pub fn handshakes_total(&self) -> u64 {
        self.retired_handshakes.load(Ordering::Relaxed)
            + self
                .snapshot()
                .peers
                .values()
                .map(|e| e.peer.handshakes.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// The drop counters now.
    pub fn drops(&self) -> Drops {
        self.drops.snapshot()
    }

    /// The peer owning `ip` (cryptokey routing).
    pub fn route(&self, ip: IpAddr) -> Option<PeerId> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .routes
            .lookup(ip)
    }

    /// The peer owning `dst`: the table's read lock is held for the lookup and the `Arc` clone only.
    #[inline]
    fn routed(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let id = t.routes.lookup(dst)?;
        t.peers.get(&id).map(|e| e.peer.clone())
    }

    /// The endpoint a packet from the TUN device would be sent to (its destination's peer), if any.
    #[inline]
    pub fn endpoint_for(&self, packet: &[u8]) -> Option<SocketAddr> {
        let (_, dst) = packet_addrs(packet)?;
        self.routed(dst)?.lock().endpoint
    }

    /// Encrypts a packet read from the TUN device for the peer owning its destination, into `out`
    /// (at least `packet.len() + 32` and [`MIN_BUFFER`] bytes). Takes only that peer's lock.
    pub fn encapsulate(&self, _now: Instant, packet: &[u8], out: &mut [u8]) -> Outbound {
        if out.len() < MIN_BUFFER || out.len() < packet.len() + 32 {
            self.drops.add(DropReason::Other);
            return Outbound::Dropped(DropReason::Other);
        }
        let Some((_, dst)) = packet_addrs(packet) else {
            self.drops.add(DropReason::Malformed);
            return Outbound::Dropped(DropReason::Malformed);
        };
        let Some(p) = self.routed(dst) else {
            self.drops.add(DropReason::NoRoute);
            return Outbound::Dropped(DropReason::NoRoute);
        };
        let mut s = p.lock();
        if s.endpoint.is_none() && s.established {
            // A session but nowhere to send (the peer's handshake reached us before any path was set):
            // boringtun would encrypt, not queue.
            drop(s);
            self.drops.add(DropReason::NoEndpoint);
            return Outbound::Dropped(DropReason::NoEndpoint);
        }
        let Some(to) = s.endpoint else {
            // No path yet (a lazy peer, or NAT traversal still checking): boringtun queues the packet
            // (bounded) and starts a handshake that has nowhere to go; `set_path` sends a fresh one.
            let queued = !matches!(s.tunn.encapsulate(packet, out), TunnResult::Err(_));
            if queued && !s.wanted {
                s.wanted = true;
                self.events.push(Event::Wanted { peer: p.id });
            }
            drop(s);
            if queued {
                return Outbound::Queued;
            }
            self.drops.add(DropReason::NoEndpoint);
            return Outbound::Dropped(DropReason::NoEndpoint);
        };
        let r = s.tunn.encapsulate(packet, out);
        drop(s);
        match r {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                if !is_handshake(b) {
                    p.tx_bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
                    p.tx_packets.fetch_add(1, Ordering::Relaxed);
                }
                Outbound::Send {
                    to,
                    len,
                    peer: p.id,
                }
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
    /// peer's. Takes only that peer's lock (a handshake initiation's Diffie-Hellman to find the peer runs
    /// under none).
    pub fn decapsulate(
        &self,
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
                self.transmits.push(Transmit {
                    to: from,
                    data: c.to_vec(),
                });
                self.drops.add(DropReason::UnderLoad);
                return Inbound::Dropped(DropReason::UnderLoad);
            }
            Err(TunnResult::Err(e)) => return self.drop(DropReason::from_wg(&e)),
            Err(_) => return self.drop(DropReason::Other),
        };
        let t = self.snapshot();
        let (id, handshake) = match &packet {
            Packet::HandshakeInit(init) => {
                match parse_handshake_anon(&self.private_key, &self.public_key, init) {
                    Ok(half) => match t.by_key.get(&half.peer_static_public) {
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
        let Some(e) = t.peers.get(&id) else {
            if is_data {
                self.nudge(&t, now, from);
            }
            return self.drop(DropReason::UnknownPeer);
        };
        let p = &e.peer;
        let mut s = p.lock();
        match s.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => {
                // Keepalive or cookie reply: authenticated (cookie replies are, by MAC) traffic from `from`.
                self.note_source(p, &mut s, from, now);
                Inbound::Done
            }
            TunnResult::WriteToNetwork(b) => {
                self.transmits.push(Transmit {
                    to: from,
                    data: b.to_vec(),
                });
                // Flush packets queued while the handshake was in flight.
                SCRATCH.with_borrow_mut(|buf| {
                    while let TunnResult::WriteToNetwork(b) = s.tunn.decapsulate(None, &[], buf) {
                        if !is_handshake(b) {
                            p.tx_packets.fetch_add(1, Ordering::Relaxed);
                            p.tx_bytes
                                .fetch_add(b.len().saturating_sub(32) as u64, Ordering::Relaxed);
                        }
                        self.transmits.push(Transmit {
                            to: from,
                            data: b.to_vec(),
                        })
                    }
                });
                if handshake {
                    p.handshakes.fetch_add(1, Ordering::Relaxed);
                    s.last_handshake = Some(now);
                    s.established = true;
                    s.path = s.kind.unwrap_or(PathKind::Connecting);
                    self.events.push(Event::HandshakeCompleted {
                        peer: id,
                        endpoint: from,
                    });
                }
                self.note_source(p, &mut s, from, now);
                Inbound::Done
            }
            TunnResult::WriteToTunnelV4(b, src) => {
                self.accept(&t, p, &mut s, from, IpAddr::V4(src), b.len(), now)
            }
            TunnResult::WriteToTunnelV6(b, src) => {
                self.accept(&t, p, &mut s, from, IpAddr::V6(src), b.len(), now)
            }
            TunnResult::Err(err) => {
                drop(s);
                let r = DropReason::from_wg(&err);
                self.drops.add(r);
                if is_data
                    && matches!(
                        err,
                        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex
                    )
                {
                    self.nudge(&t, now, from);
                }
                Inbound::Dropped(r)
            }
        }
    }

    /// Data for a session we do not have, from a peer's endpoint: the peer kept a session from before we
    /// restarted. Start a handshake at once (at most once a second per peer) instead of letting it wait
    /// for its own rekey timeout (15 s).
    fn nudge(&self, t: &Table, now: Instant, from: SocketAddr) {
        for e in t.peers.values() {
            let mut s = e.peer.lock();
            if s.endpoint != Some(from) {
                continue;
            }
            if s.last_nudge
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
            {
                return;
            }
            s.last_nudge = Some(now);
            let to = from;
            SCRATCH.with_borrow_mut(|buf| {
                if let TunnResult::WriteToNetwork(b) =
                    s.tunn.format_handshake_initiation(buf, false)
                {
                    self.transmits.push(Transmit {
                        to,
                        data: b.to_vec(),
                    });
                }
            });
            return;
        }
    }

    /// An authenticated datagram of `p` came from `from`: if that is not the peer's endpoint, queue it for
    /// [`Node::poll_source`] (once per new address, again every [`SOURCE_REPORT_INTERVAL`] while it stays).
    #[inline]
    fn note_source(&self, p: &Peer, s: &mut PeerState, from: SocketAddr, now: Instant) {
        if s.endpoint == Some(from) {
            return;
        }
        if s.reported.is_some_and(|(a, t)| {
            a == from && now.saturating_duration_since(t) < SOURCE_REPORT_INTERVAL
        }) {
            return;
        }
        s.reported = Some((from, now));
        self.sources.push((p.id, from));
    }

    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &self,
        t: &Table,
        p: &Peer,
        s: &mut PeerState,
        from: SocketAddr,
        src: IpAddr,
        len: usize,
        now: Instant,
    ) -> Inbound {
        if t.routes.lookup(src) != Some(p.id) {
            return self.drop(DropReason::SpoofedSource);
        }
        p.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        p.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.note_source(p, s, from, now);
        Inbound::WriteTun { len, peer: p.id }
    }

    fn drop(&self, r: DropReason) -> Inbound {
        self.drops.add(r);
        Inbound::Dropped(r)
    }

    /// Runs the protocol timers of every peer (call every 100-250 ms): handshake retries, rekeys,
    /// keepalives, expiry. Takes one peer's lock at a
    /// time.
    pub fn tick(&self, now: Instant) {
        {
            let mut last = self
                .last_rate_reset
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                self.rate_limiter.reset_count();
                *last = Some(now);
            }
        }
        let t = self.snapshot();
        SCRATCH.with_borrow_mut(|buf| {
            for e in t.peers.values() {
                let p = &e.peer;
                let mut s = p.lock();
                match s.tunn.update_timers(buf) {
                    TunnResult::WriteToNetwork(b) => {
                        if let Some(to) = s.endpoint {
                            self.transmits.push(Transmit {
                                to,
                                data: b.to_vec(),
                            });
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) if s.established => {
                        s.established = false;
                        s.path = PathKind::Connecting;
                        self.events.push(Event::SessionExpired { peer: p.id });
                    }
                    _ => {}
                }
                s.retry = match s.retry {
                    _ if s.established => Retry::None,
                    Retry::Armed => Retry::At(now + FIRST_HANDSHAKE_RETRY),
                    Retry::At(t) if now >= t => {
                        if let Some(to) = s.endpoint
                            && let TunnResult::WriteToNetwork(b) =
                                s.tunn.format_handshake_initiation(buf, true)
                        {
                            tracing::debug!(peer = %e.cfg.name, %to, "first handshake unanswered: sent again");
                            self.transmits.push(Transmit {
                                to,
                                data: b.to_vec(),
                            });
                        }
                        Retry::None
                    }
                    r => r,
                };
            }
        });
    }

    /// Next datagram to send that the hot-path results did not carry (one atomic load when there is none).
    #[inline]
    pub fn poll_transmit(&self) -> Option<Transmit> {
        self.transmits.pop()
    }

    pub fn poll_event(&self) -> Option<Event> {
        self.events.pop()
    }

    /// Next `(peer, source)`: an authenticated datagram of `peer` arrived from `source`, which is not the
    /// peer's endpoint (its NAT rebound, or it sends over another path): for NAT traversal
    /// (`evio-traversal`'s `tunnel_from`). Reported once per new source, again every second while it lasts.
    #[inline]
    pub fn poll_source(&self) -> Option<(PeerId, SocketAddr)> {
        self.sources.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn node_is_shared_between_threads() {
        assert_send_sync::<Node>();
    }
}
