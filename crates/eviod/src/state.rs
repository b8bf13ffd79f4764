//! State shared by the data plane threads, the control plane, the control socket and metrics.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use evio_overlay::OverlayNode;
use evio_tunnel::{Node, PeerStatus};
use ipnet::Ipv4Net;

/// What the control plane knows about a peer besides its tunnel state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMeta {
    pub node: String,
    pub address: Ipv4Addr,
    pub pod_subnet: Option<Ipv4Net>,
}

/// This node's identity as published.
#[derive(Debug, Clone, Default)]
pub struct SelfInfo {
    pub node: String,
    pub address: Option<Ipv4Addr>,
    pub pod_subnet: Option<Ipv4Net>,
    pub public_key: String,
}

/// Counters of the data plane and control plane (Prometheus metrics).
#[derive(Default)]
pub struct Counters {
    pub tun_rx_packets: AtomicU64,
    pub tun_tx_packets: AtomicU64,
    pub udp_rx_datagrams: AtomicU64,
    pub udp_tx_datagrams: AtomicU64,
    pub etcd_errors: AtomicU64,
    pub etcd_connected: AtomicBool,
    pub peer_updates: AtomicU64,
    /// Registrations in etcd not accepted as peers now (docs/security.md).
    pub registrations_rejected: AtomicU64,
    /// True while our own registration is refused: another key holds our node name.
    pub name_taken: AtomicBool,
}

/// Locks: the overlay node has none around it (inside, the tunnel core takes one peer's lock at a time
/// and NAT traversal its own; see `evio_overlay`), so status and metrics never wait for, nor stall,
/// forwarding. `me` and `meta` are the control plane's and status's only (never taken on the packet path).
pub struct Shared {
    /// The overlay node: sessions, NAT traversal, relay framing (sans-IO; the threads here do its I/O).
    pub overlay: OverlayNode,
    pub me: Mutex<SelfInfo>,
    pub meta: Mutex<HashMap<[u8; 32], PeerMeta>>,
    pub counters: Counters,
    pub stop: AtomicBool,
    /// A monotonic instant and the wall clock at the same moment, to turn instants into Unix time.
    epoch: (Instant, SystemTime),
}

/// `evioctl status --json` (docs/overlay.md): the contract lives in `evio-api`.
pub use evio_api::{PeerStatus as PeerJson, Status as StatusJson};

impl Shared {
    pub fn new(overlay: OverlayNode, me: SelfInfo) -> Shared {
        Shared {
            overlay,
            me: Mutex::new(me),
            meta: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            epoch: (Instant::now(), SystemTime::now()),
        }
    }

    /// The tunnel core (shared by reference: no lock around it).
    #[inline]
    pub fn node(&self) -> &Node {
        self.overlay.tunnel()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn unix_secs(&self, t: Instant) -> u64 {
        let wall = if t >= self.epoch.0 {
            self.epoch.1 + (t - self.epoch.0)
        } else {
            self.epoch.1 - (self.epoch.0 - t)
        };
        wall.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub fn status(&self) -> StatusJson {
        let me = self.me.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let peers: Vec<PeerStatus> = self.node().peers();
        let meta = self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let nat = self.overlay.view();
        let mut out: Vec<PeerJson> = peers
            .iter()
            .map(|p| {
                let m = meta.get(&p.public_key);
                PeerJson {
                    node: m.map(|m| m.node.clone()).unwrap_or_else(|| p.name.clone()),
                    address: m.map(|m| m.address.to_string()).unwrap_or_default(),
                    pod_subnet: m.and_then(|m| m.pod_subnet).map(|s| s.to_string()),
                    path: path_of(p, &nat).to_string(),
                    endpoint: p.endpoint.map(|e| nat.display_endpoint(e).to_string()),
                    last_handshake: p.last_handshake.map(|t| self.unix_secs(t)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        StatusJson {
            node: me.node,
            address: me.address.map(|a| a.to_string()),
            pod_subnet: me.pod_subnet.map(|s| s.to_string()),
            public_key: me.public_key,
            peers: out,
        }
    }
}

/// A peer's path for status: the tunnel core's (`connecting` until a session exists), and `connecting`
/// also while NAT traversal has no working path to it.
fn path_of(p: &PeerStatus, nat: &evio_overlay::NatView) -> &'static str {
    if nat.idle(&p.public_key) {
        return "idle";
    }
    if p.path == evio_tunnel::PathKind::Connecting || nat.no_path(&p.public_key) {
        return "connecting";
    }
    p.path.as_str()
}
