//! What the fuzz targets run (`fuzz/fuzz_targets/stun_decode.rs`, `nat_agent.rs` include this file) and
//! what `tests/never_panics.rs` runs on stable: one copy of the harness, so CI checks the same properties
//! the fuzzer does. Everything here takes arbitrary bytes and must never panic.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use evio_traversal::demux::{self, Kind};
use evio_traversal::stun::{self, Builder, Class, Message, TransactionId, attr, method};
use evio_traversal::{Agent, AgentConfig, Candidate, CandidateKind, Source, Timers, TurnConfig};

/// Every attribute type the codec knows, plus an unknown one.
const ATTRS: [u16; 16] = [
    attr::MAPPED_ADDRESS,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::ERROR_CODE,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::XOR_RELAYED_ADDRESS,
    attr::REQUESTED_TRANSPORT,
    attr::XOR_MAPPED_ADDRESS,
    attr::SOFTWARE,
    attr::FINGERPRINT,
    0x7777,
];

/// The codec and the demultiplexer on one datagram, with the properties they promise:
/// - `decode` and every accessor never panic;
/// - a decoded message is what `is_stun` and `classify` call STUN, and what `classify` calls STUN
///   decodes unless an attribute is malformed (the cookie rule of `demux` has no exception);
/// - class, method, transaction id and XOR addresses survive a re-encode with [`Builder`], and a re-encode
///   with MESSAGE-INTEGRITY and FINGERPRINT verifies with its key and not with another;
/// - ChannelData framing round-trips.
pub fn stun(data: &[u8]) {
    let kind = demux::classify(data);
    if let Some((ch, payload)) = demux::channel_data(data) {
        assert_eq!(kind, Kind::ChannelData);
        assert!((0x4000..=0x7FFF).contains(&ch));
        let mut out = Vec::new();
        demux::encode_channel_data(ch, payload, &mut out).expect("a received payload fits");
        assert_eq!(demux::channel_data(&out), Some((ch, payload)));
    }
    let m = match Message::decode(data) {
        Ok(m) => m,
        Err(e) => {
            // Only a malformed attribute makes a datagram framed as STUN fail to decode.
            if kind == Kind::Stun {
                assert!(e != stun::StunError::NotStun, "{e}");
            }
            return;
        }
    };
    assert!(stun::is_stun(data));
    assert_eq!(kind, Kind::Stun);
    for t in ATTRS {
        let _ = m.attr(t);
        let _ = m.attrs(t).count();
        let _ = m.text(t);
        let _ = m.u32_attr(t);
        let _ = m.xor_addrs(t);
        if let Some(a) = m.xor_addr(t) {
            let again = Builder::new(m.class, m.method, m.tid)
                .xor_addr(t, a)
                .finish()
                .expect("an address fits");
            let d = Message::decode(&again).expect("our own encoding decodes");
            assert_eq!(d.xor_addr(t), Some(a));
        }
    }
    let _ = m.error_code();
    let _ = m.has_integrity();
    let _ = m.verify(b"key");
    let _ = m.verify(&data[..data.len().min(64)]);
    let mut b = Builder::new(m.class, m.method, m.tid);
    let mut body = 0;
    for t in [attr::USERNAME, attr::REALM, attr::NONCE, attr::DATA] {
        if let Some(v) = m.attr(t) {
            b = b.attr(t, v);
            body += 4 + v.len().div_ceil(4) * 4;
        }
    }
    let again = match b.integrity(b"k").fingerprint() {
        Ok(again) => again,
        Err(e) => {
            // Only when the re-encode (with 32 bytes of integrity and fingerprint) is too long.
            assert_eq!(e, stun::StunError::TooLong(20 + body + 32));
            assert!(body + 32 > stun::MAX_BODY);
            return;
        }
    };
    let d = Message::decode(&again).expect("our own encoding decodes");
    assert_eq!((d.class, d.method, d.tid), (m.class, m.method, m.tid));
    assert_eq!(d.attr(attr::DATA), m.attr(attr::DATA));
    assert!(d.verify(b"k"));
    assert!(!d.verify(b"other"));
}

