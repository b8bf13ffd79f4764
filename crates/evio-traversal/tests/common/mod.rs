//! A blocking I/O driver for the sans-IO agent over real UDP sockets in lab namespaces, shared by the
//! coturn integration tests and the `nat_bench` example.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use evio_testbed::lab::{Host, Lab};
use evio_traversal::{
    Agent, AgentConfig, Candidate, CandidateKind, Event, Input, PathKind, PeerKey, Source, Timers,
    TurnConfig, check_key,
};
use x25519_dalek::{PublicKey, StaticSecret};

/// The payload of test tunnel datagrams (after the type and the sender's key).
pub const WG: &[u8] = &[1, 2, 3, 4, 5, 6, 7, 8];

/// One node: a real socket in a host namespace, driven by an agent.
pub struct Node {
    pub name: String,
    pub sock: UdpSocket,
    pub secret: StaticSecret,
    pub key: PeerKey,
    pub agent: Agent,
    pub candidates: Vec<Candidate>,
    pub started: Instant,
    pub srflx_at: Option<Duration>,
    pub relay_at: Option<Duration>,
    pub tunnel_rx: Vec<(Option<PeerKey>, Source, Vec<u8>)>,
}

impl Node {
    pub fn new(name: &str, host: &Host, lab: &Lab, turn: bool) -> Node {
        let sock = host.udp_socket(0).unwrap();
        sock.set_nonblocking(true).unwrap();
        let port = sock.local_addr().unwrap().port();
        let secret = StaticSecret::from(rand::random::<[u8; 32]>());
        let key = PublicKey::from(&secret).to_bytes();
        let t = lab.turn().unwrap();
        let cfg = AgentConfig {
            local_key: key,
            host_candidates: vec![SocketAddr::from((host.ip, port))],
            stun_servers: vec![t.addr],
            turn: turn.then(|| TurnConfig {
                server: t.addr,
                user: t.user.clone(),
                password: t.password.clone(),
            }),
            timers: Timers::default(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        };
        let now = Instant::now();
        let agent = Agent::new(cfg, rand::random(), now);
        let candidates = agent.local_candidates();
        Node {
            name: name.to_string(),
            sock,
            secret,
            key,
            agent,
            candidates,
            started: now,
            srflx_at: None,
            relay_at: None,
            tunnel_rx: Vec::new(),
        }
    }

    /// One round of I/O: receive what is there, fire timers, send what the agent wants.
    pub fn poll(&mut self) {
        let mut buf = [0u8; 2048];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let now = Instant::now();
                    let mut authenticated = None;
                    if let Input::Tunnel {
                        peer,
                        from,
                        payload,
                    } = self.agent.handle_input(from, &buf[..n], now)
                        && payload.len() >= 36
                    {
                        // Stand-in for the tunnel's authentication: the sender's key follows the type.
                        let mut sender = [0u8; 32];
                        sender.copy_from_slice(&payload[4..36]);
                        self.tunnel_rx.push((peer, from, payload[36..].to_vec()));
                        authenticated = Some((sender, from));
                    }
                    if let Some((sender, from)) = authenticated {
                        self.agent.tunnel_from(&sender, from, now);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{}: recv: {e}", self.name),
            }
        }
        let now = Instant::now();
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        while let Some(t) = self.agent.poll_transmit() {
            // A destination the namespace cannot route to (a peer's private host candidate) is fine.
            let _ = self.sock.send_to(&t.payload, t.dst);
        }
        while let Some(e) = self.agent.poll_event() {
            if std::env::var_os("EVIO_NAT_DEBUG").is_some() {
                eprintln!("{:>8.3?} {} {:?}", self.started.elapsed(), self.name, e);
            }
            if let Event::LocalCandidates(c) = e {
                let at = self.started.elapsed();
                if self.srflx_at.is_none()
                    && c.iter().any(|c| c.kind == CandidateKind::ServerReflexive)
                {
                    self.srflx_at = Some(at);
                }
                if self.relay_at.is_none() && c.iter().any(|c| c.kind == CandidateKind::Relayed) {
                    self.relay_at = Some(at);
                }
                self.candidates = c;
            }
        }
    }

    pub fn send_tunnel(&mut self, to: &PeerKey) -> bool {
        let mut wg = vec![4, 0, 0, 0];
        wg.extend_from_slice(&self.key);
        wg.extend_from_slice(WG);
        match self.agent.wrap(to, &wg) {
            Some(t) => self.sock.send_to(&t.payload, t.dst).is_ok(),
            None => false,
        }
    }
}

/// Drives all nodes for `d`, re-introducing nodes whose candidates changed (what etcd would do).
pub fn drive(nodes: &mut [Node], d: Duration, mut until: impl FnMut(&[Node]) -> bool) -> bool {
    let end = Instant::now() + d;
    let mut seen: HashMap<PeerKey, Vec<Candidate>> = HashMap::new();
    while Instant::now() < end {
        for n in nodes.iter_mut() {
            n.poll();
        }
        introduce_changed(nodes, &mut seen);
        if until(nodes) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

pub fn introduce_changed(nodes: &mut [Node], seen: &mut HashMap<PeerKey, Vec<Candidate>>) {
    let now = Instant::now();
    for i in 0..nodes.len() {
        if seen.get(&nodes[i].key) == Some(&nodes[i].candidates) {
            continue;
        }
        seen.insert(nodes[i].key, nodes[i].candidates.clone());
        let (key, cands) = (nodes[i].key, nodes[i].candidates.clone());
        for (j, n) in nodes.iter_mut().enumerate() {
            if i != j {
                let shared = n.secret.diffie_hellman(&PublicKey::from(key)).to_bytes();
                let ck = check_key(&shared, &n.key, &key, None);
                n.agent.set_peer(key, ck, cands.clone(), now);
            }
        }
    }
}

pub fn path_kind(nodes: &[Node], a: usize, b: usize) -> Option<PathKind> {
    nodes[a].agent.path(&nodes[b].key).map(|p| p.kind)
}

/// Sends a tunnel datagram each way (a few tries) and checks it arrives attributed to the sender.
pub fn tunnel_works(nodes: &mut [Node], a: usize, b: usize) -> bool {
    for (x, y) in [(a, b), (b, a)] {
        let to = nodes[y].key;
        let from = nodes[x].key;
        let before = nodes[y].tunnel_rx.len();
        let mut ok = false;
        for _ in 0..10 {
            nodes[x].send_tunnel(&to);
            ok = drive(nodes, Duration::from_millis(100), |n| {
                n[y].tunnel_rx[before..]
                    .iter()
                    .any(|(p, _, d)| d == WG && *p == Some(from))
            });
            if ok {
                break;
            }
        }
        if !ok {
            return false;
        }
    }
    true
}
