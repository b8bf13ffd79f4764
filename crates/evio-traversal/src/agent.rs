//! The NAT traversal agent: gathers local candidates, checks every candidate pair with every peer, picks
//! and keeps a path per peer. Sans-IO: driven by `now`, datagrams in, datagrams and timeouts out.
//!
//! See `docs/nat.md` for the design. In short:
//! - local bases: the tunnel's socket (host and server-reflexive candidates share it) and, with a TURN
//!   server, the relayed address;
//! - a pair is (local base, remote address); both sides check all pairs at once with STUN Binding requests
//!   carrying `USERNAME = hex(sender public key)` and a MESSAGE-INTEGRITY keyed by a secret only the two
//!   peers know ([`crate::check_key`]);
//! - checks carry the sender's Unix time ([`CHECK_TIME`], check format 2) under the MESSAGE-INTEGRITY: a
//!   check outside [`CHECK_WINDOW`] of our clock, or a copy of a recent one from another address (a small
//!   per-peer replay cache, [`REPLAY_CACHE`]), is dropped unanswered;
//! - a check received from an unknown address teaches a peer-reflexive candidate and triggers a check back
//!   (at most [`MAX_LEARNED_PAIRS`] per peer; a learned pair whose check fails is dropped);
//! - each side selects its best succeeded pair (direct before relay, LAN host before reflexive) and only
//!   moves to a strictly better class; the selected pair is checked every [`Timers::keepalive`], a failed
//!   selected pair makes the agent fall back to the next best and re-check everything at once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sha2::Sha256;

use crate::Transmit;
use crate::candidate::{Candidate, CandidateKind, is_private};
use crate::demux::{self, Kind};
use crate::stun::{Builder, Class, Message, TransactionId, attr, method};
use crate::turn::{TurnClient, TurnConfig, TurnEvent, TurnInput};
use crate::txn::{Pending, Schedule, Step, smooth};

/// Longest re-check interval of a failed pair while the peer has a direct path.
const RECHECK_IDLE_MAX: Duration = Duration::from_secs(60);

/// How long relayed pairs wait for direct pairs to be checked first when a peer is added, at least: on a
/// loaded network they wait twice the agent's smoothed round trip, up to [`MAX_RELAY_HEADSTART`] (see
/// [`Agent::relay_headstart`]).
pub const RELAY_HEADSTART: Duration = Duration::from_millis(200);

/// The longest wait of relayed pairs for the direct ones (twice the agent's round trip, when that is long).
pub const MAX_RELAY_HEADSTART: Duration = Duration::from_secs(2);

/// How long the last-resort pairs of a new peer wait, unless a path is up by then (then they are only
/// alternatives, on the slow schedule): about a check's give-up on an idle network. They are
/// - relay to relay (our relayed address to the peer's): every other relayed pair crosses the TURN
///   server once and works wherever this one would (the peer's relay accepts any address of ours it has
///   a permission for; our socket reaches the peer's relay as it reaches the server), while a
///   relay-to-relay check crosses it twice each way: checked with the others, at 100 nodes, they were
///   15% of what the server received while the fleet started (issue 12). Needed by a host allowed to
///   send UDP only to the TURN server's own port;
/// - a peer's private address that is not on our LAN (another site's, reachable only over a private WAN
///   between sites): checked 200 ms after the direct pairs, they were still a third of a node's checks
///   at a 100-node start, where direct paths took seconds.
pub const LAST_RESORT_HEADSTART: Duration = Duration::from_secs(3);

/// A pair that succeeded this recently is not re-checked when the peer's check arrives on it.
const TRIGGER_FRESH: Duration = Duration::from_secs(2);

/// The STUN attribute of a check's timestamp (check format 2): the sender's Unix time in milliseconds, 8
/// bytes big-endian, placed before MESSAGE-INTEGRITY so the check key covers it. Comprehension-optional
/// (0x8000-0xFFFF) and unassigned by IANA: other STUN stacks skip it. Agents of check format 1 sent no
/// timestamp; their checks are refused (peers must run the same version).
pub const CHECK_TIME: u16 = 0xEE10;

/// A check is accepted only if its timestamp is within this of our clock, either way: a captured check
/// replayed later is refused. Nodes' clocks must agree within it (NTP keeps them within milliseconds); it
/// is much longer than a check's retransmissions (3.1 s) plus a slow path, so clocks a few seconds apart
/// still work.
pub const CHECK_WINDOW: Duration = Duration::from_secs(30);

/// Checks remembered per peer (transaction id, timestamp, source) so that a copy of a check within
/// [`CHECK_WINDOW`] from another address is refused. An honest peer sends at most about 16 pairs x one
/// check per 2 s (every pair re-checked after a failure), ~240 in the window. When full, the oldest is
/// forgotten and no check stamped at or before it is accepted any more (a copy of it could not be told
/// apart).
pub const REPLAY_CACHE: usize = 256;

/// Peer-reflexive (learned) pairs per peer. A node has a few addresses of its own (a NAT mapping per
/// base, a new one after a rebinding); more at once are not all its own. A learned pair whose check fails
/// is dropped, so room comes back within a check's give-up time (3.1 s); until then a new address is
/// answered but not learned (no pair, no probe).
pub const MAX_LEARNED_PAIRS: usize = 8;

/// A node's identity: its X25519 (WireGuard) public key.
pub type PeerKey = [u8; 32];

/// Derives the key that authenticates connectivity checks between two nodes: HMAC-SHA256 keyed with
/// their X25519 shared secret (`DH(my_secret, peer_public)`, the same value on both sides) over a label,
/// both public keys in sorted order and the optional cluster pre-shared key. Only the two nodes can
/// compute it, so nobody else can fake a check and steer a peer's traffic to another address.
pub fn check_key(
    shared_secret: &[u8; 32],
    a: &PeerKey,
    b: &PeerKey,
    psk: Option<&[u8; 32]>,
) -> [u8; 32] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(shared_secret).expect("hmac takes any key length");
    m.update(b"evio-traversal check key v1");
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    m.update(lo);
    m.update(hi);
    if let Some(psk) = psk {
        m.update(psk);
    }
    m.finalize().into_bytes().into()
}

/// Timers of the agent.
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    /// Check interval of the selected pair (keeps NAT mappings open, detects failure).
    pub keepalive: Duration,
    /// Check interval of other succeeded pairs.
    pub recheck_ok: Duration,
    /// First re-check delay of a failed pair (doubles up to `recheck_max`).
    pub recheck_failed: Duration,
    pub recheck_max: Duration,
    /// Re-query interval of STUN servers.
    pub stun_refresh: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            keepalive: Duration::from_secs(4),
            recheck_ok: Duration::from_secs(60),
            recheck_failed: Duration::from_secs(2),
            recheck_max: Duration::from_secs(20),
            stun_refresh: Duration::from_secs(20),
        }
    }
}

/// Configuration of an [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Our public key (sent as the USERNAME of our checks).
    pub local_key: PeerKey,
    /// Host candidates: the socket's local addresses (with its port).
    pub host_candidates: Vec<SocketAddr>,
    /// STUN servers (RFC 5389 Binding) for server-reflexive candidates.
    pub stun_servers: Vec<SocketAddr>,
    /// A TURN server for a relayed candidate.
    pub turn: Option<TurnConfig>,
    pub timers: Timers,
    /// Wall-clock time (since the Unix epoch) at the `now` given to [`Agent::new`]: checks carry it (see
    /// [`CHECK_TIME`]); [`Agent::set_unix_time`] re-anchors it.
    pub unix_time: Duration,
}

/// Where a pair sends from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Base {
    /// The tunnel's socket, directly.
    Socket,
    /// Our TURN allocation (datagrams wrapped in ChannelData/Send towards the TURN server).
    Relay,
}

/// Direct or relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    Relay,
}

/// The path chosen for a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    pub kind: PathKind,
    pub base: Base,
    /// Where datagrams go (through our relay when `base` is [`Base::Relay`]).
    pub remote: SocketAddr,
    pub remote_kind: CandidateKind,
    /// Round-trip time of the last check.
    pub rtt: Option<Duration>,
}

/// Where to send a peer's datagram, for callers that frame it themselves (zero copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The UDP destination.
    pub dst: SocketAddr,
    /// `Some(n)`: prepend a ChannelData header for channel `n` (see [`crate::demux::encode_channel_data`]).
    pub channel: Option<u16>,
}

/// Agent output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The local candidates changed: publish them (NodeRecord in etcd).
    LocalCandidates(Vec<Candidate>),
    /// The path to `peer` changed (`None`: no working path).
    PathChanged { peer: PeerKey, path: Option<Path> },
    /// A check arrived from a node that is not one of our peers (not verified: we have no key for it).
    /// A caller with lazy peers adds it with [`Agent::set_peer`] if the cluster knows that key, so that
    /// the next check (a retransmission) is answered. Reported at most once a second per key, for at
    /// most [`UNKNOWN_SENDERS`] keys a second.
    CheckFromUnknown(PeerKey),
}

/// Unknown check senders reported per second at most (bounds what a flood of forged senders costs).
pub const UNKNOWN_SENDERS: usize = 64;

/// Where a tunnel datagram came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Straight to our socket from this address.
    Direct(SocketAddr),
    /// Through our TURN allocation, from this peer address.
    Relay(SocketAddr),
}

/// What a received datagram was.
#[derive(Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// STUN/TURN traffic consumed by the agent.
    Handled,
    /// A WireGuard datagram for the tunnel (unwrapped if it came through the relay); `peer` is the peer
    /// whose pair matches the source, if any (the tunnel still authenticates it).
    Tunnel {
        peer: Option<PeerKey>,
        from: Source,
        payload: &'a [u8],
    },
    /// Neither.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairState {
    Waiting,
    Succeeded,
    Failed,
}

/// One candidate pair, for status output.
#[derive(Clone, Debug)]
pub struct PairInfo {
    pub base: Base,
    pub remote: SocketAddr,
    pub remote_kind: CandidateKind,
    pub state: PairState,
    pub rtt: Option<Duration>,
}

#[derive(Debug)]
struct Pair {
    id: u64,
    base: Base,
    remote: SocketAddr,
    remote_kind: CandidateKind,
    state: PairState,
    inflight: Option<(TransactionId, Pending)>,
    next_check: Instant,
    fails: u32,
    rtt: Option<Duration>,
    /// Smoothed round trip of this pair's checks: their retransmission timeout ([`Schedule::check`]).
    srtt: Option<Duration>,
    /// When the last check of this pair succeeded.
    last_ok: Option<Instant>,
    /// Learned from traffic (peer-reflexive), not from the peer's published candidates.
    learned: bool,
    /// When it is first checked.
    order: Order,
}

