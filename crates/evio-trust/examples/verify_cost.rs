//! What checking a certificate costs: `cargo run --release -p evio-trust --example verify_cost`.
//! Prints the time per `NodeCert::verify` (signature, parse, field checks) and, for scale, per signature
//! and per join-request MAC check.

use std::time::Instant;

use evio_trust::{CaKey, JoinRequest, JoinToken, NodeCert, TokenRecord, unix_now};

fn per_op(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let ca = CaKey::generate("bench");
    let public = ca.public();
    let now = unix_now();
    let cert = NodeCert {
        node: "node-0123.example".into(),
        public_key: [7; 32],
        address: "10.10.3.7".parse().unwrap(),
        pod_subnets: vec!["10.244.3.0/24".parse().unwrap()],
        not_before: now,
        not_after: now + 86_400,
        serial: NodeCert::new_serial(),
    };
    let signed = cert.sign(&ca).unwrap();
    let n = 20_000;
    let verify = per_op(n, || {
        std::hint::black_box(
            NodeCert::verify(std::hint::black_box(&signed), &public, now).unwrap(),
        );
    });
    let sign = per_op(n, || {
        std::hint::black_box(cert.sign(&ca).unwrap());
    });
    let token = JoinToken::new(&public, vec!["http://127.0.0.1:2379".into()], now + 3600);
    let rec = TokenRecord::of(&token, true, now);
    let key = rec.mac_key().unwrap();
    let req = JoinRequest::new(&token, "node-1", &[9; 32], now).unwrap();
    let json = req.to_json();
    let mac = per_op(n, || {
        let r = JoinRequest::parse(json.as_bytes()).unwrap();
        r.verify(&key, now).unwrap();
    });
    println!("certificate: {} bytes", signed.len());
    println!("NodeCert::verify: {verify:.1} us/op");
    println!("NodeCert::sign: {sign:.1} us/op");
    println!("JoinRequest parse+verify: {mac:.1} us/op");
}
