//! Kubernetes' own path: kubelet's calls to containerd's CRI plugin, which runs the conflist that
//! `evioctl cni-config` wrote, on eviod nodes. A CRI client (the CRI protobuf API over gRPC, as kubelet)
//! drives Debian's containerd 1.6 started in each node's network namespace; the chain is evio-cni +
//! host-local, then the reference portmap for hostPorts.
//!
//! Checked: the pod's address is in the node's claimed subnet; pod to pod across nodes both ways; a
//! hostPort answers from the other node; nothing is left after removal; a pod outlives a containerd
//! restart (address, connectivity, CNI CHECK); a sandbox whose netns vanished is removed cleanly; 20
//! sandboxes made and removed at once leave no veth, address, rule or cache entry behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Cluster, cni_config_in};
use evio_testbed::cri::{BUSYBOX_IMAGE, ContainerSpec, CriNode, PodSpec, Sandbox, busybox_image};
use evio_testbed::wait_until;

/// One node's CNI side as kubelet's runtime sees it: the conflist directory, the plugin directory
/// (evio-cni installed by cni-config; host-local, portmap and loopback, which the CRI plugin runs for
/// the pod's `lo`, from the reference plugins), and state.
struct NodeCni {
    dir: PathBuf,
    /// cni-config's JSON line: node, subnet, gateway, ...
    claim: serde_json::Value,
}

impl NodeCni {
    fn new(c: &Cluster, i: usize) -> NodeCni {
        let dir = c.dir.path().join(format!("{}-cri", c.hosts[i].name));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        for p in ["host-local", "portmap", "loopback"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), dir.join("bin").join(p))
                .unwrap();
        }
        let claim = cni_config_in(c.hosts[i].ns.name(), &c.hosts[i].name, &c.etcd_url(), &dir);
        NodeCni { dir, claim }
    }

    fn conflist(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("net.d/10-evio.conflist")).unwrap())
            .unwrap()
    }

    fn subnet(&self) -> ipnet::Ipv4Net {
        self.claim["subnet"].as_str().unwrap().parse().unwrap()
    }

    fn cri(&self, c: &Cluster, i: usize, image: &Path) -> CriNode {
        let n = CriNode::start(
            &c.hosts[i].ns,
            &self.dir.join("net.d"),
            &self.dir.join("bin"),
            BUSYBOX_IMAGE,
        );
        n.import(image);
        n
    }

    /// Addresses host-local still holds for pods.
    fn reservations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(nets) = std::fs::read_dir(self.dir.join("ipam")) {
            for net in nets.flatten() {
                for f in std::fs::read_dir(net.path()).unwrap().flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.parse::<std::net::IpAddr>().is_ok() {
                        out.push(name);
                    }
                }
            }
        }
        out
    }

    /// Attachments evio-cni still records (what a DEL would undo): `<stateDir>/<network>/*.json`.
    fn attachments(&self) -> Vec<PathBuf> {
        let net = self.conflist()["name"].as_str().unwrap().to_string();
        evio_testbed::runtimes::files_under(&self.dir.join("state").join(net))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect()
    }
}

/// The node's NAT rules that portmap made for one container (chains `CNI-DN-*`, jumps to them).
fn hostport_rules(c: &Cluster, i: usize) -> Vec<String> {
    let out = c.hosts[i].ns.exec(&["iptables-save", "-t", "nat"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("CNI-DN-"))
        .map(String::from)
        .collect()
}

/// libcni's result cache entries (`/var/lib/cni/results/<network>-<id>-<ifname>`) for these sandboxes.
fn cache_entries(ids: &[String]) -> Vec<PathBuf> {
    evio_testbed::runtimes::files_under(Path::new("/var/lib/cni/results"))
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            ids.iter().any(|id| n.contains(id.as_str()))
        })
        .collect()
}

fn busybox(c: &Cluster) -> PathBuf {
    let p = c.dir.path().join("busybox.tar");
    if !p.exists() {
        busybox_image(&p);
    }
    p
}

/// A pod serving /www on port 80 (busybox httpd), with `ports` mapped to the node.
fn web_pod(cri: &CriNode, name: &str, ports: Vec<(i32, i32)>) -> (Sandbox, String, String) {
    let spec = PodSpec {
        ports,
        ..PodSpec::new(name)
    };
    let sandbox = cri.run_pod(&spec).unwrap_or_else(|e| {
        panic!("RunPodSandbox {name}: {e}\n{}", cri.log());
    });
    let (ready, ip) = cri.pod_status(&sandbox.id).expect("PodSandboxStatus");
    assert!(ready, "sandbox {name} not ready");
    let web = ContainerSpec {
        name: "web".into(),
        image: BUSYBOX_IMAGE.into(),
        command: ["httpd", "-f", "-p", "80", "-h", "/www"]
            .map(String::from)
            .to_vec(),
        ..ContainerSpec::default()
    };
    let id = cri
        .start_container(&sandbox, &web)
        .unwrap_or_else(|e| panic!("{e}\n{}", cri.log()));
    (sandbox, ip, id)
}

