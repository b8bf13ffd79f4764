//! Which ChaCha20-Poly1305 is fastest here (issue 13): the WireGuard protocol fixes the AEAD, so the choice
//! is the implementation. boringtun seals and opens transport data with ring's (BoringSSL's assembly);
//! RustCrypto's `chacha20poly1305` (pure Rust, SIMD backends) is the alternative already in the lockfile.
//! ring's AES-256-GCM is measured beside them as a reference only (WireGuard cannot use it).
//!
//! A benchmark, not a test: `cargo test --release -p evio-tunnel --test aead -- --ignored --nocapture`
//! (`EVIO_AEAD_SECS` per sample, default 1; 3 interleaved rounds, medians). One thread, in-place seal and
//! open of `EVIO_AEAD_SIZES` bytes (default 1420, the overlay's largest datagram, and 64).

use std::time::{Duration, Instant};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const KEY: [u8; 32] = [7; 32];

#[derive(Clone, Copy, Debug)]
enum Imp {
    RingChaCha,
    RustCryptoChaCha,
    RingAesGcm,
}

impl Imp {
    fn name(self) -> &'static str {
        match self {
            Imp::RingChaCha => "ring 0.17 ChaCha20-Poly1305 (boringtun's)",
            Imp::RustCryptoChaCha => "chacha20poly1305 0.10 (RustCrypto)",
            Imp::RingAesGcm => "ring 0.17 AES-256-GCM (reference only)",
        }
    }
}

fn nonce(n: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_le_bytes());
    b
}

/// Bytes sealed (then opened) per second by `imp` on `size`-byte messages, for `secs`.
fn run(imp: Imp, size: usize, secs: Duration) -> (f64, f64) {
    let mut buf = vec![0x5a_u8; size];
    let mut tag_buf = Vec::with_capacity(size + 16);
    match imp {
        Imp::RingChaCha | Imp::RingAesGcm => {
            let alg = if matches!(imp, Imp::RingChaCha) {
                &CHACHA20_POLY1305
            } else {
                &AES_256_GCM
            };
            let key = LessSafeKey::new(UnboundKey::new(alg, &KEY).unwrap());
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < secs {
                for _ in 0..64 {
                    n += 1;
                    let tag = key
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce(n)),
                            Aad::empty(),
                            &mut buf,
                        )
                        .unwrap();
                    std::hint::black_box(&tag);
                }
            }
            let sealed = n * size as u64;
            let seal_t = t.elapsed();
            // Open: a sealed message (ciphertext + tag) opened in place, again and again.
            tag_buf.clear();
            tag_buf.extend_from_slice(&buf);
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce(0)),
                    Aad::empty(),
                    &mut tag_buf,
                )
                .unwrap();
            tag_buf.extend_from_slice(tag.as_ref());
            let msg = tag_buf.clone();
            let t = Instant::now();
            let mut m = 0u64;
            while t.elapsed() < secs {
                for _ in 0..64 {
                    m += 1;
                    tag_buf.clear();
                    tag_buf.extend_from_slice(&msg);
                    let p = key
                        .open_in_place(
                            Nonce::assume_unique_for_key(nonce(0)),
                            Aad::empty(),
                            &mut tag_buf,
                        )
                        .unwrap();
                    std::hint::black_box(&p);
                }
            }
            let opened = m * size as u64;
            (
                sealed as f64 / seal_t.as_secs_f64(),
                opened as f64 / t.elapsed().as_secs_f64(),
            )
        }
        Imp::RustCryptoChaCha => {
            let key = chacha20poly1305::ChaCha20Poly1305::new(&KEY.into());
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < secs {
                for _ in 0..64 {
                    n += 1;
                    let tag = key
                        .encrypt_in_place_detached(&nonce(n).into(), &[], &mut buf)
                        .unwrap();
                    std::hint::black_box(&tag);
                }
            }
            let sealed = n * size as u64;
            let seal_t = t.elapsed();
            // Open: a sealed message (ciphertext `sealed0`, tag `tag0`) opened in place, again and again.
            let mut sealed0 = buf.clone();
            let tag0 = key
                .encrypt_in_place_detached(&nonce(0).into(), &[], &mut sealed0)
                .unwrap();
            let t = Instant::now();
            let mut m = 0u64;
            while t.elapsed() < secs {
                for _ in 0..64 {
                    m += 1;
                    tag_buf.clear();
                    tag_buf.extend_from_slice(&sealed0);
                    key.decrypt_in_place_detached(&nonce(0).into(), &[], &mut tag_buf, &tag0)
                        .unwrap();
                    std::hint::black_box(&tag_buf);
                }
            }
            let opened = m * size as u64;
            (
                sealed as f64 / seal_t.as_secs_f64(),
                opened as f64 / t.elapsed().as_secs_f64(),
            )
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The implementations agree (a message sealed by one opens with the other): the comparison is of equals.
#[test]
fn ring_and_rustcrypto_chacha20poly1305_agree() {
    let msg = b"the same AEAD, two implementations".to_vec();
    let ring_key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).unwrap());
    let mut a = msg.clone();
    let tag = ring_key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(9)), Aad::empty(), &mut a)
        .unwrap();
    let rc = chacha20poly1305::ChaCha20Poly1305::new(&KEY.into());
    let mut b = msg.clone();
    let tag_b = rc
        .encrypt_in_place_detached(&nonce(9).into(), &[], &mut b)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(tag.as_ref(), tag_b.as_slice());
    rc.decrypt_in_place_detached(&nonce(9).into(), &[], &mut a, &tag_b)
        .unwrap();
    assert_eq!(a, msg);
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn bench_aead() {
    let secs = Duration::from_secs_f64(
        std::env::var("EVIO_AEAD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.0),
    );
    let sizes: Vec<usize> = std::env::var("EVIO_AEAD_SIZES")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![1420, 64]);
    let imps = [Imp::RingChaCha, Imp::RustCryptoChaCha, Imp::RingAesGcm];
    println!("| implementation | bytes | seal Gb/s | open Gb/s | seal vs ring ChaCha |");
    println!("|---|---:|---:|---:|---:|");
    for &size in &sizes {
        let mut seal = vec![Vec::new(); imps.len()];
        let mut open = vec![Vec::new(); imps.len()];
        for _round in 0..3 {
            for (i, imp) in imps.iter().enumerate() {
                let (s, o) = run(*imp, size, secs);
                seal[i].push(s * 8.0 / 1e9);
                open[i].push(o * 8.0 / 1e9);
            }
        }
        let seal: Vec<f64> = seal.into_iter().map(median).collect();
        let open: Vec<f64> = open.into_iter().map(median).collect();
        for (i, imp) in imps.iter().enumerate() {
            println!(
                "| {} | {size} | {:.2} | {:.2} | {:.2}x |",
                imp.name(),
                seal[i],
                open[i],
                seal[i] / seal[0]
            );
        }
    }
}