/// Seeds for [`stun`]: what the NAT core sends and receives.
pub fn stun_seeds() -> Vec<Vec<u8>> {
    let tid = TransactionId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let v4: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::7]:9".parse().unwrap();
    let mut cd = Vec::new();
    demux::encode_channel_data(0x4001, b"\x04\0\0\0wireguard data", &mut cd).unwrap();
    let seeds = vec![
        Builder::new(Class::Request, method::BINDING, tid).fingerprint(),
        Builder::new(Class::Success, method::BINDING, tid)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, v4)
            .integrity(b"key")
            .fingerprint(),
        Builder::new(Class::Request, method::BINDING, tid)
            .attr(attr::USERNAME, &[b'a'; 64])
            .integrity(b"key")
            .fingerprint(),
        Builder::new(Class::Error, method::ALLOCATE, tid)
            .error(401, "Unauthorized")
            .attr(attr::REALM, b"evio")
            .attr(attr::NONCE, b"abcdef")
            .fingerprint(),
        Builder::new(Class::Success, method::ALLOCATE, tid)
            .xor_addr(attr::XOR_RELAYED_ADDRESS, v6)
            .xor_addr(attr::XOR_MAPPED_ADDRESS, v4)
            .u32_attr(attr::LIFETIME, 600)
            .integrity(b"key")
            .fingerprint(),
        Builder::new(Class::Indication, method::DATA, tid)
            .xor_addr(attr::XOR_PEER_ADDRESS, v4)
            .attr(attr::DATA, b"\x01\0\0\0handshake")
            .finish(),
    ];
    let mut seeds: Vec<Vec<u8>> = seeds.into_iter().map(|s| s.unwrap()).collect();
    seeds.push(cd);
    seeds
}

/// A cursor over the fuzzer's bytes; reads past the end give zeros.
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
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    /// A length-prefixed chunk (one byte of length, up to 255 bytes).
    fn chunk(&mut self) -> &'a [u8] {
        let n = self.byte() as usize;
        self.take(n)
    }
    fn addr(&mut self) -> SocketAddr {
        if self.byte() & 1 == 0 {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(self.u32())), self.u16())
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&[self.take(16), &[0u8; 16]].concat()[..16]);
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), self.u16())
        }
    }
}

const LOCAL_KEY: [u8; 32] = [0xAA; 32];
const PEER_KEY: [u8; 32] = [0x55; 32];
const CHECK_KEY: [u8; 32] = [0x33; 32];
const TURN_USER: &str = "evio";
const TURN_PASSWORD: &str = "secret";
const REALM: &str = "evio.test";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn stun_server() -> SocketAddr {
    sa("198.51.100.1:3478")
}
fn turn_server() -> SocketAddr {
    sa("198.51.100.2:3478")
}
fn peer_candidates() -> Vec<Candidate> {
    vec![
        Candidate::new(CandidateKind::Host, sa("10.0.0.2:51820")),
        Candidate::new(CandidateKind::ServerReflexive, sa("203.0.113.5:40000")),
        Candidate::new(CandidateKind::Relayed, sa("198.51.100.2:50000")),
        Candidate::new(CandidateKind::Host, sa("[2001:db8::2]:51820")),
    ]
}

/// A request the agent sent, whose answer the fuzzer may forge.
#[derive(Clone, Copy)]
struct Sent {
    dst: SocketAddr,
    tid: TransactionId,
    method: u16,
    /// Sent through the relay (as ChannelData or a Send indication) rather than directly.
    relayed: bool,
}

/// The STUN request inside an outgoing datagram: direct, in ChannelData or in a Send indication.
fn sent_request(dst: SocketAddr, payload: &[u8]) -> Option<Sent> {
    let (inner, relayed) = if let Some((_, p)) = demux::channel_data(payload) {
        (p, true)
    } else {
        (payload, false)
    };
    let m = Message::decode(inner).ok()?;
    if m.class == Class::Indication && m.method == method::SEND {
        let peer = m.xor_addr(attr::XOR_PEER_ADDRESS)?;
        let data = m.attr(attr::DATA)?;
        let inner = Message::decode(data).ok()?;
        return (inner.class == Class::Request).then_some(Sent {
            dst: peer,
            tid: inner.tid,
            method: inner.method,
            relayed: true,
        });
    }
    (m.class == Class::Request).then_some(Sent {
        dst: if relayed { turn_server() } else { dst },
        tid: m.tid,
        method: m.method,
        relayed,
    })
}

/// The agent's wall clock at its start.
const UNIX: Duration = Duration::from_secs(1_790_000_000);

struct AgentRun {
    agent: Agent,
    start: Instant,
    now: Instant,
    sent: Vec<Sent>,
}

