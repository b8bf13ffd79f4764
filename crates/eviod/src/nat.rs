//! NAT traversal in eviod: the `evio-nat` agent on the tunnel's one UDP socket.
//!
//! - Demultiplexing: the receive thread hands WireGuard datagrams straight to the tunnel core; everything
//!   else (STUN checks and answers, TURN responses, ChannelData and Data indications from our TURN
//!   allocation) goes through [`Nat::input`]. A WireGuard datagram that arrived through our relay comes back
//!   unwrapped, with a *relay endpoint* as its source.
//! - Relay endpoints: a peer reached through our own TURN allocation gets the endpoint `[100::1]:SLOT` in
//!   the tunnel core (`100::/64` is the discard-only prefix of RFC 6666, never a real destination). The
//!   slot names the peer's address as the relay sees it ([`RelaySlots`]: bounded; made only for addresses
//!   the agent checks through the relay, i.e. of authenticated peers; never re-pointed while a path or the
//!   tunnel core may use it). A relayed datagram from any other address gets a *provisional endpoint*
//!   `[100::2]:N` (a small ring, [`PENDING`] entries) so that the tunnel can authenticate it: nothing is
//!   ever sent there. Whatever the core sends to a relay endpoint (data, handshakes,
//!   keepalives) is framed as ChannelData towards the TURN server by [`Nat::push`] or the send thread's
//!   zero-copy path ([`Nat::relay_route`]); replies to a relayed handshake go back the way it came.
//! - Path selection is the agent's: each `PathChanged` event becomes [`evio_tunnel::Node::set_path`]; the
//!   core then stops roaming on its own for that peer.
//! - NAT rebinding: when the core authenticates a datagram of a peer from an address that is not the
//!   peer's endpoint (`Node::poll_source`: a new mapping of the peer's NAT, or a new relayed address), the
//!   receive thread calls the agent's `tunnel_from` with the real source ([`new_sources`]): the agent
//!   checks the new address at once and probes the selected pair, so a rebinding heals in a check round
//!   trip plus the 300 ms fail-over, not at the next scheduled check.
//! - Candidates (host, server-reflexive, relayed) are published by the control plane in the node's etcd
//!   record whenever [`Nat::candidates`] changes version; peers' records come back through
//!   [`Nat::set_peers`].
//!
//! Locks: never hold this module's state lock and the tunnel core's lock at once; path changes are taken
//! and applied under a third lock ([`pump`], [`sync_paths`]) so they reach the core in order.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use evio_io::{SendBatch, UdpBatch};
use evio_nat::demux::{self, Kind};
use evio_nat::{
    Agent, AgentConfig, Base, Candidate, CandidateKind, Event, Input, Path, PathKind, PeerKey,
    RelaySlots, Source, Timers, TurnConfig, check_key,
};
use evio_tunnel::{PublicKey, StaticSecret};

use crate::config::NatConfig;
use crate::state::Shared;

/// The address of relay endpoints (see the module docs).
const RELAY_IP: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1);
/// The address of provisional endpoints: relayed datagrams from an address with no relay slot yet.
const PENDING_IP: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 2);
/// Provisional endpoints kept (a ring: more than one receive batch, so an entry outlives the batch that
/// made it, and [`new_sources`] runs after every batch).
pub const PENDING: usize = 64;
/// ChannelData framing for the zero-copy relay path (length-checked: 16-bit length field).
pub use evio_nat::demux::{CHANNEL_HEADER, channel_header};

/// True if `a` is a relay endpoint (a peer reached through our TURN allocation).
#[inline]
pub fn is_relay(a: &SocketAddr) -> bool {
    matches!(a, SocketAddr::V6(v) if *v.ip() == RELAY_IP)
}

/// True if `a` is a provisional endpoint (never a destination: sends to it are dropped).
#[inline]
pub fn is_provisional(a: &SocketAddr) -> bool {
    matches!(a, SocketAddr::V6(v) if *v.ip() == PENDING_IP)
}

fn relay_endpoint(slot: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(RELAY_IP, slot, 0, 0))
}

/// How to send to a relay endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayRoute {
    /// Prepend a ChannelData header for `channel` and send to `server`.
    Channel { server: SocketAddr, channel: u16 },
    /// No channel bound yet: wrap in a Send indication ([`Nat::wrap`]).
    Indication { remote: SocketAddr },
}

