//! A sans-IO TURN client (RFC 8656) for one allocation over UDP, sharing the tunnel's socket.
//!
//! Long-term credentials: the first Allocate goes without credentials, the server answers 401 with REALM and
//! NONCE, every later request carries USERNAME, REALM, NONCE and MESSAGE-INTEGRITY; a 438 (stale nonce)
//! takes the new NONCE and resends. The allocation is refreshed one minute before it expires (or at half
//! its lifetime when shorter); permissions (valid 5 min) are refreshed every 4 min, channels (valid 10 min)
//! every 5 min. A Binding request to the server every 15 s keeps the NAT mapping towards the server open and
//! notices when it changed (conntrack flush on a symmetric NAT): the allocation's 5-tuple is then gone and
//! the client allocates again. Relayed datagrams travel as ChannelData once a channel is bound, as Send/Data
//! indications before.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::Transmit;
use crate::demux;
use crate::stun::{self, Builder, Class, Message, TransactionId, attr, method};
use crate::txn::{Pending, Schedule, Step};

/// Where and as whom to allocate.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    pub server: SocketAddr,
    pub user: String,
    pub password: String,
}

/// Timers of the TURN client.
pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(300);
pub const KEEPALIVE: Duration = Duration::from_secs(15);
const REQUESTED_LIFETIME: u32 = 600;

/// What the client reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnEvent {
    /// An allocation exists: `relayed` is the relay candidate, `mapped` how the server sees us.
    Allocated {
        relayed: SocketAddr,
        mapped: SocketAddr,
    },
    /// The allocation is gone (server lost, mapping changed, refresh refused); the client retries.
    Lost { reason: String },
}

/// What a datagram from the server was.
#[derive(Debug, PartialEq, Eq)]
pub enum TurnInput<'a> {
    /// Not from the server or not a TURN message of ours.
    NotForMe,
    /// A response consumed by the client.
    Handled,
    /// A datagram relayed from `peer`.
    Data { peer: SocketAddr, payload: &'a [u8] },
}

#[derive(Clone, Debug)]
enum Kind {
    Allocate,
    Refresh { lifetime: u32 },
    Permission(Vec<IpAddr>),
    ChannelBind { peer: SocketAddr, number: u16 },
    Keepalive,
}

#[derive(Debug)]
struct Txn {
    kind: Kind,
    pending: Pending,
    auth_tries: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Allocating,
    Allocated {
        relayed: SocketAddr,
        mapped: SocketAddr,
        refresh_at: Instant,
    },
    /// Deleting a stale allocation (437 on Allocate) before allocating again.
    Deleting,
    Waiting {
        retry_at: Instant,
    },
}

#[derive(Debug)]
struct Perm {
    installed: bool,
    pending: bool,
    refresh_at: Option<Instant>,
}

#[derive(Debug)]
struct Chan {
    number: u16,
    bound: bool,
    pending: bool,
    refresh_at: Option<Instant>,
}

/// The TURN client. Feed it datagrams from the server and timeouts; it yields datagrams and events.
#[derive(Debug)]
pub struct TurnClient {
    cfg: TurnConfig,
    realm: Option<String>,
    nonce: Option<String>,
    key: Option<[u8; 16]>,
    state: State,
    txns: HashMap<TransactionId, Txn>,
    out: VecDeque<Transmit>,
    events: VecDeque<TurnEvent>,
    perms: HashMap<IpAddr, Perm>,
    chans: HashMap<SocketAddr, Chan>,
    by_number: HashMap<u16, SocketAddr>,
    next_number: u16,
    keepalive_at: Option<Instant>,
    backoff: Duration,
    rng: StdRng,
    stale_nonces: u64,
    allocations: u64,
}

impl TurnClient {
    /// A client; it sends its first Allocate right away (see [`TurnClient::poll_transmit`]).
    pub fn new(cfg: TurnConfig, seed: u64, now: Instant) -> TurnClient {
        let mut c = TurnClient {
            cfg,
            realm: None,
            nonce: None,
            key: None,
            state: State::Allocating,
            txns: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            perms: HashMap::new(),
            chans: HashMap::new(),
            by_number: HashMap::new(),
            next_number: 0x4000,
            keepalive_at: None,
            backoff: Duration::from_secs(1),
            rng: StdRng::seed_from_u64(seed),
            stale_nonces: 0,
            allocations: 0,
        };
        c.allocate(now);
        c
    }

