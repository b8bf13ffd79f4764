#![no_main]
//! The tunnel core: raw datagrams into a node with a live session, inner packets (untrusted, from pods)
//! through encrypt/decrypt and the inbound filter, replays and bit flips, the packet address parser
//! (harness and properties: crates/evio-tunnel/tests/fuzz_harness).
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/evio-tunnel/tests/fuzz_harness/mod.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::tunnel(data);
});