/// What a non-WireGuard datagram turned out to be.
pub enum Rx<'a> {
    /// A WireGuard datagram (unwrapped) and the endpoint to attribute it to.
    Tunnel {
        from: SocketAddr,
        payload: &'a [u8],
    },
    /// STUN/TURN traffic consumed by the agent (call [`pump`] soon).
    Handled,
    Unknown,
}

/// A path change for the tunnel core: the peer, and its endpoint and path kind (`None`: no working path).
type PathUpdate = (PeerKey, Option<(SocketAddr, evio_tunnel::PathKind)>);

/// What status shows of NAT traversal ([`Nat::view`]).
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

    /// The endpoint to show: where datagrams go, so the TURN server for a peer reached through our relay.
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

struct Inner {
    agent: Agent,
    /// Relay endpoint slot -> the peer's address as our relay sees it.
    slots: RelaySlots,
    /// Relay endpoint slots the tunnel core's peers had as endpoints at the last [`sync_paths`].
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

impl Inner {
    /// The relay endpoint of `remote`: its slot, made if `remote` is one of the agent's relay pairs (an
    /// address it checks through our relay for an authenticated peer). `None` for any other address, or
    /// if the table is full of slots still in use.
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
        SocketAddr::V6(SocketAddrV6::new(PENDING_IP, i as u16, 0, 0))
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
            return self.remote_of(&ep).map(Source::Relay);
        }
        Some(Source::Direct(ep))
    }

    fn remote_of(&self, ep: &SocketAddr) -> Option<SocketAddr> {
        if !is_relay(ep) {
            return None;
        }
        self.slots.remote(ep.port())
    }
}

/// NAT traversal state of the agent.
pub struct Nat {
    inner: Mutex<Inner>,
    /// Held while path changes are taken from the agent and applied to the tunnel core, so that two
    /// threads pumping at once cannot apply them out of order (a stale endpoint would stick).
    apply: Mutex<()>,
    secret: StaticSecret,
    public: PeerKey,
    psk: Option<[u8; 32]>,
    port: u16,
    version: AtomicU64,
    pub relay_tx_bytes: AtomicU64,
    pub relay_rx_bytes: AtomicU64,
    pub path_changes: AtomicU64,
    pub checks_rx: AtomicU64,
    /// Lazy peers (`--lazy-peers`): only wanted and pinned peers are checked.
    lazy: bool,
    /// How long a lazy peer stays up without inner packets (`--peer-idle-timeout`).
    pub idle_timeout: std::time::Duration,
    pub peers_woken: AtomicU64,
    pub peers_idled: AtomicU64,
}

/// The wall clock (Unix time), for the timestamps of connectivity checks.
fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Resolves `HOST:PORT` to an IPv4 socket address (the tunnel socket is IPv4).
pub fn resolve(s: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {s:?} (want HOST:PORT)"))?
        .collect();
    match addrs.iter().find(|a| a.is_ipv4()) {
        Some(a) => Ok(*a),
        None => bail!("{s:?} has no IPv4 address"),
    }
}

/// The agent configuration from the command line: STUN servers, TURN server and credentials.
pub fn agent_settings(cfg: &NatConfig) -> Result<(Vec<SocketAddr>, Option<TurnConfig>)> {
    let stun = cfg
        .stun
        .iter()
        .map(|s| resolve(s))
        .collect::<Result<Vec<_>>>()?;
    let turn = match (&cfg.turn, &cfg.turn_user, &cfg.turn_password_file) {
        (Some(server), Some(user), Some(file)) => {
            let password =
                evio_store::read_secret_file(file, "TURN password").with_context(|| {
                    format!("cannot read the TURN password file {}", file.display())
                })?;
            Some(TurnConfig {
                server: resolve(server)?,
                user: user.clone(),
                password,
            })
        }
        _ => None,
    };
    Ok((stun, turn))
}

