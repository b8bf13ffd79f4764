//! Sans-IO NAT traversal for evio: STUN binding (RFC 5389/8489), a TURN client (RFC 8656) and an
//! ICE-style agent that checks candidate pairs with every peer and keeps one path per peer (direct when
//! possible, through the TURN relay otherwise).
//!
//! Everything is driven by the caller: `now`, datagrams in ([`Agent::handle_input`]), datagrams out
//! ([`Agent::poll_transmit`]), timers ([`Agent::poll_timeout`] / [`Agent::handle_timeout`]) and events
//! ([`Agent::poll_event`]). No sockets, no clocks, no threads: the same code runs under a simulated network
//! with a fake clock ([`sim`]) and in eviod on the tunnel's one UDP socket, which it shares with WireGuard
//! ([`demux::classify`] tells the three protocols apart).
//!
//! # Why an own codec and agent rather than a crate
//! Checked (crates.io, late 2026): `stun-proto` 2.x / `turn-client-proto` 0.7 (librice) are the most
//! complete sans-IO STUN/TURN state machines, but the TURN client is pre-1.0 and its API was restructured
//! several times within a year (0.2 → 0.3 → 0.7: `TurnClient` became `TurnClientUdp` + an `api` trait
//! module), it carries its own `Instant` type and STUN agent that expect to own every datagram of a 5-tuple,
//! and it has no notion of a peer's identity. `stun_codec` 0.4 (bytecodec based) is a stable codec with
//! no client state machines. `is` 0.12 (str0m's ICE agent) is pre-1.0, tied to `str0m-proto`, built around
//! SDP-style ufrag/password exchange and controlling/controlled roles, and has no TURN client (Firezone's
//! snownet adds its own). What evio needs is small and specific: one socket shared with WireGuard, peers
//! identified by their X25519 public keys, checks authenticated by a key derived from the two nodes' DH
//! secret, relay pairs through one allocation, and a path selection that prefers direct and never flaps.
//! The wire format is only a few hundred lines ([`stun`]), checked against the RFC 5769 test vector and a
//! real coturn in the integration tests; the cryptographic primitives come from RustCrypto (`hmac`,
//! `sha1`, `sha2`, `md-5`) and `crc32fast`, all widely used and stable.

pub mod agent;
pub mod candidate;
pub mod demux;
pub mod sim;
pub mod slots;
pub mod stun;
pub mod turn;
pub mod txn;

use std::net::SocketAddr;

pub use agent::{
    Agent, AgentConfig, Base, CHECK_WINDOW, Event, Input, MAX_LEARNED_PAIRS, PairInfo, PairState,
    Path, PathKind, PeerKey, REPLAY_CACHE, Route, Source, Timers, check_key, encode_check,
};
pub use candidate::{Candidate, CandidateKind};
pub use slots::RelaySlots;
pub use turn::{TurnClient, TurnConfig, TurnEvent};

/// A datagram to send from the shared socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}
