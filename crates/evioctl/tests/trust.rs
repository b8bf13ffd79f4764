//! The cluster CA end to end: `evioctl ca init`, `token`, `ca serve` and `revoke` as real processes against a
//! real etcd, with the join and renewal clients of evio-trust standing in for eviod.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use evio_store::etcd_client::GetOptions;
use evio_store::{EtcdOptions, Store, keys};
use evio_testbed::Etcd;
use evio_trust::client::{JoinError, join, renew};
use evio_trust::{
    CaPublic, CertRecord, JoinRequest, JoinToken, NodeCert, Revocation, RevocationRecord,
    TrustError, public_key_of, unix_now,
};
use serde_json::Value;

const EVIOCTL: &str = env!("CARGO_BIN_EXE_evioctl");

fn out_text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn evioctl(args: &[&str]) -> Output {
    Command::new(EVIOCTL)
        .args(args)
        .env_remove("EVIO_ETCD_ENDPOINTS")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = evioctl(args);
    assert!(o.status.success(), "{args:?}: {}", out_text(&o));
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = evioctl(args);
    assert!(
        !o.status.success(),
        "{args:?} should fail: {}",
        out_text(&o)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A CA directory in a temporary directory.
struct Ca {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Ca {
    fn new() -> Ca {
        let tmp = tempfile::Builder::new()
            .prefix("evio-ca")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("ca");
        ok(&[
            "ca",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--name",
            "test",
        ]);
        Ca { _tmp: tmp, dir }
    }
    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }
    fn public(&self) -> CaPublic {
        CaPublic::load(&self.dir.join("ca.json")).unwrap()
    }
    fn token(&self, etcd: &str, extra: &[&str]) -> String {
        let mut a = vec![
            "token",
            "create",
            "--ca-dir",
            self.d(),
            "--etcd-endpoints",
            etcd,
        ];
        a.extend_from_slice(extra);
        let s = ok(&a);
        assert_eq!(s.lines().count(), 1, "only the token on stdout: {s}");
        s.trim().to_string()
    }
    fn tokens(&self) -> Vec<Value> {
        let s = ok(&["token", "list", "--ca-dir", self.d(), "--json"]);
        serde_json::from_str::<Value>(&s)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

/// `evioctl ca serve`, killed on drop.
struct Signer(Child);

impl Signer {
    fn start(ca: &Ca, etcd: &Etcd, extra: &[&str]) -> Signer {
        let mut c = Command::new(EVIOCTL);
        c.args(["ca", "serve", "--ca-dir", ca.d(), "--etcd-endpoints"])
            .arg(etcd.endpoint())
            .args(extra)
            .env_remove("EVIO_ETCD_ENDPOINTS")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        Signer(c.spawn().unwrap())
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn store(r: &tokio::runtime::Runtime, etcd: &Etcd) -> Store {
    r.block_on(Store::connect(&EtcdOptions::new([etcd.endpoint()])))
        .unwrap()
}

fn keys_under(r: &tokio::runtime::Runtime, s: &Store, prefix: &str) -> Vec<String> {
    r.block_on(async {
        let mut c = s.client();
        let resp = c
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect()
    })
}

/// Nothing of `node` in etcd but (possibly) a refusal: no claim, no certificate, no pending request.
fn assert_nothing_for(r: &tokio::runtime::Runtime, s: &Store, node: &str) {
    let all = keys_under(r, s, keys::PREFIX);
    let left: Vec<_> = all
        .iter()
        .filter(|k| k.ends_with(&format!("/{node}")) && !k.starts_with(keys::REFUSED))
        .collect();
    assert!(left.is_empty(), "keys left for {node}: {left:?}");
}

const T: Duration = Duration::from_secs(10);

#[test]
fn ca_init_modes_pin_and_refusal_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let pin = ok(&[
        "ca",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--name",
        "lab",
    ]);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.json")), 0o644);
    let public = CaPublic::load(&dir.join("ca.json")).unwrap();
    assert_eq!(pin.trim(), public.pin());
    assert_eq!(public.name, "lab");
    let key = std::fs::read(dir.join("ca.key")).unwrap();
    let err = fails(&["ca", "init", "--dir", dir.to_str().unwrap()]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), key);
    assert_eq!(CaPublic::load(&dir.join("ca.json")).unwrap(), public);
    // A key readable by others is refused by everything that loads the CA.
    std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&[
        "revoke",
        "x",
        "--ca-dir",
        dir.to_str().unwrap(),
        "--etcd-endpoints",
        "http://127.0.0.1:9",
    ]);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn tokens_create_list_delete_keep_no_secret() {
    let ca = Ca::new();
    let pwfile = ca.dir.parent().unwrap().join("turn-pw");
    std::fs::write(&pwfile, "turnsecret\n").unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t1 = ca.token(
        "http://10.0.0.1:2379,http://10.0.0.2:2379",
        &[
            "--ttl",
            "2h",
            "--stun",
            "stun.example:3478",
            "--turn",
            "turn.example:3478",
            "--turn-user",
            "u",
            "--turn-password-file",
            pwfile.to_str().unwrap(),
        ],
    );
    let t2 = ca.token("http://10.0.0.1:2379", &["--reusable"]);
    let d1 = JoinToken::decode(&t1).unwrap();
    let d2 = JoinToken::decode(&t2).unwrap();
    assert_eq!(
        d1.etcd_endpoints,
        ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(d1.ca, {
        let mut p = ca.public();
        p.created = 0;
        p
    });
    assert_eq!(d1.stun, ["stun.example:3478"]);
    assert_eq!(d1.turn_password.as_deref(), Some("turnsecret"));
    let now = unix_now();
    assert!(
        (now + 7190..=now + 7200).contains(&d1.expires),
        "{}",
        d1.expires
    );

    let list = ca.tokens();
    assert_eq!(list.len(), 2);
    let row = |id: &str| list.iter().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(row(&d1.id)["singleUse"], true);
    assert_eq!(row(&d2.id)["singleUse"], false);
    assert_eq!(row(&d1.id)["uses"], 0);
    assert_eq!(row(&d1.id)["state"], "usable");
    // Neither the token files nor the listing hold a secret.
    let text = ok(&["token", "list", "--ca-dir", ca.d()]);
    for d in [&d1, &d2] {
        let f = ca.dir.join("tokens").join(format!("{}.json", d.id));
        assert_eq!(mode(&f), 0o600);
        let body = std::fs::read_to_string(&f).unwrap();
        for secret in [base64_std(&d.secret), base64_url(&d.secret)] {
            assert!(!body.contains(&secret) && !text.contains(&secret));
        }
        assert!(!body.contains("turnsecret"));
    }
    ok(&["token", "delete", "--ca-dir", ca.d(), &d1.id]);
    assert_eq!(ca.tokens().len(), 1);
    let err = fails(&["token", "delete", "--ca-dir", ca.d(), &d1.id]);
    assert!(err.contains("unknown"), "{err}");
    let err = fails(&["token", "delete", "--ca-dir", ca.d(), "../ca"]);
    assert!(err.contains("16 hex"), "{err}");
    // A token creation without a CA fails clearly.
    let err = fails(&[
        "token",
        "create",
        "--ca-dir",
        "/nonexistent",
        "--etcd-endpoints",
        "http://x:1",
    ]);
    assert!(err.contains("ca init"), "{err}");
}

/// Base64 by hand (the test checks that a secret does not appear in either alphabet).
fn base64_std(b: &[u8]) -> String {
    enc(
        b,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        true,
    )
}

fn base64_url(b: &[u8]) -> String {
    enc(
        b,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        false,
    )
}

fn enc(b: &[u8], table: &[u8], pad: bool) -> String {
    let mut s = String::new();
    for ch in b.chunks(3) {
        let n = (u32::from(ch[0]) << 16)
            | (u32::from(*ch.get(1).unwrap_or(&0)) << 8)
            | u32::from(*ch.get(2).unwrap_or(&0));
        for i in 0..=ch.len() {
            s.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if pad {
            for _ in ch.len()..3 {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn signer_grants_exactly_the_claims_and_renews() {
    let etcd = Etcd::start();
    let ca = Ca::new();
    let _signer = Signer::start(
        &ca,
        &etcd,
        &[
            "--overlay-cidr",
            "10.10.0.0/16",
            "--pod-cidr",
            "10.244.0.0/16",
            "--node-bits",
            "8",
            "--cert-ttl",
            "1h",
        ],
    );
    let r = rt();
    let s = store(&r, &etcd);
    let mut joins = Vec::new();
    for (i, node) in ["node-a", "node-b"].iter().enumerate() {
        let token = JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap();
        let private = [i as u8 + 1; 32];
        let public = public_key_of(&private);
        let start = Instant::now();
        let (cert, signed) = r.block_on(join(&s, &token, node, &public, T)).unwrap();
        let took = start.elapsed();
        joins.push(took);
        eprintln!("join of {node}: {took:?} from request to verified certificate");
        assert_eq!(cert.node, *node);
        assert_eq!(cert.public_key, public);
        let addr = r.block_on(s.address_of(node)).unwrap().unwrap();
        let subnet = r.block_on(s.subnet_of(node)).unwrap().unwrap();
        assert_eq!(cert.address, addr.address);
        assert_eq!(cert.pod_subnets, vec![subnet.subnet]);
        assert!(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 10, 0, 0), 16)
                .unwrap()
                .contains(&cert.address)
        );
        // What is in etcd is what the client got, and it verifies against ca.json.
        let stored = r
            .block_on(evio_trust::client::certificate(
                &s,
                &ca.public(),
                node,
                unix_now(),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(stored.1, signed);
        assert_eq!(
            NodeCert::verify(&signed, &ca.public(), unix_now()).unwrap(),
            cert
        );
        assert!(cert.not_after - cert.not_before == 3600);
        // The request is gone and the single-use token is spent.
        assert!(keys_under(&r, &s, &keys::join(node)).is_empty());
        let row = ca
            .tokens()
            .into_iter()
            .find(|t| t["id"] == token.id.as_str())
            .unwrap();
        assert_eq!(row["uses"], 1);
        assert_eq!(row["state"], "used");

        // Renewal without the token: same grants, new serial.
        let start = Instant::now();
        let (renewed, _) = r
            .block_on(renew(&s, &ca.public(), &private, &cert, T))
            .unwrap();
        eprintln!("renewal of {node}: {:?}", start.elapsed());
        assert_eq!(
            (renewed.node.as_str(), renewed.public_key, renewed.address),
            (*node, public, cert.address)
        );
        assert_eq!(renewed.pod_subnets, cert.pod_subnets);
        assert_ne!(renewed.serial, cert.serial);
        // Someone else's key cannot renew node-a's certificate (the MAC proves the key).
        let e = r
            .block_on(renew(&s, &ca.public(), &[99; 32], &renewed, T))
            .unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
    let a = r.block_on(s.address_of("node-a")).unwrap().unwrap().address;
    let b = r.block_on(s.address_of("node-b")).unwrap().unwrap().address;
    assert_ne!(a, b);
    // A reusable token joins several hosts (and gives a few more join times).
    let reusable = JoinToken::decode(&ca.token(&etcd.endpoint(), &["--reusable"])).unwrap();
    for i in 0..8u8 {
        let node = format!("node-r{i}");
        let start = Instant::now();
        let (cert, _) = r
            .block_on(join(&s, &reusable, &node, &public_key_of(&[40 + i; 32]), T))
            .unwrap();
        joins.push(start.elapsed());
        assert_eq!(
            Some(cert.address),
            r.block_on(s.address_of(&node)).unwrap().map(|a| a.address)
        );
    }
    let row = ca
        .tokens()
        .into_iter()
        .find(|t| t["id"] == reusable.id.as_str())
        .unwrap();
    assert_eq!(
        (row["uses"].as_u64(), row["state"].as_str()),
        (Some(8), Some("usable"))
    );
    joins.sort();
    eprintln!(
        "join, request to verified certificate, {} joins: min {:?} median {:?} max {:?}",
        joins.len(),
        joins[0],
        joins[joins.len() / 2],
        joins[joins.len() - 1]
    );
}

#[test]
fn refused_joins_write_nothing() {
    let etcd = Etcd::start();
    let ca = Ca::new();
    let _signer = Signer::start(&ca, &etcd, &["--pod-cidr", "10.244.0.0/16"]);
    let r = rt();
    let s = store(&r, &etcd);

    // A token whose pin does not match its CA key: refused before anything is written.
    let good = ca.token(&etcd.endpoint(), &[]);
    let other = Ca::new();
    let mut v: Value =
        serde_json::from_slice(&base64_url_decode(good.strip_prefix("evio1.").unwrap())).unwrap();
    v["caPin"] = other.public().pin().into();
    let forged = format!("evio1.{}", base64_url(&serde_json::to_vec(&v).unwrap()));
    assert!(matches!(
        JoinToken::decode(&forged),
        Err(TrustError::PinMismatch { .. })
    ));

    // A token of another CA (well-formed, right pin for *its* CA): unknown to this signer. The client also
    // refuses the answer, since this CA's refusal does not verify against the other CA... so it times out.
    let foreign = JoinToken::decode(&other.token(&etcd.endpoint(), &[])).unwrap();
    let e = r
        .block_on(join(
            &s,
            &foreign,
            "node-f",
            &public_key_of(&[5; 32]),
            Duration::from_secs(2),
        ))
        .unwrap_err();
    assert!(matches!(e, JoinError::Timeout { .. }), "{e}");
    // A token with this CA's keys but a secret the signer does not know.
    let mut wrong_secret = JoinToken::decode(&good).unwrap();
    wrong_secret.secret = [0x55; 32];
    let e = r
        .block_on(join(
            &s,
            &wrong_secret,
            "node-m",
            &public_key_of(&[6; 32]),
            T,
        ))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("authentication code does not verify"),
        "{e}"
    );

    // Expired: the client refuses to send; a request written anyway (by hand) is refused by the signer.
    let short = JoinToken::decode(&ca.token(&etcd.endpoint(), &["--ttl", "1s"])).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let e = r
        .block_on(join(&s, &short, "node-e", &public_key_of(&[7; 32]), T))
        .unwrap_err();
    assert!(
        matches!(e, JoinError::Trust(TrustError::TokenExpired { .. })),
        "{e}"
    );
    let req = JoinRequest::new(&short, "node-e", &public_key_of(&[7; 32]), unix_now()).unwrap();
    r.block_on(async {
        s.client()
            .put(keys::join("node-e"), req.to_json(), None)
            .await
            .unwrap()
    });
    let refusal = wait_refusal(&r, &s, &ca, "node-e");
    assert!(refusal.contains("expired"), "{refusal}");

    // Used: the first node joins, a second one with the same single-use token is refused.
    let once = JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap();
    r.block_on(join(&s, &once, "node-1", &public_key_of(&[8; 32]), T))
        .unwrap();
    let e = r
        .block_on(join(&s, &once, "node-2", &public_key_of(&[9; 32]), T))
        .unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused { reason, .. } if reason.contains("already used")),
        "{e}"
    );

    // An oversized request is deleted unread.
    r.block_on(async {
        s.client()
            .put(keys::join("node-big"), "x".repeat(100_000), None)
            .await
            .unwrap()
    });
    let deadline = Instant::now() + T;
    while !keys_under(&r, &s, &keys::join("node-big")).is_empty() {
        assert!(Instant::now() < deadline, "oversized request not removed");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A valid request of node-1's token put under another node's key is refused, not issued to either.
    let moved = JoinRequest::new(
        &ok_token(&ca, &etcd),
        "node-h",
        &public_key_of(&[10; 32]),
        unix_now(),
    )
    .unwrap();
    r.block_on(async {
        s.client()
            .put(keys::join("node-i"), moved.to_json(), None)
            .await
            .unwrap()
    });
    let refusal = wait_refusal(&r, &s, &ca, "node-i");
    assert!(refusal.contains("under the key of node-i"), "{refusal}");
    // A flood of garbage (more than one pass reads) is deleted, all of it.
    r.block_on(async {
        let mut c = s.client();
        for i in 0..150 {
            c.put(keys::join(&format!("junk-{i}")), "{not json", None)
                .await
                .unwrap();
        }
    });
    let deadline = Instant::now() + T;
    while !keys_under(&r, &s, keys::JOIN).is_empty() {
        assert!(
            Instant::now() < deadline,
            "junk requests not removed: {:?}",
            keys_under(&r, &s, keys::JOIN).len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    for node in [
        "node-f", "node-m", "node-e", "node-2", "node-big", "node-h", "node-i", "junk-0",
        "junk-149",
    ] {
        assert_nothing_for(&r, &s, node);
    }
    assert!(r.block_on(s.address_of("node-1")).unwrap().is_some());
    assert_eq!(r.block_on(s.address_claims()).unwrap().len(), 1);
    assert_eq!(r.block_on(s.subnet_claims()).unwrap().len(), 1);
}

fn ok_token(ca: &Ca, etcd: &Etcd) -> JoinToken {
    JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap()
}

fn base64_url_decode(s: &str) -> Vec<u8> {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = table.iter().position(|&t| t == c).unwrap() as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Waits for the CA-signed refusal of `node`; returns its reason.
fn wait_refusal(r: &tokio::runtime::Runtime, s: &Store, ca: &Ca, node: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let v = r.block_on(async { s.client().get(keys::refused(node), None).await.unwrap() });
        if let Some(kv) = v.kvs().first() {
            let rec: evio_trust::RefusalRecord = serde_json::from_slice(kv.value()).unwrap();
            return evio_trust::Refusal::verify(&rec.refusal, &ca.public())
                .unwrap()
                .reason;
        }
        assert!(Instant::now() < deadline, "no refusal for {node}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn revoked_keys_cannot_join_and_names_stay_bound_to_their_key() {
    let etcd = Etcd::start();
    let ca = Ca::new();
    let _signer = Signer::start(&ca, &etcd, &["--pod-cidr", "10.244.0.0/16"]);
    let r = rt();
    let s = store(&r, &etcd);
    let k1 = public_key_of(&[11; 32]);
    let k2 = public_key_of(&[12; 32]);
    let tok = || JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap();

    let (cert, _) = r.block_on(join(&s, &tok(), "node-r", &k1, T)).unwrap();
    // The name is bound to k1 while its certificate is current and unrevoked.
    let e = r.block_on(join(&s, &tok(), "node-r", &k2, T)).unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused { reason, .. } if reason.contains("another key")),
        "{e}"
    );
    // Also when an etcd writer deleted the certificate: the signer's ledger still binds the name.
    r.block_on(async { s.client().delete(keys::cert("node-r"), None).await.unwrap() });
    let e = r.block_on(join(&s, &tok(), "node-r", &k2, T)).unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused { reason, .. } if reason.contains("another key")),
        "{e}"
    );
    // The same key joining again (a reinstall keeping its key) gets a fresh certificate, same grants.
    let (again, _) = r.block_on(join(&s, &tok(), "node-r", &k1, T)).unwrap();
    assert_eq!(
        (again.address, &again.pod_subnets),
        (cert.address, &cert.pod_subnets)
    );

    // Renewal works before the revocation, not after.
    let (again, _) = r
        .block_on(renew(&s, &ca.public(), &[11; 32], &again, T))
        .unwrap();
    let out = ok(&[
        "revoke",
        "node-r",
        "--ca-dir",
        ca.d(),
        "--etcd-endpoints",
        &etcd.endpoint(),
    ]);
    assert!(out.contains("revoked key"), "{out}");
    // A CA-signed revocation is in etcd; the certificate and the claims are gone.
    let revs = keys_under(&r, &s, keys::REVOKED);
    assert_eq!(revs, [keys::revoked("node-r", again.serial)]);
    let v = r.block_on(async { s.client().get(revs[0].clone(), None).await.unwrap() });
    let rec: RevocationRecord = serde_json::from_slice(v.kvs()[0].value()).unwrap();
    let rev = Revocation::verify(&rec.revocation, &ca.public()).unwrap();
    assert_eq!((rev.key().unwrap(), rev.serial), (k1, again.serial));
    assert_nothing_for(&r, &s, "node-r");
    let listed = r
        .block_on(evio_trust::client::revocations(&s, &ca.public()))
        .unwrap();
    assert_eq!(listed, vec![rev]);
    // A revocation written by an etcd writer without the CA key is ignored.
    let other = Ca::new();
    let forged = {
        let c = evio_trust::CaKey::load_dir(&other.dir).unwrap();
        Revocation::of(&cert, unix_now()).sign(&c).unwrap()
    };
    r.block_on(async {
        s.client()
            .put(
                keys::revoked("node-x", 1),
                serde_json::to_string(&RevocationRecord { revocation: forged }).unwrap(),
                None,
            )
            .await
            .unwrap()
    });
    assert_eq!(
        r.block_on(evio_trust::client::revocations(&s, &ca.public()))
            .unwrap()
            .len(),
        1
    );

    // The revoked key cannot join again, under any name, even after an etcd writer deleted the revocations
    // (the signer keeps its own copy in the CA directory).
    r.block_on(async {
        s.client()
            .delete(
                keys::REVOKED,
                Some(evio_store::etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap()
    });
    assert!(ca.dir.join("revoked").read_dir().unwrap().count() == 1);
    for name in ["node-r", "node-r2"] {
        let e = r.block_on(join(&s, &tok(), name, &k1, T)).unwrap_err();
        assert!(
            matches!(&e, JoinError::Refused { reason, .. } if reason.contains("revoked")),
            "{e}"
        );
        assert_nothing_for(&r, &s, name);
    }
    let e = r
        .block_on(renew(&s, &ca.public(), &[11; 32], &again, T))
        .unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused { reason, .. } if reason.contains("revoked")),
        "{e}"
    );
    // A new key may take the name.
    let (fresh, _) = r.block_on(join(&s, &tok(), "node-r", &k2, T)).unwrap();
    assert_eq!(fresh.public_key, k2);
    // Renewal grants only what the node still holds: after its claims were freed, it must join again.
    ok(&[
        "release",
        "node-r",
        "--force",
        "--etcd-endpoints",
        &etcd.endpoint(),
    ]);
    let e = r
        .block_on(renew(&s, &ca.public(), &[12; 32], &fresh, T))
        .unwrap_err();
    assert!(
        matches!(&e, JoinError::Refused { reason, .. } if reason.contains("claims changed")),
        "{e}"
    );
    // A certificate put in etcd by hand (no CA key) is not what the client accepts.
    let fake = CertRecord {
        cert: "e30.AAAA".into(),
    };
    r.block_on(async {
        s.client()
            .put(
                keys::cert("node-r"),
                serde_json::to_string(&fake).unwrap(),
                None,
            )
            .await
            .unwrap()
    });
    assert!(
        r.block_on(evio_trust::client::certificate(
            &s,
            &ca.public(),
            "node-r",
            unix_now()
        ))
        .is_err()
    );
}

#[test]
fn one_signer_per_ca_directory() {
    let etcd = Etcd::start();
    let ca = Ca::new();
    let _first = Signer::start(&ca, &etcd, &[]);
    // Once the first signer answers a join, it holds the lock (taken before it connects to etcd).
    let r = rt();
    let s = store(&r, &etcd);
    let token = JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap();
    r.block_on(join(&s, &token, "node-l", &public_key_of(&[3; 32]), T))
        .unwrap();
    let mut second = Signer::start(&ca, &etcd, &[]);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(st) = second.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the second signer was not refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
}

/// CPU time (user + system) of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) start after its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A signer with nothing to do waits on its watches: no reads, no new watches, (almost) no CPU. Its first
/// wait returned on the watch's "created" message and it spun, re-reading etcd a thousand times a second.
#[test]
fn an_idle_signer_does_not_spin() {
    let etcd = Etcd::start();
    let ca = Ca::new();
    let signer = Signer::start(&ca, &etcd, &[]);
    let r = rt();
    let s = store(&r, &etcd);
    // Once it answered a join it is connected and idle.
    let token = JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap();
    r.block_on(join(&s, &token, "node-i", &public_key_of(&[4; 32]), T))
        .unwrap();
    let before = cpu_time(signer.0.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(signer.0.id()) - before;
    assert!(
        used < Duration::from_millis(300),
        "an idle signer used {used:?} of CPU in 3 s"
    );
}

/// The signer handles requests concurrently: many hosts joining at once with one reusable token all get
/// certificates with distinct addresses and subnets, and several hosts racing for one single-use token
/// leave exactly one certificate and no claim for the losers.
#[test]
fn concurrent_joins_get_distinct_grants_and_a_single_use_token_is_spent_once() {
    let etcd = Etcd::start();
    let ca = Ca::new();
    let _signer = Signer::start(&ca, &etcd, &["--pod-cidr", "10.244.0.0/16"]);
    let r = rt();
    let s = store(&r, &etcd);

    let reusable = JoinToken::decode(&ca.token(&etcd.endpoint(), &["--reusable"])).unwrap();
    let nodes: Vec<String> = (0..24).map(|i| format!("many-{i}")).collect();
    let certs: Vec<NodeCert> = r.block_on(async {
        let joins = nodes.iter().enumerate().map(|(i, n)| {
            let (s, t) = (&s, &reusable);
            async move {
                join(s, t, n, &public_key_of(&[100 + i as u8; 32]), T)
                    .await
                    .map(|(c, _)| c)
            }
        });
        futures_util::future::join_all(joins)
            .await
            .into_iter()
            .map(|r| r.expect("join"))
            .collect()
    });
    let addrs: std::collections::HashSet<_> = certs.iter().map(|c| c.address).collect();
    let subnets: std::collections::HashSet<_> =
        certs.iter().map(|c| c.pod_subnets.clone()).collect();
    assert_eq!((addrs.len(), subnets.len()), (24, 24), "{certs:#?}");
    for c in &certs {
        let held = r
            .block_on(s.address_of(&c.node))
            .unwrap()
            .map(|a| a.address);
        assert_eq!(held, Some(c.address));
    }
    // Each request handled once: a read taken before a request's deletion must not issue it again (a
    // second certificate, with another serial than the one the node took, and a second use of the token).
    std::thread::sleep(Duration::from_millis(500));
    for c in &certs {
        let rec: Value = r.block_on(async {
            let mut cl = s.client();
            let v = cl.get(evio_store::keys::cert(&c.node), None).await.unwrap();
            serde_json::from_slice(v.kvs()[0].value()).unwrap()
        });
        let issued =
            evio_trust::NodeCert::verify_ignoring_time(rec["cert"].as_str().unwrap(), &ca.public())
                .unwrap();
        assert_eq!(issued.serial, c.serial, "{}: issued again", c.node);
    }
    let uses = ca
        .tokens()
        .iter()
        .find(|t| t["id"] == reusable.id.as_str())
        .map(|t| t["uses"].as_u64());
    assert_eq!(uses, Some(Some(24)), "the reusable token's uses");

    let single = JoinToken::decode(&ca.token(&etcd.endpoint(), &[])).unwrap();
    let racers: Vec<String> = (0..6).map(|i| format!("race-{i}")).collect();
    let results: Vec<bool> = r.block_on(async {
        let joins = racers.iter().enumerate().map(|(i, n)| {
            let (s, t) = (&s, &single);
            async move {
                join(s, t, n, &public_key_of(&[200 + i as u8; 32]), T)
                    .await
                    .is_ok()
            }
        });
        futures_util::future::join_all(joins).await
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
    for (n, ok) in racers.iter().zip(&results) {
        let address = r.block_on(s.address_of(n)).unwrap();
        let subnet = r.block_on(s.subnet_of(n)).unwrap();
        assert_eq!(address.is_some(), *ok, "{n}: address claim {address:?}");
        assert_eq!(subnet.is_some(), *ok, "{n}: subnet claim {subnet:?}");
    }
}