/// A shell line that GETs `/` from `host:port` with busybox `nc` (busybox-static's `wget` crashes: it
/// is a static glibc binary that cannot load glibc's NSS libraries).
fn http_get(host: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host} {port}")
}

/// The body of an HTTP response, if it is one.
fn body(response: &str) -> Option<String> {
    if !response.starts_with("HTTP/1.") {
        return None;
    }
    response.split("\r\n\r\n").nth(1).map(String::from)
}

/// GET `/` from `ip`:80 inside container `from`, retried for up to 20 s (the first packets to a peer may
/// wait for its tunnel's handshake); the body.
fn fetch_in(cri: &CriNode, from: &str, ip: &str) -> String {
    let mut last = (0, String::new(), String::new());
    let mut got = None;
    let ok = wait_until(Duration::from_secs(20), || {
        last = cri.exec(from, &["sh", "-c", &http_get(ip, 80)]);
        got = body(&last.1);
        got.is_some()
    });
    assert!(ok, "GET http://{ip}/ from {from}: {last:?}");
    got.unwrap()
}

/// GET `/` from `host:port` in host `i`'s network namespace (the node itself), retried for up to 20 s.
fn fetch_from_host(c: &Cluster, i: usize, host: &str, port: u16) -> String {
    let mut got = None;
    let ok = wait_until(Duration::from_secs(20), || {
        let o = c.hosts[i].ns.exec(&[
            "sh",
            "-c",
            &http_get(host, port).replace("| nc", "| busybox nc"),
        ]);
        got = body(&String::from_utf8_lossy(&o.stdout));
        got.is_some()
    });
    assert!(ok, "GET http://{host}:{port}/ from host {i}");
    got.unwrap()
}

/// CNI CHECK of sandbox `id` with what libcni cached at ADD (the config and its result as prevResult),
/// run as the runtime would, in host `i`'s namespace; (exit success, stdout).
fn cni_check(c: &Cluster, i: usize, node: &NodeCni, id: &str, netns: &Path) -> (bool, String) {
    let list = node.conflist();
    let cached = Path::new("/var/lib/cni/results")
        .join(format!("{}-{id}-eth0", list["name"].as_str().unwrap()));
    let entry: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cached).unwrap_or_else(|e| panic!("{}: {e}", cached.display())),
    )
    .unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    conf["prevResult"] = entry["result"].clone();
    let mut cmd = c.hosts[i]
        .ns
        .command(node.dir.join("bin/evio-cni").to_str().unwrap());
    cmd.env("CNI_COMMAND", "CHECK")
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", node.dir.join("bin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn two_nodes() -> (Cluster, Vec<NodeCni>) {
    let mut c = Cluster::new(2);
    c.start_all();
    for h in &c.hosts {
        h.enable_forwarding();
    }
    assert!(c.wait_mesh(Duration::from_secs(30)), "{}", c.logs());
    let nodes = (0..2).map(|i| NodeCni::new(&c, i)).collect();
    (c, nodes)
}

#[test]
fn kubelets_path_pods_reach_each_other_across_nodes_and_survive_a_containerd_restart() {
    let (c, nodes) = two_nodes();
    // The version cni-config chose itself (the net-conf names none): one containerd 1.6 accepts.
    assert_eq!(nodes[0].conflist()["cniVersion"], "1.0.0");
    let image = busybox(&c);
    let mut cri: Vec<CriNode> = (0..2).map(|i| nodes[i].cri(&c, i, &image)).collect();

    let (a, a_ip, a_web) = web_pod(&cri[0], "web-a", vec![(80, 8080)]);
    let (b, b_ip, b_web) = web_pod(&cri[1], "web-b", vec![]);
    for (i, ip) in [(0, &a_ip), (1, &b_ip)] {
        let addr: std::net::Ipv4Addr = ip.parse().expect("pod IP");
        assert!(
            nodes[i].subnet().contains(&addr),
            "pod {ip} outside node {i}'s subnet {}",
            nodes[i].subnet()
        );
    }
    // Pod to pod across the overlay, both ways.
    assert_eq!(fetch_in(&cri[0], &a_web, &b_ip), "evio-test\n");
    assert_eq!(fetch_in(&cri[1], &b_web, &a_ip), "evio-test\n");
    // The hostPort from the other node: at host A's underlay address and at its VIP (over the overlay).
    let a_vip = c.hosts[0].vip();
    for host in [c.hosts[0].ip.clone(), a_vip] {
        assert_eq!(fetch_from_host(&c, 1, &host, 8080), "evio-test\n");
    }
    assert!(!hostport_rules(&c, 0).is_empty());

    // containerd restarted under running pods: they keep their address and their connectivity, and the
    // plugin's CHECK agrees with what ADD returned.
    let a_netns = cri[0].pod_netns(&a.id).expect("pod netns");
    let (ok, out) = cni_check(&c, 0, &nodes[0], &a.id, &a_netns);
    assert!(ok, "CHECK before the restart: {out}");
    cri[0].restart();
    let (ready, ip) = cri[0].pod_status(&a.id).expect("status after restart");
    assert!(ready && ip == a_ip, "after restart: ready {ready}, ip {ip}");
    assert_eq!(fetch_in(&cri[0], &a_web, &b_ip), "evio-test\n");
    assert_eq!(fetch_in(&cri[1], &b_web, &a_ip), "evio-test\n");
    let (ok, out) = cni_check(&c, 0, &nodes[0], &a.id, &a_netns);
    assert!(ok, "CHECK after the restart: {out}");

    // Removal frees everything: veth, address, hostPort rules, the plugin's record, libcni's cache.
    let ids = vec![a.id.clone(), b.id.clone()];
    for (n, s) in [(&cri[0], &a), (&cri[1], &b)] {
        n.stop_pod(&s.id).expect("StopPodSandbox");
        n.remove_pod(&s.id).expect("RemovePodSandbox");
        assert!(n.pods().is_empty());
    }
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(c.hosts[i].ns.settled_veths(), Vec::<String>::new());
        assert_eq!(node.reservations(), Vec::<String>::new());
        assert_eq!(node.attachments(), Vec::<PathBuf>::new());
        assert_eq!(hostport_rules(&c, i), Vec::<String>::new());
    }
    assert!(!a_netns.exists(), "{} left", a_netns.display());
    assert_eq!(cache_entries(&ids), Vec::<PathBuf>::new());
    cri.clear();
}