impl AgentRun {
    fn new() -> AgentRun {
        let now = Instant::now();
        let cfg = AgentConfig {
            local_key: LOCAL_KEY,
            host_candidates: vec![sa("10.0.0.1:51820")],
            stun_servers: vec![stun_server()],
            turn: Some(TurnConfig {
                server: turn_server(),
                user: TURN_USER.into(),
                password: TURN_PASSWORD.into(),
            }),
            timers: Timers::default(),
            unix_time: UNIX,
        };
        let mut agent = Agent::new(cfg, 7, now);
        agent.set_peer(PEER_KEY, CHECK_KEY, peer_candidates(), now);
        let mut run = AgentRun {
            agent,
            start: now,
            now,
            sent: Vec::new(),
        };
        run.drain();
        run
    }

    /// Takes everything the agent wants to send and say, remembering its requests.
    fn drain(&mut self) {
        while let Some(t) = self.agent.poll_transmit() {
            if let Some(s) = sent_request(t.dst, &t.payload) {
                if self.sent.len() >= 64 {
                    self.sent.remove(0);
                }
                self.sent.push(s);
            }
        }
        while self.agent.poll_event().is_some() {}
    }

    fn pick_sent(&self, r: &mut Reader<'_>) -> Option<Sent> {
        let n = self.sent.len();
        (n > 0).then(|| self.sent[n - 1 - r.byte() as usize % n])
    }

    /// A source address: one the agent knows (STUN server, TURN server, a peer candidate) or any.
    fn source(&self, r: &mut Reader<'_>) -> SocketAddr {
        match r.byte() % 8 {
            0 => stun_server(),
            1 | 2 => turn_server(),
            3..=6 => peer_candidates()[(r.byte() % 4) as usize].addr,
            _ => r.addr(),
        }
    }

    /// Delivers `buf` from `from`; through the relay (from peer address `from`) if `relay`.
    fn deliver(&mut self, from: SocketAddr, buf: &[u8], relay: Option<u8>) {
        match relay {
            None => {
                let _ = self.agent.handle_input(from, buf, self.now);
            }
            Some(how) => {
                let wrapped = if how & 1 == 0 {
                    let mut cd = Vec::new();
                    demux::encode_channel_data(0x4000 + (how >> 1) as u16 % 8, buf, &mut cd)
                        .map(|()| cd)
                } else {
                    Builder::new(Class::Indication, method::DATA, TransactionId([how; 12]))
                        .xor_addr(attr::XOR_PEER_ADDRESS, from)
                        .attr(attr::DATA, buf)
                        .finish()
                };
                let Ok(wrapped) = wrapped else {
                    return;
                };
                let _ = self.agent.handle_input(turn_server(), &wrapped, self.now);
            }
        }
        self.drain();
    }

