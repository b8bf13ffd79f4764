//! CA mode end to end: real etcd, the real signer (`evioctl ca serve`) and agents in network namespaces
//! that are given nothing but a join token.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::Cluster;
use evio_testbed::wait_until;

/// The CA directory and the signer process (killed on drop).
struct Ca {
    dir: PathBuf,
    log: PathBuf,
    signer: Option<Child>,
}

impl Drop for Ca {
    fn drop(&mut self) {
        if let Some(mut s) = self.signer.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

fn evioctl(c: &Cluster, args: &[&str]) -> std::process::Output {
    c.underlay
        .command(common::evioctl().to_str().unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `evioctl ca init` and the signer, in the underlay namespace (where etcd is).
fn ca(c: &Cluster) -> Ca {
    ca_with(c, &[])
}

/// [`ca`] with extra `ca serve` flags.
fn ca_with(c: &Cluster, serve_args: &[&str]) -> Ca {
    let dir = c.dir.path().join("ca");
    ok(evioctl(c, &["ca", "init", "--dir", dir.to_str().unwrap()]));
    let log = c.dir.path().join("signer.log");
    let f = std::fs::File::create(&log).unwrap();
    let signer = c
        .underlay
        .command(common::evioctl().to_str().unwrap())
        .args(["ca", "serve", "--ca-dir", dir.to_str().unwrap()])
        .args([
            "--etcd-endpoints",
            &c.etcd_url(),
            "--pod-cidr",
            "10.244.0.0/16",
        ])
        .args(serve_args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    Ca {
        dir,
        log,
        signer: Some(signer),
    }
}

fn token(c: &Cluster, ca: &Ca, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--ca-dir", ca.dir.to_str().unwrap()];
    let url = c.etcd_url();
    args.extend(["--etcd-endpoints", &url]);
    args.extend_from_slice(extra);
    ok(evioctl(c, &args)).trim().to_string()
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs eviod in `h`'s namespace with only a token and waits for it to exit; returns its stderr.
fn refused_join(h: &common::Host, token: &str) -> String {
    let o =
        h.ns.command(common::eviod())
            .args(["--node-name", &h.name, "--state-dir"])
            .arg(&h.state_dir)
            .env("EVIO_JOIN_TOKEN", token)
            .output()
            .unwrap();
    assert!(!o.status.success(), "eviod accepted a bad token");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn hosts_join_with_one_token_and_a_revoked_node_leaves_every_host() {
    let mut c = Cluster::new(3);
    let ca = ca(&c);
    let token = token(&c, &ca, &["--reusable", "--ttl", "10m"]);
    let diag = |c: &Cluster| {
        format!(
            "{}\n=== signer ===\n{}",
            c.logs(),
            std::fs::read_to_string(&ca.log).unwrap_or_default()
        )
    };

    // A token is all a host needs: no etcd endpoints, no addresses, no key files.
    let t0 = Instant::now();
    for i in 0..3 {
        c.hosts[i].start_with(None, &[("EVIO_JOIN_TOKEN", &token)]);
    }
    let started = t0.elapsed();
    assert!(c.wait_mesh(Duration::from_secs(20)), "{}", diag(&c));
    let vips: Vec<String> = c.hosts.iter().map(|h| h.vip()).collect();
    assert!(
        c.hosts[0].ping_until(&vips[1], Duration::from_secs(5)),
        "{}",
        diag(&c)
    );
    eprintln!(
        "3 agents joined with a token: control sockets up after {started:?}, full mesh with VIP ping after {:?}",
        t0.elapsed()
    );
    for h in &c.hosts {
        let st = h.status().unwrap();
        // What the certificate grants is what etcd's claims say.
        let claim = c.etcdctl(&[
            "get",
            "--print-value-only",
            &format!("/evio/v1/addresses/by-node/{}", h.name),
        ]);
        assert!(claim.contains(st["address"].as_str().unwrap()), "{claim}");
        assert!(
            st["podSubnet"].as_str().unwrap().starts_with("10.244."),
            "{st}"
        );
        // The state dir keeps what the token brought (secrets 0600); the token itself is gone.
        for f in ["ca.json", "join.json", "node.cert", "private.key"] {
            assert_eq!(mode(&h.state_dir.join(f)), 0o600, "{f}");
        }
        assert!(!h.state_dir.join("join-token").exists());
        let reg = c.etcdctl(&[
            "get",
            "--print-value-only",
            &format!("/evio/v1/nodes/{}", h.name),
        ]);
        assert!(reg.contains("\"certificate\""), "{reg}");
    }

    // A restart needs no token, and gets the same VIP.
    c.hosts[0].stop();
    c.hosts[0].start_with(None, &[]);
    assert_eq!(c.hosts[0].vip(), vips[0]);
    for v in &vips[1..] {
        assert!(
            c.hosts[0].ping_until(v, Duration::from_secs(10)),
            "{}",
            diag(&c)
        );
    }

    // Someone who can only write to etcd cannot add a peer: a record with claims and no certificate, and one
    // with a certificate copied from another node, are refused by every host.
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let forged = format!(r#"{{"node":"forged","publicKey":"{key}","address":"10.10.0.77"}}"#);
    c.etcdctl(&["put", "/evio/v1/nodes/forged", &forged]);
    c.etcdctl(&[
        "put",
        "/evio/v1/addresses/by-node/forged",
        r#"{"node":"forged","address":"10.10.0.77","since":1}"#,
    ]);
    c.etcdctl(&[
        "put",
        "/evio/v1/addresses/by-address/10.10.0.77",
        r#"{"node":"forged","address":"10.10.0.77","since":1}"#,
    ]);
    let stolen: serde_json::Value =
        serde_json::from_str(&c.etcdctl(&["get", "--print-value-only", "/evio/v1/nodes/host-2"]))
            .unwrap();
    let copy = format!(
        r#"{{"node":"copycat","publicKey":"{key}","certificate":{}}}"#,
        stolen["certificate"]
    );
    c.etcdctl(&["put", "/evio/v1/nodes/copycat", &copy]);
    std::thread::sleep(Duration::from_secs(2));
    for (i, h) in c.hosts.iter().enumerate() {
        let want: Vec<&str> = ["host-1", "host-2", "host-3"]
            .into_iter()
            .filter(|n| *n != h.name)
            .collect();
        assert_eq!(h.peer_names(), names(&want), "host {i}: {}", diag(&c));
        assert!(!h.tun_routes().contains("10.10.0.77"));
    }
    assert!(c.hosts[0].log_text().contains("no certificate"));

    // Revoked: host-3 leaves every host within 10 s and cannot come back, though its agent keeps running
    // and re-registers.
    let t = Instant::now();
    ok(evioctl(
        &c,
        &[
            "revoke",
            "host-3",
            "--ca-dir",
            ca.dir.to_str().unwrap(),
            "--etcd-endpoints",
            &c.etcd_url(),
        ],
    ));
    let gone = wait_until(Duration::from_secs(10), || {
        c.hosts[..2]
            .iter()
            .all(|h| !h.peer_names().contains("host-3"))
    });
    assert!(gone, "host-3 still a peer after 10 s: {}", diag(&c));
    eprintln!("revoked node gone from every host after {:?}", t.elapsed());
    // Its agent restarted (with its stored, revoked certificate) registers again: still refused.
    c.hosts[2].kill9();
    c.hosts[2].start_with(None, &[]);
    assert!(
        wait_until(Duration::from_secs(5), || c
            .etcdctl(&["get", "--keys-only", "/evio/v1/nodes/host-3"])
            .contains("host-3")),
        "host-3 did not register again: {}",
        diag(&c)
    );
    std::thread::sleep(Duration::from_secs(3));
    for h in &c.hosts[..2] {
        assert!(!h.peer_names().contains("host-3"), "{}", diag(&c));
        assert!(!h.ping(&vips[2]));
    }
    assert!(
        c.hosts[0].ping(&vips[1]),
        "the others still reach each other"
    );
}

#[test]
fn bad_tokens_are_refused_and_write_nothing() {
    let c = Cluster::new(1);
    let ca = ca(&c);
    let h = &c.hosts[0];
    // A token whose pin does not match the CA key it carries.
    let good = token(&c, &ca, &[]);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut body: serde_json::Value =
        serde_json::from_slice(&b64.decode(good.strip_prefix("evio1.").unwrap()).unwrap()).unwrap();
    body["caPin"] = serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    let bad_pin = format!("evio1.{}", b64.encode(body.to_string()));
    let err = refused_join(h, &bad_pin);
    assert!(err.contains("pin"), "{err}");
    // Not a token at all, and an expired one.
    assert!(refused_join(h, "hello").contains("invalid join token"));
    let short = token(&c, &ca, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let err = refused_join(h, &short);
    assert!(err.contains("expired"), "{err}");
    // Nothing was kept, nothing was asked of the signer, nothing was claimed.
    let kept: Vec<String> = std::fs::read_dir(&h.state_dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        kept.iter()
            .all(|f| !["ca.json", "join.json", "join-token", "node.cert"].contains(&f.as_str())),
        "{kept:?}"
    );
    let all = c.etcdctl(&["get", "--prefix", "--keys-only", "/evio/v1/"]);
    assert!(all.trim().is_empty(), "etcd holds: {all}");
}

/// Certificates renew before they expire without a dropped packet: with 15 s certificates both agents renew
/// after 10 s while a ping runs every 0.2 s.
#[test]
fn certificates_renew_without_a_dropped_packet() {
    let mut c = Cluster::new(2);
    let ca = ca_with(&c, &["--cert-ttl", "15s"]);
    let token = token(&c, &ca, &["--reusable"]);
    for i in 0..2 {
        c.hosts[i].start_with(None, &[("EVIO_JOIN_TOKEN", &token)]);
    }
    let vip = c.hosts[1].vip();
    assert!(
        c.hosts[0].ping_until(&vip, Duration::from_secs(10)),
        "{}",
        c.logs()
    );
    let before: Vec<String> = c
        .hosts
        .iter()
        .map(|h| std::fs::read_to_string(h.state_dir.join("node.cert")).unwrap())
        .collect();
    let out = c.hosts[0]
        .ns
        .exec(&["ping", "-q", "-c", "75", "-i", "0.2", "-W", "1", &vip]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for (h, old) in c.hosts.iter().zip(&before) {
        let now = std::fs::read_to_string(h.state_dir.join("node.cert")).unwrap();
        assert_ne!(&now, old, "{} did not renew: {}", h.name, h.log_text());
        assert!(h.log_text().contains("certificate renewed"));
        let reg = c.etcdctl(&[
            "get",
            "--print-value-only",
            &format!("/evio/v1/nodes/{}", h.name),
        ]);
        assert!(
            reg.contains(now.trim()),
            "the renewed certificate is not published"
        );
    }
    assert!(
        text.contains("75 packets transmitted, 75 received"),
        "{text}\n{}",
        c.logs()
    );
}
