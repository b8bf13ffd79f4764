//! The conflist written by `evioctl cni-config` drives a real ADD/DEL: the installed evio-cni plugin with
//! the real host-local IPAM (from /usr/lib/cni) in a throw-away node netns, then the chained portmap plugin
//! as a runtime would call it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use evio_testbed::{Etcd, Netns};
use serde_json::{Value, json};

const EVIOCTL: &str = env!("CARGO_BIN_EXE_evioctl");

fn evio_cni() -> PathBuf {
    let p = evio_testbed::bin_dir().join("evio-cni");
    assert!(
        p.exists(),
        "{} is not built: cargo build -p evio-cni",
        p.display()
    );
    p
}

fn text(o: &Output) -> String {
    format!(
        "{:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs plugin `bin` for `cmd` inside `node`, as a runtime would (config on stdin, CNI_* in the env).
fn cni(node: &Netns, bin: &Path, cmd: &str, netns: &str, path: &str, conf: &Value) -> Output {
    let mut c = node
        .command(bin.to_str().unwrap())
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", "ctr-evio-test-1")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    c.wait_with_output().unwrap()
}

/// The config a runtime passes to plugin `i` of a conflist.
fn plugin_conf(list: &Value, i: usize, prev: Option<&Value>) -> Value {
    let mut p = list["plugins"][i].clone();
    p["cniVersion"] = list["cniVersion"].clone();
    p["name"] = list["name"].clone();
    if let Some(prev) = prev {
        p["prevResult"] = prev.clone();
    }
    if p["type"] == "portmap" {
        p["runtimeConfig"] =
            json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]});
    }
    p
}

