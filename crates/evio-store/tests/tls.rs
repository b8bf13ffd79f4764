//! etcd over TLS with client certificates (a CA, server and client certificates made with openssl here).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evio_store::{EtcdOptions, Store, SubnetPlan};

struct TlsEtcd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=evio-test-ca",
        "-days",
        "1",
    ]);
    openssl(dir, &ca);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        let (key, csr, crt, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extf), ext).unwrap();
        req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj"]);
        let subj = format!("/CN=evio-{name}");
        req.push(&subj);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "1",
                "-extfile",
                &extf,
            ],
        );
    }
}

fn start_tls_etcd() -> (TlsEtcd, String, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("evio-etcd-tls")
        .tempdir()
        .unwrap();
    make_pki(dir.path());
    let (cp, pp) = (evio_testbed::free_port(), evio_testbed::free_port());
    let client = format!("https://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let d = dir.path();
    let log = std::fs::File::create(d.join("etcd.log")).unwrap();
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(d.join("data"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("t={peer}")])
        .args([
            "--heartbeat-interval",
            "10",
            "--election-timeout",
            "100",
            "--log-level",
            "warn",
        ])
        .arg("--cert-file")
        .arg(d.join("server.crt"))
        .arg("--key-file")
        .arg(d.join("server.key"))
        .arg("--trusted-ca-file")
        .arg(d.join("ca.crt"))
        .arg("--client-cert-auth")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("etcd");
    let path = d.to_path_buf();
    let e = TlsEtcd { child, _dir: dir };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", cp)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "etcd (TLS) did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (e, client, path)
}

#[test]
fn claims_over_mutual_tls() {
    let (_etcd, endpoint, pki) = start_tls_etcd();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut o = EtcdOptions::new([endpoint.clone()]);
        o.ca = Some(pki.join("ca.crt"));
        o.cert = Some(pki.join("client.crt"));
        o.key = Some(pki.join("client.key"));
        // etcd may still be electing itself leader: retry for a moment.
        let t = Instant::now();
        let store = loop {
            match Store::connect(&o).await {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("TLS connect: {e}"),
            }
        };
        let plan = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        assert_eq!(
            store
                .claim_subnet(&plan, "tls-node")
                .await
                .unwrap()
                .subnet
                .to_string(),
            "10.244.0.0/24"
        );

        // Without a client certificate the server refuses: an error, within the bound.
        let mut no_cert = EtcdOptions::new([endpoint.clone()]);
        no_cert.ca = Some(pki.join("ca.crt"));
        no_cert.timeout = Duration::from_secs(2);
        let t = Instant::now();
        let e = Store::connect(&no_cert).await.err().expect("refused");
        // With TLS 1.3 the client learns of the refusal as an alert or as a closed connection, by timing.
        assert!(
            matches!(
                e,
                evio_store::StoreError::Tls { .. } | evio_store::StoreError::Unreachable { .. }
            ),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(4));
        // A CA that did not sign the server's certificate: a TLS error that says so.
        let mut wrong_ca = o.clone();
        wrong_ca.ca = Some(pki.join("client.crt"));
        let e = Store::connect(&wrong_ca).await.err().expect("refused");
        assert!(matches!(e, evio_store::StoreError::Tls { .. }), "{e}");
        assert!(e.to_string().contains("--etcd-ca"), "{e}");
        // A half-given client identity is a configuration error.
        let mut half = o.clone();
        half.key = None;
        let e = Store::connect(&half).await.err().unwrap().to_string();
        assert!(e.contains("--etcd-cert and --etcd-key go together"), "{e}");
    });
}