    pub fn server(&self) -> SocketAddr {
        self.cfg.server
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            State::Allocated { relayed, .. } => Some(relayed),
            _ => None,
        }
    }

    /// Our address as the server sees it, once allocated.
    pub fn mapped(&self) -> Option<SocketAddr> {
        match self.state {
            State::Allocated { mapped, .. } => Some(mapped),
            _ => None,
        }
    }

    /// How many 438 (stale nonce) answers were handled.
    pub fn stale_nonces(&self) -> u64 {
        self.stale_nonces
    }

    /// How many allocations succeeded so far (1 unless one was lost and made again).
    pub fn allocations(&self) -> u64 {
        self.allocations
    }

    /// True if `tid` is one of our requests in flight.
    pub fn owns(&self, tid: &TransactionId) -> bool {
        self.txns.contains_key(tid)
    }

    /// Keeps a permission for `ip` installed (refreshed while the allocation lives).
    pub fn want_permission(&mut self, ip: IpAddr, now: Instant) {
        self.perms.entry(ip).or_insert(Perm {
            installed: false,
            pending: false,
            refresh_at: None,
        });
        self.pump(now);
    }

    /// Keeps a channel bound to `peer` (which also keeps a permission for its address).
    pub fn want_channel(&mut self, peer: SocketAddr, now: Instant) {
        if !self.chans.contains_key(&peer) {
            if self.next_number > 0x4FFF {
                tracing::warn!(%peer, "TURN channel numbers exhausted");
                return;
            }
            let number = self.next_number;
            self.next_number += 1;
            self.by_number.insert(number, peer);
            self.chans.insert(
                peer,
                Chan {
                    number,
                    bound: false,
                    pending: false,
                    refresh_at: None,
                },
            );
        }
        self.want_permission(peer.ip(), now);
    }

    /// The channel bound to `peer`, if any.
    pub fn channel(&self, peer: SocketAddr) -> Option<u16> {
        self.chans.get(&peer).filter(|c| c.bound).map(|c| c.number)
    }

    /// True if data can be relayed to `peer` now (channel bound or permission installed).
    pub fn can_send(&self, peer: SocketAddr) -> bool {
        self.relayed().is_some()
            && (self.channel(peer).is_some()
                || self.perms.get(&peer.ip()).is_some_and(|p| p.installed))
    }

    /// Wraps `payload` for relaying to `peer`: ChannelData if a channel is bound, else a Send indication.
    /// `None` if the relay cannot reach `peer` (yet).
    pub fn wrap(&mut self, peer: SocketAddr, payload: &[u8]) -> Option<Transmit> {
        self.relayed()?;
        if let Some(n) = self.channel(peer) {
            let mut out = Vec::with_capacity(payload.len() + 4);
            demux::encode_channel_data(n, payload, &mut out);
            return Some(Transmit {
                dst: self.cfg.server,
                payload: out,
            });
        }
        if !self.perms.get(&peer.ip()).is_some_and(|p| p.installed) {
            return None;
        }
        let msg = Builder::new(Class::Indication, method::SEND, self.tid())
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, payload)
            .finish();
        Some(Transmit {
            dst: self.cfg.server,
            payload: msg,
        })
    }

    /// Sends a Refresh now: a quick way to find out whether the allocation still exists.
    pub fn probe(&mut self, now: Instant) {
        if matches!(self.state, State::Allocated { .. })
            && !self
                .txns
                .values()
                .any(|t| matches!(t.kind, Kind::Refresh { .. }))
        {
            self.request(
                Kind::Refresh {
                    lifetime: REQUESTED_LIFETIME,
                },
                now,
            );
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// The next time [`TurnClient::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut min = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        for txn in self.txns.values() {
            min(txn.pending.next);
        }
        match self.state {
            State::Allocated { refresh_at, .. } => {
                // Timers whose request is already in flight wait for its answer (or give-up) instead.
                if !self
                    .txns
                    .values()
                    .any(|t| matches!(t.kind, Kind::Refresh { .. }))
                {
                    min(refresh_at);
                }
                if let Some(k) = self.keepalive_at {
                    min(k);
                }
                for p in self.perms.values().filter(|p| !p.pending) {
                    if let Some(r) = p.refresh_at {
                        min(r);
                    }
                }
                for c in self.chans.values().filter(|c| !c.pending) {
                    if let Some(r) = c.refresh_at {
                        min(r);
                    }
                }
            }
            State::Waiting { retry_at } => min(retry_at),
            State::Allocating | State::Deleting => {}
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Retransmissions and give-ups.
        let mut gave_up = Vec::new();
        for (tid, txn) in self.txns.iter_mut() {
            match txn.pending.on_timer(now) {
                Step::Wait => {}
                Step::Resend => self.out.push_back(Transmit {
                    dst: txn.pending.dst,
                    payload: txn.pending.bytes.clone(),
                }),
                Step::GiveUp => gave_up.push(*tid),
            }
        }
        for tid in gave_up {
            if let Some(txn) = self.txns.remove(&tid) {
                self.on_give_up(txn.kind, now);
            }
        }
        match self.state {
            State::Waiting { retry_at } if now >= retry_at => self.allocate(now),
            State::Allocated { refresh_at, .. } => {
                if now >= refresh_at
                    && !self
                        .txns
                        .values()
                        .any(|t| matches!(t.kind, Kind::Refresh { .. }))
                {
                    self.request(
                        Kind::Refresh {
                            lifetime: REQUESTED_LIFETIME,
                        },
                        now,
                    );
                }
                if self.keepalive_at.is_some_and(|k| now >= k) {
                    self.keepalive_at = Some(now + KEEPALIVE);
                    self.request(Kind::Keepalive, now);
                }
            }
            _ => {}
        }
        self.pump(now);
    }

    /// Handles a datagram from `from`. Only datagrams from the server are looked at.
    pub fn handle_input<'a>(
        &mut self,
        from: SocketAddr,
        buf: &'a [u8],
        now: Instant,
    ) -> TurnInput<'a> {
        if from != self.cfg.server {
            return TurnInput::NotForMe;
        }
        if let Some((number, payload)) = demux::channel_data(buf) {
            return match self.by_number.get(&number) {
                Some(peer) if self.relayed().is_some() => TurnInput::Data {
                    peer: *peer,
                    payload,
                },
                _ => TurnInput::Handled,
            };
        }
        let Ok(msg) = Message::decode(buf) else {
            return TurnInput::NotForMe;
        };
        if msg.class == Class::Indication && msg.method == method::DATA {
            return match (msg.xor_addr(attr::XOR_PEER_ADDRESS), msg.attr(attr::DATA)) {
                (Some(peer), Some(payload)) if self.relayed().is_some() => {
                    TurnInput::Data { peer, payload }
                }
                _ => TurnInput::Handled,
            };
        }
        if !matches!(msg.class, Class::Success | Class::Error) {
            return TurnInput::NotForMe;
        }
        let Some(txn) = self.txns.remove(&msg.tid) else {
            return TurnInput::NotForMe;
        };
        self.on_response(txn, &msg, now);
        self.pump(now);
        TurnInput::Handled
    }

    fn tid(&mut self) -> TransactionId {
        TransactionId(self.rng.random())
    }

    fn allocate(&mut self, now: Instant) {
        self.state = State::Allocating;
        self.keepalive_at = None;
        self.request(Kind::Allocate, now);
    }

    fn build(&mut self, kind: &Kind, tid: TransactionId) -> Vec<u8> {
        let mut b = match kind {
            Kind::Allocate => Builder::new(Class::Request, method::ALLOCATE, tid)
                .u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24)
                .u32_attr(attr::LIFETIME, REQUESTED_LIFETIME),
            Kind::Refresh { lifetime } => Builder::new(Class::Request, method::REFRESH, tid)
                .u32_attr(attr::LIFETIME, *lifetime),
            Kind::Permission(ips) => {
                let mut b = Builder::new(Class::Request, method::CREATE_PERMISSION, tid);
                for ip in ips {
                    b = b.xor_addr(attr::XOR_PEER_ADDRESS, SocketAddr::new(*ip, 0));
                }
                b
            }
            Kind::ChannelBind { peer, number } => {
                Builder::new(Class::Request, method::CHANNEL_BIND, tid)
                    .u32_attr(attr::CHANNEL_NUMBER, (*number as u32) << 16)
                    .xor_addr(attr::XOR_PEER_ADDRESS, *peer)
            }
            Kind::Keepalive => {
                return Builder::new(Class::Request, method::BINDING, tid).fingerprint();
            }
        };
        if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
            b = b
                .attr(attr::USERNAME, self.cfg.user.as_bytes())
                .attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes())
                .integrity(key);
        }
        b.fingerprint()
    }

    fn request(&mut self, kind: Kind, now: Instant) {
        self.request_with(kind, now, 0);
    }

    fn request_with(&mut self, kind: Kind, now: Instant, auth_tries: u8) {
        let tid = self.tid();
        let bytes = self.build(&kind, tid);
        self.out.push_back(Transmit {
            dst: self.cfg.server,
            payload: bytes.clone(),
        });
        let pending = Pending::new(bytes, self.cfg.server, now, Schedule::SERVER);
        self.txns.insert(
            tid,
            Txn {
                kind,
                pending,
                auth_tries,
            },
        );
    }

    /// Sends the permission and channel requests that are due.
    fn pump(&mut self, now: Instant) {
        if !matches!(self.state, State::Allocated { .. }) {
            return;
        }
        let mut ips = Vec::new();
        for (ip, p) in self.perms.iter_mut() {
            if !p.pending && (!p.installed || p.refresh_at.is_some_and(|r| now >= r)) {
                p.pending = true;
                ips.push(*ip);
            }
        }
        if !ips.is_empty() {
            self.request(Kind::Permission(ips), now);
        }
        let mut binds = Vec::new();
        for (peer, c) in self.chans.iter_mut() {
            if !c.pending && (!c.bound || c.refresh_at.is_some_and(|r| now >= r)) {
                c.pending = true;
                binds.push(Kind::ChannelBind {
                    peer: *peer,
                    number: c.number,
                });
            }
        }
        for k in binds {
            self.request(k, now);
        }
    }

    fn lose(&mut self, reason: String, now: Instant, retry_now: bool) {
        tracing::info!(server = %self.cfg.server, %reason, "TURN allocation lost");
        if matches!(self.state, State::Allocated { .. }) {
            self.events.push_back(TurnEvent::Lost { reason });
        }
        // Every permission and channel has to be installed again on the next allocation.
        self.txns.retain(|_, t| matches!(t.kind, Kind::Allocate));
        for p in self.perms.values_mut() {
            *p = Perm {
                installed: false,
                pending: false,
                refresh_at: None,
            };
        }
        for c in self.chans.values_mut() {
            c.bound = false;
            c.pending = false;
            c.refresh_at = None;
        }
        self.keepalive_at = None;
        if retry_now {
            self.allocate(now);
        } else {
            self.state = State::Waiting {
                retry_at: now + self.backoff,
            };
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn on_give_up(&mut self, kind: Kind, now: Instant) {
        match kind {
            Kind::Allocate | Kind::Refresh { .. } | Kind::Keepalive => {
                self.lose(format!("no answer from {}", self.cfg.server), now, false)
            }
            Kind::Permission(ips) => {
                for ip in ips {
                    if let Some(p) = self.perms.get_mut(&ip) {
                        p.pending = false;
                    }
                }
            }
            Kind::ChannelBind { peer, .. } => {
                if let Some(c) = self.chans.get_mut(&peer) {
                    c.pending = false;
                }
            }
        }
    }

    fn on_response(&mut self, txn: Txn, msg: &Message<'_>, now: Instant) {
        if msg.class == Class::Error {
            let code = msg.error_code().unwrap_or(0);
            if (code == 401 || code == 438) && txn.auth_tries < 3 {
                if code == 438 {
                    self.stale_nonces += 1;
                }
                if let Some(realm) = msg.text(attr::REALM) {
                    self.realm = Some(realm.to_string());
                }
                if let Some(nonce) = msg.text(attr::NONCE) {
                    self.nonce = Some(nonce.to_string());
                }
                if let Some(realm) = &self.realm {
                    self.key = Some(stun::long_term_key(
                        &self.cfg.user,
                        realm,
                        &self.cfg.password,
                    ));
                    self.request_with(txn.kind, now, txn.auth_tries + 1);
                    return;
                }
            }
            tracing::debug!(code, kind = ?txn.kind, "TURN error response");
            if code == 437
                && matches!(self.state, State::Allocated { .. })
                && matches!(txn.kind, Kind::Permission(_) | Kind::ChannelBind { .. })
            {
                // The server no longer knows our allocation (it restarted, or it expired).
                self.lose(format!("allocation mismatch on {:?}", txn.kind), now, true);
                return;
            }
            match txn.kind {
                Kind::Allocate if code == 437 => {
                    // An allocation of ours from before still holds this 5-tuple: delete it, then allocate.
                    self.state = State::Deleting;
                    self.request(Kind::Refresh { lifetime: 0 }, now);
                }
                Kind::Allocate => self.lose(format!("allocate refused ({code})"), now, false),
                Kind::Refresh { lifetime: 0 } => self.allocate(now),
                Kind::Refresh { .. } => {
                    self.lose(format!("refresh refused ({code})"), now, code == 437)
                }
                Kind::Permission(ips) => {
                    for ip in ips {
                        if let Some(p) = self.perms.get_mut(&ip) {
                            p.pending = false;
                            p.refresh_at = Some(now + Duration::from_secs(30));
                        }
                    }
                }
                Kind::ChannelBind { peer, .. } => {
                    if let Some(c) = self.chans.get_mut(&peer) {
                        c.pending = false;
                        c.refresh_at = Some(now + Duration::from_secs(30));
                    }
                }
                Kind::Keepalive => {}
            }
            return;
        }
        // Success. Responses to authenticated requests must carry a valid MESSAGE-INTEGRITY.
        if let Some(key) = &self.key
            && !matches!(txn.kind, Kind::Keepalive)
            && msg.has_integrity()
            && !msg.verify(key)
        {
            tracing::warn!("TURN response with a bad MESSAGE-INTEGRITY ignored");
            self.txns.insert(msg.tid, txn);
            return;
        }
        match txn.kind {
            Kind::Allocate => {
                let (Some(relayed), Some(mapped)) = (
                    msg.xor_addr(attr::XOR_RELAYED_ADDRESS),
                    msg.xor_addr(attr::XOR_MAPPED_ADDRESS),
                ) else {
                    self.lose("allocate response without addresses".into(), now, false);
                    return;
                };
                let lifetime = msg.u32_attr(attr::LIFETIME).unwrap_or(REQUESTED_LIFETIME);
                self.state = State::Allocated {
                    relayed,
                    mapped,
                    refresh_at: now + refresh_in(lifetime),
                };
                self.keepalive_at = Some(now + KEEPALIVE);
                self.backoff = Duration::from_secs(1);
                self.allocations += 1;
                tracing::info!(%relayed, %mapped, lifetime, "TURN allocation");
                self.events
                    .push_back(TurnEvent::Allocated { relayed, mapped });
            }
            Kind::Refresh { lifetime: 0 } => self.allocate(now),
            Kind::Refresh { .. } => {
                let lifetime = msg.u32_attr(attr::LIFETIME).unwrap_or(REQUESTED_LIFETIME);
                if let State::Allocated { refresh_at, .. } = &mut self.state {
                    *refresh_at = now + refresh_in(lifetime);
                }
            }
            Kind::Permission(ips) => {
                for ip in ips {
                    if let Some(p) = self.perms.get_mut(&ip) {
                        *p = Perm {
                            installed: true,
                            pending: false,
                            refresh_at: Some(now + PERMISSION_REFRESH),
                        };
                    }
                }
            }
            Kind::ChannelBind { peer, .. } => {
                if let Some(c) = self.chans.get_mut(&peer) {
                    c.bound = true;
                    c.pending = false;
                    c.refresh_at = Some(now + CHANNEL_REFRESH);
                }
                // A channel binding installs or refreshes the permission for the peer's address too.
                if let Some(p) = self.perms.get_mut(&peer.ip())
                    && !p.pending
                {
                    *p = Perm {
                        installed: true,
                        pending: false,
                        refresh_at: Some(now + PERMISSION_REFRESH),
                    };
                }
            }
            Kind::Keepalive => {
                let seen = msg.xor_addr(attr::XOR_MAPPED_ADDRESS);
                if let (Some(seen), Some(mapped)) = (seen, self.mapped())
                    && seen != mapped
                {
                    self.lose(
                        format!("our mapping changed from {mapped} to {seen}"),
                        now,
                        true,
                    );
                }
            }
        }
    }
}

fn refresh_in(lifetime: u32) -> Duration {
    let l = Duration::from_secs(lifetime as u64);
    if l > Duration::from_secs(120) {
        l - Duration::from_secs(60)
    } else {
        l / 2
    }
}
