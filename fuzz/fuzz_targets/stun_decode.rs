#![no_main]
//! A datagram on the tunnel's UDP socket, as the NAT core parses it: STUN/TURN decoding with every
//! accessor, the WireGuard/STUN/ChannelData demultiplexer and ChannelData framing (harness and
//! properties: crates/evio-traversal/tests/fuzz_harness).
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/evio-traversal/tests/fuzz_harness/mod.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::stun(data));
