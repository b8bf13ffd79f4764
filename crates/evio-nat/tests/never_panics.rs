//! The fuzz targets' properties on stable, in CI: the committed seeds (`fuzz/seeds/`), inputs that once
//! crashed, and a few thousand pseudo-random and mutated inputs (fixed seed) through the same harness the
//! fuzz targets run (`tests/fuzz_harness`). `cargo test -p evio-nat --test never_panics`; the long search
//! is `cargo +nightly fuzz run stun_decode` / `nat_agent` (docs/fuzz.md).

mod fuzz_harness;

use std::path::PathBuf;

use fuzz_harness::{agent, agent_seeds, stun, stun_seeds};

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

/// The committed seed files of a fuzz target.
fn seed_files(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn stun_codec_never_panics() {
    let mut seeds = stun_seeds();
    seeds.extend(seed_files("stun_decode"));
    let mut rng = Rng(0x5EED_0001);
    for s in &seeds {
        stun(s);
        for _ in 0..300 {
            stun(&rng.mutate(s));
        }
    }
    for _ in 0..2000 {
        // Random bytes behind a valid STUN header, so the attribute walk is reached.
        let mut m = rng.bytes(120);
        let body = m.len().div_ceil(4) * 4;
        m.resize(body, 0);
        let mut d = vec![
            0x01,
            0x01,
            (body >> 8) as u8,
            body as u8,
            0x21,
            0x12,
            0xA4,
            0x42,
        ];
        d.extend_from_slice(&[7; 12]);
        d.extend_from_slice(&m);
        stun(&d);
        stun(&rng.bytes(64));
    }
}

#[test]
fn agent_never_panics() {
    let mut seeds = agent_seeds();
    seeds.extend(seed_files("nat_agent"));
    let mut rng = Rng(0x5EED_0002);
    for s in &seeds {
        agent(s);
        for _ in 0..40 {
            agent(&rng.mutate(s));
        }
    }
    for _ in 0..300 {
        agent(&rng.bytes(200));
    }
}

/// The seeds must reach the deep states, or the fuzzer starts from the shallow end.
#[test]
fn agent_seeds_reach_allocation_and_paths() {
    let s = agent_seeds();
    assert!(
        agent(&s[0]).allocated,
        "seed 0 allocates on the TURN server"
    );
    assert_eq!(
        agent(&s[1]).path,
        Some(evio_nat::PathKind::Direct),
        "seed 1 checks a direct pair"
    );
    assert!(agent(&s[2]).allocated);
}

/// Writes the seeds above into `fuzz/seeds/` (run by hand after changing them:
/// `cargo test -p evio-nat --test never_panics -- --ignored write_seeds`).
#[test]
#[ignore]
fn write_seeds() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    for (target, seeds) in [("stun_decode", stun_seeds()), ("nat_agent", agent_seeds())] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