    fn step(&mut self, r: &mut Reader<'_>) -> bool {
        let Some(op) = r.u8() else {
            return false;
        };
        match op % 10 {
            // Raw bytes from a source.
            0 => {
                let from = self.source(r);
                let buf = r.chunk().to_vec();
                self.deliver(from, &buf, None);
            }
            // Raw bytes carrying the transaction id of a request in flight (a forged answer).
            1 => {
                let sent = self.pick_sent(r);
                let mut buf = r.chunk().to_vec();
                if let Some(s) = sent
                    && buf.len() >= 20
                {
                    buf[8..20].copy_from_slice(&s.tid.0);
                    let relay = s.relayed.then(|| r.byte());
                    self.deliver(s.dst, &buf, relay);
                }
            }
            // Time passes.
            2 => {
                self.now += Duration::from_millis(r.u16() as u64 * 4);
                // Timers run when due, or early if the fuzzer says so.
                let early = r.byte() & 1 == 1;
                if self
                    .agent
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now || early)
                {
                    self.agent.handle_timeout(self.now);
                }
                self.drain();
            }
            // An authenticated connectivity check from the peer (direct or relayed), stamped with the
            // agent's clock give or take up to 65 s (so inside and outside the acceptance window).
            3 => {
                let from = self.source(r);
                let tid = TransactionId(r.take(12).try_into().unwrap_or([9; 12]));
                let user: String = PEER_KEY.iter().map(|x| format!("{x:02x}")).collect();
                let unix = (UNIX + (self.now - self.start)).as_millis() as u64;
                let skew = r.u16() as u64;
                let ts = if r.byte() & 1 == 0 {
                    unix.saturating_sub(skew)
                } else {
                    unix + skew
                };
                let buf = Builder::new(Class::Request, method::BINDING, tid)
                    .attr(attr::USERNAME, user.as_bytes())
                    .attr(0x7777, r.chunk())
                    .attr(evio_traversal::agent::CHECK_TIME, &ts.to_be_bytes())
                    .integrity(&CHECK_KEY)
                    .fingerprint();
                let Ok(buf) = buf else {
                    return true;
                };
                let relay = (r.byte() & 1 == 1).then(|| r.byte());
                self.deliver(from, &buf, relay);
            }
            // An answer to a request in flight, well formed: a check response (keyed with the check
            // key), a STUN server's answer, a TURN server's answer (401/438 with realm and nonce, other
            // errors, successes with addresses and lifetime, MESSAGE-INTEGRITY or not).
            4 => {
                let Some(s) = self.pick_sent(r) else {
                    return true;
                };
                let flags = r.byte();
                let class = if flags & 1 == 0 {
                    Class::Success
                } else {
                    Class::Error
                };
                let mut b = Builder::new(class, s.method, s.tid);
                if class == Class::Error {
                    let code = [401, 438, 437, 403, 486, 508, 500][(flags >> 1) as usize % 7];
                    b = b
                        .error(code, "x")
                        .attr(attr::REALM, REALM.as_bytes())
                        .attr(attr::NONCE, r.chunk());
                } else {
                    b = b
                        .xor_addr(attr::XOR_MAPPED_ADDRESS, r.addr())
                        .xor_addr(attr::XOR_RELAYED_ADDRESS, r.addr())
                        .u32_attr(attr::LIFETIME, r.u32());
                }
                let msg = match (flags >> 4) % 3 {
                    0 => b.integrity(&CHECK_KEY).fingerprint(),
                    1 => b
                        .integrity(&stun::long_term_key(TURN_USER, REALM, TURN_PASSWORD))
                        .fingerprint(),
                    _ => b.finish(),
                };
                let Ok(msg) = msg else {
                    return true;
                };
                let relay = s.relayed.then(|| r.byte());
                self.deliver(s.dst, &msg, relay);
            }
            // Data relayed from a peer address through the TURN server.
            5 => {
                let from = self.source(r);
                let buf = r.chunk().to_vec();
                let how = r.byte();
                self.deliver(from, &buf, Some(how));
            }
            // The tunnel authenticated a datagram of the peer from an address.
            6 => {
                let a = self.source(r);
                let from = if r.byte() & 1 == 0 {
                    Source::Direct(a)
                } else {
                    Source::Relay(a)
                };
                self.agent.tunnel_from(&PEER_KEY, from, self.now);
                self.drain();
            }
            // The control plane: candidates change, the peer goes and comes back, local addresses change.
            7 => {
                let mask = r.byte();
                let mut c: Vec<Candidate> = peer_candidates()
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, c)| c)
                    .collect();
                if mask & 0x80 != 0 {
                    let kind = [
                        CandidateKind::Host,
                        CandidateKind::ServerReflexive,
                        CandidateKind::PeerReflexive,
                        CandidateKind::Relayed,
                    ][(mask >> 4) as usize % 4];
                    c.push(Candidate::new(kind, r.addr()));
                }
                match mask & 0x30 {
                    0x30 => self.agent.remove_peer(&PEER_KEY),
                    0x20 => self
                        .agent
                        .set_host_candidates(vec![sa("10.0.0.1:51820"), r.addr()]),
                    _ => self.agent.set_peer(PEER_KEY, CHECK_KEY, c, self.now),
                }
                self.drain();
            }
            // Sending tunnel datagrams.
            8 => {
                let payload = r.chunk();
                let _ = self.agent.wrap(&PEER_KEY, payload);
                let _ = self.agent.route(&PEER_KEY);
                let to = self.source(r);
                let _ = self.agent.turn_wrap(to, payload);
                self.drain();
            }
            // Status calls.
            _ => {
                let _ = self.agent.path(&PEER_KEY);
                let _ = self.agent.pairs(&PEER_KEY);
                let _ = self.agent.local_candidates();
                let _ = self.agent.peer_reflexive();
                let _ = self.agent.turn().map(|t| (t.relayed(), t.mapped()));
            }
        }
        true
    }
}

/// What an [`agent`] run reached (so the stable test can check that the seeds go deep).
#[derive(Debug, Default)]
pub struct Reached {
    pub allocated: bool,
    pub path: Option<evio_traversal::PathKind>,
}

