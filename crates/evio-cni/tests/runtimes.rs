//! Real runtimes drive evio-cni: containerd 1.6 (`ctr run --rm --cni`) and podman 4.3 with its CNI backend
//! each run a busybox container that gets its address from evio-cni (Linux bridge made inside a throw-away
//! node netns) and pings the gateway; after the container exits their DELs leave nothing: no veth, no IP
//! reservation, no masquerade entry, no plugin state, no libcni cache entry.

use std::path::Path;

use evio_testbed::ovs::Ovs;
use evio_testbed::runtimes::{CniDirs, Containerd, Podman, busybox_rootfs, files_under};
use evio_testbed::{Netns, unique};
use serde_json::{Value, json};

/// A conflist for evio-cni with host-local, all state in `dirs`' temp dir.
fn conflist(
    net: &str,
    subnet: &str,
    gw: &str,
    dirs: &CniDirs,
    state: &Path,
    extra: &Value,
) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": net,
        "plugins": [{
            "type": "evio-cni",
            "bridge": "eviobr0",
            "isGateway": true,
            "ipMasq": true,
            "stateDir": state,
            "logFile": state.join("plugin.log"),
            "logLevel": "debug",
            "ipam": {"type": "host-local", "dataDir": dirs.ipam(),
                     "ranges": [[{"subnet": subnet, "gateway": gw}]]}
        }]
    });
    if let (Value::Object(p), Value::Object(e)) = (&mut c["plugins"][0], extra) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
    c.to_string()
}

struct Setup {
    node: Netns,
    dirs: CniDirs,
    state: tempfile::TempDir,
    rootfs: tempfile::TempDir,
    net: String,
}

fn setup(subnet: &str, gw: &str) -> Setup {
    let node = Netns::new("rtn");
    let dirs = CniDirs::new();
    dirs.add_plugin("evio-cni", Path::new(env!("CARGO_BIN_EXE_evio-cni")));
    let state = tempfile::Builder::new()
        .prefix("evio-rtstate")
        .tempdir()
        .unwrap();
    let net = unique("evn");
    dirs.write_conf(
        "10-evio.conflist",
        &conflist(&net, subnet, gw, &dirs, state.path(), &json!({})),
    );
    let rootfs = tempfile::Builder::new()
        .prefix("evio-rootfs")
        .tempdir()
        .unwrap();
    busybox_rootfs(rootfs.path());
    Setup {
        node,
        dirs,
        state,
        rootfs,
        net,
    }
}

impl Setup {
    /// Rewrites the conflist with `extra` plugin keys.
    fn configure(&self, subnet: &str, gw: &str, extra: &Value) {
        let c = conflist(&self.net, subnet, gw, &self.dirs, self.state.path(), extra);
        self.dirs.write_conf("10-evio.conflist", &c);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("plugin.log")).unwrap_or_default()
    }

    /// Pod entries in the node's masquerade sets (empty when there is no table).
    fn nft_entries(&self) -> Vec<String> {
        let out = self
            .node
            .exec(&["nft", "-j", "list", "table", "inet", "evio_cni"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("set"))
            .filter(|s| s["name"] == "pods4" || s["name"] == "pods6")
            .flat_map(|s| {
                s.get("elem")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|e| e.to_string())
            .collect()
    }

    /// What a finished container must not leave behind.
    fn assert_clean(&self) {
        let veths = self.node.settled_veths();
        assert!(veths.is_empty(), "veths left: {veths:?}\n{}", self.log());
        let reserved: Vec<_> = files_under(&self.dirs.ipam())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
            })
            .collect();
        assert!(reserved.is_empty(), "IP reservations left: {reserved:?}");
        assert_eq!(
            self.nft_entries(),
            Vec::<String>::new(),
            "masquerade entries left"
        );
        // Per-attachment state lives in stateDir/<network>/ (stateDir/delegates/ caches IPAM versions).
        let state = files_under(&self.state.path().join(&self.net));
        assert!(state.is_empty(), "plugin state left: {state:?}");
        assert!(
            self.dirs.cache_files().is_empty(),
            "libcni cache left: {:?}",
            self.dirs.cache_files()
        );
    }
}

