//! What the crates' `never_panics` tests share (included with `#[path]`, so no crate is needed): a small
//! deterministic generator with libFuzzer-like mutations, and the committed seeds of a fuzz target.
#![allow(dead_code)] // each test uses its own subset

use std::path::PathBuf;

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A few byte flips, insertions, deletions and interesting values, as libFuzzer's mutators do.
    pub fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
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

/// Where the committed seeds of fuzz target `target` live (`fuzz/seeds/<target>`).
pub fn seeds_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
}

/// The committed seed files of a fuzz target, in name order.
pub fn seed_files(target: &str) -> Vec<Vec<u8>> {
    let dir = seeds_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Writes `seeds` as `seed-<i>` files of fuzz target `target` (by hand, after changing a harness's seeds).
pub fn write_seed_files(target: &str, seeds: &[Vec<u8>]) {
    let dir = seeds_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
    }
}