/// The agent (and its TURN client) fed a script of operations decoded from `data`: datagrams from the
/// network (raw, or shaped as answers to the agent's requests in flight, or authenticated checks from its
/// peer, direct or through the relay), time passing, control-plane changes. Must never panic, and never
/// learns more than `MAX_LEARNED_PAIRS` pairs.
pub fn agent(data: &[u8]) -> Reached {
    let mut run = AgentRun::new();
    let mut r = Reader(data);
    let mut reached = Reached::default();
    // Bounded, so a long input cannot make one run slow.
    for _ in 0..256 {
        if !run.step(&mut r) {
            break;
        }
        reached.allocated |= run.agent.turn().is_some_and(|t| t.relayed().is_some());
        assert!(run.agent.learned_pairs(&PEER_KEY) <= evio_traversal::MAX_LEARNED_PAIRS);
        if let Some(p) = run.agent.path(&PEER_KEY) {
            reached.path = Some(p.kind);
        }
    }
    reached
}

/// Builds [`agent`] scripts (for the seeds).
#[derive(Default)]
pub struct Script(pub Vec<u8>);

impl Script {
    fn addr4(mut self, a: SocketAddr) -> Self {
        let SocketAddr::V4(a) = a else {
            unreachable!("seeds use IPv4")
        };
        self.0.push(0);
        self.0.extend_from_slice(&a.ip().octets());
        self.0.extend_from_slice(&a.port().to_be_bytes());
        self
    }
    /// Time passes by `ms` (a multiple of 4) and the timers run.
    pub fn time(mut self, ms: u16) -> Self {
        self.0.push(2);
        self.0.extend_from_slice(&(ms / 4).to_be_bytes());
        self.0.push(1);
        self
    }
    /// The TURN server answers the newest request with 401 and a nonce.
    pub fn unauthorized(mut self) -> Self {
        self.0.extend_from_slice(&[4, 0, 0b0000_0001, 5]);
        self.0.extend_from_slice(b"nonce");
        self
    }
    /// A success answer to the `pick`-th newest request, with mapped and relayed addresses, a lifetime
    /// and MESSAGE-INTEGRITY keyed with the check key (`turn_key` false) or the TURN long-term key.
    pub fn success(mut self, pick: u8, mapped: &str, relayed: &str, turn_key: bool) -> Self {
        self.0
            .extend_from_slice(&[4, pick, if turn_key { 0x10 } else { 0 }]);
        let mut s = self.addr4(sa(mapped)).addr4(sa(relayed));
        s.0.extend_from_slice(&600u32.to_be_bytes());
        s.0.push(0);
        s
    }
    /// An authenticated check from the peer's srflx candidate, stamped with the agent's clock.
    pub fn check(mut self) -> Self {
        self.0.extend_from_slice(&[3, 3, 1]);
        self.0.extend_from_slice(&[7; 12]);
        self.0.extend_from_slice(&[0, 0, 0]);
        self.0.extend_from_slice(&[2, 0xAB, 0xCD, 0]);
        self
    }
    /// Raw bytes relayed from the peer's relayed candidate.
    pub fn relayed(mut self, payload: &[u8], how: u8) -> Self {
        self.0.extend_from_slice(&[5, 3, 2, payload.len() as u8]);
        self.0.extend_from_slice(payload);
        self.0.push(how);
        self
    }
    /// A control-plane change (see op 7) and sends.
    pub fn control(mut self, mask: u8) -> Self {
        self.0
            .extend_from_slice(&[7, mask, 8, 4, 1, 0, 0, 0, 3, 1, 9]);
        self
    }
}

/// Seeds for [`agent`]: short scripts that reach an allocation, a checked pair and relayed data.
pub fn agent_seeds() -> Vec<Vec<u8>> {
    let alloc = || {
        Script::default()
            .unauthorized()
            .success(0, "203.0.113.9:40000", "198.51.100.2:50001", true)
    };
    vec![
        alloc().time(1000).0,
        Script::default()
            .time(0)
            .success(0, "10.0.0.1:51820", "10.0.0.1:51820", false)
            .time(5000)
            .0,
        alloc()
            .time(100)
            .check()
            .relayed(b"\x01\0\0\0handshake", 2)
            .relayed(b"\x04\0\0\0data", 1)
            .control(0x0F)
            .time(4000)
            .control(0x30)
            .0,
    ]
}
