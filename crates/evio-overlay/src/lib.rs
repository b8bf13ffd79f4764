//! evio's overlay node, sans-IO: one [`OverlayNode`] owns the per-peer WireGuard-protocol sessions
//! (`evio-tunnel`'s `Node`), NAT traversal (`evio-traversal`'s `Agent`: candidates, checks, path selection, the
//! TURN client) and the relay framing between them. It touches no socket, device, thread or clock:
//!
//! - inputs, each with `now`: packets read from the TUN device ([`OverlayNode::dst_for`] and
//!   [`OverlayNode::encapsulate`] on the hot path, [`OverlayNode::encapsulate_slow`] otherwise), datagrams
//!   received ([`OverlayNode::decapsulate`], then [`OverlayNode::process`] once per batch), timeouts
//!   ([`OverlayNode::handle_timeout`] at [`OverlayNode::poll_timeout`]), and the control plane's peers
//!   ([`OverlayNode::tunnel`] for sessions and routes, [`OverlayNode::set_peers`] for candidates);
//! - outputs: the datagram or packet written into the caller's buffer, typed [`Transmit`]s
//!   ([`OverlayNode::poll_transmit`]) whose destination is [`Dst::Direct`] (send as is) or [`Dst::Relay`]
//!   (prepend a ChannelData header and send to the TURN server), [`NodeEvent`]s
//!   ([`OverlayNode::poll_event`]: paths chosen, sessions, lazy peers woken and put to rest) and the next
//!   timeout.
//!
//! eviod is the I/O around it (threads, the TUN device, the UDP socket, etcd); the simulation test
//! (`tests/sim.rs`, feature `mock-time`) drives the same node on a fake clock through simulated NATs and a
//! TURN server model, so relayed paths, path switching and NAT rebinding are tested without a kernel.
//!
//! Inside, a peer reached through our own TURN allocation has a stand-in endpoint in the tunnel core
//! (`[100::1]:SLOT`, RFC 6666's discard-only prefix: never a real destination) whose slot names the peer's
//! address as the relay sees it; it never leaves this crate: every output is typed.
//!
//! Every method takes `&self`, so the I/O threads share one node. Locks: the NAT state's mutex, then
//! (while holding it, to apply path changes in order) the tunnel core's own per-peer locks; never the
//! other way round. The tunnel core's hot path takes no lock of this crate, except a relayed peer's
//! route lookup.

mod node;
mod relay;

pub use evio_traversal::{Candidate, CandidateKind, Path, PathKind, PeerKey, TurnConfig};
pub use evio_tunnel;
pub use node::{Config, Counters, EVENTS_MAX, NatView, NodeEvent, OverlayNode, Received};
pub use relay::{CHANNEL_HEADER, Dst, Transmit};
