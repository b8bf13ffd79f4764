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
/// Peer addresses per CreatePermission: keeps the request well under a path MTU (24 bytes per IPv6
/// address) however many peers sit behind the relay.
const PERMISSIONS_PER_REQUEST: usize = 32;
/// REALM and NONCE are shorter than 128 characters, at most 763 bytes (RFC 8489 §14.9, §14.10); longer
/// ones are not echoed back.
const MAX_REALM_NONCE: usize = 763;

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
    /// The long-term key the request was signed with; its response must be signed with it too.
    key: Option<[u8; 16]>,
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
        self.want_permissions([ip], now);
    }

    /// Keeps permissions for every address of `ips` installed: one pass over the table for all of them
    /// (a lazy node permits every resting peer's addresses on each control-plane update).
    /// IPv6 addresses are skipped: our allocation is IPv4 (we send no REQUESTED-ADDRESS-FAMILY, RFC 8656
    /// §7.2), and a server refuses a permission of the other family (443); an IPv6 peer is reached
    /// directly or not through this relay.
    pub fn want_permissions(&mut self, ips: impl IntoIterator<Item = IpAddr>, now: Instant) {
        for ip in ips.into_iter().filter(IpAddr::is_ipv4) {
            self.perms.entry(ip).or_insert(Perm {
                installed: false,
                pending: false,
                refresh_at: None,
            });
        }
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
    /// `None` if the relay cannot reach `peer` (yet), or if `payload` does not fit the framing's 16-bit
    /// length (65535 bytes for ChannelData, a little less for a Send indication).
    pub fn wrap(&mut self, peer: SocketAddr, payload: &[u8]) -> Option<Transmit> {
        self.relayed()?;
        if let Some(n) = self.channel(peer) {
            let mut out = Vec::with_capacity(payload.len() + demux::CHANNEL_HEADER);
            if let Err(e) = demux::encode_channel_data(n, payload, &mut out) {
                tracing::debug!(%peer, "not relayed: {e}");
                return None;
            }
            return Some(Transmit {
                dst: self.cfg.server,
                payload: out,
            });
        }
        if !self.perms.get(&peer.ip()).is_some_and(|p| p.installed) {
            return None;
        }
        let msg = match Builder::new(Class::Indication, method::SEND, self.tid())
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, payload)
            .finish()
        {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%peer, "not relayed: {e}");
                return None;
            }
        };
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
            // Only from addresses we asked a permission for: the server relays nothing else, so anything
            // else is forged (the server's address is easy to spoof).
            return match (msg.xor_addr(attr::XOR_PEER_ADDRESS), msg.attr(attr::DATA)) {
                (Some(peer), Some(payload))
                    if self.relayed().is_some() && self.perms.contains_key(&peer.ip()) =>
                {
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

    /// The request for `kind`, and the key it is signed with (none before the first 401).
    fn build(
        &mut self,
        kind: &Kind,
        tid: TransactionId,
    ) -> Result<(Vec<u8>, Option<[u8; 16]>), stun::StunError> {
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
                // A plain Binding: coturn answers it without credentials (and so without integrity).
                return Ok((
                    Builder::new(Class::Request, method::BINDING, tid).fingerprint()?,
                    None,
                ));
            }
        };
        let mut signed = None;
        if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
            b = b
                .attr(attr::USERNAME, self.cfg.user.as_bytes())
                .attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes())
                .integrity(key);
            signed = Some(*key);
        }
        Ok((b.fingerprint()?, signed))
    }

    fn request(&mut self, kind: Kind, now: Instant) {
        self.request_with(kind, now, 0);
    }

    fn request_with(&mut self, kind: Kind, now: Instant, auth_tries: u8) {
        let tid = self.tid();
        let (bytes, key) = match self.build(&kind, tid) {
            Ok(r) => r,
            Err(e) => {
                // Only a USERNAME of tens of kilobytes gets here (REALM and NONCE are bounded, peer
                // addresses go 32 to a request): handle it as a refusal, which ends in a retry later.
                tracing::error!(kind = ?kind, "TURN request not sent: {e}");
                self.refused(kind, 0, now);
                return;
            }
        };
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
                key,
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
        for chunk in ips.chunks(PERMISSIONS_PER_REQUEST) {
            self.request(Kind::Permission(chunk.to_vec()), now);
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

    /// Allocates again after the backoff, once a stale allocation was deleted. Not at once: coturn
    /// answers 437 to an Allocate for about two more seconds after its Refresh(0) succeeded, and each
    /// 437 would start another delete, a request loop at the speed of the round trip (seen in
    /// `coturn_signs_what_the_client_requires`).
    fn allocate_later(&mut self, now: Instant) {
        self.state = State::Waiting {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
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

    /// A request refused by the server with error `code` (0: could not be sent at all).
    fn refused(&mut self, kind: Kind, code: u16, now: Instant) {
        if code == 437
            && matches!(self.state, State::Allocated { .. })
            && matches!(kind, Kind::Permission(_) | Kind::ChannelBind { .. })
        {
            // The server no longer knows our allocation (it restarted, or it expired).
            self.lose(format!("allocation mismatch on {kind:?}"), now, true);
            return;
        }
        match kind {
            Kind::Allocate if code == 437 => {
                // An allocation of ours from before still holds this 5-tuple: delete it, then allocate.
                self.state = State::Deleting;
                self.request(Kind::Refresh { lifetime: 0 }, now);
            }
            Kind::Allocate => self.lose(format!("allocate refused ({code})"), now, false),
            Kind::Refresh { lifetime: 0 } => self.allocate_later(now),
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
    }

    fn on_response(&mut self, txn: Txn, msg: &Message<'_>, now: Instant) {
        let code = (msg.class == Class::Error).then(|| msg.error_code().unwrap_or(0));
        // A response that should be signed and is not (or not with our key) is discarded as if it had
        // never arrived: the transaction stays pending and is retransmitted (RFC 8489 §9.2.5, over
        // UDP). Forging a response takes only the 96-bit transaction id, which anyone on the path sees.
        let authentic = match txn.key {
            Some(key) => may_be_unsigned(&txn.kind, code) || msg.verify(&key),
            // Sent before the first challenge, so there is no key to check with. Errors are taken
            // (the 401 challenge, coturn's 437). A success is not: a TURN server authenticates every
            // request (RFC 8656 §5), so it answers an unsigned one with 401, never with a success. The
            // keepalive Binding is not a TURN request and is answered unsigned.
            None => code.is_some() || matches!(txn.kind, Kind::Keepalive),
        };
        if !authentic {
            tracing::debug!(kind = ?txn.kind, code, "TURN response without a valid MESSAGE-INTEGRITY discarded");
            self.txns.insert(msg.tid, txn);
            return;
        }
        if let Some(code) = code {
            if (code == 401 || code == 438) && txn.auth_tries < 3 {
                // A challenge: never authenticated, so only its REALM and NONCE are taken, and only if
                // they are of a sane size (they are echoed in every later request).
                let realm = msg.text(attr::REALM).filter(|r| r.len() <= MAX_REALM_NONCE);
                let nonce = msg.text(attr::NONCE).filter(|n| n.len() <= MAX_REALM_NONCE);
                if code == 438 {
                    self.stale_nonces += 1;
                }
                if let Some(realm) = realm {
                    self.realm = Some(realm.to_string());
                }
                if let Some(nonce) = nonce {
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
            self.refused(txn.kind, code, now);
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
            Kind::Refresh { lifetime: 0 } => self.allocate_later(now),
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

/// Which responses to a signed request are processed without a valid MESSAGE-INTEGRITY (`code`: the
/// error code, `None` for a success). Everything else must be signed (RFC 8489 §9.2.5):
/// - 401 and 438: the challenges, unsigned by nature; a forged one costs a resend (at most three in a
///   row) with the REALM and NONCE it carries, never our password;
/// - 437 to an Allocate: coturn checks the 5-tuple before the credentials and answers this one
///   unsigned (RFC 8656 §7.2 would sign it). Its only effect is an authenticated Refresh(0) whose own
///   answer must be signed, then a new Allocate.
fn may_be_unsigned(kind: &Kind, code: Option<u16>) -> bool {
    match code {
        Some(401 | 438) => true,
        Some(437) => matches!(kind, Kind::Allocate),
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "evio";
    const PASSWORD: &str = "secret";
    const REALM: &str = "evio";

    fn server() -> SocketAddr {
        "198.18.0.1:3478".parse().unwrap()
    }

    fn key() -> [u8; 16] {
        stun::long_term_key(USER, REALM, PASSWORD)
    }

    fn client(now: Instant) -> TurnClient {
        let cfg = TurnConfig {
            server: server(),
            user: USER.into(),
            password: PASSWORD.into(),
        };
        TurnClient::new(cfg, 1, now)
    }

    /// Everything the client wants to send.
    fn sent(c: &mut TurnClient) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| c.poll_transmit())
            .map(|t| {
                assert_eq!(t.dst, server());
                t.payload
            })
            .collect()
    }

    /// The one request the client just sent.
    fn one(c: &mut TurnClient) -> Vec<u8> {
        let mut s = sent(c);
        assert_eq!(s.len(), 1, "one request expected");
        s.pop().unwrap()
    }

    /// How the server answers: signed with the long-term key, signed with another key, or unsigned.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Sig {
        Key,
        Wrong,
        None,
    }

    /// Feeds `c` an answer to `req`: a success with `attrs`, or an error `code`.
    fn answer(
        c: &mut TurnClient,
        req: &[u8],
        code: Option<u16>,
        sig: Sig,
        attrs: impl FnOnce(Builder) -> Builder,
        now: Instant,
    ) {
        let m = Message::decode(req).unwrap();
        let b = match code {
            None => Builder::new(Class::Success, m.method, m.tid),
            Some(code) => Builder::new(Class::Error, m.method, m.tid).error(code, "x"),
        };
        let b = attrs(b);
        let b = match sig {
            Sig::Key => b.integrity(&key()),
            Sig::Wrong => b.integrity(&[7; 16]),
            Sig::None => b,
        };
        let d = b.fingerprint().unwrap();
        assert_eq!(c.handle_input(server(), &d, now), TurnInput::Handled);
    }

    fn challenge(b: Builder, nonce: &str) -> Builder {
        b.attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
    }

    fn allocation(b: Builder) -> Builder {
        b.xor_addr(
            attr::XOR_RELAYED_ADDRESS,
            "198.18.0.1:50000".parse().unwrap(),
        )
        .xor_addr(
            attr::XOR_MAPPED_ADDRESS,
            "198.18.1.1:40000".parse().unwrap(),
        )
        .u32_attr(attr::LIFETIME, 600)
    }

    /// A client through the 401 challenge, with its signed Allocate in flight.
    fn challenged(now: Instant) -> (TurnClient, Vec<u8>) {
        let mut c = client(now);
        let first = one(&mut c);
        assert!(!Message::decode(&first).unwrap().has_integrity());
        answer(
            &mut c,
            &first,
            Some(401),
            Sig::None,
            |b| challenge(b, "n1"),
            now,
        );
        let signed = one(&mut c);
        let m = Message::decode(&signed).unwrap();
        assert_eq!(m.method, method::ALLOCATE);
        assert!(m.verify(&key()));
        (c, signed)
    }

    fn allocated(now: Instant) -> TurnClient {
        let (mut c, req) = challenged(now);
        answer(&mut c, &req, None, Sig::Key, allocation, now);
        assert!(c.relayed().is_some());
        assert!(matches!(c.poll_event(), Some(TurnEvent::Allocated { .. })));
        c
    }

    /// RFC 8489 §9.2.5: over UDP, a response to a signed request without a valid MESSAGE-INTEGRITY is
    /// discarded as if it had never arrived. Before, one without MESSAGE-INTEGRITY at all was accepted:
    /// anyone who saw the transaction id could hand the client a relayed address of their choice.
    #[test]
    fn unsigned_success_to_a_signed_request_is_discarded() {
        let t0 = Instant::now();
        // Not even to the first, unsigned Allocate: the server must challenge it (RFC 8656 §5), so an
        // unsigned success can only be forged (racing the real 401).
        let mut c = client(t0);
        let first = one(&mut c);
        answer(&mut c, &first, None, Sig::None, allocation, t0);
        assert_eq!(
            c.relayed(),
            None,
            "unsigned success to the first Allocate accepted"
        );
        answer(
            &mut c,
            &first,
            Some(401),
            Sig::None,
            |b| challenge(b, "n1"),
            t0,
        );
        assert!(Message::decode(&one(&mut c)).unwrap().verify(&key()));
        for sig in [Sig::None, Sig::Wrong] {
            let (mut c, req) = challenged(t0);
            let tid = Message::decode(&req).unwrap().tid;
            answer(&mut c, &req, None, sig, allocation, t0);
            assert_eq!(c.relayed(), None, "{sig:?} success accepted");
            assert_eq!(c.poll_event(), None);
            // Still pending: retransmitted unchanged when its timer fires.
            assert!(c.owns(&tid));
            let t1 = t0 + Duration::from_millis(250);
            assert_eq!(c.poll_timeout(), Some(t1));
            c.handle_timeout(t1);
            assert_eq!(one(&mut c), req);
            // The real, signed answer still counts.
            answer(&mut c, &req, None, Sig::Key, allocation, t1);
            assert_eq!(c.relayed(), Some("198.18.0.1:50000".parse().unwrap()));
        }
    }

    /// Errors to signed requests must be signed too, except the challenges (401, 438) and coturn's
    /// unsigned 437 to an Allocate. Before, an unsigned 437 to a CreatePermission made the client drop
    /// its allocation.
    #[test]
    fn ipv6_peers_get_no_permission_on_the_ipv4_allocation() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        c.want_permissions(["2001:db8::5".parse().unwrap()], t0);
        assert!(
            sent(&mut c).is_empty(),
            "a CreatePermission for an IPv6 peer"
        );
        assert!(!c.perms.contains_key(&"2001:db8::5".parse().unwrap()));
        c.want_permissions(
            [
                "2001:db8::6".parse().unwrap(),
                "198.18.2.1".parse().unwrap(),
            ],
            t0,
        );
        assert_eq!(
            sent(&mut c).len(),
            1,
            "one CreatePermission, for the IPv4 peer"
        );
    }

    #[test]
    fn unsigned_errors_to_signed_requests_are_discarded() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        let relayed = c.relayed();
        c.want_permission("198.18.2.1".parse().unwrap(), t0);
        let req = one(&mut c);
        let tid = Message::decode(&req).unwrap().tid;
        for code in [437, 403, 400, 508] {
            for sig in [Sig::None, Sig::Wrong] {
                answer(&mut c, &req, Some(code), sig, |b| b, t0);
                assert!(c.owns(&tid), "{code} {sig:?} taken");
                assert_eq!((c.relayed(), c.poll_event()), (relayed, None));
            }
        }
        // Signed, the 437 means the server forgot the allocation: allocate again.
        answer(&mut c, &req, Some(437), Sig::Key, |b| b, t0);
        assert!(matches!(c.poll_event(), Some(TurnEvent::Lost { .. })));
        assert_eq!(c.relayed(), None);
        let again = one(&mut c);
        assert_eq!(Message::decode(&again).unwrap().method, method::ALLOCATE);
    }

    /// The challenges are unsigned by nature and keep working on signed requests: a 438 on a Refresh
    /// is retried with the new nonce.
    #[test]
    fn stale_nonce_on_a_signed_request_is_retried() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        c.probe(t0);
        let req = one(&mut c);
        answer(
            &mut c,
            &req,
            Some(438),
            Sig::None,
            |b| challenge(b, "n2"),
            t0,
        );
        assert_eq!(c.stale_nonces(), 1);
        let retry = one(&mut c);
        let m = Message::decode(&retry).unwrap();
        assert_eq!(
            (m.method, m.text(attr::NONCE)),
            (method::REFRESH, Some("n2"))
        );
        assert!(m.verify(&key()));
        answer(
            &mut c,
            &retry,
            None,
            Sig::Key,
            |b| b.u32_attr(attr::LIFETIME, 600),
            t0,
        );
        assert!(c.relayed().is_some());
        assert_eq!(c.poll_event(), None);
    }

    /// coturn answers an Allocate on a 5-tuple that already has an allocation with an unsigned 437 (it
    /// checks this before the credentials): the client deletes the old allocation (signed Refresh 0)
    /// and allocates again.
    #[test]
    fn unsigned_allocation_mismatch_on_allocate_is_taken() {
        let t0 = Instant::now();
        let (mut c, req) = challenged(t0);
        answer(&mut c, &req, Some(437), Sig::None, |b| b, t0);
        let delete = one(&mut c);
        let m = Message::decode(&delete).unwrap();
        assert_eq!(
            (m.method, m.u32_attr(attr::LIFETIME)),
            (method::REFRESH, Some(0))
        );
        assert!(m.verify(&key()));
        // Its answer must be signed.
        answer(&mut c, &delete, None, Sig::None, |b| b, t0);
        assert!(sent(&mut c).is_empty());
        answer(&mut c, &delete, None, Sig::Key, |b| b, t0);
        // The next Allocate waits for the backoff: coturn keeps the deleted allocation for a moment, and
        // another 437 would mean another delete, at once (a request loop before).
        assert!(sent(&mut c).is_empty());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.poll_timeout(), Some(t1));
        c.handle_timeout(t1);
        let alloc = one(&mut c);
        assert_eq!(Message::decode(&alloc).unwrap().method, method::ALLOCATE);
        answer(&mut c, &alloc, Some(437), Sig::None, |b| b, t1);
        let delete = one(&mut c);
        answer(&mut c, &delete, None, Sig::Key, |b| b, t1);
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(c.poll_timeout(), Some(t2), "the backoff doubles");
        c.handle_timeout(t2);
        let alloc = one(&mut c);
        answer(&mut c, &alloc, None, Sig::Key, allocation, t2);
        assert!(c.relayed().is_some());
    }

    /// The keepalive is a plain Binding, which coturn answers without integrity: that answer counts.
    #[test]
    fn unsigned_keepalive_answer_is_taken() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        let t1 = t0 + KEEPALIVE;
        c.handle_timeout(t1);
        let req = one(&mut c);
        let m = Message::decode(&req).unwrap();
        assert_eq!((m.method, m.has_integrity()), (method::BINDING, false));
        // A different mapping: the allocation's 5-tuple is gone.
        answer(
            &mut c,
            &req,
            None,
            Sig::None,
            |b| {
                b.xor_addr(
                    attr::XOR_MAPPED_ADDRESS,
                    "198.18.1.1:40001".parse().unwrap(),
                )
            },
            t1,
        );
        assert!(matches!(c.poll_event(), Some(TurnEvent::Lost { .. })));
    }

    /// A REALM or NONCE longer than RFC 8489 allows is not echoed in the next request.
    #[test]
    fn oversized_nonce_is_not_echoed() {
        let t0 = Instant::now();
        let mut c = client(t0);
        let first = one(&mut c);
        let huge = "n".repeat(MAX_REALM_NONCE + 1);
        answer(
            &mut c,
            &first,
            Some(401),
            Sig::None,
            |b| challenge(b, &huge),
            t0,
        );
        let next = one(&mut c);
        let m = Message::decode(&next).unwrap();
        assert_eq!((m.text(attr::NONCE), m.has_integrity()), (None, false));
        assert!(next.len() < 200);
    }

    /// However many permissions are due at once, each CreatePermission stays small.
    #[test]
    fn permissions_go_in_small_batches() {
        let t0 = Instant::now();
        let (mut c, req) = challenged(t0);
        for i in 0..100u32 {
            c.want_permission(IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 | i)), t0);
        }
        assert!(sent(&mut c).is_empty(), "nothing before the allocation");
        answer(&mut c, &req, None, Sig::Key, allocation, t0);
        let reqs = sent(&mut c);
        let counts: Vec<usize> = reqs
            .iter()
            .map(|r| {
                let m = Message::decode(r).unwrap();
                assert_eq!(m.method, method::CREATE_PERMISSION);
                assert!(r.len() < 1000, "{} bytes", r.len());
                m.xor_addrs(attr::XOR_PEER_ADDRESS).len()
            })
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 100);
        assert!(
            counts.iter().all(|&n| n <= PERMISSIONS_PER_REQUEST),
            "{counts:?}"
        );
    }

    /// A payload that does not fit the framing's 16-bit length is not relayed (before, it went out with
    /// its length wrapped modulo 65536).
    #[test]
    fn oversized_payloads_are_not_framed() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        let peer: SocketAddr = "198.18.2.1:51820".parse().unwrap();
        c.want_channel(peer, t0);
        let reqs = sent(&mut c);
        let perm = reqs
            .iter()
            .find(|r| Message::decode(r).unwrap().method == method::CREATE_PERMISSION)
            .unwrap();
        answer(&mut c, perm, None, Sig::Key, |b| b, t0);
        // Send indications: the DATA attribute and the peer address share the 16-bit length.
        assert!(c.wrap(peer, &vec![0; 65_000]).is_some());
        assert_eq!(c.wrap(peer, &vec![0; 65_535]), None);
        assert_eq!(c.wrap(peer, &vec![0; 65_536 + 8]), None);
        let bind = reqs
            .iter()
            .find(|r| Message::decode(r).unwrap().method == method::CHANNEL_BIND)
            .unwrap();
        answer(&mut c, bind, None, Sig::Key, |b| b, t0);
        assert!(c.channel(peer).is_some());
        let t = c.wrap(peer, &vec![1; 65_535]).unwrap();
        assert_eq!(t.payload.len(), 65_539);
        assert_eq!(c.wrap(peer, &vec![1; 65_536]), None);
    }

    /// Data indications and ChannelData are relayed datagrams only for what we asked for: a permission for
    /// the peer's address, a channel we bound. Anything else from the server's (spoofable) address is
    /// dropped. Before, a Data indication named any peer address and came out as relayed data.
    #[test]
    fn relayed_data_only_from_what_we_asked_for() {
        let t0 = Instant::now();
        let mut c = allocated(t0);
        let asked: SocketAddr = "198.18.2.1:51820".parse().unwrap();
        c.want_permission(asked.ip(), t0);
        let data = |peer: SocketAddr| {
            Builder::new(Class::Indication, method::DATA, TransactionId([5; 12]))
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, b"\x04\0\0\0wireguard")
                .finish()
                .unwrap()
        };
        let ind = data(asked);
        assert_eq!(
            c.handle_input(server(), &ind, t0),
            TurnInput::Data {
                peer: asked,
                payload: b"\x04\0\0\0wireguard"
            }
        );
        for i in 0..1000u16 {
            let spoofed = SocketAddr::from(([203, 0, 113, (i % 250) as u8], 1000 + i));
            let ind = data(spoofed);
            assert_eq!(c.handle_input(server(), &ind, t0), TurnInput::Handled);
            let mut chd = Vec::new();
            demux::encode_channel_data(0x4000 + i, b"\x04\0\0\0x", &mut chd).unwrap();
            assert_eq!(c.handle_input(server(), &chd, t0), TurnInput::Handled);
        }
    }
}