/// When a new pair is first checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// At once: a direct pair (a public address, or a private one on our LAN).
    First,
    /// After the direct pairs ([`RELAY_HEADSTART`]), and only as an alternative once a direct path works:
    /// a pair through one relay.
    Later,
    /// Only if no path is up [`LAST_RESORT_HEADSTART`] after the peer was added, else as an alternative:
    /// relay to relay, or a private address not on our LAN.
    LastResort,
}

impl Pair {
    fn kind(&self) -> PathKind {
        if self.base == Base::Relay || self.remote_kind == CandidateKind::Relayed {
            PathKind::Relay
        } else {
            PathKind::Direct
        }
    }

    /// Preference class: LAN host 3, other direct 2, one relay 1, relay to relay 0.
    fn rank(&self) -> u8 {
        match (self.base, self.remote_kind) {
            (Base::Socket, CandidateKind::Host) => 3,
            (Base::Socket, CandidateKind::Relayed) => 1,
            (Base::Socket, _) => 2,
            (Base::Relay, CandidateKind::Relayed) => 0,
            (Base::Relay, _) => 1,
        }
    }

    fn path(&self) -> Path {
        Path {
            kind: self.kind(),
            base: self.base,
            remote: self.remote,
            remote_kind: self.remote_kind,
            rtt: self.rtt,
        }
    }
}

#[derive(Debug)]
struct Peer {
    key: [u8; 32],
    remote: Vec<Candidate>,
    pairs: Vec<Pair>,
    selected: Option<u64>,
    /// Checks received recently, to refuse copies.
    replay: ReplayCache,
    /// When its earliest pair is due, as indexed in `Agent::deadlines`.
    deadline: Option<Instant>,
    /// When it was added: relayed pairs wait for the direct ones from then, not from when they are learned.
    added: Instant,
}

impl Peer {
    /// When the earliest pair is due: its retransmission if a check is in flight, else its next check.
    fn next_due(&self) -> Option<Instant> {
        self.pairs
            .iter()
            .map(|p| p.inflight.as_ref().map_or(p.next_check, |(_, x)| x.next))
            .min()
    }
}

/// Recently accepted checks of one peer (see [`REPLAY_CACHE`]).
#[derive(Debug, Default)]
struct ReplayCache {
    /// (timestamp in ms, transaction id, base and address it came from).
    seen: Vec<(u64, TransactionId, Base, SocketAddr)>,
    /// Every forgotten check was stamped at or before this (ms): nothing as old is accepted.
    floor: u64,
}

impl ReplayCache {
    /// Accepts a check stamped `ts` (ms) at our time `now` (ms) if it is fresh and not a copy of a check
    /// seen from another address. A retransmission (same transaction id, same source) is accepted again.
    fn admit(
        &mut self,
        ts: u64,
        now: u64,
        tid: TransactionId,
        base: Base,
        from: SocketAddr,
    ) -> Result<(), &'static str> {
        let window = CHECK_WINDOW.as_millis() as u64;
        if ts.abs_diff(now) > window {
            return Err("timestamp outside the acceptance window");
        }
        if let Some(&(_, _, b, a)) = self.seen.iter().find(|e| e.1 == tid) {
            return if (b, a) == (base, from) {
                Ok(())
            } else {
                Err("copy of a check from another address")
            };
        }
        if ts <= self.floor {
            return Err("as old as a forgotten check");
        }
        // Checks older than the window cannot come back (refused above): forget them.
        let floor = &mut self.floor;
        self.seen.retain(|e| {
            let keep = e.0 + window >= now;
            if !keep {
                *floor = (*floor).max(e.0);
            }
            keep
        });
        if self.seen.len() >= REPLAY_CACHE
            && let Some((i, oldest)) = self.seen.iter().enumerate().min_by_key(|(_, e)| e.0)
        {
            self.floor = self.floor.max(oldest.0);
            self.seen.swap_remove(i);
            if ts <= self.floor {
                return Err("as old as a forgotten check");
            }
        }
        self.seen.push((ts, tid, base, from));
        Ok(())
    }
}

impl Peer {
    fn pair(&self, id: u64) -> Option<&Pair> {
        self.pairs.iter().find(|p| p.id == id)
    }
    fn selected_pair(&self) -> Option<&Pair> {
        self.selected.and_then(|id| self.pair(id))
    }
}

#[derive(Debug)]
struct StunServer {
    addr: SocketAddr,
    mapped: Option<SocketAddr>,
    inflight: Option<(TransactionId, Pending)>,
    next: Instant,
}

/// The agent. See the module docs.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    rng: StdRng,
    stun: Vec<StunServer>,
    turn: Option<TurnClient>,
    peers: HashMap<PeerKey, Peer>,
    /// (base, remote address) -> peer, for tunnel datagrams.
    index: HashMap<(Base, SocketAddr), PeerKey>,
    checks: HashMap<TransactionId, (PeerKey, u64)>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    published: Vec<Candidate>,
    next_pair: u64,
    /// How peers see us (from check responses), for status.
    reflexive: Option<SocketAddr>,
    path_changes: u64,
    /// Wall clock anchor: the Unix time at this instant.
    clock: (Instant, Duration),
    /// Unknown check senders reported in the current second, and when that second began.
    unknown: (Instant, Vec<PeerKey>),
    /// Every peer's deadline (`Peer::deadline`), earliest first: the next timeout is the first entry and a
    /// timeout visits only the peers due. (A pass over every pair of every peer after every datagram
    /// was the NAT agent's largest cost at 100 nodes.)
    deadlines: BTreeSet<(Instant, PeerKey)>,
    /// Peers whose pairs changed since their deadline was indexed; `settle` re-indexes them before any
    /// public method returns.
    dirty: HashSet<PeerKey>,
    /// Smoothed round trip of all checks: the first checks of new pairs are timed by it (on a loaded
    /// machine every path is slow).
    srtt: Option<Duration>,
    /// The networks of our host addresses ([`Agent::set_host_networks`]): a peer's private address in
    /// one of them is on our LAN.
    host_networks: Vec<IpNet>,
}

impl Agent {
    /// A new agent; it starts gathering at once. `seed` feeds transaction ids (use OS randomness in
    /// production, a fixed value in simulations).
    pub fn new(cfg: AgentConfig, seed: u64, now: Instant) -> Agent {
        let unix_time = cfg.unix_time;
        let mut rng = StdRng::seed_from_u64(seed);
        let turn = cfg
            .turn
            .clone()
            .map(|t| TurnClient::new(t, rng.random(), now));
        let stun = cfg
            .stun_servers
            .iter()
            .map(|a| StunServer {
                addr: *a,
                mapped: None,
                inflight: None,
                next: now,
            })
            .collect();
        let mut a = Agent {
            cfg,
            rng,
            stun,
            turn,
            peers: HashMap::new(),
            index: HashMap::new(),
            checks: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            published: Vec::new(),
            next_pair: 1,
            reflexive: None,
            path_changes: 0,
            clock: (now, unix_time),
            unknown: (now, Vec::new()),
            deadlines: BTreeSet::new(),
            dirty: HashSet::new(),
            srtt: None,
            host_networks: Vec::new(),
        };
        a.handle_timeout(now);
        a
    }

    /// True once every STUN server told us our mapping and the TURN allocation (if any) exists: the
    /// candidates a first registration should carry.
    pub fn gathered(&self) -> bool {
        self.stun.iter().all(|s| s.mapped.is_some())
            && self.turn.as_ref().is_none_or(|t| t.relayed().is_some())
    }

    /// Our candidates now: host, server-reflexive (STUN or TURN mapped), relayed.
    pub fn local_candidates(&self) -> Vec<Candidate> {
        let mut v: Vec<Candidate> = self
            .cfg
            .host_candidates
            .iter()
            .map(|a| Candidate::new(CandidateKind::Host, *a))
            .collect();
        let mut push = |c: Candidate| {
            if !v.iter().any(|x| x.addr == c.addr) {
                v.push(c);
            }
        };
        for s in &self.stun {
            if let Some(m) = s.mapped {
                push(Candidate::new(CandidateKind::ServerReflexive, m));
            }
        }
        if let Some(t) = &self.turn {
            if let Some(m) = t.mapped() {
                push(Candidate::new(CandidateKind::ServerReflexive, m));
            }
            if let Some(r) = t.relayed() {
                push(Candidate::new(CandidateKind::Relayed, r));
            }
        }
        v
    }

    /// Replaces the host candidates (local addresses changed).
    pub fn set_host_candidates(&mut self, hosts: Vec<SocketAddr>) {
        self.cfg.host_candidates = hosts;
        self.publish_if_changed();
    }

    /// The networks our host addresses are in (address and prefix length of each local interface
    /// address). A peer's private host address in one of them is checked at once; one elsewhere only
    /// when the peer shares our public address (behind the same NAT), else after the direct pairs.
    pub fn set_host_networks(&mut self, networks: Vec<IpNet>) {
        self.host_networks = networks;
    }

    /// Re-anchors the wall clock: the Unix time is `unix` at `now` (call it now and then, so a clock step
    /// on the host reaches the checks' timestamps).
    pub fn set_unix_time(&mut self, now: Instant, unix: Duration) {
        self.clock = (now, unix);
    }

    /// Our Unix time at `now`, in milliseconds.
    fn unix_ms(&self, now: Instant) -> u64 {
        let (at, unix) = self.clock;
        let t = if now >= at {
            unix + (now - at)
        } else {
            unix.saturating_sub(at - now)
        };
        t.as_millis() as u64
    }

    /// How many learned (peer-reflexive) pairs `peer` has.
    pub fn learned_pairs(&self, peer: &PeerKey) -> usize {
        self.peers
            .get(peer)
            .map_or(0, |p| p.pairs.iter().filter(|p| p.learned).count())
    }

    /// The peer whose pair through our relay goes to `remote`, if any: the addresses the agent itself
    /// checks through the relay (announced by the peer or learned from its authenticated checks).
    pub fn relay_peer(&self, remote: SocketAddr) -> Option<PeerKey> {
        self.index.get(&(Base::Relay, remote)).copied()
    }

    /// Our address as the last peer check response saw it.
    pub fn peer_reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    /// How many `PathChanged` events the agent emitted (a metric).
    pub fn path_changes(&self) -> u64 {
        self.path_changes
    }

    /// The TURN client, if configured (for status and tests).
    pub fn turn(&self) -> Option<&TurnClient> {
        self.turn.as_ref()
    }

    /// Keeps TURN permissions on our allocation for the addresses of `candidates` (of nodes we do not
    /// check: lazy peers at rest), so that their first check through our relay reaches us and can wake
    /// them ([`Event::CheckFromUnknown`]). Private host addresses are skipped, as for checked peers.
    /// Permissions are batched and refreshed by the TURN client; nothing is sent to the peers.
    pub fn permit(&mut self, candidates: &[Candidate], now: Instant) {
        let Some(t) = &mut self.turn else { return };
        let public = candidates
            .iter()
            .filter(|c| !(c.kind == CandidateKind::Host && is_private(c.addr.ip())))
            .map(|c| c.addr.ip());
        t.want_permissions(public, now);
    }

