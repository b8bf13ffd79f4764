#![no_main]
//! The NAT traversal agent and its TURN client fed datagrams from the network (raw, forged answers to its
//! requests in flight, authenticated checks, relayed data), time and control-plane changes (harness:
//! crates/evio-traversal/tests/fuzz_harness).
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/evio-traversal/tests/fuzz_harness/mod.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::agent(data);
});