impl Nat {
    pub fn new(
        secret: StaticSecret,
        psk: Option<[u8; 32]>,
        port: u16,
        hosts: &[IpAddr],
        stun: Vec<SocketAddr>,
        turn: Option<TurnConfig>,
        lazy: bool,
    ) -> Nat {
        let public = PublicKey::from(&secret).to_bytes();
        let cfg = AgentConfig {
            local_key: public,
            host_candidates: hosts.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
            stun_servers: stun,
            turn,
            timers: Timers::default(),
            unix_time: unix_now(),
        };
        let agent = Agent::new(cfg, rand::random(), Instant::now());
        let candidates = agent.local_candidates();
        Nat {
            apply: Mutex::new(()),
            inner: Mutex::new(Inner {
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
            secret,
            public,
            psk,
            port,
            version: AtomicU64::new(1),
            relay_tx_bytes: AtomicU64::new(0),
            relay_rx_bytes: AtomicU64::new(0),
            path_changes: AtomicU64::new(0),
            checks_rx: AtomicU64::new(0),
            lazy,
            idle_timeout: std::time::Duration::from_secs(crate::config::DEFAULT_PEER_IDLE_TIMEOUT),
            peers_woken: AtomicU64::new(0),
            peers_idled: AtomicU64::new(0),
        }
    }

    pub fn lazy(&self) -> bool {
        self.lazy
    }

    /// The peers kept up with lazy peers (the control plane maps `--pin-peer` names to keys).
    pub fn set_pinned(&self, keys: HashSet<PeerKey>) {
        self.lock().pinned = keys;
    }

    /// Starts NAT traversal with a lazy peer the cluster knows (its first packet, or its first check
    /// to us). Returns whether it was at rest.
    pub fn wake(&self, peer: &PeerKey) -> bool {
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
        let now = Instant::now();
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
        self.peers_woken.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Lazy peers that moved no inner packet for `timeout` (given each peer's packet count now) go to
    /// rest: NAT traversal forgets them. Returns them (the tunnel core then drops their sessions).
    pub fn idle_peers(
        &self,
        packets: &HashMap<PeerKey, u64>,
        timeout: std::time::Duration,
    ) -> Vec<PeerKey> {
        if !self.lazy {
            return Vec::new();
        }
        let now = Instant::now();
        let mut g = self.lock();
        let g = &mut *g;
        let mut idle = Vec::new();
        for (k, e) in g.peers.iter_mut() {
            let n = packets.get(k).copied().unwrap_or(0);
            if n != e.activity.0 {
                e.activity = (n, now);
            } else if !g.pinned.contains(k)
                && now.saturating_duration_since(e.activity.1) >= timeout
            {
                idle.push(*k);
            }
        }
        for k in &idle {
            g.peers.remove(k);
            g.agent.remove_peer(k);
        }
        self.peers_idled
            .fetch_add(idle.len() as u64, Ordering::Relaxed);
        idle
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Our candidates and their version (bumped on every change).
    pub fn candidates(&self) -> (u64, Vec<Candidate>) {
        let v = self.version.load(Ordering::Acquire);
        (v, self.lock().candidates.clone())
    }

    /// True once the candidates published here are all the agent gathers (its STUN mappings and its relay).
    pub fn gathered(&self) -> bool {
        let g = self.lock();
        g.agent.gathered() && g.candidates == g.agent.local_candidates()
    }

    pub fn candidates_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Local addresses changed.
    pub fn set_host_addresses(&self, hosts: &[IpAddr]) {
        let hosts: Vec<SocketAddr> = hosts
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect();
        let mut g = self.lock();
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

    /// The peers and their candidates as the control plane knows them; others are forgotten.
    pub fn set_peers(&self, peers: &[(PeerKey, Vec<Candidate>)]) {
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
                g.agent.permit(&resting, Instant::now());
                peers
                    .iter()
                    .filter(|(k, _)| g.peers.contains_key(k) || g.pinned.contains(k))
                    .cloned()
                    .collect()
            }
        };
        self.set_active(&up);
    }

    /// Makes NAT traversal's peers exactly `peers`.
    fn set_active(&self, peers: &[(PeerKey, Vec<Candidate>)]) {
        let now = Instant::now();
        // Check keys of new peers (an X25519 each) outside the lock: the receive thread takes it for
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
                // Added by another caller since (set_peers runs on the control plane only).
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

    fn check_key_of(&self, k: &PeerKey) -> [u8; 32] {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*k)).to_bytes();
        check_key(&shared, &self.public, k, self.psk.as_ref())
    }

    /// Handles a datagram that is not plain WireGuard (see the module docs).
    pub fn input<'a>(&self, from: SocketAddr, data: &'a [u8], now: Instant) -> Rx<'a> {
        let mut g = self.lock();
        match g.agent.handle_input(from, data, now) {
            Input::Tunnel {
                from: Source::Direct(a),
                payload,
                ..
            } => Rx::Tunnel { from: a, payload },
            Input::Tunnel {
                from: Source::Relay(remote),
                payload,
                ..
            } => {
                self.relay_rx_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                // An address with no slot (no pair of ours: e.g. the peer's NAT rebound) gets a
                // provisional endpoint, so that the tunnel can authenticate the datagram and
                // `new_sources` tell the agent.
                let from = match g.slot(remote, now) {
                    Some(from) => from,
                    None => g.provisional(remote),
                };
                Rx::Tunnel { from, payload }
            }
            Input::Handled => {
                self.checks_rx.fetch_add(1, Ordering::Relaxed);
                Rx::Handled
            }
            Input::Unknown => Rx::Unknown,
        }
    }

    /// How to reach a relay endpoint now (`None`: unknown slot or no allocation).
    pub fn relay_route(&self, ep: &SocketAddr) -> Option<RelayRoute> {
        let g = self.lock();
        let remote = g.remote_of(ep)?;
        let turn = g.agent.turn()?;
        turn.relayed()?;
        Some(match turn.channel(remote) {
            Some(channel) => RelayRoute::Channel {
                server: turn.server(),
                channel,
            },
            None => RelayRoute::Indication { remote },
        })
    }

    /// Wraps `payload` for `remote` through our relay (Send indication or ChannelData; allocates: only for
    /// the first datagrams before a channel is bound).
    pub fn wrap(&self, remote: SocketAddr, payload: &[u8]) -> Option<evio_nat::Transmit> {
        let mut g = self.lock();
        let t = g.agent.turn_wrap(remote, payload)?;
        self.relay_tx_bytes
            .fetch_add(t.payload.len() as u64, Ordering::Relaxed);
        Some(t)
    }

    /// Queues a datagram of the tunnel core for `to`, framing it for the relay if `to` is a relay endpoint.
    /// Returns false if it does not fit (flush and retry) or cannot be sent.
    pub fn push(&self, out: &mut SendBatch, to: SocketAddr, data: &[u8]) -> bool {
        if is_provisional(&to) {
            return true;
        }
        if !is_relay(&to) {
            return out.push(to, data);
        }
        match self.relay_route(&to) {
            Some(RelayRoute::Channel { server, channel }) => {
                let mut head = [0u8; CHANNEL_HEADER];
                if let Err(e) = channel_header(&mut head, channel, data.len()) {
                    tracing::debug!("not relayed: {e}");
                    return true;
                }
                let n = data.len() + CHANNEL_HEADER;
                let r = out.push_with(server, n, |buf| {
                    buf[..CHANNEL_HEADER].copy_from_slice(&head);
                    buf[CHANNEL_HEADER..n].copy_from_slice(data);
                    Some(n)
                });
                if r.is_some() {
                    self.relay_tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                r.is_some()
            }
            Some(RelayRoute::Indication { remote }) => match self.wrap(remote, data) {
                Some(t) => out.push(t.dst, &t.payload),
                None => true,
            },
            None => true,
        }
    }

    /// Counts relayed bytes sent by the zero-copy path.
    #[inline]
    pub fn count_relay_tx(&self, n: usize) {
        self.relay_tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Runs the agent's timers if due; returns its datagrams and the path changes to apply.
    fn poll(&self, now: Instant) -> (Vec<evio_nat::Transmit>, Vec<PathUpdate>, Vec<PeerKey>) {
        let mut g = self.lock();
        // Follow steps of the host's wall clock (checks carry it).
        g.agent.set_unix_time(now, unix_now());
        if g.agent.poll_timeout().is_some_and(|t| t <= now) {
            g.agent.handle_timeout(now);
        }
        let mut tx = Vec::new();
        while let Some(t) = g.agent.poll_transmit() {
            tx.push(t);
        }
        let mut changes = Vec::new();
        let mut unknown = Vec::new();
        while let Some(e) = g.agent.poll_event() {
            match e {
                Event::LocalCandidates(c) => {
                    tracing::info!(candidates = ?c.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "local candidates");
                    g.candidates = c;
                    self.version.fetch_add(1, Ordering::AcqRel);
                }
                Event::PathChanged { peer, path } => {
                    self.path_changes.fetch_add(1, Ordering::Relaxed);
                    if let Some(e) = g.peers.get_mut(&peer) {
                        e.path = path;
                    }
                    let target = match path {
                        Some(p) => match target(&mut g, &p, now) {
                            Some(t) => Some(t),
                            None => continue,
                        },
                        None => None,
                    };
                    changes.push((peer, target));
                }
                Event::CheckFromUnknown(k) => {
                    if self.lazy && g.known.contains_key(&k) {
                        unknown.push(k);
                    }
                }
            }
        }
        (tx, changes, unknown)
    }

    /// What status shows of NAT traversal, for every peer at once: one lock per status, not one per peer
    /// (the receive thread takes this lock for relayed datagrams).
    pub fn view(&self) -> NatView {
        let g = self.lock();
        NatView {
            paths: g.peers.iter().map(|(k, e)| (*k, e.path)).collect(),
            turn_server: g.agent.turn().map(|t| t.server()),
            lazy: self.lazy,
        }
    }

    /// Adds the NAT traversal metrics.
    pub fn metrics(&self, m: &mut crate::metrics::Exposition) {
        let (cands, relayed) = {
            let g = self.lock();
            (
                g.candidates.clone(),
                g.agent.turn().and_then(|t| t.relayed()).is_some(),
            )
        };
        for (name, help, v) in [
            (
                "evio_path_changes_total",
                "Path changes chosen by NAT traversal (direct, relay, none).",
                &self.path_changes,
            ),
            (
                "evio_relay_tx_bytes_total",
                "Bytes sent through our TURN allocation (framing included).",
                &self.relay_tx_bytes,
            ),
            (
                "evio_relay_rx_bytes_total",
                "Bytes received through our TURN allocation (framing included).",
                &self.relay_rx_bytes,
            ),
            (
                "evio_nat_stun_rx_datagrams_total",
                "STUN/TURN datagrams handled by NAT traversal.",
                &self.checks_rx,
            ),
            (
                "evio_lazy_peers_woken_total",
                "Lazy peers taken up (a packet to them, or a check from them).",
                &self.peers_woken,
            ),
            (
                "evio_lazy_peers_idled_total",
                "Lazy peers put to rest after the idle timeout.",
                &self.peers_idled,
            ),
        ] {
            m.counter(name, help, v.load(Ordering::Relaxed));
        }
        m.gauges(
            "evio_candidates",
            "Local candidates by kind.",
            "kind",
            [
                CandidateKind::Host,
                CandidateKind::ServerReflexive,
                CandidateKind::Relayed,
            ]
            .into_iter()
            .map(|k| {
                let n = cands.iter().filter(|c| c.kind == k).count();
                (k.as_str().to_string(), n as i64)
            }),
        );
        m.gauge(
            "evio_turn_allocated",
            "Whether a TURN allocation exists.",
            relayed as i64,
        );
    }
}

/// The tunnel core's endpoint and path kind for a selected path (`None`: a relay endpoint is needed and
/// the table is full).
fn target(g: &mut Inner, p: &Path, now: Instant) -> Option<(SocketAddr, evio_tunnel::PathKind)> {
    Some(match (p.base, p.kind) {
        (Base::Relay, _) => (g.slot(p.remote, now)?, evio_tunnel::PathKind::Relay),
        (Base::Socket, PathKind::Relay) => (p.remote, evio_tunnel::PathKind::Relay),
        (Base::Socket, PathKind::Direct) => (p.remote, evio_tunnel::PathKind::Direct),
    })
}

/// True if the receive thread must hand `data` to [`Nat::input`] instead of the tunnel core.
#[inline]
pub fn needs_nat(data: &[u8]) -> bool {
    demux::classify(data) != Kind::WireGuard
}

/// Drives NAT traversal: timers, datagrams to send, path changes into the tunnel core. Call on every timer
/// tick and after [`Nat::input`] handled something.
pub fn pump(shared: &Shared, udp: &mut UdpBatch, out: &mut SendBatch) {
    let order = shared.nat.apply.lock().unwrap_or_else(|e| e.into_inner());
    let (tx, changes, unknown) = shared.nat.poll(Instant::now());
    if !changes.is_empty() {
        let node = shared.node();
        for (peer, target) in changes {
            let Some(id) = node.peer_id(&peer) else {
                continue;
            };
            match target {
                Some((ep, kind)) => {
                    tracing::info!(peer = %node.peer_name(id).unwrap_or_default(), endpoint = %ep, ?kind, "path selected");
                    node.set_path(id, ep, kind);
                }
                None => {
                    tracing::info!(peer = %node.peer_name(id).unwrap_or_default(), "no working path; re-checking")
                }
            }
        }
    }
    drop(order);
    // Lazy peers checking us: take them up, so that their next check is answered.
    for k in unknown {
        if shared.nat.wake(&k) {
            tracing::info!(peer = %crate::keys::encode(&k), "lazy peer woken by its check");
        }
    }
    for t in tx {
        if t.dst.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
            continue;
        }
        if !out.push(t.dst, &t.payload) {
            crate::dataplane::flush(shared, udp, out);
            out.push(t.dst, &t.payload);
        }
    }
}

/// Lazy peers: takes up the peers the tunnel core has packets for ([`evio_tunnel::Event::Wanted`]), and
/// puts to rest those without inner packets for `timeout` (their sessions dropped: no keepalives).
pub fn lazy_peers(
    shared: &Shared,
    wanted: &[evio_tunnel::PeerId],
    sweep: Option<std::time::Duration>,
) {
    if !shared.nat.lazy() {
        return;
    }
    let node = shared.node();
    for id in wanted {
        if let Some(k) = node.peer_key(*id)
            && shared.nat.wake(&k)
        {
            tracing::info!(peer = %node.peer_name(*id).unwrap_or_default(), "lazy peer woken by a packet");
        }
    }
    if let Some(timeout) = sweep {
        let packets: HashMap<PeerKey, u64> = node
            .peers()
            .iter()
            .map(|p| (p.public_key, p.rx_packets + p.tx_packets))
            .collect();
        for k in shared.nat.idle_peers(&packets, timeout) {
            if let Some(id) = node.peer_id(&k) {
                tracing::info!(peer = %node.peer_name(id).unwrap_or_default(), "lazy peer idle");
                node.set_idle(id);
            }
        }
    }
}

/// Tells the agent about authenticated datagrams from addresses that are not their peer's endpoint
/// (`Node::poll_source`; see the module docs). Returns whether there were any (then [`pump`]: the agent
/// has checks to send now). Called by the receive thread after every batch: one atomic load when there
/// is nothing.
pub fn new_sources(shared: &Shared, now: Instant) -> bool {
    let node = shared.node();
    let mut any = false;
    while let Some((id, from)) = node.poll_source() {
        let Some(key) = node.peer_key(id) else {
            continue;
        };
        let mut g = shared.nat.lock();
        let Some(source) = g.source_of(from) else {
            continue;
        };
        tracing::debug!(peer = %node.peer_name(id).unwrap_or_default(), ?source, "authenticated datagram from a new source");
        g.agent.tunnel_from(&key, source, now);
        any = true;
    }
    any
}

/// Our candidates as published in the NodeRecord (peer-reflexive ones are learned, never published).
pub fn to_records(c: &[Candidate]) -> Vec<evio_store::Candidate> {
    c.iter()
        .filter_map(|c| {
            let kind = match c.kind {
                CandidateKind::Host => evio_store::CandidateKind::Host,
                CandidateKind::ServerReflexive => evio_store::CandidateKind::Srflx,
                CandidateKind::Relayed => evio_store::CandidateKind::Relay,
                CandidateKind::PeerReflexive => return None,
            };
            Some(evio_store::Candidate { kind, addr: c.addr })
        })
        .collect()
}

/// A peer's candidates from its NodeRecord: its candidates, and its endpoints as host candidates (records
/// of agents that publish no candidates). IPv4 only (the tunnel socket is IPv4).
pub fn from_record(r: &evio_store::NodeRecord) -> Vec<Candidate> {
    let mut v: Vec<Candidate> = Vec::new();
    let mut add = |c: Candidate| {
        if c.addr.is_ipv4()
            && !c.addr.ip().is_unspecified()
            && c.addr.port() != 0
            && !v.iter().any(|x| x.addr == c.addr)
        {
            v.push(c);
        }
    };
    for c in &r.candidates {
        let kind = match c.kind {
            evio_store::CandidateKind::Host => CandidateKind::Host,
            evio_store::CandidateKind::Srflx => CandidateKind::ServerReflexive,
            evio_store::CandidateKind::Relay => CandidateKind::Relayed,
            evio_store::CandidateKind::Unknown => continue,
        };
        add(Candidate::new(kind, c.addr));
    }
    for e in &r.endpoints {
        add(Candidate::new(CandidateKind::Host, *e));
    }
    v
}

/// Gives the tunnel core the selected path of every peer whose endpoint differs (peers the core added
/// after NAT traversal had already chosen their path), and notes which relay endpoints the core uses (their
/// slots are not reused).
pub fn sync_paths(shared: &Shared) {
    let _order = shared.nat.apply.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let want: Vec<(PeerKey, SocketAddr, evio_tunnel::PathKind)> = {
        let mut g = shared.nat.lock();
        let paths: Vec<(PeerKey, Path)> = g
            .peers
            .iter()
            .filter_map(|(k, e)| e.path.map(|p| (*k, p)))
            .collect();
        paths
            .into_iter()
            .filter_map(|(k, p)| {
                let (ep, kind) = target(&mut g, &p, now)?;
                Some((k, ep, kind))
            })
            .collect()
    };
    let core_slots: HashSet<u16> = {
        let node = shared.node();
        for (k, ep, kind) in want {
            if let Some(id) = node.peer_id(&k)
                && node.peer(id).is_some_and(|p| p.endpoint != Some(ep))
            {
                node.set_path(id, ep, kind);
            }
        }
        node.peers()
            .iter()
            .filter_map(|p| p.endpoint)
            .filter(is_relay)
            .map(|ep| ep.port())
            .collect()
    };
    shared.nat.lock().core_slots = core_slots;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_endpoints_are_recognised_and_never_real() {
        let ep = relay_endpoint(7);
        assert!(is_relay(&ep));
        assert_eq!(ep.port(), 7);
        assert!(!is_relay(&"198.18.0.1:3478".parse().unwrap()));
        assert!(!is_relay(&"[2001:db8::1]:7".parse().unwrap()));
    }

    #[test]
    fn channel_header_frames_in_place() {
        let mut buf = [0u8; 10];
        channel_header(&mut buf, 0x4001, 6).unwrap();
        buf[4..].copy_from_slice(b"\x04\0\0\0ab");
        assert_eq!(
            demux::channel_data(&buf),
            Some((0x4001, &b"\x04\0\0\0ab"[..]))
        );
        assert_eq!(demux::classify(&buf), Kind::ChannelData);
        assert!(needs_nat(&buf));
        assert!(!needs_nat(b"\x04\0\0\0abcdefgh"));
        assert!(needs_nat(b""));
    }

    #[test]
    fn candidates_round_trip_through_the_record() {
        let ours = vec![
            Candidate::new(CandidateKind::Host, "192.168.1.2:51820".parse().unwrap()),
            Candidate::new(
                CandidateKind::ServerReflexive,
                "198.18.1.1:51820".parse().unwrap(),
            ),
            Candidate::new(
                CandidateKind::PeerReflexive,
                "198.18.1.1:4000".parse().unwrap(),
            ),
            Candidate::new(CandidateKind::Relayed, "198.18.0.1:50000".parse().unwrap()),
        ];
        let mut r = evio_store::NodeRecord::new("n");
        r.candidates = to_records(&ours);
        assert_eq!(
            r.candidates.len(),
            3,
            "peer-reflexive candidates are not published"
        );
        // Endpoints of older records count as host candidates; duplicates and IPv6 are dropped.
        r.endpoints = vec![
            "192.168.1.2:51820".parse().unwrap(),
            "10.0.0.5:51820".parse().unwrap(),
            "[2001:db8::1]:1".parse().unwrap(),
        ];
        let back = from_record(&r);
        let want: Vec<Candidate> = ours
            .iter()
            .filter(|c| c.kind != CandidateKind::PeerReflexive)
            .copied()
            .chain([Candidate::new(
                CandidateKind::Host,
                "10.0.0.5:51820".parse().unwrap(),
            )])
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn turn_settings_need_a_readable_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let cfg = NatConfig {
            stun: vec!["127.0.0.1:3478".into()],
            turn: Some("127.0.0.1:3478".into()),
            turn_user: Some("u".into()),
            turn_password_file: Some(f.clone()),
        };
        let (stun, turn) = agent_settings(&cfg).unwrap();
        assert_eq!(stun, vec!["127.0.0.1:3478".parse().unwrap()]);
        let turn = turn.unwrap();
        assert_eq!(
            (turn.user.as_str(), turn.password.as_str()),
            ("u", "s3cret")
        );
        let missing = NatConfig {
            turn_password_file: Some(dir.path().join("nope")),
            ..cfg.clone()
        };
        assert!(agent_settings(&missing).is_err());
        let bad = NatConfig {
            stun: vec!["no-port".into()],
            ..cfg
        };
        assert!(agent_settings(&bad).is_err());
    }
}