    /// Adds a peer or updates its candidates (from its NodeRecord). `key` from [`check_key`].
    pub fn set_peer(
        &mut self,
        peer: PeerKey,
        key: [u8; 32],
        candidates: Vec<Candidate>,
        now: Instant,
    ) {
        let entry = self.peers.entry(peer).or_insert_with(|| Peer {
            key,
            remote: Vec::new(),
            pairs: Vec::new(),
            selected: None,
            replay: ReplayCache::default(),
            deadline: None,
            added: now,
        });
        entry.key = key;
        entry.remote = candidates
            .into_iter()
            .filter(|c| c.kind != CandidateKind::PeerReflexive)
            .collect();
        // Drop pairs whose remote address is no longer announced (learned peer-reflexive pairs stay while
        // they work).
        let remote = entry.remote.clone();
        let kept = |p: &Pair| {
            remote.iter().any(|c| c.addr == p.remote) || (p.learned && p.state != PairState::Failed)
        };
        for p in &entry.pairs {
            if !kept(p)
                && let Some((tid, _)) = &p.inflight
            {
                self.checks.remove(tid);
            }
        }
        entry.pairs.retain(kept);
        for c in remote {
            self.add_pairs_for(peer, c, now);
        }
        self.promote_lan_pairs(peer, now);
        self.reselect(peer, now);
        self.reindex();
        self.dirty.insert(peer);
        self.settle();
    }

    /// Tells the agent that an authenticated tunnel datagram of `peer` arrived from `from`: call it after
    /// the tunnel decrypted the datagram, never before. An address the agent did not know becomes a
    /// peer-reflexive pair, checked at once, and the selected pair is probed: a NAT rebinding on the peer's
    /// side heals as soon as the peer sends anything, not only at its next keepalive. Known addresses cost
    /// one hash lookup.
    pub fn tunnel_from(&mut self, peer: &PeerKey, from: Source, now: Instant) {
        let (base, addr) = match from {
            Source::Direct(a) => (Base::Socket, a),
            Source::Relay(a) => (Base::Relay, a),
        };
        if self.index.get(&(base, addr)) == Some(peer) || !self.peers.contains_key(peer) {
            return;
        }
        if self.find_pair(peer, base, addr).is_none() {
            let _ = self.learn(*peer, base, addr, now);
        }
        self.peer_timers(*peer, now);
        self.settle();
    }

