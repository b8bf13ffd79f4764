//! eviod end to end: hosts as network namespaces on one underlay bridge, real etcd, real TUN devices.

mod common;

use std::time::Duration;

use common::Cluster;
use evio_testbed::{Netns, run_ok, wait_until};

/// Waits until a socket listens on `port` in `ns` (`kind`: `t` for TCP, `u` for UDP).
fn listening(ns: &Netns, kind: &str, port: u16) -> bool {
    let filter = format!("sport = :{port}");
    wait_until(Duration::from_secs(5), || {
        !ns.exec_ok(&["ss", &format!("-Hnl{kind}"), &filter])
            .trim()
            .is_empty()
    })
}

#[test]
fn three_hosts_reach_each_others_vips() {
    let mut c = Cluster::new(3);
    // A cluster pre-shared key (mode 0600) on every node, and metrics on host-1.
    let psk = c.dir.path().join("psk");
    std::fs::write(&psk, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    for h in &mut c.hosts {
        h.extra = vec!["--psk-file".into(), psk.to_str().unwrap().into()];
    }
    c.hosts[0]
        .extra
        .extend(["--metrics-addr".to_string(), "127.0.0.1:9109".to_string()]);
    c.start_all();
    if c.ca.is_some() {
        // CA mode (EVIO_TEST_CA): every agent joined with the token and holds its certificate.
        for h in &c.hosts {
            assert!(h.state_dir.join("node.cert").exists(), "{}", c.logs());
        }
    }
    assert!(
        c.wait_mesh(Duration::from_secs(20)),
        "no full mesh:\n{}",
        c.logs()
    );
    let vips: Vec<String> = c.hosts.iter().map(|h| h.vip()).collect();
    for v in &vips {
        assert!(v.starts_with("10.10."), "{vips:?}");
    }
    for (i, h) in c.hosts.iter().enumerate() {
        for (j, v) in vips.iter().enumerate() {
            if i != j {
                assert!(
                    h.ping_until(v, Duration::from_secs(5)),
                    "{} cannot reach {v}:\n{}",
                    h.name,
                    c.logs()
                );
            }
        }
    }
    // `evioctl status --json` prints exactly the agent's document; without --json, a table.
    let ctl = common::evioctl();
    let sd = c.hosts[0].state_dir.to_str().unwrap().to_string();
    let out = run_ok(&[
        ctl.to_str().unwrap(),
        "status",
        "--state-dir",
        &sd,
        "--json",
    ]);
    let st: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut keys: Vec<&str> = st.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["address", "node", "peers", "podSubnet", "publicKey"]);
    assert_eq!(st["node"], "host-1");
    assert_eq!(st["address"].as_str().unwrap(), vips[0]);
    let table = run_ok(&[ctl.to_str().unwrap(), "status", "--state-dir", &sd]);
    // --address prints only the VIP (what deploy/kubelet-evio.conf gives the kubelet as --node-ip); --wait
    // retries until the agent answers, then gives up with the error.
    let vip = run_ok(&[
        ctl.to_str().unwrap(),
        "status",
        "--state-dir",
        &sd,
        "--address",
        "--wait",
        "5",
    ]);
    assert_eq!(vip, format!("{}\n", vips[0]));
    let t = std::time::Instant::now();
    let o = std::process::Command::new(&ctl)
        .args([
            "status",
            "--state-dir",
            "/nonexistent-evio",
            "--address",
            "--wait",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success() && t.elapsed() >= Duration::from_secs(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the agent"));
    assert!(
        table.contains("host-2") && table.contains("direct") && table.contains(&vips[1]),
        "{table}"
    );
    let peers = st["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    let mut pkeys: Vec<&str> = peers[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    pkeys.sort();
    assert_eq!(
        pkeys,
        [
            "address",
            "endpoint",
            "lastHandshake",
            "node",
            "path",
            "podSubnet",
            "rxBytes",
            "txBytes"
        ]
    );
    for p in peers {
        assert_eq!(p["path"], "direct");
        assert!(p["lastHandshake"].as_u64().unwrap() > 1_700_000_000);
        assert!(p["rxBytes"].as_u64().unwrap() > 0);
        assert!(p["endpoint"].as_str().unwrap().ends_with(":51820"));
    }
    // Prometheus metrics over HTTP.
    let m = c.hosts[0]
        .ns
        .exec_ok(&["curl", "-sf", "http://127.0.0.1:9109/metrics"]);
    for line in [
        "evio_peers 2",
        "evio_peers_connected 2",
        "evio_drops_total{reason=\"spoofed_source\"} 0",
        "evio_etcd_connected 1",
    ] {
        assert!(m.contains(line), "{line} not in metrics:\n{m}");
    }
    assert!(
        m.contains("evio_peer_rx_bytes_total{peer=\"host-2\"}"),
        "{m}"
    );
    let hs: u64 = m
        .lines()
        .find(|l| l.starts_with("evio_handshakes_total "))
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(hs >= 2, "{m}");
}

/// Pods on three hosts, subnets claimed by `evioctl cni-config` (one after the agents started), real
/// addresses end to end, a 30 MB TCP transfer, no clear text on the underlay, spoofed sources dropped.
#[test]
fn pods_reach_each_other_encrypted_with_real_addresses() {
    let mut c = Cluster::new(3);
    let etcd = c.etcd_url();
    let dir = c.dir.path().to_path_buf();
    let mut nets = Vec::new();
    for h in &c.hosts[..2] {
        nets.push(h.cni_config(&etcd, &dir));
    }
    c.start_all();
    assert!(
        c.wait_mesh(Duration::from_secs(20)),
        "no full mesh:\n{}",
        c.logs()
    );
    // Host 3 claims its subnet only now: the others route it within seconds.
    nets.push(c.hosts[2].cni_config(&etcd, &dir));
    let sub3 = nets[2]["subnet"].as_str().unwrap().to_string();
    assert!(
        evio_testbed::wait_until(Duration::from_secs(5), || c.hosts[0]
            .tun_routes()
            .contains(&sub3)),
        "host-1 has no route to {sub3}: {}\n{}",
        c.hosts[0].tun_routes(),
        c.logs()
    );
    // Pods plugged in by the real evio-cni with the conflist of `evioctl cni-config`.
    let mut bg: Vec<std::process::Child> = Vec::new();
    let mut pods = Vec::new();
    for (i, h) in c.hosts.iter().enumerate() {
        let pod = h.add_pod_cni(&dir);
        let subnet: ipnet::Ipv4Net = nets[i]["subnet"].as_str().unwrap().parse().unwrap();
        assert!(
            subnet.contains(&pod.ip.parse::<std::net::Ipv4Addr>().unwrap()),
            "{} not in {subnet}",
            pod.ip
        );
        pods.push(pod);
    }
    // Status shows our pod subnet and the peers'.
    let st = c.hosts[0].status().unwrap();
    assert_eq!(st["podSubnet"], nets[0]["subnet"]);
    let p2 = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "host-2")
        .unwrap()
        .clone();
    assert_eq!(p2["podSubnet"], nets[1]["subnet"]);

    // Pod to pod, every pair; node to pod.
    for (i, a) in pods.iter().enumerate() {
        for (j, b) in pods.iter().enumerate() {
            if i != j {
                assert!(
                    a.ping_until(&b.ip, Duration::from_secs(5)),
                    "pod {i} -> pod {j} ({}):\n{}",
                    b.ip,
                    c.logs()
                );
            }
        }
    }
    assert!(
        c.hosts[0].ping_until(&pods[1].ip, Duration::from_secs(5)),
        "host-1 -> pod on host-2"
    );
    assert!(
        c.hosts[2].ping_until(&pods[0].ip, Duration::from_secs(5)),
        "host-3 -> pod on host-1"
    );

    // The server sees the client's real pod address (no masquerade inside the cluster).
    bg.push(
        pods[1]
            .ns
            .command("socat")
            .args([
                "TCP-LISTEN:7000,reuseaddr,fork",
                "SYSTEM:echo $SOCAT_PEERADDR",
            ])
            .spawn()
            .unwrap(),
    );
    let seen = evio_testbed::wait_until(Duration::from_secs(5), || {
        let out = pods[0].exec(&["socat", "-T", "2", "-", &format!("TCP:{}:7000", pods[1].ip)]);
        String::from_utf8_lossy(&out.stdout).trim() == pods[0].ip
    });
    assert!(seen, "pod-2 did not see pod-1's address {}", pods[0].ip);

    // Capture the underlay while a recognizable marker crosses the overlay.
    let pcap = dir.join("underlay.pcap");
    let mut dump = c
        .underlay
        .command("tcpdump")
        .args([
            "-i",
            "br0",
            "-U",
            "-s",
            "0",
            "-w",
            pcap.to_str().unwrap(),
            "udp",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump says "listening on br0" once it captures; read its stderr until then.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = dump.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "tcpdump did not start capturing"
    );
    let marker = "EVIO-SECRET-MARKER-7f3a";
    bg.push(
        pods[2]
            .ns
            .command("socat")
            .args(["-u", "TCP-LISTEN:7001,reuseaddr", "OPEN:/dev/null"])
            .spawn()
            .unwrap(),
    );
    assert!(listening(&pods[2].ns, "t", 7001), "no listener on 7001");
    let payload = marker.repeat(200);
    let out = pods[0].exec(&[
        "sh",
        "-c",
        &format!("echo {payload} | socat -u - TCP:{}:7001", pods[2].ip),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Control: the same marker sent in clear over the underlay must show up in the capture.
    c.hosts[0].ns.exec(&[
        "sh",
        "-c",
        &format!(
            "echo CLEAR-{marker} | socat -u - UDP-SENDTO:{}:9",
            c.hosts[1].ip
        ),
    ]);
    // tcpdump -U writes each packet as it comes: wait for the control to be in the file.
    let clear = format!("CLEAR-{marker}");
    let captured = wait_until(Duration::from_secs(5), || {
        let cap = std::fs::read(&pcap).unwrap_or_default();
        cap.windows(clear.len()).any(|w| w == clear.as_bytes())
    });
    assert!(captured, "the capture does not work: no clear control");
    // SAFETY: SIGINT to our tcpdump child so it flushes the capture file.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    let _ = dump.wait();
    let cap = std::fs::read(&pcap).unwrap();
    let count = |needle: &[u8]| cap.windows(needle.len()).filter(|w| *w == needle).count();
    assert!(
        count(format!("CLEAR-{marker}").as_bytes()) >= 1,
        "the capture does not work ({} bytes)",
        cap.len()
    );
    assert_eq!(
        count(marker.as_bytes()),
        1,
        "pod payload seen in clear on the underlay"
    );
    assert!(
        cap.len() > 200 * marker.len(),
        "too little traffic captured"
    );

    // A 30 MB TCP transfer pod to pod, checked byte for byte.
    let src = dir.join("transfer.bin");
    let dst = dir.join("transfer.out");
    run_ok(&[
        "sh",
        "-c",
        &format!("head -c 31457280 /dev/urandom > {}", src.display()),
    ]);
    let mut server = pods[1]
        .ns
        .command("socat")
        .args([
            "-u",
            "TCP-LISTEN:7003,reuseaddr",
            &format!("OPEN:{},creat,trunc", dst.display()),
        ])
        .spawn()
        .unwrap();
    assert!(listening(&pods[1].ns, "t", 7003), "no listener on 7003");
    let t0 = std::time::Instant::now();
    let out = pods[0].exec(&[
        "socat",
        "-u",
        &format!("OPEN:{}", src.display()),
        &format!("TCP:{}:7003", pods[1].ip),
    ]);
    assert!(
        out.status.success(),
        "transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = server.wait();
    eprintln!("30 MiB pod to pod in {:?}", t0.elapsed());
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
        "transferred data differs"
    );

    // A pod on host-1 sending with an address of host-2's subnet is not delivered to host-3's pod.
    for k in ["all", "default", "eviobr0", "eth0"] {
        c.hosts[0].ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv4.conf.{k}.rp_filter=0"),
        ]);
    }
    let sub2: ipnet::Ipv4Net = nets[1]["subnet"].as_str().unwrap().parse().unwrap();
    let spoof = std::net::Ipv4Addr::from(u32::from(sub2.network()) + 77).to_string();
    pods[0].exec(&["ip", "addr", "add", &format!("{spoof}/32"), "dev", "eth0"]);
    let got_file = dir.join("udp-received");
    bg.push(
        pods[2]
            .ns
            .command("socat")
            .args([
                "-u",
                "UDP-RECV:7002",
                &format!("OPEN:{},creat,append", got_file.display()),
            ])
            .spawn()
            .unwrap(),
    );
    assert!(listening(&pods[2].ns, "u", 7002), "no receiver on 7002");
    let before = c.hosts[2].metric("evio_drops_total{reason=\"spoofed_source\"}");
    for (msg, bind) in [("SPOOFED", Some(spoof.as_str())), ("GENUINE", None)] {
        let target = match bind {
            Some(b) => format!("UDP-SENDTO:{}:7002,bind={b}", pods[2].ip),
            None => format!("UDP-SENDTO:{}:7002", pods[2].ip),
        };
        let out = pods[0].exec(&["sh", "-c", &format!("echo {msg} | socat -u - {target}")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let ok = evio_testbed::wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&got_file)
            .unwrap_or_default()
            .contains("GENUINE")
    });
    let received = std::fs::read_to_string(&got_file).unwrap_or_default();
    assert!(ok, "the genuine datagram did not arrive");
    assert!(
        !received.contains("SPOOFED"),
        "spoofed datagram delivered: {received}"
    );
    let after = c.hosts[2].metric("evio_drops_total{reason=\"spoofed_source\"}");
    assert!(
        after > before,
        "host-3 did not count the spoofed packet ({before} -> {after})"
    );
    for mut b in bg {
        let _ = b.kill();
        let _ = b.wait();
    }
}

/// `--tun-queues`: the TUN device gets several queues, each read and sealed by its own thread. The TUN
/// driver sends a flow out on the queue its packets were last written to, so the receiving thread writes
/// each flow through the queue of its hash. 16 TCP flows from host-1 to host-2 (iperf3 -P 16) all arrive,
/// and at least two of host-1's sealing threads read a MiB or more from the TUN (per-thread `rchar`; with
/// every write through one queue, one thread read all: 46.6 MB against under 1 KB for the three others).
/// The other host keeps one queue: both ends interoperate.
/// Dual-stack pods and host VIPs (issue 15): the net-conf's `podCIDRs` (an IPv4 pool of /24s, an IPv6
/// pool of /64s) gives each node the IPv6 subnet paired with its IPv4 claim (`evioctl cni-config` writes
/// both host-local ranges), the real evio-cni gives pods both addresses, and eviod (`--pod-cidr` given
/// for both families) routes and allows the peer's paired IPv6 subnet: pods on different hosts reach
/// each other over both families, through the tunnel (the hosts have no other route to the other's IPv6
/// pod subnet than the one into evio0; without the IPv6 `--pod-cidr` there is none and this fails). With
/// an IPv6 `--overlay-cidr` too every host has an IPv6 VIP, at its IPv4 VIP's offset, and the hosts reach
/// each other's.
#[test]
fn dual_stack_pods_reach_each_other_over_both_families() {
    const POOL6: &str = "fd00:10:244::/48";
    const OVERLAY6: &str = "fd00:10:10::/64";
    let mut c = Cluster::new(2);
    let etcd = c.etcd_url();
    let dir = c.dir.path().to_path_buf();
    let mut subnets = Vec::new();
    for h in &mut c.hosts {
        let d = dir.join(format!("{}-cni", h.name));
        let net = common::cni_config_with(
            h.ns.name(),
            &h.name,
            &etcd,
            &d,
            serde_json::json!({
                "podCIDRs": ["10.244.0.0/16", { "cidr": POOL6, "nodePrefixLength": 64 }],
            }),
        );
        subnets.push(net["subnet"].as_str().unwrap().to_string());
        h.extra = [
            "--pod-cidr",
            "10.244.0.0/16",
            "--pod-cidr",
            POOL6,
            "--pod-node-prefix6",
            "64",
            "--overlay-cidr",
            OVERLAY6,
        ]
        .map(String::from)
        .to_vec();
    }
    c.start_all();
    assert!(
        c.wait_mesh(Duration::from_secs(20)),
        "no mesh:\n{}",
        c.logs()
    );
    let plan4 = evio_store::SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
    let plan6 = evio_store::SubnetPlan6::parse(POOL6, 16).unwrap();
    let mut pods = Vec::new();
    for (i, h) in c.hosts.iter().enumerate() {
        let (pod, ips) =
            common::add_pod_with_ips(h.ns.name(), &dir.join(format!("{}-cni", h.name)));
        let s4: ipnet::Ipv4Net = subnets[i].parse().unwrap();
        let s6 = plan6.paired(&plan4, &s4).unwrap();
        let v6 = ips
            .iter()
            .find_map(|a| a.parse::<std::net::Ipv6Addr>().ok())
            .unwrap_or_else(|| panic!("no IPv6 address for the pod on {}: {ips:?}", h.name));
        assert!(s6.contains(&v6), "{v6} not in {s6}");
        pods.push((pod, v6.to_string(), s6));
    }
    // Each host routes the other's IPv6 pod subnet into the tunnel.
    for (i, h) in c.hosts.iter().enumerate() {
        let other = pods[1 - i].2.to_string();
        let ok = evio_testbed::wait_until(Duration::from_secs(10), || {
            String::from_utf8_lossy(
                &h.ns
                    .exec(&["ip", "-6", "route", "show", "dev", "evio0"])
                    .stdout,
            )
            .contains(&other)
        });
        assert!(ok, "{} has no IPv6 route to {other}:\n{}", h.name, c.logs());
    }
    // Host IPv6 VIPs (from each host's status: its IPv4 VIP, at the same offset).
    let vip6: Vec<String> = c
        .hosts
        .iter()
        .map(|h| {
            let v4 = h.status().unwrap()["address"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let a6 = evio_store::paired_address6(
                "10.10.0.0/16".parse().unwrap(),
                v4,
                OVERLAY6.parse().unwrap(),
            )
            .unwrap()
            .to_string();
            let shown =
                h.ns.exec(&["ip", "-6", "addr", "show", "dev", "evio0"])
                    .stdout;
            assert!(
                String::from_utf8_lossy(&shown).contains(&a6),
                "{a6} not on evio0"
            );
            a6
        })
        .collect();
    for (a, b) in [(0, 1), (1, 0)] {
        let ok = evio_testbed::wait_until(Duration::from_secs(10), || {
            c.hosts[a]
                .ns
                .exec(&["ping", "-6", "-c", "1", "-W", "1", &vip6[b]])
                .status
                .success()
        });
        assert!(ok, "host {a} -> host {b}'s IPv6 VIP {} failed", vip6[b]);
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let (pa, pb) = (&pods[a].0, &pods[b]);
        assert!(
            pa.ping_until(&pb.0.ip, Duration::from_secs(10)),
            "IPv4 pod {a} -> pod {b} ({}) failed",
            pb.0.ip
        );
        let ok = evio_testbed::wait_until(Duration::from_secs(10), || {
            pa.exec(&["ping", "-6", "-c", "1", "-W", "1", &pb.1])
                .status
                .success()
        });
        assert!(
            ok,
            "IPv6 pod {a} -> pod {b} ({}) failed:\n{}",
            pb.1,
            c.logs()
        );
    }
}

#[test]
fn several_tun_queues_seal_flows_in_parallel() {
    let mut c = Cluster::new(2);
    c.hosts[0].extra = vec!["--tun-queues".into(), "4".into()];
    c.start_all();
    assert!(c.wait_mesh(Duration::from_secs(20)), "{}", c.logs());
    let pid = c.hosts[0].agent.as_ref().unwrap().id();
    let threads = || -> Vec<(String, u64)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?.path();
                let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                let comm = comm.trim().to_string();
                let io = std::fs::read_to_string(t.join("io")).ok()?;
                let rchar = io
                    .lines()
                    .find_map(|l| l.strip_prefix("rchar: "))?
                    .trim()
                    .parse()
                    .ok()?;
                comm.starts_with("evio-tun-rx").then_some((comm, rchar))
            })
            .collect()
    };
    let before = threads();
    assert_eq!(before.len(), 4, "{before:?}");
    let vip2 = c.hosts[1].vip();
    c.hosts[1].ns.exec_ok(&["iperf3", "-s", "-D", "-1"]);
    assert!(listening(&c.hosts[1].ns, "t", 5201));
    let out = c.hosts[0]
        .ns
        .exec_ok(&["iperf3", "-c", &vip2, "-P", "16", "-t", "1", "-J"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let received = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(received > 0, "{out}");
    let after = threads();
    let busy = after
        .iter()
        .filter(|(name, r)| {
            let r0 = before.iter().find(|(n, _)| n == name).map_or(0, |b| b.1);
            r - r0 > 1 << 20
        })
        .count();
    assert!(
        busy >= 2,
        "one queue carried every flow: {before:?} -> {after:?}"
    );
}
