//! The `tunnel` fuzz target's properties on stable, in CI: the committed seeds (`fuzz/seeds/tunnel`) and
//! 2000 pseudo-random and mutated scripts (fixed seed) through the same harness the fuzz target
//! runs (`tests/fuzz_harness`). `cargo test -p evio-tunnel --test never_panics`; the long search is
//! `cargo +nightly fuzz run tunnel` (docs/fuzz.md).
#![cfg(not(feature = "mock-time"))]

mod fuzz_harness;

use fuzz_harness::{Pair, seeds, tunnel};
use stable::{Rng, seed_files, write_seed_files};

#[path = "../../../fuzz/stable.rs"]
mod stable;

#[test]
fn tunnel_never_panics() {
    let mut all = seeds();
    all.extend(seed_files("tunnel"));
    // Each seed on a fresh pair, as the fuzz target runs it: they carry packets through the session
    // (else the properties were never exercised).
    for (i, s) in all.iter().enumerate() {
        assert!(tunnel(s) >= 1, "seed {i} delivers a packet");
    }
    // Mutations and random scripts on a few shared pairs (a handshake costs more than a script).
    let mut rng = Rng(0x5EED_0003);
    for _ in 0..4 {
        let mut pair = Pair::new();
        for _ in 0..400 {
            let s = &all[rng.below(all.len())];
            pair.run(&rng.mutate(s));
        }
        for _ in 0..100 {
            pair.run(&rng.bytes(300));
        }
    }
}

/// Writes [`seeds`] into `fuzz/seeds/tunnel` (by hand after changing them:
/// `cargo test -p evio-tunnel --test never_panics -- --ignored write_seeds`).
#[test]
#[ignore]
fn write_seeds() {
    write_seed_files("tunnel", &seeds());
}