    /// Adds a pair for an address of `peer` seen on `base`, and probes the selected pair. `None`: the peer
    /// has [`MAX_LEARNED_PAIRS`] already.
    fn learn(&mut self, peer: PeerKey, base: Base, from: SocketAddr, now: Instant) -> Option<u64> {
        if self.learned_pairs(&peer) >= MAX_LEARNED_PAIRS {
            tracing::debug!(%from, ?base, "peer-reflexive candidate not learned: too many already");
            return None;
        }
        self.dirty.insert(peer);
        let kind = self.classify_remote(&peer, from);
        tracing::debug!(%from, ?base, ?kind, "peer-reflexive candidate");
        // Checks through our relay need only a permission (Send indications); a channel is bound when
        // the pair is selected (`reselect`), not for every address a peer's checks came from.
        if base == Base::Relay
            && let Some(t) = &mut self.turn
        {
            t.want_permission(from.ip(), now);
        }
        let id = self.add_pair(peer, base, from, kind, now);
        if let Some(p) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.pairs.iter_mut().find(|p| p.id == id))
        {
            // An address the peer just used: checked at once, relayed or not.
            p.learned = true;
            p.next_check = now;
        }
        self.reindex();
        // A new address of the peer on this base: maybe its NAT rebound. Probe the selected pair at once
        // so a dead one is noticed quickly (see `fail_over_early`).
        if let Some(p) = self.peers.get_mut(&peer)
            && let Some(sel) = p.selected
            && let Some(p) = p
                .pairs
                .iter_mut()
                .find(|p| p.id == sel && p.inflight.is_none())
        {
            p.next_check = now;
        }
        Some(id)
    }

    /// Forgets a peer.
    pub fn remove_peer(&mut self, peer: &PeerKey) {
        if let Some(d) = self.peers.remove(peer).and_then(|p| p.deadline) {
            self.deadlines.remove(&(d, *peer));
        }
        self.dirty.remove(peer);
        self.checks.retain(|_, (p, _)| p != peer);
        self.reindex();
    }

    /// The selected path to `peer`.
    pub fn path(&self, peer: &PeerKey) -> Option<Path> {
        self.peers.get(peer)?.selected_pair().map(Pair::path)
    }

    /// Every pair of `peer` with its state.
    pub fn pairs(&self, peer: &PeerKey) -> Vec<PairInfo> {
        self.peers.get(peer).map_or_else(Vec::new, |p| {
            p.pairs
                .iter()
                .map(|x| PairInfo {
                    base: x.base,
                    remote: x.remote,
                    remote_kind: x.remote_kind,
                    state: x.state,
                    rtt: x.rtt,
                })
                .collect()
        })
    }

    /// Where datagrams for `peer` go now (`None`: no path yet, or relayed without a bound channel: then use
    /// [`Agent::wrap`]).
    pub fn route(&self, peer: &PeerKey) -> Option<Route> {
        let p = self.peers.get(peer)?.selected_pair()?;
        match p.base {
            Base::Socket => Some(Route {
                dst: p.remote,
                channel: None,
            }),
            Base::Relay => {
                let t = self.turn.as_ref()?;
                Some(Route {
                    dst: t.server(),
                    channel: Some(t.channel(p.remote)?),
                })
            }
        }
    }

    /// Frames `payload` (a WireGuard datagram) for the selected path to `peer`.
    pub fn wrap(&mut self, peer: &PeerKey, payload: &[u8]) -> Option<Transmit> {
        let p = self.peers.get(peer)?.selected_pair()?;
        let (base, remote) = (p.base, p.remote);
        self.wrap_via(base, remote, payload)
    }

    /// Frames `payload` for `remote` through our TURN allocation (ChannelData once a channel is bound, a
    /// Send indication before); `None` without an allocation or permission.
    pub fn turn_wrap(&mut self, remote: SocketAddr, payload: &[u8]) -> Option<Transmit> {
        self.wrap_via(Base::Relay, remote, payload)
    }

    fn wrap_via(&mut self, base: Base, remote: SocketAddr, payload: &[u8]) -> Option<Transmit> {
        match base {
            Base::Socket => Some(Transmit {
                dst: remote,
                payload: payload.to_vec(),
            }),
            Base::Relay => self.turn.as_mut()?.wrap(remote, payload),
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.out.pop_front() {
            return Some(t);
        }
        self.turn.as_mut()?.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Agent::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut min = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        for s in &self.stun {
            min(s.inflight.as_ref().map_or(s.next, |(_, p)| p.next));
        }
        if let Some(x) = self.turn.as_ref().and_then(TurnClient::poll_timeout) {
            min(x);
        }
        debug_assert!(self.dirty.is_empty(), "a public method returned unsettled");
        debug_assert!(
            self.peers.iter().all(|(k, p)| p.deadline == p.next_due()
                && p.deadline.is_none_or(|d| self.deadlines.contains(&(d, *k)))),
            "a peer's deadline is not indexed"
        );
        if let Some((d, _)) = self.deadlines.first() {
            min(*d);
        }
        t
    }

    /// Re-indexes the deadlines of the peers marked dirty.
    fn settle(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            let Some(peer) = self.peers.get_mut(&key) else {
                continue;
            };
            let due = peer.next_due();
            if peer.deadline == due {
                continue;
            }
            if let Some(old) = peer.deadline {
                self.deadlines.remove(&(old, key));
            }
            if let Some(d) = due {
                self.deadlines.insert((d, key));
            }
            peer.deadline = due;
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // STUN servers.
        for i in 0..self.stun.len() {
            let s = &mut self.stun[i];
            match &mut s.inflight {
                Some((_, p)) => match p.on_timer(now) {
                    Step::Wait => {}
                    Step::Resend => self.out.push_back(Transmit {
                        dst: p.dst,
                        payload: p.bytes.clone(),
                    }),
                    Step::GiveUp => {
                        tracing::debug!(server = %s.addr, "STUN server does not answer");
                        s.inflight = None;
                        s.next = now + self.cfg.timers.stun_refresh;
                    }
                },
                None if now >= s.next => {
                    let tid = TransactionId(self.rng.random());
                    let bytes = Builder::new(Class::Request, method::BINDING, tid)
                        .fingerprint()
                        .expect("a Binding request is 28 bytes");
                    let s = &mut self.stun[i];
                    self.out.push_back(Transmit {
                        dst: s.addr,
                        payload: bytes.clone(),
                    });
                    s.inflight = Some((tid, Pending::new(bytes, s.addr, now, Schedule::SERVER)));
                }
                None => {}
            }
        }
        // TURN.
        if let Some(t) = &mut self.turn {
            t.handle_timeout(now);
        }
        self.drain_turn(now);
        // Checks: the peers due.
        let due: Vec<PeerKey> = self
            .deadlines
            .range(..=(now, [u8::MAX; 32]))
            .map(|(_, k)| *k)
            .collect();
        for key in due {
            self.peer_timers(key, now);
        }
        self.settle();
    }

    fn peer_timers(&mut self, key: PeerKey, now: Instant) {
        self.dirty.insert(key);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let mut resend = Vec::new();
        let mut start = Vec::new();
        let mut failed = Vec::new();
        let mut suspect = false;
        let selected = peer.selected;
        for p in &mut peer.pairs {
            match &mut p.inflight {
                Some((_, pend)) => match pend.on_timer(now) {
                    Step::Wait => {}
                    Step::Resend => {
                        // The selected pair has not answered 3 sends (300 ms on a quick path, 3 x its
                        // timeout on a slow one): suspect it.
                        suspect |= Some(p.id) == selected && pend.sends() == 3;
                        resend.push((p.base, p.remote, pend.bytes.clone()))
                    }
                    Step::GiveUp => failed.push(p.id),
                },
                None if now >= p.next_check => start.push(p.id),
                None => {}
            }
        }
        for (base, remote, bytes) in resend {
            self.send_check_bytes(base, remote, bytes);
        }
        let mut reselect = false;
        for id in failed {
            reselect |= self.on_check_failed(key, id, now);
        }
        for id in start {
            self.start_check(key, id, now);
        }
        if suspect && !reselect {
            // Re-check every other pair now, so a live alternative is known fresh within one RTT.
            if let Some(peer) = self.peers.get_mut(&key) {
                for p in peer.pairs.iter_mut().filter(|p| p.inflight.is_none()) {
                    p.next_check = now;
                }
            }
            self.fail_over_early(key, now);
            self.peer_timers(key, now);
        }
        if reselect {
            self.reselect(key, now);
        }
    }

    /// The selected pair stopped answering: if another pair of at least the same class answered within
    /// the last keepalive interval, move to it now rather than after the full give-up (3.1 s). This is
    /// what heals a NAT rebinding quickly: the peer's checks from its new mapping already made that pair.
    fn fail_over_early(&mut self, key: PeerKey, now: Instant) {
        self.dirty.insert(key);
        let fresh = self.cfg.timers.keepalive;
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(cur) = peer.selected_pair() else {
            return;
        };
        let (cur_id, cur_rank) = (cur.id, cur.rank());
        let alt = peer
            .pairs
            .iter()
            .filter(|p| p.id != cur_id && p.state == PairState::Succeeded && p.rank() >= cur_rank)
            .filter(|p| {
                p.last_ok
                    .is_some_and(|t| now.saturating_duration_since(t) < fresh)
            })
            .max_by(|a, b| a.rank().cmp(&b.rank()).then(a.last_ok.cmp(&b.last_ok)))
            .map(|p| p.id);
        let Some(alt) = alt else {
            return;
        };
        peer.selected = Some(alt);
        let keepalive = self.cfg.timers.keepalive;
        if let Some(p) = peer
            .pairs
            .iter_mut()
            .find(|p| p.id == alt && p.inflight.is_none())
        {
            p.next_check = p.next_check.min(now + keepalive);
        }
        let path = peer.pair(alt).map(Pair::path);
        tracing::info!(peer = %hex(&key[..4]), ?path, "selected path does not answer, moved to a fresh one");
        self.path_selected(key, path, now);
    }

    /// Marks a pair failed; returns true if it was the selected one.
    fn on_check_failed(&mut self, key: PeerKey, id: u64, now: Instant) -> bool {
        self.dirty.insert(key);
        let t = self.cfg.timers;
        let Some(peer) = self.peers.get_mut(&key) else {
            return false;
        };
        let has_direct = peer
            .selected_pair()
            .is_some_and(|p| p.kind() == PathKind::Direct);
        let was_selected = peer.selected == Some(id);
        let Some(p) = peer.pairs.iter_mut().find(|p| p.id == id) else {
            return false;
        };
        if let Some((tid, _)) = p.inflight.take() {
            self.checks.remove(&tid);
        }
        p.state = PairState::Failed;
        p.fails += 1;
        let backoff = t.recheck_failed * 2u32.saturating_pow(p.fails.min(8) - 1);
        p.next_check = now
            + if has_direct && !was_selected {
                // A direct path works: failed alternatives need not be probed often.
                t.recheck_ok.max(backoff).min(RECHECK_IDLE_MAX)
            } else {
                backoff.min(t.recheck_max)
            };
        let relay_base = p.base == Base::Relay;
        let learned = p.learned;
        if was_selected {
            tracing::info!(peer = %hex(&key[..4]), remote = %p.remote, "path failed, re-checking every pair");
            peer.selected = None;
            let keepalive = t.keepalive;
            for q in &mut peer.pairs {
                if q.inflight.is_none() {
                    q.next_check = now;
                }
                // Whatever made this path fail may have killed the others too: only pairs confirmed
                // within the last keepalive interval stay selectable; the rest must answer again first.
                if q.state == PairState::Succeeded
                    && q.last_ok
                        .is_none_or(|ok| now.saturating_duration_since(ok) >= keepalive)
                {
                    q.state = PairState::Waiting;
                }
            }
            if relay_base && let Some(turn) = &mut self.turn {
                // Maybe the allocation itself is gone (server restart, our mapping changed): ask.
                turn.probe(now);
            }
        }
        if learned {
            // A learned address that does not answer is forgotten (it comes back if the peer's checks
            // come from it again): learned pairs never pile up.
            peer.pairs.retain(|q| q.id != id);
            self.reindex();
        }
        was_selected
    }

    fn start_check(&mut self, key: PeerKey, id: u64, now: Instant) {
        self.dirty.insert(key);
        let local = self.cfg.local_key;
        let unix_ms = self.unix_ms(now);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let check_key = peer.key;
        let Some(p) = peer.pairs.iter_mut().find(|p| p.id == id) else {
            return;
        };
        if p.base == Base::Relay && !self.turn.as_ref().is_some_and(|t| t.can_send(p.remote)) {
            // The relay cannot reach this address yet (permission/channel pending): try a bit later.
            p.next_check = now + Duration::from_millis(200);
            return;
        }
        let tid = TransactionId(self.rng.random());
        let bytes = encode_check(tid, &local, unix_ms, &check_key);
        let schedule = Schedule::check(p.srtt.or(self.srtt));
        p.inflight = Some((tid, Pending::new(bytes.clone(), p.remote, now, schedule)));
        let (base, remote) = (p.base, p.remote);
        self.checks.insert(tid, (key, id));
        self.send_check_bytes(base, remote, bytes);
    }

    fn send_check_bytes(&mut self, base: Base, remote: SocketAddr, bytes: Vec<u8>) {
        match base {
            Base::Socket => self.out.push_back(Transmit {
                dst: remote,
                payload: bytes,
            }),
            Base::Relay => {
                if let Some(t) = self.wrap_via(Base::Relay, remote, &bytes) {
                    self.out.push_back(t);
                }
            }
        }
    }

    /// Handles a datagram received on the shared socket from `from`.
    pub fn handle_input<'a>(&mut self, from: SocketAddr, buf: &'a [u8], now: Instant) -> Input<'a> {
        let r = self.input(from, buf, now);
        self.settle();
        r
    }

    fn input<'a>(&mut self, from: SocketAddr, buf: &'a [u8], now: Instant) -> Input<'a> {
        let kind = demux::classify(buf);
        match kind {
            Kind::WireGuard => {
                let peer = self.index.get(&(Base::Socket, from)).copied();
                return Input::Tunnel {
                    peer,
                    from: Source::Direct(from),
                    payload: buf,
                };
            }
            Kind::Unknown => return Input::Unknown,
            Kind::ChannelData | Kind::Stun => {}
        }
        if let Some(t) = &mut self.turn {
            match t.handle_input(from, buf, now) {
                TurnInput::Data { peer, payload } => {
                    let r = self.handle_relayed(peer, payload, now);
                    self.drain_turn(now);
                    return r;
                }
                TurnInput::Handled => {
                    self.drain_turn(now);
                    return Input::Handled;
                }
                TurnInput::NotForMe => {}
            }
        }
        if kind == Kind::Stun
            && let Ok(msg) = Message::decode(buf)
        {
            self.handle_stun(Base::Socket, from, &msg, now);
            return Input::Handled;
        }
        Input::Unknown
    }

    fn handle_relayed<'a>(
        &mut self,
        peer_addr: SocketAddr,
        payload: &'a [u8],
        now: Instant,
    ) -> Input<'a> {
        match demux::classify(payload) {
            Kind::WireGuard => {
                let peer = self.index.get(&(Base::Relay, peer_addr)).copied();
                Input::Tunnel {
                    peer,
                    from: Source::Relay(peer_addr),
                    payload,
                }
            }
            Kind::Stun => {
                if let Ok(msg) = Message::decode(payload) {
                    self.handle_stun(Base::Relay, peer_addr, &msg, now);
                }
                Input::Handled
            }
            _ => Input::Unknown,
        }
    }

    fn handle_stun(&mut self, base: Base, from: SocketAddr, msg: &Message<'_>, now: Instant) {
        match msg.class {
            Class::Request if msg.method == method::BINDING => {
                self.on_check_request(base, from, msg, now)
            }
            Class::Success | Class::Error => {
                // A STUN server's answer?
                if base == Base::Socket
                    && let Some(s) = self
                        .stun
                        .iter_mut()
                        .find(|s| s.inflight.as_ref().is_some_and(|(t, _)| *t == msg.tid))
                {
                    if let Some((_, pend)) = s.inflight.take() {
                        // The server's round trip says how loaded the way out is, before any check.
                        let rtt = now.saturating_duration_since(pend.first_sent);
                        self.srtt = Some(smooth(self.srtt, rtt));
                    }
                    s.next = now + self.cfg.timers.stun_refresh;
                    if msg.class == Class::Success
                        && let Some(m) = msg
                            .xor_addr(attr::XOR_MAPPED_ADDRESS)
                            .or_else(|| msg.addr(attr::MAPPED_ADDRESS))
                    {
                        if s.mapped != Some(m) {
                            tracing::info!(server = %s.addr, mapped = %m, "server-reflexive candidate");
                        }
                        s.mapped = Some(m);
                        self.publish_if_changed();
                    }
                    return;
                }
                self.on_check_response(base, from, msg, now);
            }
            _ => {}
        }
    }

    fn on_check_request(&mut self, base: Base, from: SocketAddr, msg: &Message<'_>, now: Instant) {
        let Some(sender) = msg.text(attr::USERNAME).and_then(unhex) else {
            return;
        };
        let unix_ms = self.unix_ms(now);
        if !self.peers.contains_key(&sender) {
            tracing::debug!(%from, "check from an unknown node ignored");
            if now.saturating_duration_since(self.unknown.0) >= Duration::from_secs(1) {
                self.unknown = (now, Vec::new());
            }
            if self.unknown.1.len() < UNKNOWN_SENDERS && !self.unknown.1.contains(&sender) {
                self.unknown.1.push(sender);
                self.events.push_back(Event::CheckFromUnknown(sender));
            }
            return;
        }
        self.dirty.insert(sender);
        let Some(peer) = self.peers.get_mut(&sender) else {
            return;
        };
        let key = peer.key;
        if !msg.verify(&key) {
            tracing::debug!(%from, "check with a bad MESSAGE-INTEGRITY ignored");
            return;
        }
        // Freshness (after the integrity check: only the peer can fill its replay cache).
        let Some(ts) = msg
            .attr(CHECK_TIME)
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes)
        else {
            tracing::debug!(%from, "check without a timestamp ignored (an agent of check format 1?)");
            return;
        };
        if let Err(why) = peer.replay.admit(ts, unix_ms, msg.tid, base, from) {
            tracing::debug!(%from, ?base, why, "check refused");
            return;
        }
        let resp = Builder::new(Class::Success, method::BINDING, msg.tid)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, from)
            .integrity(&key)
            .fingerprint()
            .expect("a check response is at most 64 bytes");
        self.send_check_bytes(base, from, resp);
        // Learn the address and check it back (triggered check).
        let Some(id) = self
            .find_pair(&sender, base, from)
            .or_else(|| self.learn(sender, base, from, now))
        else {
            return;
        };
        let (keepalive, recheck) = (self.cfg.timers.keepalive, self.cfg.timers.recheck_ok);
        let Some(peer) = self.peers.get_mut(&sender) else {
            return;
        };
        let selected = peer.selected == Some(id);
        let working = peer
            .selected_pair()
            .filter(|p| p.state == PairState::Succeeded)
            .map(Pair::rank);
        let Some(p) = peer.pairs.iter_mut().find(|p| p.id == id) else {
            return;
        };
        // A relayed pair no better than the path we use (direct, or another through one relay): answered
        // (above), not checked back. The peer checks it because its own check of our path has not come
        // back yet, and finds its path through our answers; a check back would cross the TURN server
        // twice more for a path we would not move to. At a 100-node start these checks back were most of
        // what a host behind an easy NAT sent through the relay (issue 12).
        if p.kind() == PathKind::Relay && !selected && working.is_some_and(|r| r >= p.rank()) {
            return;
        }
        // A working pair the peer checks needs no check of ours until the next interval: its check and
        // our answer keep both NATs' mappings open and show the pair alive, so one exchange per interval
        // does the work of two (idle traffic per peer halves). If the peer stops checking, ours resumes
        // after the interval and finds out.
        let interval = if selected { keepalive } else { recheck };
        if p.state == PairState::Succeeded
            && p.inflight.is_none()
            && p.last_ok
                .is_some_and(|t| now.saturating_duration_since(t) < 2 * interval)
        {
            p.last_ok = Some(now);
            p.next_check = p.next_check.max(now + interval);
            return;
        }
        // Triggered check, unless this pair answered us recently: two peers must not keep triggering each
        // other's checks (each success is fresh when the other side's request arrives, which ends it).
        let fresh = p
            .last_ok
            .is_some_and(|t| now.saturating_duration_since(t) < TRIGGER_FRESH);
        if p.state != PairState::Succeeded || !fresh {
            match &mut p.inflight {
                None => p.next_check = now,
                // Our own check of this pair is under way, maybe lost before the path opened (the peer's
                // permission on its relay, its NAT's mapping): the peer's check just came through it, so
                // resend ours now rather than at its backed-off time (RFC 8445 7.3.1.4). At 100 nodes
                // this was the tail of the relayed paths: seconds of retransmission backoff.
                // Only for a pair not working yet whose check went unanswered at least twice (a first
                // send merely crossing the peer's check is not repeated; a working pair's keepalives
                // may cross the peer's).
                Some((_, pend)) if p.state != PairState::Succeeded && pend.sends() >= 2 => {
                    pend.next = pend.next.min(now)
                }
                Some(_) => {}
            }
            self.peer_timers(sender, now);
        }
    }

    fn on_check_response(&mut self, base: Base, from: SocketAddr, msg: &Message<'_>, now: Instant) {
        let Some(&(key, id)) = self.checks.get(&msg.tid) else {
            return;
        };
        self.dirty.insert(key);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if !msg.verify(&peer.key) {
            tracing::debug!(%from, "check response with a bad MESSAGE-INTEGRITY ignored");
            return;
        }
        let Some(p) = peer.pairs.iter_mut().find(|p| p.id == id) else {
            return;
        };
        // Only a response over the same base from the address we sent to counts (symmetric paths).
        if p.base != base || p.remote != from {
            return;
        }
        self.checks.remove(&msg.tid);
        if msg.class == Class::Error {
            return;
        }
        let Some((_, pend)) = p.inflight.take() else {
            return;
        };
        // From the first send: an answer to a resend counts as slow (Karn's ambiguity resolved
        // towards longer timeouts, which is what a loaded path needs).
        let rtt = now.saturating_duration_since(pend.first_sent);
        p.rtt = Some(rtt);
        p.srtt = Some(smooth(p.srtt, rtt));
        self.srtt = Some(smooth(self.srtt, rtt));
        p.state = PairState::Succeeded;
        p.fails = 0;
        p.last_ok = Some(now);
        let selected = peer.selected == Some(id);
        p.next_check = now
            + if selected {
                self.cfg.timers.keepalive
            } else {
                self.cfg.timers.recheck_ok
            };
        if base == Base::Socket
            && let Some(m) = msg.xor_addr(attr::XOR_MAPPED_ADDRESS)
        {
            self.reflexive = Some(m);
        }
        self.reselect(key, now);
        if self.selected_suspect(&key) {
            self.fail_over_early(key, now);
        }
    }

    /// Chooses the best succeeded pair; moves only to a strictly better class (no flapping).
    fn reselect(&mut self, key: PeerKey, now: Instant) {
        self.dirty.insert(key);
        let keepalive = self.cfg.timers.keepalive;
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let current = peer
            .selected_pair()
            .filter(|p| p.state == PairState::Succeeded);
        let best = peer
            .pairs
            .iter()
            .filter(|p| p.state == PairState::Succeeded)
            .max_by(|a, b| a.rank().cmp(&b.rank()).then(b.rtt.cmp(&a.rtt)));
        let new = match (current, best) {
            (Some(c), Some(b)) if b.rank() > c.rank() => Some(b.id),
            (Some(c), _) => Some(c.id),
            (None, Some(b)) => Some(b.id),
            (None, None) => None,
        };
        if new == peer.selected {
            return;
        }
        let old = peer.selected;
        peer.selected = new;
        let path = new.and_then(|id| peer.pair(id)).map(Pair::path);
        // Keepalives on the new selected pair; the old one falls back to the slower schedule. Pairs not
        // checked yet that are alternatives wait for the slow schedule (or are checked at once if the
        // path fails): last-resort pairs as soon as any path works, relayed pairs once the path is no
        // worse than they are (a direct one, or another through one relay). Those whose first checks
        // are still unanswered stop their resends too (on a loaded relay a check is resent for up to
        // 15 s; a late answer is ignored).
        let recheck = self.cfg.timers.recheck_ok;
        let new_rank = new.and_then(|id| peer.pair(id)).map(Pair::rank);
        let mut cancelled = Vec::new();
        for p in &mut peer.pairs {
            let no_better = p.kind() == PathKind::Relay
                && Some(p.id) != new
                && new_rank.is_some_and(|r| r >= p.rank());
            if no_better
                && p.state == PairState::Waiting
                && let Some((tid, _)) = p.inflight.take()
            {
                cancelled.push(tid);
            }
            let spare =
                p.order != Order::First && p.state == PairState::Waiting && p.inflight.is_none();
            if Some(p.id) == new && p.inflight.is_none() {
                p.next_check = p.next_check.min(now + keepalive);
            } else if spare && (no_better || (new.is_some() && p.order == Order::LastResort)) {
                p.next_check = p.next_check.max(now + recheck);
            }
        }
        for tid in cancelled {
            self.checks.remove(&tid);
        }
        tracing::info!(peer = %hex(&key[..4]), ?path, had = old.is_some(), "path changed");
        self.path_selected(key, path, now);
    }

    /// A new selected path of `key` (by reselection or early fail-over): counted and reported; a path
    /// through our relay gets a channel (cheaper framing than Send indications).
    fn path_selected(&mut self, key: PeerKey, path: Option<Path>, now: Instant) {
        if let Some(p) = path
            && p.base == Base::Relay
            && let Some(t) = &mut self.turn
        {
            t.want_channel(p.remote, now);
        }
        self.path_changes += 1;
        self.events
            .push_back(Event::PathChanged { peer: key, path });
    }

    /// True if the selected pair of `peer` has an unanswered check sent 3 times or more.
    fn selected_suspect(&self, key: &PeerKey) -> bool {
        self.peers
            .get(key)
            .and_then(Peer::selected_pair)
            .and_then(|p| p.inflight.as_ref())
            .is_some_and(|(_, pend)| pend.sends() >= 3)
    }

    fn find_pair(&self, key: &PeerKey, base: Base, remote: SocketAddr) -> Option<u64> {
        self.peers
            .get(key)?
            .pairs
            .iter()
            .find(|p| p.base == base && p.remote == remote)
            .map(|p| p.id)
    }

    /// The kind of an address a peer's check came from: a known candidate's kind, else peer-reflexive;
    /// an unknown address on a relay (the peer's allocation moved) counts as relayed.
    fn classify_remote(&self, key: &PeerKey, addr: SocketAddr) -> CandidateKind {
        let Some(peer) = self.peers.get(key) else {
            return CandidateKind::PeerReflexive;
        };
        if let Some(c) = peer.remote.iter().find(|c| c.addr == addr) {
            return c.kind;
        }
        let relay_ips: Vec<IpAddr> = peer
            .remote
            .iter()
            .filter(|c| c.kind == CandidateKind::Relayed)
            .map(|c| c.addr.ip())
            .chain(self.cfg.turn.iter().map(|t| t.server.ip()))
            .collect();
        if relay_ips.contains(&addr.ip()) {
            CandidateKind::Relayed
        } else {
            CandidateKind::PeerReflexive
        }
    }

    fn add_pairs_for(&mut self, key: PeerKey, c: Candidate, now: Instant) {
        if self.cfg.host_candidates.contains(&c.addr) {
            return;
        }
        if self.find_pair(&key, Base::Socket, c.addr).is_none() {
            self.add_pair(key, Base::Socket, c.addr, c.kind, now);
        }
        // Through our relay: not to a private host address, and only to IPv4 (the allocation's family).
        let relay_ok =
            !(c.kind == CandidateKind::Host && is_private(c.addr.ip())) && c.addr.is_ipv4();
        let missing = self.find_pair(&key, Base::Relay, c.addr).is_none();
        if relay_ok && let Some(t) = &mut self.turn {
            // A permission is enough to check the pair (Send indications); a channel is bound only once
            // a relayed path is selected and carries data (`reselect`). Binding one per candidate of
            // every peer was N x 2 ChannelBinds per node at start, the bulk of the TURN server's load
            // at 100 nodes (issue 12).
            t.want_permission(c.addr.ip(), now);
            if t.relayed().is_some() && missing {
                self.add_pair(key, Base::Relay, c.addr, c.kind, now);
            }
        }
    }

    /// Our public addresses (of our server-reflexive candidates).
    fn public_addresses(&self) -> Vec<IpAddr> {
        self.local_candidates()
            .iter()
            .filter(|c| c.kind == CandidateKind::ServerReflexive)
            .map(|c| c.addr.ip())
            .collect()
    }

    /// How long a new peer's relayed pairs wait for its direct pairs: twice our smoothed round trip (the
    /// STUN server's answers and our checks), between [`RELAY_HEADSTART`] and [`MAX_RELAY_HEADSTART`].
    /// On a quiet network that is 200 ms; on a loaded one a direct check takes seconds to come back, and
    /// relayed checks sent 200 ms after it were sent for nearly every peer, the direct ones included: at
    /// a 100-node start they were most of what reached the TURN server, whose queue then delayed its
    /// answers by 1.5-6 s (the relayed peers' own allocations among them; issue 12).
    fn relay_headstart(&self) -> Duration {
        self.srtt
            .map_or(RELAY_HEADSTART, |s| s * 2)
            .clamp(RELAY_HEADSTART, MAX_RELAY_HEADSTART)
    }

    /// The peer's private addresses waiting as a last resort that its candidates now show on our LAN (its
    /// public address, published after its private one, is ours) are checked now.
    fn promote_lan_pairs(&mut self, key: PeerKey, now: Instant) {
        let ours = self.public_addresses();
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        for p in &mut peer.pairs {
            if p.order == Order::LastResort
                && p.base == Base::Socket
                && p.remote_kind == CandidateKind::Host
                && p.state == PairState::Waiting
                && p.inflight.is_none()
                && on_our_lan(&self.host_networks, &ours, &peer.remote, p.remote.ip())
            {
                p.order = Order::First;
                p.next_check = now;
                self.dirty.insert(key);
            }
        }
    }

    fn add_pair(
        &mut self,
        key: PeerKey,
        base: Base,
        remote: SocketAddr,
        kind: CandidateKind,
        now: Instant,
    ) -> u64 {
        let id = self.next_pair;
        self.next_pair += 1;
        let recheck = self.cfg.timers.recheck_ok;
        self.dirty.insert(key);
        let ours = self.public_addresses();
        let headstart = self.relay_headstart();
        if let Some(peer) = self.peers.get_mut(&key) {
            let relayed = base == Base::Relay || kind == CandidateKind::Relayed;
            let elsewhere = base == Base::Socket
                && kind == CandidateKind::Host
                && is_private(remote.ip())
                && !on_our_lan(&self.host_networks, &ours, &peer.remote, remote.ip());
            let relay_to_relay = base == Base::Relay && kind == CandidateKind::Relayed;
            let order = if relay_to_relay || elsewhere {
                Order::LastResort
            } else if relayed {
                Order::Later
            } else {
                Order::First
            };
            let has_direct = peer
                .selected_pair()
                .is_some_and(|p| p.kind() == PathKind::Direct);
            // Direct pairs first (ICE checks relayed candidates last): a relayed pair waits for them
            // (`relay_headstart` from the peer's addition), and is only an alternative once a direct
            // path works. With every pair checked at once, a fleet's checks all went through the one
            // TURN server, N x N of them, and flooded it (issue 12: coturn's socket dropped thousands
            // of datagrams a second at 100 nodes, the relayed peers' own allocations among them).
            let next_check = match (order, has_direct) {
                (Order::First, _) => now,
                (_, true) => now + recheck,
                (Order::LastResort, false) if peer.selected.is_some() => now + recheck,
                (Order::LastResort, false) => now + LAST_RESORT_HEADSTART,
                (Order::Later, false) => now.max(peer.added + headstart),
            };
            peer.pairs.push(Pair {
                id,
                base,
                remote,
                remote_kind: kind,
                state: PairState::Waiting,
                inflight: None,
                next_check,
                fails: 0,
                rtt: None,
                srtt: None,
                last_ok: None,
                learned: false,
                order,
            });
        }
        id
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (k, peer) in &self.peers {
            for p in &peer.pairs {
                self.index.insert((p.base, p.remote), *k);
            }
        }
    }

    fn drain_turn(&mut self, now: Instant) {
        let mut evs = Vec::new();
        if let Some(t) = &mut self.turn {
            while let Some(e) = t.poll_event() {
                evs.push(e);
            }
        }
        for e in evs {
            match e {
                TurnEvent::Allocated { .. } => {
                    let all: Vec<(PeerKey, Vec<Candidate>)> = self
                        .peers
                        .iter()
                        .map(|(k, p)| (*k, p.remote.clone()))
                        .collect();
                    for (k, cands) in all {
                        for c in cands {
                            self.add_pairs_for(k, c, now);
                        }
                    }
                    self.reindex();
                }
                TurnEvent::Lost { .. } => {
                    let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
                    for k in keys {
                        self.dirty.insert(k);
                        let Some(peer) = self.peers.get_mut(&k) else {
                            continue;
                        };
                        for p in peer.pairs.iter().filter(|p| p.base == Base::Relay) {
                            if let Some((tid, _)) = &p.inflight {
                                self.checks.remove(tid);
                            }
                        }
                        peer.pairs.retain(|p| p.base != Base::Relay);
                        if peer.selected.is_some_and(|id| peer.pair(id).is_none()) {
                            peer.selected = None;
                            for q in &mut peer.pairs {
                                if q.inflight.is_none() {
                                    q.next_check = now;
                                }
                            }
                            self.path_changes += 1;
                            self.events.push_back(Event::PathChanged {
                                peer: k,
                                path: None,
                            });
                        }
                        self.reselect(k, now);
                    }
                    self.reindex();
                }
            }
            self.publish_if_changed();
        }
    }

    fn publish_if_changed(&mut self) {
        let now = self.local_candidates();
        if now != self.published {
            self.published = now.clone();
            self.events.push_back(Event::LocalCandidates(now));
        }
    }
}

