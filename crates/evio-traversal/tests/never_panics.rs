//! The fuzz targets' properties on stable, in CI: the committed seeds (`fuzz/seeds/`), inputs that once
//! crashed, and a few thousand pseudo-random and mutated inputs (fixed seed) through the same harness the
//! fuzz targets run (`tests/fuzz_harness`). `cargo test -p evio-traversal --test never_panics`; the long search
//! is `cargo +nightly fuzz run stun_decode` / `nat_agent` (docs/fuzz.md).

mod fuzz_harness;

use fuzz_harness::{agent, agent_seeds, stun, stun_seeds};
use stable::{Rng, seed_files, write_seed_files};

#[path = "../../../fuzz/stable.rs"]
mod stable;

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
        Some(evio_traversal::PathKind::Direct),
        "seed 1 checks a direct pair"
    );
    assert!(agent(&s[2]).allocated);
}

/// Writes the seeds above into `fuzz/seeds/` (run by hand after changing them:
/// `cargo test -p evio-traversal --test never_panics -- --ignored write_seeds`).
#[test]
#[ignore]
fn write_seeds() {
    write_seed_files("stun_decode", &stun_seeds());
    write_seed_files("nat_agent", &agent_seeds());
}