fn stdout_of(out: &std::process::Output, what: &str, log: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {stdout}{}\nplugin log:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const SCRIPT: &str = "ip -4 addr show eth0; ip route; ping -c1 -W2 GW";

#[test]
fn containerd_ctr_run_cni_uses_evio_cni() {
    let s = setup("10.244.61.0/24", "10.244.61.1");
    let ctrd = Containerd::start();
    let out = ctrd.run_cni(
        &s.node,
        &s.dirs,
        s.rootfs.path(),
        "evio1",
        &SCRIPT.replace("GW", "10.244.61.1"),
    );
    let stdout = stdout_of(&out, &format!("ctr run\n{}", ctrd.log()), &s.log());
    assert!(
        stdout.contains("inet 10.244.61.2/24"),
        "address from evio-cni: {stdout}"
    );
    assert!(stdout.contains("default via 10.244.61.1"), "{stdout}");
    assert!(
        stdout.contains("1 packets received"),
        "ping the gateway: {stdout}"
    );
    // The plugin really ran (not another one): its log has the ADD and containerd's DEL (empty netns).
    let log = s.log();
    assert!(
        log.contains("ADD done") && log.contains("DEL done"),
        "{log}"
    );
    assert!(
        s.node
            .exec_ok(&["ip", "-br", "addr", "show", "eviobr0"])
            .contains("10.244.61.1/24")
    );
    s.assert_clean();
}

#[test]
fn podman_cni_backend_uses_evio_cni() {
    let s = setup("10.244.62.0/24", "10.244.62.1");
    let pm = Podman::new(&s.dirs);
    let out = pm.run(
        &s.node,
        &s.dirs,
        &s.net,
        s.rootfs.path(),
        &SCRIPT.replace("GW", "10.244.62.1"),
    );
    let stdout = stdout_of(&out, "podman run", &s.log());
    assert!(
        stdout.contains("inet 10.244.62.2/24"),
        "address from evio-cni: {stdout}"
    );
    assert!(stdout.contains("default via 10.244.62.1"), "{stdout}");
    assert!(
        stdout.contains("1 packets received"),
        "ping the gateway: {stdout}"
    );
    let log = s.log();
    assert!(
        log.contains("ADD done") && log.contains("DEL done"),
        "{log}"
    );
    s.assert_clean();
}

#[test]
fn containerd_ctr_run_cni_with_an_ovs_bridge() {
    let s = setup("10.244.63.0/24", "10.244.63.1");
    let ovs = Ovs::start(&s.node); // declared after the node: dropped first
    let extra =
        json!({"bridgeType": "ovs", "ovsDatapathType": "netdev", "ovsdbSocket": ovs.socket()});
    s.configure("10.244.63.0/24", "10.244.63.1", &extra);
    let ctrd = Containerd::start();
    let out = ctrd.run_cni(
        &s.node,
        &s.dirs,
        s.rootfs.path(),
        "evio-ovs1",
        &SCRIPT.replace("GW", "10.244.63.1"),
    );
    let stdout = stdout_of(
        &out,
        &format!("ctr run\n{}\n{}", ctrd.log(), ovs.log()),
        &s.log(),
    );
    assert!(
        stdout.contains("inet 10.244.63.2/24"),
        "address from evio-cni: {stdout}"
    );
    assert!(
        stdout.contains("1 packets received"),
        "ping the gateway over OVS: {stdout}"
    );
    assert_eq!(
        ovs.vsctl_ok(&["get", "Bridge", "eviobr0", "datapath_type"])
            .trim(),
        "netdev"
    );
    assert!(
        ovs.ports("eviobr0").is_empty(),
        "OVS port left: {:?}",
        ovs.ports("eviobr0")
    );
    s.assert_clean();
}