/// Whether a peer's private address `ip` is on our LAN, as far as we can tell: it is in one of our
/// networks, or the peer is behind our NAT (one of its public, server-reflexive, addresses is one of
/// `ours`). Anywhere else it is another LAN's address, which ours can rarely reach (a private WAN between
/// sites can). Before the public addresses are known (records are published before gathering ends) an
/// address outside our networks counts as elsewhere, and as ours when our networks are not known (no
/// host networks given).
fn on_our_lan(networks: &[IpNet], ours: &[IpAddr], remote: &[Candidate], ip: IpAddr) -> bool {
    if networks.iter().any(|n| n.contains(&ip)) {
        return true;
    }
    let mut theirs = remote
        .iter()
        .filter(|c| c.kind == CandidateKind::ServerReflexive)
        .map(|c| c.addr.ip())
        .peekable();
    if theirs.peek().is_none() || ours.is_empty() {
        return networks.is_empty();
    }
    theirs.any(|ip| ours.contains(&ip))
}

/// A connectivity check (check format 2): a Binding request from `sender` stamped with its Unix time in
/// ms ([`CHECK_TIME`]), authenticated with the pair's check key ([`check_key`]).
pub fn encode_check(tid: TransactionId, sender: &PeerKey, unix_ms: u64, key: &[u8; 32]) -> Vec<u8> {
    Builder::new(Class::Request, method::BINDING, tid)
        .attr(attr::USERNAME, hex(sender).as_bytes())
        .attr(CHECK_TIME, &unix_ms.to_be_bytes())
        .integrity(key)
        .fingerprint()
        .expect("a check is 132 bytes")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<PeerKey> {
    if s.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, out) in k.iter_mut().enumerate() {
        *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: PeerKey = [2; 32];
    const KEY: [u8; 32] = [9; 32];
    /// The agents' wall clock at their start (any fixed time will do).
    const UNIX: Duration = Duration::from_secs(1_790_000_000);

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn agent(stun_servers: Vec<SocketAddr>, now: Instant) -> Agent {
        let cfg = AgentConfig {
            local_key: [1; 32],
            host_candidates: vec![sa("10.0.0.1:51820")],
            stun_servers,
            turn: None,
            timers: Timers::default(),
            unix_time: UNIX,
        };
        let mut a = Agent::new(cfg, 5, now);
        // The host's network, as eviod gives it: 10.0.0.0/24 peers are on our LAN.
        a.set_host_networks(vec!["10.0.0.1/24".parse().unwrap()]);
        a
    }

    fn transmits(a: &mut Agent) -> Vec<Transmit> {
        std::iter::from_fn(|| a.poll_transmit()).collect()
    }

    /// Checks are answered with the pair's check key. A response without MESSAGE-INTEGRITY, with a wrong
    /// one, or an unsigned error never moves a pair; the signed response does. (The agent already
    /// required this before the TURN client was fixed; this keeps it that way.)
    #[test]
    fn check_responses_must_be_signed() {
        let t0 = Instant::now();
        let mut a = agent(vec![], t0);
        let remote = sa("10.0.0.2:51820");
        a.set_peer(
            PEER,
            KEY,
            vec![Candidate::new(CandidateKind::Host, remote)],
            t0,
        );
        a.handle_timeout(t0);
        let check = transmits(&mut a)
            .into_iter()
            .find(|t| t.dst == remote)
            .expect("a check");
        let req = Message::decode(&check.payload).unwrap();
        assert!(req.verify(&KEY));
        let answer = |class: Class, key: Option<&[u8]>| {
            let mut b = Builder::new(class, method::BINDING, req.tid)
                .xor_addr(attr::XOR_MAPPED_ADDRESS, sa("10.0.0.1:51820"));
            if class == Class::Error {
                b = b.error(400, "x");
            }
            if let Some(k) = key {
                b = b.integrity(k);
            }
            b.fingerprint().unwrap()
        };
        for bad in [
            answer(Class::Success, None),
            answer(Class::Success, Some(&[8; 32])),
            answer(Class::Error, None),
        ] {
            assert_eq!(a.handle_input(remote, &bad, t0), Input::Handled);
            assert_eq!(a.path(&PEER), None);
            assert!(
                a.checks.contains_key(&req.tid),
                "the check is still waiting"
            );
        }
        let good = answer(Class::Success, Some(&KEY));
        a.handle_input(remote, &good, t0 + Duration::from_millis(3));
        let p = a.path(&PEER).expect("a path");
        assert_eq!((p.kind, p.remote), (PathKind::Direct, remote));
    }

    /// An agent whose STUN server (198.18.0.1:3478) answered with a plain MAPPED-ADDRESS of 198.18.1.1.
    fn agent_mapped(t0: Instant) -> Agent {
        agent_mapped_after(t0, Duration::ZERO)
    }

    /// The same, the answer received `rtt` after the request.
    fn agent_mapped_after(t0: Instant, rtt: Duration) -> Agent {
        let server = sa("198.18.0.1:3478");
        let mut a = agent(vec![server], t0);
        let req = transmits(&mut a)
            .into_iter()
            .find(|t| t.dst == server)
            .expect("a Binding request");
        let tid = Message::decode(&req.payload).unwrap().tid;
        let resp = Builder::new(Class::Success, method::BINDING, tid)
            .attr(attr::MAPPED_ADDRESS, &[0, 1, 0xCA, 0x6C, 198, 18, 1, 1])
            .fingerprint()
            .unwrap();
        a.handle_input(server, &resp, t0 + rtt);
        a
    }

    /// A STUN server that answers with MAPPED-ADDRESS only: the address is plain, not XOR-encoded (it
    /// used to be XOR-decoded into a wrong server-reflexive candidate).
    #[test]
    fn stun_server_mapped_address_is_plain() {
        let t0 = Instant::now();
        let a = agent_mapped(t0);
        assert!(
            a.local_candidates().contains(&Candidate::new(
                CandidateKind::ServerReflexive,
                sa("198.18.1.1:51820")
            )),
            "{:?}",
            a.local_candidates()
        );
    }

    /// A peer's private host address is checked at once when the peer may share our site (the same
    /// public address), and after the direct pairs (then only as an alternative) when its public address
    /// is another.
    #[test]
    fn private_addresses_of_other_sites_are_checked_after_the_public_ones() {
        let t0 = Instant::now();
        for (their_public, at_once) in [("198.18.1.1:40000", true), ("198.18.1.2:40000", false)] {
            // Our public address: 198.18.1.1.
            let mut a = agent_mapped(t0);
            let (lan, public) = (sa("192.168.7.2:51820"), sa(their_public));
            a.set_peer(
                PEER,
                KEY,
                vec![
                    Candidate::new(CandidateKind::Host, lan),
                    Candidate::new(CandidateKind::ServerReflexive, public),
                ],
                t0,
            );
            a.handle_timeout(t0);
            let tx = transmits(&mut a);
            assert_eq!(sent_to(&tx, public), (0, 1), "{their_public}");
            assert_eq!(sent_to(&tx, lan), (0, at_once as usize), "{their_public}");
            if !at_once {
                a.handle_timeout(t0 + RELAY_HEADSTART);
                assert_eq!(sent_to(&transmits(&mut a), lan), (0, 0), "{their_public}");
                a.handle_timeout(t0 + LAST_RESORT_HEADSTART);
                assert_eq!(sent_to(&transmits(&mut a), lan), (0, 1), "checked last");
            }
        }
    }

    /// A peer's private address is checked at once when it is in one of our networks, even before its
    /// public address is known; outside them, before its public address tells, it is a last resort (at a
    /// fleet's start, records are published before their public addresses are gathered) until the peer
    /// turns out to be behind our NAT.
    #[test]
    fn private_addresses_on_our_networks_are_checked_at_once() {
        let t0 = Instant::now();
        let lan = sa("192.168.7.2:51820");
        for (networks, at_once) in [
            // Our networks not given (no host networks known): the address may be ours.
            (vec![], true),
            (vec!["192.168.8.1/24"], false),
            (vec!["192.168.7.9/24"], true),
        ] {
            let mut a = agent_mapped(t0);
            a.set_host_networks(networks.iter().map(|n| n.parse().unwrap()).collect());
            a.set_peer(
                PEER,
                KEY,
                vec![Candidate::new(CandidateKind::Host, lan)],
                t0,
            );
            a.handle_timeout(t0);
            let first = sent_to(&transmits(&mut a), lan);
            assert_eq!(first, (0, at_once as usize), "{networks:?}");
            if !at_once {
                a.handle_timeout(t0 + LAST_RESORT_HEADSTART);
                let last = sent_to(&transmits(&mut a), lan);
                assert_eq!(last, (0, 1), "{networks:?}: checked last");
            }
        }
        // Waiting as a last resort until the peer's public address shows it behind our NAT.
        let mut a = agent_mapped(t0);
        a.set_peer(
            PEER,
            KEY,
            vec![Candidate::new(CandidateKind::Host, lan)],
            t0,
        );
        a.handle_timeout(t0);
        assert_eq!(sent_to(&transmits(&mut a), lan), (0, 0));
        let t1 = t0 + Duration::from_millis(500);
        let ours = sa("198.18.1.1:40000");
        let both = vec![
            Candidate::new(CandidateKind::Host, lan),
            Candidate::new(CandidateKind::ServerReflexive, ours),
        ];
        a.set_peer(PEER, KEY, both, t1);
        a.handle_timeout(t1);
        assert_eq!(
            sent_to(&transmits(&mut a), lan),
            (0, 1),
            "on our LAN after all"
        );
    }

    /// On a loaded machine (the STUN server answered in 1 s) a new pair's first check is not resent after
    /// 100 ms: its timeout follows the round trips seen so far (1 s, the longest).
    #[test]
    fn first_checks_are_timed_by_the_round_trips_seen() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut a = agent_mapped_after(t0, Duration::from_secs(1));
        let public = sa("198.18.1.2:40000");
        a.set_peer(
            PEER,
            KEY,
            vec![Candidate::new(CandidateKind::ServerReflexive, public)],
            t1,
        );
        a.handle_timeout(t1);
        assert_eq!(sent_to(&transmits(&mut a), public), (0, 1));
        a.handle_timeout(t1 + Duration::from_millis(900));
        assert_eq!(sent_to(&transmits(&mut a), public), (0, 0), "resent early");
        a.handle_timeout(t1 + Duration::from_secs(1));
        assert_eq!(
            sent_to(&transmits(&mut a), public),
            (0, 1),
            "resent after 1 s"
        );
    }

    /// An agent with PEER (one host candidate) and no traffic yet.
    fn agent_with_peer(t0: Instant) -> Agent {
        let mut a = agent(vec![], t0);
        a.set_peer(
            PEER,
            KEY,
            vec![Candidate::new(CandidateKind::Host, sa("10.0.0.2:51820"))],
            t0,
        );
        transmits(&mut a);
        a
    }

    /// PEER's check stamped `at` (its clock agrees with ours: `UNIX` at `t0`).
    fn check_at(t0: Instant, at: Instant, tid: u32) -> Vec<u8> {
        let mut id = [7u8; 12];
        id[..4].copy_from_slice(&tid.to_be_bytes());
        let ms = (UNIX + at.saturating_duration_since(t0)).as_millis() as u64;
        encode_check(TransactionId(id), &PEER, ms, &KEY)
    }

    /// What the agent sent to `to`: (responses, requests).
    fn sent_to(tx: &[Transmit], to: SocketAddr) -> (usize, usize) {
        let classes: Vec<Class> = tx
            .iter()
            .filter(|t| t.dst == to)
            .filter_map(|t| Message::decode(&t.payload).ok().map(|m| m.class))
            .collect();
        (
            classes.iter().filter(|c| **c == Class::Success).count(),
            classes.iter().filter(|c| **c == Class::Request).count(),
        )
    }

    fn spoofed(i: u32) -> SocketAddr {
        SocketAddr::from((
            std::net::Ipv4Addr::from(0xCB00_7100 + (i >> 8)),
            1024 + i as u16,
        ))
    }

    /// A captured check replayed from 1,000 spoofed sources creates nothing: no learned pair, no answer
    /// and no probe towards any of them. Only the source it came from was answered and learned.
    #[test]
    fn replayed_checks_from_spoofed_sources_create_nothing() {
        let t0 = Instant::now();
        let mut a = agent_with_peer(t0);
        let real = sa("198.18.1.1:4000");
        let check = check_at(t0, t0, 1);
        a.handle_input(real, &check, t0);
        let tx = transmits(&mut a);
        assert_eq!(sent_to(&tx, real), (1, 1), "answered and checked back");
        assert_eq!(a.learned_pairs(&PEER), 1);
        let mut tx = Vec::new();
        for i in 0..1000 {
            let at = t0 + Duration::from_millis(i as u64);
            assert_eq!(a.handle_input(spoofed(i), &check, at), Input::Handled);
            a.handle_timeout(at);
            tx.extend(transmits(&mut a));
        }
        assert_eq!(a.learned_pairs(&PEER), 1);
        assert_eq!(a.pairs(&PEER).len(), 2);
        for i in 0..1000 {
            assert_eq!(sent_to(&tx, spoofed(i)), (0, 0), "sent to {}", spoofed(i));
        }
        // The real source may retransmit its check: answered again.
        a.handle_input(real, &check, t0 + Duration::from_secs(1));
        assert_eq!(sent_to(&transmits(&mut a), real).0, 1);
    }

    /// A check from the peer on a pair whose own check went unanswered twice makes us resend at once
    /// (the path just opened), not at the backed-off time; one merely crossing our first send does not.
    #[test]
    fn a_peer_check_hurries_our_unanswered_check_of_that_pair() {
        let t0 = Instant::now();
        let host = sa("10.0.0.2:51820");
        let ms = |n| t0 + Duration::from_millis(n);
        // Our first check is in flight: the peer's check crosses it.
        let mut a = agent_with_peer(t0);
        a.handle_timeout(t0);
        assert_eq!(sent_to(&transmits(&mut a), host), (0, 1));
        a.handle_input(host, &check_at(t0, ms(10), 1), ms(10));
        assert_eq!(
            sent_to(&transmits(&mut a), host),
            (1, 0),
            "answered, not resent"
        );
        // Unanswered twice (t0 and the resend at 100 ms; the next is due at 300 ms).
        a.handle_timeout(ms(100));
        assert_eq!(sent_to(&transmits(&mut a), host), (0, 1));
        a.handle_input(host, &check_at(t0, ms(150), 2), ms(150));
        assert_eq!(
            sent_to(&transmits(&mut a), host),
            (1, 1),
            "answered and resent at once"
        );
        assert!(a.poll_timeout().is_some_and(|t| t > ms(150)));
    }

    /// Relayed pairs wait for the direct ones twice the agent's round trip on a loaded network (here the
    /// STUN server answered in 1 s: 2 s), counted from the peer's addition: a relayed candidate the peer
    /// publishes later is checked at once.
    #[test]
    fn relayed_pairs_wait_longer_on_a_loaded_network() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut a = agent_mapped_after(t0, Duration::from_secs(1));
        let (public, relay, later) = (
            sa("198.18.1.2:40000"),
            sa("198.18.0.1:50000"),
            sa("198.18.0.1:50002"),
        );
        let mut candidates = vec![
            Candidate::new(CandidateKind::ServerReflexive, public),
            Candidate::new(CandidateKind::Relayed, relay),
        ];
        a.set_peer(PEER, KEY, candidates.clone(), t1);
        a.handle_timeout(t1);
        assert_eq!(sent_to(&transmits(&mut a), public), (0, 1));
        a.handle_timeout(t1 + RELAY_HEADSTART);
        assert_eq!(
            sent_to(&transmits(&mut a), relay),
            (0, 0),
            "not after 200 ms"
        );
        a.handle_timeout(t1 + Duration::from_millis(1990));
        assert_eq!(sent_to(&transmits(&mut a), relay), (0, 0));
        a.handle_timeout(t1 + MAX_RELAY_HEADSTART);
        assert_eq!(sent_to(&transmits(&mut a), relay), (0, 1), "after 2 s");
        let t2 = t1 + Duration::from_secs(3);
        candidates.push(Candidate::new(CandidateKind::Relayed, later));
        a.set_peer(PEER, KEY, candidates, t2);
        a.handle_timeout(t2);
        assert_eq!(sent_to(&transmits(&mut a), later), (0, 1), "at once");
        // A quiet network: 200 ms.
        let mut b = agent_mapped(t0);
        b.set_peer(
            PEER,
            KEY,
            vec![
                Candidate::new(CandidateKind::ServerReflexive, public),
                Candidate::new(CandidateKind::Relayed, relay),
            ],
            t0,
        );
        b.handle_timeout(t0);
        transmits(&mut b);
        b.handle_timeout(t0 + RELAY_HEADSTART);
        assert_eq!(sent_to(&transmits(&mut b), relay), (0, 1));
    }

    /// PEER's signed answer to our check `tid`.
    fn answer(tid: TransactionId) -> Vec<u8> {
        Builder::new(Class::Success, method::BINDING, tid)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, sa("10.0.0.1:51820"))
            .integrity(&KEY)
            .fingerprint()
            .unwrap()
    }

    /// Runs the agent from `from` to `to` (ms after `t0`, 50 ms steps) while PEER answers every check
    /// sent to `path`; returns what went to `quiet` meanwhile (responses, requests), then checks that
    /// PEER's check arriving on `quiet` is answered but not checked back.
    fn quiet_while_path_works(
        a: &mut Agent,
        t0: Instant,
        (from, to): (u64, u64),
        path: SocketAddr,
        quiet: SocketAddr,
    ) -> (usize, usize) {
        let ms = |n| t0 + Duration::from_millis(n);
        let mut sent = (0, 0);
        for n in (from..to).step_by(50) {
            a.handle_timeout(ms(n));
            let tx = transmits(a);
            let (r, q) = sent_to(&tx, quiet);
            sent = (sent.0 + r, sent.1 + q);
            for t in tx.iter().filter(|t| t.dst == path) {
                let m = Message::decode(&t.payload).unwrap();
                if m.class == Class::Request {
                    a.handle_input(path, &answer(m.tid), ms(n));
                }
            }
        }
        a.handle_input(quiet, &check_at(t0, ms(to), 1), ms(to));
        a.handle_timeout(ms(to));
        assert_eq!(
            sent_to(&transmits(a), quiet),
            (1, 0),
            "answered, not checked back"
        );
        sent
    }

    /// Once a peer is reached directly, its relayed pairs go quiet: our relayed check still unanswered is
    /// not resent, and the peer's check of a relayed pair (its own direct check has not come back yet) is
    /// answered but not checked back. Either crossed the TURN server for a path neither side uses.
    #[test]
    fn relayed_pairs_of_a_peer_reached_directly_go_quiet() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let (host, relay) = (sa("10.0.0.2:51820"), sa("198.18.0.1:50000"));
        let mut a = agent(vec![], t0);
        a.set_peer(
            PEER,
            KEY,
            vec![
                Candidate::new(CandidateKind::Host, host),
                Candidate::new(CandidateKind::Relayed, relay),
            ],
            t0,
        );
        a.handle_timeout(t0);
        let tx = transmits(&mut a);
        assert_eq!(sent_to(&tx, relay), (0, 0), "relayed pairs wait");
        let check = tx.iter().find(|t| t.dst == host).expect("a direct check");
        let req = Message::decode(&check.payload).unwrap();
        a.handle_timeout(ms(200));
        assert_eq!(sent_to(&transmits(&mut a), relay), (0, 1), "then checked");
        a.handle_input(host, &answer(req.tid), ms(210));
        assert_eq!(a.path(&PEER).map(|p| p.kind), Some(PathKind::Direct));
        let sent = quiet_while_path_works(&mut a, t0, (250, 10_000), host, relay);
        assert_eq!(sent, (0, 0), "the relayed check is not resent");
    }

    /// The same with a relayed path: the other relayed pairs (no better) go quiet once one works.
    #[test]
    fn other_relayed_pairs_go_quiet_once_one_works() {
        let t0 = Instant::now();
        let (r1, r2) = (sa("198.18.0.1:50000"), sa("198.18.0.1:50002"));
        let mut a = agent(vec![], t0);
        a.set_peer(
            PEER,
            KEY,
            vec![
                Candidate::new(CandidateKind::Relayed, r1),
                Candidate::new(CandidateKind::Relayed, r2),
            ],
            t0,
        );
        a.handle_timeout(t0 + RELAY_HEADSTART);
        let tx = transmits(&mut a);
        assert_eq!((sent_to(&tx, r1), sent_to(&tx, r2)), ((0, 1), (0, 1)));
        let req = tx.iter().find(|t| t.dst == r1).unwrap();
        let req = Message::decode(&req.payload).unwrap();
        a.handle_input(r1, &answer(req.tid), t0 + Duration::from_millis(210));
        assert_eq!(a.path(&PEER).map(|p| p.remote), Some(r1));
        let sent = quiet_while_path_works(&mut a, t0, (250, 3_000), r1, r2);
        assert_eq!(sent, (0, 0), "the other relayed check is not resent");
    }

    /// A check stamped outside the acceptance window (either way), or without a timestamp (check format
    /// 1), is not answered and teaches nothing; one inside it is.
    #[test]
    fn stale_future_and_unstamped_checks_are_refused() {
        let t0 = Instant::now();
        let mut a = agent_with_peer(t0);
        let now = t0 + Duration::from_secs(100);
        let w = CHECK_WINDOW + Duration::from_secs(1);
        let old_format = Builder::new(Class::Request, method::BINDING, TransactionId([3; 12]))
            .attr(attr::USERNAME, hex(&PEER).as_bytes())
            .integrity(&KEY)
            .fingerprint()
            .unwrap();
        for (i, bad) in [
            check_at(t0, now - w, 1),
            check_at(t0, now + w, 2),
            old_format,
        ]
        .iter()
        .enumerate()
        {
            let from = spoofed(i as u32);
            a.handle_input(from, bad, now);
            assert_eq!(sent_to(&transmits(&mut a), from), (0, 0), "check {i}");
        }
        assert_eq!(a.learned_pairs(&PEER), 0);
        let ok = CHECK_WINDOW - Duration::from_secs(1);
        for (i, good) in [check_at(t0, now - ok, 4), check_at(t0, now + ok, 5)]
            .iter()
            .enumerate()
        {
            let from = spoofed(10 + i as u32);
            a.handle_input(from, good, now);
            assert_eq!(sent_to(&transmits(&mut a), from), (1, 1), "check {i}");
        }
        assert_eq!(a.learned_pairs(&PEER), 2);
    }

    /// The replay cache is bounded; a check it had to forget cannot be replayed from elsewhere either
    /// (nothing as old as a forgotten check is accepted).
    #[test]
    fn replay_cache_is_bounded_and_forgetting_is_safe() {
        let t0 = Instant::now();
        let mut a = agent_with_peer(t0);
        let real = sa("198.18.1.1:4000");
        let n = REPLAY_CACHE as u32 + 100;
        for i in 0..n {
            let at = t0 + Duration::from_millis(10 * i as u64);
            a.handle_input(real, &check_at(t0, at, i), at);
            assert_eq!(sent_to(&transmits(&mut a), real).0, 1, "check {i}");
        }
        assert_eq!(a.peers[&PEER].replay.seen.len(), REPLAY_CACHE);
        let now = t0 + Duration::from_millis(10 * n as u64);
        // The first check (forgotten) and the last one (remembered), replayed from elsewhere.
        for i in [0, n - 1] {
            let at = t0 + Duration::from_millis(10 * i as u64);
            a.handle_input(spoofed(i), &check_at(t0, at, i), now);
            assert_eq!(sent_to(&transmits(&mut a), spoofed(i)), (0, 0), "check {i}");
        }
        assert_eq!(a.learned_pairs(&PEER), 1);
    }

    /// Fresh, authentic checks from 1,000 addresses (only the peer can make them, but it is still no
    /// reason to learn and probe them all): at most MAX_LEARNED_PAIRS are learned and probed.
    #[test]
    fn learned_pairs_are_capped_per_peer() {
        let t0 = Instant::now();
        let mut a = agent_with_peer(t0);
        let mut tx = Vec::new();
        for i in 0..1000 {
            let at = t0 + Duration::from_millis(i as u64);
            a.handle_input(spoofed(i), &check_at(t0, at, i), at);
            tx.extend(transmits(&mut a));
        }
        assert_eq!(a.learned_pairs(&PEER), MAX_LEARNED_PAIRS);
        let probed = (0..1000)
            .filter(|i| sent_to(&tx, spoofed(*i)).1 > 0)
            .count();
        assert_eq!(probed, MAX_LEARNED_PAIRS);
        let answered = (0..1000)
            .filter(|i| sent_to(&tx, spoofed(*i)).0 > 0)
            .count();
        assert_eq!(answered, 1000, "authentic, fresh checks are answered");
    }

    /// A learned pair whose check fails is dropped, which makes room for the peer's next address.
    #[test]
    fn learned_pairs_are_dropped_when_their_check_fails() {
        let t0 = Instant::now();
        let mut a = agent_with_peer(t0);
        for i in 0..MAX_LEARNED_PAIRS as u32 {
            a.handle_input(spoofed(i), &check_at(t0, t0, i), t0);
        }
        assert_eq!(a.learned_pairs(&PEER), MAX_LEARNED_PAIRS);
        // Nobody answers the probes: given up after 3.1 s.
        let mut now = t0;
        while now < t0 + Duration::from_secs(4) {
            now += Duration::from_millis(50);
            a.handle_timeout(now);
            transmits(&mut a);
        }
        assert_eq!(a.learned_pairs(&PEER), 0);
        assert_eq!(a.pairs(&PEER).len(), 1, "the announced pair stays");
        let next = sa("198.18.1.1:5000");
        a.handle_input(next, &check_at(t0, now, 99), now);
        assert_eq!(sent_to(&transmits(&mut a), next), (1, 1));
        assert_eq!(a.learned_pairs(&PEER), 1);
    }

    /// A step of the host's wall clock reaches the checks through `set_unix_time`: the agent's checks carry
    /// the new time, and a check stamped on the old clock is refused.
    #[test]
    fn wall_clock_steps_reach_the_checks() {
        let t0 = Instant::now();
        let mut a = agent_with_peer(t0);
        let step = Duration::from_secs(3600);
        let t1 = t0 + Duration::from_secs(1);
        a.set_unix_time(t1, UNIX + step + Duration::from_secs(1));
        a.handle_input(spoofed(1), &check_at(t0, t1, 1), t1);
        assert_eq!(sent_to(&transmits(&mut a), spoofed(1)), (0, 0));
        a.handle_input(spoofed(2), &check_at(t0, t1 + step, 2), t1);
        let tx = transmits(&mut a);
        assert_eq!(sent_to(&tx, spoofed(2)), (1, 1));
        let probe = tx
            .iter()
            .filter_map(|t| Message::decode(&t.payload).ok())
            .find(|m| m.class == Class::Request)
            .unwrap();
        let ts = u64::from_be_bytes(probe.attr(CHECK_TIME).unwrap().try_into().unwrap());
        assert_eq!(
            ts,
            (UNIX + step + Duration::from_secs(1)).as_millis() as u64
        );
    }
}
