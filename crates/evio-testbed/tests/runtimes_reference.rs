//! The runtime fixtures themselves, driven with the reference `bridge` plugin (containernetworking-plugins):
//! if these fail, the evio-cni runtime tests cannot say anything about evio-cni.

use evio_testbed::runtimes::{CniDirs, Containerd, Podman, busybox_rootfs, files_under};
use evio_testbed::{Netns, unique};

fn conflist(net: &str, bridge: &str, subnet: &str, dirs: &CniDirs) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"{net}","plugins":[{{"type":"bridge","bridge":"{bridge}","isGateway":true,
"ipMasq":false,"ipam":{{"type":"host-local","dataDir":"{}","ranges":[[{{"subnet":"{subnet}"}}]]}}}}]}}"#,
        dirs.ipam().display()
    )
}

fn check(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn ctr_run_cni_with_the_reference_bridge_plugin() {
    let node = Netns::new("rtn");
    let dirs = CniDirs::new();
    let br = unique("rb");
    dirs.write_conf(
        "10-ref.conflist",
        &conflist("refnet", &br, "10.234.1.0/24", &dirs),
    );
    let rootfs = tempfile::tempdir().unwrap();
    busybox_rootfs(rootfs.path());
    let ctrd = Containerd::start();
    let out = ctrd.run_cni(
        &node,
        &dirs,
        rootfs.path(),
        "c1",
        "ip -4 addr show eth0; ping -c1 -W2 10.234.1.1",
    );
    let stdout = check(&out, &format!("ctr run\n{}", ctrd.log()));
    assert!(
        stdout.contains("10.234.1.2/24") && stdout.contains("1 packets received"),
        "{stdout}"
    );
    let veths = node.settled_veths();
    assert!(veths.is_empty(), "veth left: {veths:?}");
    assert!(
        dirs.cache_files().is_empty(),
        "libcni cache left: {:?}",
        dirs.cache_files()
    );
    let reservations: Vec<_> = files_under(&dirs.ipam())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("10.234"))
        .collect();
    assert!(
        reservations.is_empty(),
        "IP reservation left: {reservations:?}"
    );
}

#[test]
fn podman_with_cni_backend_and_the_reference_bridge_plugin() {
    let node = Netns::new("rtn");
    let dirs = CniDirs::new();
    let br = unique("rb");
    let net = unique("pnet");
    dirs.write_conf(
        "10-ref.conflist",
        &conflist(&net, &br, "10.234.2.0/24", &dirs),
    );
    let rootfs = tempfile::tempdir().unwrap();
    busybox_rootfs(rootfs.path());
    let pm = Podman::new(&dirs);
    let out = pm.run(
        &node,
        &dirs,
        &net,
        rootfs.path(),
        "ip -4 addr show eth0; ping -c1 -W2 10.234.2.1",
    );
    let stdout = check(&out, "podman run");
    assert!(
        stdout.contains("10.234.2.2/24") && stdout.contains("1 packets received"),
        "{stdout}"
    );
    let veths = node.settled_veths();
    assert!(veths.is_empty(), "veth left: {veths:?}");
    assert!(
        dirs.cache_files().is_empty(),
        "libcni cache left: {:?}",
        dirs.cache_files()
    );
}

#[test]
fn containerd_fixture_stops_containers_left_running() {
    // A test that fails while its container runs must not leave the container or its shim behind.
    let node = Netns::new("rtn");
    let dirs = CniDirs::new();
    dirs.write_conf(
        "10-ref.conflist",
        &conflist("refnet", &unique("rb"), "10.234.3.0/24", &dirs),
    );
    let rootfs = tempfile::tempdir().unwrap();
    busybox_rootfs(rootfs.path());
    let ctrd = Containerd::start();
    let sock = ctrd.socket().display().to_string();
    let mut client = ctrd
        .run_cni_command(&node, &dirs, rootfs.path(), "long", "sleep 60")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        evio_testbed::wait_until(std::time::Duration::from_secs(20), || !ctrd
            .container_pids()
            .is_empty()),
        "the container did not start: {}",
        ctrd.log()
    );
    let pids = ctrd.container_pids();
    drop(ctrd);
    for pid in &pids {
        let gone = evio_testbed::wait_until(std::time::Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        });
        assert!(gone, "container process {pid} survived");
    }
    let shims = evio_testbed::wait_until(std::time::Duration::from_secs(5), || {
        std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmd).contains(&sock) || e.file_name() == "self"
        })
    });
    assert!(shims, "a process using our containerd socket survived");
    let _ = client.kill();
    let _ = client.wait();
}
