//! Sans-IO core of evio's overlay data plane: one [`Node`] holds this node's static key and one
//! WireGuard-protocol session per peer, and turns inputs into outputs without touching sockets, devices or
//! threads:
//!
//! - inputs: packets read from the TUN device ([`Node::encapsulate`]), datagrams received from an address
//!   ([`Node::decapsulate`]), timer ticks ([`Node::tick`]), peer changes ([`Node::upsert_peer`],
//!   [`Node::remove_peer`], [`Node::set_path`]);
//! - outputs: the datagram or packet written into the caller's buffer (the hot path allocates nothing),
//!   extra datagrams to send ([`Node::poll_transmit`]: handshakes, cookies, queued packets),
//!   [`Event`]s ([`Node::poll_event`]) and authenticated datagrams from a new source
//!   ([`Node::poll_source`], for NAT traversal).
//!
//! Every method takes `&self`: one `Node` is shared by the sending and receiving threads, the timers,
//! the control plane and status without a lock around it (a copy-on-write peer table, one mutex per
//! peer's session, atomic counters; see the `node` module). No new dependency for it: the table is a
//! `std` `RwLock<Arc<_>>` whose write lock is held only for a pointer swap.
//!
//! The protocol itself (Noise IKpsk2 handshake, cookies, rekey timers, replay window, ChaCha20-Poly1305) is
//! `boringtun`'s `noise` module (Cloudflare's WireGuard implementation, the sans-IO part of it, chosen
//! because it is a maintained, widely deployed implementation of a formally analysed protocol: evio does no
//! crypto of its own). This crate adds what a multi-peer node needs around it: cryptokey routing (longest
//! prefix match over each peer's VIP and pod subnet, [`RouteTable`]), the inbound filter (a decrypted packet
//! is accepted only if its inner source lies in the sending peer's prefixes), drop counters by reason, and
//! the endpoint NAT traversal chose for each peer ([`Node::set_path`], [`PathKind`]), reporting authenticated datagrams from other sources ([`Node::poll_source`]) instead of roaming.
//!
//! Time: the core takes `now` for its own bookkeeping; boringtun's timers read the monotonic clock
//! themselves. With the `mock-time` feature boringtun reads `mock_instant`'s clock instead, which the
//! simulation tests advance (`cargo test -p evio-tunnel --features mock-time`).

mod node;
mod route;

pub use boringtun::x25519::{PublicKey, StaticSecret};
pub use node::{
    DropReason, Drops, Event, Inbound, MIN_BUFFER, Node, NodeConfig, Outbound, PathKind,
    PeerConfig, PeerStatus, Transmit,
};
pub use route::{RouteTable, packet_addrs};

/// Identifies a peer inside one [`Node`] (also the high 24 bits of its WireGuard session indices).
pub type PeerId = u32;

/// Bytes the tunnel adds to an inner packet: WireGuard data header and tag (32) plus UDP (8) and IPv6 (40)
/// headers. The TUN MTU is the underlay MTU minus this (1420 on a 1500 underlay).
pub const OVERHEAD: usize = 80;