fn add_and_del(cni_version: Option<&str>) {
    let etcd = Etcd::start();
    let node = Netns::new("nd");
    let pod = Netns::new("pd");
    let t = tempfile::tempdir().unwrap();
    let (conf_dir, bin_dir) = (t.path().join("net.d"), t.path().join("bin"));
    let ipam_dir = t.path().join("ipam");
    let mut net_conf = json!({
        "name": "evio-add",
        "podCIDR": "10.123.0.0/16",
        "nodeBits": 8,
        "dataStore": etcd.endpoint(),
        "bridge": "eviobr0",
        "ipMasq": true,
        "logFile": t.path().join("cni.log"),
        "logLevel": "debug",
        "stateDir": t.path().join("state"),
        "ipam": {"dataDir": ipam_dir},
    });
    if let Some(v) = cni_version {
        net_conf["cniVersion"] = json!(v);
    }
    std::fs::write(t.path().join("net-conf.json"), net_conf.to_string()).unwrap();
    let o = Command::new(EVIOCTL)
        .arg("cni-config")
        .arg("--net-conf")
        .arg(t.path().join("net-conf.json"))
        .args(["--node-name", "add-node"])
        .arg("--cni-conf-dir")
        .arg(&conf_dir)
        .arg("--cni-bin-dir")
        .arg(&bin_dir)
        .arg("--plugin-binary")
        .arg(evio_cni())
        .arg("--cni-path")
        .arg(format!("{}:/usr/lib/cni", bin_dir.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    let list: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-evio.conflist")).unwrap()).unwrap();
    // Without a named version: the newest that evio-cni and the distribution's portmap both speak, up to
    // 1.0.0 (what containerd 1.6/1.7 accept).
    assert_eq!(list["cniVersion"], cni_version.unwrap_or("1.0.0"));
    assert_eq!(line["cniVersion"], list["cniVersion"]);
    let installed = bin_dir.join("evio-cni");
    let path = format!("{}:/usr/lib/cni", bin_dir.display());
    let netns = pod.path().display().to_string();

    // ADD through the chain: evio-cni, then portmap with evio-cni's result as prevResult.
    let o = cni(
        &node,
        &installed,
        "ADD",
        &netns,
        &path,
        &plugin_conf(&list, 0, None),
    );
    assert!(o.status.success(), "evio-cni ADD: {}", text(&o));
    let result: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ip = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert_eq!(
        ip,
        format!("{}/24", line["rangeStart"].as_str().unwrap()),
        "{result}"
    );
    assert_eq!(result["ips"][0]["gateway"], line["gateway"]);
    let portmap = Path::new("/usr/lib/cni/portmap");
    let o = cni(
        &node,
        portmap,
        "ADD",
        &netns,
        &path,
        &plugin_conf(&list, 1, Some(&result)),
    );
    assert!(
        o.status.success(),
        "portmap ADD with cniVersion {}: {}",
        list["cniVersion"],
        text(&o)
    );

    // The pod has its address and reaches its gateway (the node's bridge) in the node netns.
    let addrs = pod.exec_ok(&["ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(addrs.contains(&ip), "{addrs}");
    let gw = line["gateway"].as_str().unwrap();
    let ping = pod.exec(&["ping", "-c", "1", "-W", "2", gw]);
    assert!(ping.status.success(), "{}", text(&ping));
    assert!(
        node.exec_ok(&["ip", "-o", "-4", "addr", "show", "eviobr0"])
            .contains(&format!("{gw}/24"))
    );
    // host-local's reservation is a file named after the address (its lock and last_reserved_ip files
    // do not count).
    let bare_ip = ip.split('/').next().unwrap();
    assert!(
        ipam_dir.join("evio-add").join(bare_ip).is_file(),
        "host-local holds no lease for {bare_ip} in its temp dataDir"
    );

    // DEL in reverse order; host-local's lease is released.
    let o = cni(
        &node,
        portmap,
        "DEL",
        &netns,
        &path,
        &plugin_conf(&list, 1, Some(&result)),
    );
    assert!(o.status.success(), "portmap DEL: {}", text(&o));
    let o = cni(
        &node,
        &installed,
        "DEL",
        &netns,
        &path,
        &plugin_conf(&list, 0, Some(&result)),
    );
    assert!(o.status.success(), "evio-cni DEL: {}", text(&o));
    let leases: Vec<String> = std::fs::read_dir(ipam_dir.join("evio-add"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(leases.is_empty(), "address not released: {leases:?}");
    let veths: Vec<String> = node
        .links()
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert!(veths.is_empty(), "veth left after DEL: {veths:?}");
    assert!(
        !pod.links().contains(&"eth0".to_string()),
        "pod interface left after DEL"
    );
}

#[test]
fn generated_conflist_drives_a_real_add_and_del() {
    add_and_del(None);
}

#[test]
fn generated_conflist_with_cni_0_4_0_chains_portmap() {
    add_and_del(Some("0.4.0"));
}

/// A net-conf that names a version the chained portmap does not speak (Debian 12's reference plugins stop
/// at 1.0.0) is refused before anything is claimed or written.
#[test]
fn a_named_version_portmap_lacks_is_refused_and_nothing_is_written() {
    let etcd = Etcd::start();
    let t = tempfile::tempdir().unwrap();
    let (conf_dir, bin_dir) = (t.path().join("net.d"), t.path().join("bin"));
    let net_conf =
        json!({"cniVersion": "1.1.0", "podCIDR": "10.125.0.0/16", "dataStore": etcd.endpoint()});
    std::fs::write(t.path().join("net-conf.json"), net_conf.to_string()).unwrap();
    let o = Command::new(EVIOCTL)
        .arg("cni-config")
        .arg("--net-conf")
        .arg(t.path().join("net-conf.json"))
        .args(["--node-name", "v-node"])
        .arg("--cni-conf-dir")
        .arg(&conf_dir)
        .arg("--cni-bin-dir")
        .arg(&bin_dir)
        .arg("--plugin-binary")
        .arg(evio_cni())
        .arg("--cni-path")
        .arg("/usr/lib/cni")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        err.contains("cniVersion 1.1.0")
            && err.contains("portmap")
            && err.contains("/usr/lib/cni/portmap"),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(!conf_dir.exists() && !bin_dir.exists(), "files written");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let claims = rt.block_on(async {
        let s = evio_store::Store::connect(&evio_store::EtcdOptions::new([etcd.endpoint()]))
            .await
            .unwrap();
        s.subnet_claims().await.unwrap()
    });
    assert!(claims.is_empty(), "claimed: {claims:?}");
}

/// Runs `evioctl cni-config` into a runtime's private CNI directories; returns its JSON line.
fn cni_config_into(
    dirs: &evio_testbed::runtimes::CniDirs,
    etcd: &Etcd,
    name: &str,
    pod_cidr: &str,
    t: &Path,
) -> Value {
    // No cniVersion, as users write them: cni-config picks one the runtime and portmap accept.
    let net_conf = json!({
        "name": name,
        "podCIDR": pod_cidr,
        "nodeBits": 8,
        "bridge": "eviobr0",
        "logFile": t.join("cni.log"),
        "stateDir": t.join("state"),
        "ipam": {"dataDir": dirs.ipam()},
    });
    std::fs::write(t.join("net-conf.json"), net_conf.to_string()).unwrap();
    let o = Command::new(EVIOCTL)
        .arg("cni-config")
        .arg("--net-conf")
        .arg(t.join("net-conf.json"))
        .args([
            "--node-name",
            "rt-node",
            "--etcd-endpoints",
            &etcd.endpoint(),
        ])
        .arg("--cni-conf-dir")
        .arg(dirs.conf())
        .arg("--cni-bin-dir")
        .arg(dirs.bin())
        .arg("--plugin-binary")
        .arg(evio_cni())
        .arg("--cni-path")
        .arg(format!("{}:/usr/lib/cni", dirs.bin().display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `ctr run --cni` (containerd 1.6, the first conflist in its CNI dir) starts a container with the conflist
/// and plugin that `evioctl cni-config` installed. containerd 1.6's libcni and Debian's reference plugins
/// predate CNI 1.1.0; the net-conf names no version and cni-config chooses one they accept.
#[test]
fn ctr_run_cni_uses_the_installed_conflist() {
    use evio_testbed::runtimes::{CniDirs, Containerd, busybox_rootfs, files_under};
    let etcd = Etcd::start();
    let node = Netns::new("ctn");
    let dirs = CniDirs::new();
    let t = tempfile::tempdir().unwrap();
    let line = cni_config_into(&dirs, &etcd, "evio-ctr", "10.124.0.0/16", t.path());
    let gw = line["gateway"].as_str().unwrap();
    let rootfs = tempfile::tempdir().unwrap();
    busybox_rootfs(rootfs.path());
    let ctrd = Containerd::start();
    let out = ctrd.run_cni(
        &node,
        &dirs,
        rootfs.path(),
        "evio-c1",
        &format!("ip -4 addr show eth0; ping -c1 -W2 {gw}"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ctr run: {}\ncni log: {}\n{}",
        text(&out),
        std::fs::read_to_string(t.path().join("cni.log")).unwrap_or_default(),
        ctrd.log()
    );
    let want = format!("{}/24", line["rangeStart"].as_str().unwrap());
    assert!(
        stdout.contains(&want) && stdout.contains("1 packets received"),
        "{stdout}"
    );
    // containerd's DEL (empty CNI_NETNS) removed the host veth and released the address.
    let veths = node.settled_veths();
    assert!(veths.is_empty(), "veth left: {veths:?}");
    let left: Vec<_> = files_under(&dirs.ipam())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("10.124."))
        .collect();
    assert!(left.is_empty(), "IP reservation left: {left:?}");
}

/// `podman run` with its CNI backend and the installed conflist (network name = the conflist's name).
#[test]
fn podman_runs_with_the_installed_conflist() {
    use evio_testbed::runtimes::{CniDirs, Podman, busybox_rootfs, files_under};
    let etcd = Etcd::start();
    let node = Netns::new("pmn");
    let dirs = CniDirs::new();
    let t = tempfile::tempdir().unwrap();
    let net = evio_testbed::unique("evpm");
    let line = cni_config_into(&dirs, &etcd, &net, "10.125.0.0/16", t.path());
    let gw = line["gateway"].as_str().unwrap();
    let rootfs = tempfile::tempdir().unwrap();
    busybox_rootfs(rootfs.path());
    let pm = Podman::new(&dirs);
    let out = pm.run(
        &node,
        &dirs,
        &net,
        rootfs.path(),
        &format!("ip -4 addr show eth0; ping -c1 -W2 {gw}"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "podman run: {}\ncni log: {}",
        text(&out),
        std::fs::read_to_string(t.path().join("cni.log")).unwrap_or_default()
    );
    let want = format!("{}/24", line["rangeStart"].as_str().unwrap());
    assert!(
        stdout.contains(&want) && stdout.contains("1 packets received"),
        "{stdout}"
    );
    let veths = node.settled_veths();
    assert!(veths.is_empty(), "veth left: {veths:?}");
    let left: Vec<_> = files_under(&dirs.ipam())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("10.125."))
        .collect();
    assert!(left.is_empty(), "IP reservation left: {left:?}");
}
