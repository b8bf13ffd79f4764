//! The DaemonSet as shipped, run the way kubelet runs it: the pod template of deploy/evio.yaml through
//! containerd 1.6's CRI plugin (a CRI client as kubelet), with the image `make image` builds
//! (scripts/image.py, imported from its OCI archive: no registry), on two nodes in network namespaces
//! sharing one etcd.
//!
//! Per node: the pod's volumes become files and directories of the node (the ConfigMap's and the
//! Secret's data as files, the hostPaths under the node's own root), `NODE_NAME` comes from the node,
//! hostNetwork is the node's namespace, and every container's command, args, mounts and security
//! context are the manifest's. Checked: the init container claims the node's subnet in etcd, writes the
//! conflist and installs the plugin into the node's CNI directories; the main container runs and stops on
//! SIGTERM within the grace period; the second node gets another subnet; a pod created afterwards
//! through the CRI gets its address from that conflist and leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use evio_testbed::cri::{
    BUSYBOX_IMAGE, ContainerSpec, ContainerState, CriNode, PodSpec, busybox_image,
};
use evio_testbed::{Etcd, Netns};
use serde_json::Value;

const EVIOCTL: &str = env!("CARGO_BIN_EXE_evioctl");
const ETCD_IP: &str = "10.98.0.254";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// deploy/evio.yaml's documents as JSON (python's yaml module, as in deploy.rs).
fn documents() -> Vec<Value> {
    let o = Command::new("python3")
        .args(["-c", "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))"])
        .arg(repo().join("deploy/evio.yaml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `make image`'s archive, built from the workspace's binaries with the manifest's image tag.
fn evio_image(dir: &Path, tag: &str) -> PathBuf {
    let bin_dir = Path::new(EVIOCTL).parent().unwrap();
    assert!(
        bin_dir.join("evio-cni").exists() && bin_dir.join("eviod").exists(),
        "build the workspace binaries first"
    );
    let out = dir.join("evio-image.tar");
    let o = Command::new("python3")
        .arg(repo().join("scripts/image.py"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(&out)
        .args(["--tag", tag])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "image.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A node: its network namespace (on the underlay with etcd) and its own root for hostPaths and volumes.
struct Node {
    name: String,
    ns: Netns,
    root: PathBuf,
}

impl Node {
    /// A hostPath of this node.
    fn host_path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
}

/// The pod template's volumes made real on `node`: a name to the host path a mount of it binds.
fn volumes(spec: &Value, node: &Node, net_conf: &Value) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for v in spec["volumes"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        let path = if let Some(hp) = v["hostPath"]["path"].as_str() {
            let p = node.host_path(hp);
            assert_eq!(v["hostPath"]["type"], "DirectoryOrCreate");
            std::fs::create_dir_all(&p).unwrap();
            p
        } else if v["configMap"].is_object() {
            // kubelet writes the ConfigMap's keys as files of a directory.
            let d = node.root.join("volumes/configmap").join(&name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("net-conf.json"), net_conf.to_string()).unwrap();
            d
        } else if v["secret"].is_object() {
            let d = node.root.join("volumes/secret").join(&name);
            std::fs::create_dir_all(&d).unwrap();
            let secret = documents()
                .into_iter()
                .find(|d| d["kind"] == "Secret")
                .unwrap();
            let mode = v["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            for (k, val) in secret["stringData"].as_object().unwrap() {
                let f = d.join(k);
                std::fs::write(&f, val.as_str().unwrap()).unwrap();
                std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            }
            d
        } else {
            panic!("volume {name}: kind not handled by this test: {v}");
        };
        out.push((name, path));
    }
    out
}

/// A container of the template as the CRI's ContainerConfig: command, args, env (`fieldRef
/// spec.nodeName` is the node's name), mounts and security context from the manifest.
fn container(c: &Value, node: &Node, vols: &[(String, PathBuf)]) -> ContainerSpec {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let env = c["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let v = if let Some(v) = e["value"].as_str() {
                        v.to_string()
                    } else {
                        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
                        node.name.clone()
                    };
                    (e["name"].as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    let mounts = c["volumeMounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let name = m["name"].as_str().unwrap();
                    let (_, host) = vols.iter().find(|(n, _)| n == name).unwrap();
                    let host = match m["subPath"].as_str() {
                        Some(sub) => host.join(sub),
                        None => host.clone(),
                    };
                    (
                        m["mountPath"].as_str().unwrap().to_string(),
                        host,
                        m["readOnly"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let sc = &c["securityContext"];
    let image = c["image"].as_str().unwrap().to_string();
    ContainerSpec {
        name: c["name"].as_str().unwrap().to_string(),
        image,
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env,
        mounts,
        run_as_user: sc["runAsUser"].as_i64(),
        run_as_group: sc["runAsGroup"].as_i64(),
        readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
        drop_all_capabilities: sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "ALL")),
        no_new_privs: sc["allowPrivilegeEscalation"] == false,
    }
}

/// The JSON line `evioctl cni-config` printed, from the CRI log of container `name`.
fn cni_config_line(log: &str) -> Value {
    log.lines()
        .filter_map(|l| l.split_once(" stdout F ").map(|(_, m)| m))
        .find_map(|m| serde_json::from_str::<Value>(m).ok())
        .unwrap_or_else(|| panic!("no JSON line in the init container's log: {log}"))
}

#[test]
fn the_daemonset_runs_as_shipped_through_the_cri_and_its_conflist_serves_pods() {
    let docs = documents();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
    let image_ref = spec["containers"][0]["image"].as_str().unwrap().to_string();
    let tag = image_ref.rsplit(':').next().unwrap().to_string();

    // The cluster: etcd on an underlay bridge, two nodes.
    let underlay = Netns::new("du");
    underlay.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    underlay.exec_ok(&["ip", "link", "set", "br0", "up"]);
    underlay.exec_ok(&["ip", "addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"]);
    let etcd = Etcd::start_in(Some(&underlay), ETCD_IP);
    let t = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            let ns = Netns::new("dn");
            let port = format!("v{i}");
            ns.veth_to("eth0", &underlay, &port);
            underlay.exec_ok(&["ip", "link", "set", &port, "master", "br0"]);
            ns.exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("10.98.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
            Node {
                name: format!("worker-{}", i + 1),
                ns,
                root: t.path().join(format!("node-{}", i + 1)),
            }
        })
        .collect();

    // The ConfigMap as a user edits it: dataStore is the cluster's etcd. The plugin's log, state and
    // IPAM data go under the node's root instead of the machine's /var (the test's isolation).
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let images = [busybox_image_at(t.path()), evio_image(t.path(), &tag)];

    let mut subnets = Vec::new();
    for node in &nodes {
        let mut net_conf: Value =
            serde_json::from_str(cm["data"]["net-conf.json"].as_str().unwrap()).unwrap();
        net_conf["dataStore"] = Value::String(etcd.endpoint());
        net_conf["logFile"] = Value::String(
            node.host_path("/var/log/evio-cni.log")
                .display()
                .to_string(),
        );
        net_conf["stateDir"] =
            Value::String(node.host_path("/var/lib/evio-cni").display().to_string());
        net_conf["ipam"] = serde_json::json!({"dataDir": node.host_path("/var/lib/cni/networks")});
        let vols = volumes(spec, node, &net_conf);
        // The node's CNI directories as kubelet's runtime sees them; the reference plugins in the bin dir
        // as the kubernetes-cni package puts them (copies: the init container asks portmap its versions).
        let conf_dir = node.host_path("/etc/cni/net.d");
        let bin_dir = node.host_path("/opt/cni/bin");
        for p in ["host-local", "portmap", "loopback"] {
            std::fs::copy(Path::new("/usr/lib/cni").join(p), bin_dir.join(p)).unwrap();
        }
        let cri = CriNode::start(&node.ns, &conf_dir, &bin_dir, BUSYBOX_IMAGE);
        for i in &images {
            cri.import(i);
        }
        // imagePullPolicy: IfNotPresent: the image is there, nothing is pulled.
        assert!(
            cri.image_id(&image_ref).is_some(),
            "{image_ref} not found after import"
        );

        let pod = cri
            .run_pod(&PodSpec {
                host_network: true,
                ..PodSpec::new("evio-node")
            })
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", cri.log()));
        // The init container runs to completion first.
        let init = container(&spec["initContainers"][0], node, &vols);
        let id = cri
            .start_container(&pod, &init)
            .unwrap_or_else(|e| panic!("{e}\n{}", cri.log()));
        let code = cri.wait_exit(&id, Duration::from_secs(30));
        let log = cri.container_log(&pod, &init.name);
        assert_eq!(code, Some(0), "init container: {log}\n{}", cri.log());
        let line = cni_config_line(&log);
        assert_eq!(line["node"], node.name.as_str());
        subnets.push(line["subnet"].as_str().unwrap().to_string());
        let list: Value =
            serde_json::from_slice(&std::fs::read(conf_dir.join("10-evio.conflist")).unwrap())
                .unwrap();
        assert_eq!(list["cniVersion"], "1.0.0");
        let installed = bin_dir.join("evio-cni");
        let mode = std::fs::metadata(&installed).unwrap().permissions();
        assert!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
            "evio-cni not installed"
        );
        // The claim is in etcd, under this node's name.
        let claims = etcd.etcdctl(&["get", "--prefix", "/evio/", "--keys-only"]);
        assert!(
            claims.lines().any(|k| k.contains(&node.name)),
            "no key for {} in etcd: {claims}",
            node.name
        );

        // The main container runs, and stops on SIGTERM within the grace period, by itself (exit 0).
        let main = container(&spec["containers"][0], node, &vols);
        let id = cri
            .start_container(&pod, &main)
            .unwrap_or_else(|e| panic!("{e}\n{}", cri.log()));
        std::thread::sleep(Duration::from_millis(500));
        let (state, _) = cri.container_state(&id).unwrap();
        assert_eq!(
            state,
            ContainerState::ContainerRunning,
            "{}",
            cri.container_log(&pod, &main.name)
        );
        let start = Instant::now();
        cri.stop_container(&id, grace).expect("StopContainer");
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(grace as u64),
            "stop took {took:?}"
        );
        assert_eq!(cri.wait_exit(&id, Duration::from_secs(5)), Some(0));

        // A pod created afterwards gets its address from the conflist the DaemonSet wrote.
        let web = cri
            .run_pod(&PodSpec::new("app"))
            .unwrap_or_else(|e| panic!("RunPodSandbox with evio's conflist: {e}\n{}", cri.log()));
        let (ready, ip) = cri.pod_status(&web.id).unwrap();
        let subnet: ipnet::Ipv4Net = subnets.last().unwrap().parse().unwrap();
        assert!(
            ready && subnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()),
            "pod {ip} (ready {ready}) outside {subnet}"
        );
        for id in [web.id.clone(), pod.id.clone()] {
            cri.stop_pod(&id).expect("StopPodSandbox");
            cri.remove_pod(&id).expect("RemovePodSandbox");
        }
        assert!(cri.pods().is_empty());
        assert_eq!(node.ns.settled_veths(), Vec::<String>::new());
        let held: Vec<PathBuf> =
            evio_testbed::runtimes::files_under(&node.host_path("/var/lib/cni/networks"))
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .parse::<std::net::IpAddr>()
                        .is_ok()
                })
                .collect();
        assert_eq!(held, Vec::<PathBuf>::new());
    }
    assert_ne!(subnets[0], subnets[1], "two nodes, one subnet");
}

fn busybox_image_at(dir: &Path) -> PathBuf {
    let p = dir.join("busybox.tar");
    busybox_image(&p);
    p
}