#[test]
fn a_sandbox_whose_netns_vanished_is_removed_cleanly() {
    let c = Cluster::new(1);
    c.hosts[0].enable_forwarding();
    let node = NodeCni::new(&c, 0);
    let image = busybox(&c);
    let cri = node.cri(&c, 0, &image);
    let (s, _ip, _web) = web_pod(&cri, "gone", vec![(80, 8081)]);
    let netns = cri.pod_netns(&s.id).expect("pod netns");
    assert_eq!(node.reservations().len(), 1);
    assert_eq!(node.attachments().len(), 1);

    // As after a node's reboot: every process of the pod gone and its netns file removed, so the kernel
    // destroyed the namespace (and the veth with it).
    let name = netns.file_name().unwrap().to_string_lossy().into_owned();
    let out = evio_testbed::run(&["ip", "netns", "pids", &name]);
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        // SAFETY: kill with a pid the kernel listed in the pod's netns, which this test made.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    }
    evio_testbed::run_ok(&["ip", "netns", "del", &name]);
    assert!(!netns.exists());

    cri.stop_pod(&s.id).unwrap_or_else(|e| {
        panic!(
            "StopPodSandbox after the netns vanished: {e}\n{}",
            cri.log()
        )
    });
    cri.remove_pod(&s.id).expect("RemovePodSandbox");
    assert!(cri.pods().is_empty());
    assert_eq!(c.hosts[0].ns.settled_veths(), Vec::<String>::new());
    assert_eq!(node.reservations(), Vec::<String>::new());
    assert_eq!(node.attachments(), Vec::<PathBuf>::new());
    assert_eq!(hostport_rules(&c, 0), Vec::<String>::new());
    assert_eq!(
        cache_entries(std::slice::from_ref(&s.id)),
        Vec::<PathBuf>::new()
    );
}

#[test]
fn twenty_sandboxes_made_and_removed_at_once_leave_nothing_behind() {
    let c = Cluster::new(1);
    c.hosts[0].enable_forwarding();
    let node = NodeCni::new(&c, 0);
    let image = busybox(&c);
    let cri = node.cri(&c, 0, &image);
    let results: Vec<Result<(String, String), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let cri = &cri;
                s.spawn(move || {
                    let spec = PodSpec {
                        ports: vec![(80, 9000 + i)],
                        ..PodSpec::new(&format!("many-{i}"))
                    };
                    let sb = cri.run_pod(&spec)?;
                    let (ready, ip) = cri.pod_status(&sb.id)?;
                    if !ready {
                        return Err(format!("{} not ready", sb.id));
                    }
                    Ok((sb.id, ip))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pods: Vec<(String, String)> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}\n{}", cri.log())))
        .collect();
    let ips: std::collections::BTreeSet<&String> = pods.iter().map(|(_, ip)| ip).collect();
    assert_eq!(ips.len(), 20, "addresses not distinct: {pods:?}");
    assert_eq!(node.reservations().len(), 20);
    assert_eq!(node.attachments().len(), 20);
    assert!(hostport_rules(&c, 0).len() >= 20);

    let ids: Vec<String> = pods.iter().map(|(id, _)| id.clone()).collect();
    std::thread::scope(|s| {
        for id in &ids {
            let cri = &cri;
            s.spawn(move || {
                cri.stop_pod(id).expect("StopPodSandbox");
                cri.remove_pod(id).expect("RemovePodSandbox");
            });
        }
    });
    assert!(cri.pods().is_empty());
    assert_eq!(c.hosts[0].ns.settled_veths(), Vec::<String>::new());
    assert_eq!(node.reservations(), Vec::<String>::new());
    assert_eq!(node.attachments(), Vec::<PathBuf>::new());
    assert_eq!(hostport_rules(&c, 0), Vec::<String>::new());
    assert_eq!(cache_entries(&ids), Vec::<PathBuf>::new());
}
