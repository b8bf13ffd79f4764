//! `make image`'s builder (scripts/image.py): a reproducible OCI image archive that containerd imports and
//! runs, with no base image and no registry.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use evio_testbed::runtimes::Containerd;

const EVIOCTL: &str = env!("CARGO_BIN_EXE_evioctl");

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/image.py")
}

/// Builds the image from the binaries next to this test's evioctl (the workspace's debug build).
fn build(out: &Path) -> Output {
    let bin_dir = Path::new(EVIOCTL).parent().unwrap();
    assert!(
        bin_dir.join("evio-cni").exists() && bin_dir.join("eviod").exists(),
        "build the workspace binaries first"
    );
    Command::new("python3")
        .arg(script())
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(out)
        .args(["--tag", "0.1.0-test"])
        .output()
        .unwrap()
}

#[test]
fn the_image_is_reproducible_and_containerd_imports_and_runs_it() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a.tar"), t.path().join("b.tar"));
    let o = build(&a);
    assert!(o.status.success(), "{}", text(&o));
    let o = build(&b);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two builds of the same binaries differ"
    );

    let ctrd = Containerd::start();
    let sock = ctrd.socket().display().to_string();
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .args(["--address", &sock, "-n", ctrd.namespace()])
            .args(args)
            .output()
            .unwrap()
    };
    let o = ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        &a.display().to_string(),
    ]);
    assert!(o.status.success(), "import: {}\n{}", text(&o), ctrd.log());
    let o = ctr(&["images", "ls", "-q"]);
    let images = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        images
            .lines()
            .any(|l| l == "docker.io/library/evio:0.1.0-test"),
        "{images}"
    );
    // The image's user, binaries and the shell tools deploy/evio.yaml's containers use.
    let o = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "docker.io/library/evio:0.1.0-test",
        "evio-image-test",
        "/bin/sh",
        "-c",
        "id -u; evioctl --version; eviod --version; test -x /usr/local/bin/evio-cni && echo cni; \
         cat /etc/ssl/certs/ca-certificates.crt >/dev/null && echo certs; sleep 0",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "run: {}\n{}", text(&o), ctrd.log());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65534", "{out}");
    assert!(
        lines[1].starts_with("evioctl ") && lines[2].starts_with("eviod "),
        "{out}"
    );
    assert!(out.contains("cni\n") && out.contains("certs\n"), "{out}");
}
