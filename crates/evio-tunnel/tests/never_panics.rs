//! The `tunnel` fuzz target's properties on stable, in CI: the committed seeds (`fuzz/seeds/tunnel`) and
//! 2000 pseudo-random and mutated scripts (fixed seed) through the same harness the fuzz target
//! runs (`tests/fuzz_harness`). `cargo test -p evio-tunnel --test never_panics`; the long search is
//! `cargo +nightly fuzz run tunnel` (docs/fuzz.md).
#![cfg(not(feature = "mock-time"))]

mod fuzz_harness;

use std::path::PathBuf;

use fuzz_harness::{Pair, seeds, tunnel};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A few byte flips, insertions, deletions and interesting values, as libFuzzer's mutators do.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.below(v.len() + 1);
            match self.below(5) {
                0 if at < v.len() => v[at] ^= 1 << self.below(8),
                1 => v.insert(at, self.next() as u8),
                2 if at < v.len() => {
                    v.remove(at);
                }
                3 if at < v.len() => v[at] = [0, 1, 0x7F, 0x80, 0xFF][self.below(5)],
                _ if at + 1 < v.len() => v.truncate(at + 1),
                _ => {}
            }
        }
        v
    }
}

fn seed_files() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/tunnel");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn tunnel_never_panics() {
    let mut all = seeds();
    all.extend(seed_files());
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
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/tunnel");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
    }
}
