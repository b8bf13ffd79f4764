//! What the demo shows once the cluster is up: the nodes, each node's path to each peer, the connectivity
//! matrix (real pings, in parallel, with retries under one deadline) and a short throughput sample.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::{Bins, Cluster, LISTEN_PORT, status};
use super::signals;

/// Every node's `evioctl status --json`, by node index (None: no answer).
pub fn statuses(c: &Cluster, bins: &Bins) -> Vec<Option<Value>> {
    c.nodes
        .iter()
        .map(|n| status(bins, &n.state_dir()))
        .collect()
}

/// The path node `i` reports towards node `j` (`direct`, `relay`, `connecting`, or `-` if unknown).
pub fn path(st: &[Option<Value>], c: &Cluster, i: usize, j: usize) -> String {
    let name = &c.nodes[j].name;
    st[i]
        .as_ref()
        .and_then(|s| s["peers"].as_array().cloned())
        .and_then(|ps| ps.into_iter().find(|p| p["node"] == name.as_str()))
        .and_then(|p| p["path"].as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// Waits until every node reports every other with a path other than `connecting` (or the limit).
/// Returns how many of the N·(N-1) directed peer paths are up.
pub fn wait_paths(c: &Cluster, bins: &Bins, limit: Duration) -> (usize, usize) {
    let n = c.nodes.len();
    let total = n * n.saturating_sub(1);
    let end = Instant::now() + limit;
    loop {
        let st = statuses(c, bins);
        let up = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .filter(|&(i, j)| matches!(path(&st, c, i, j).as_str(), "direct" | "relay"))
            .count();
        if up == total || Instant::now() >= end || !signals::sleep(Duration::from_millis(250)) {
            return (up, total);
        }
    }
}

/// The host's public UDP mappings as its NAT's conntrack table shows them (the agent's port, translated).
pub fn public_mappings(c: &Cluster, i: usize) -> Vec<String> {
    let n = &c.nodes[i];
    let Some(nat) = &n.nat else {
        return Vec::new();
    };
    let Ok(out) = evio_lab::netns_exec(&nat.ns, &["conntrack", "-L", "-p", "udp"]) else {
        return Vec::new();
    };
    let host = n.host.ip.to_string();
    let port = LISTEN_PORT.to_string();
    let mut set = BTreeSet::new();
    for line in out.lines() {
        let f = |key: &str, nth: usize| -> Option<&str> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .nth(nth)
        };
        if f("src=", 0) == Some(host.as_str())
            && f("sport=", 0) == Some(port.as_str())
            && let (Some(ip), Some(p)) = (f("dst=", 1), f("dport=", 1))
        {
            set.insert(format!("{ip}:{p}"));
        }
    }
    set.into_iter().collect()
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let w: Vec<usize> = (0..cols)
        .map(|k| {
            rows.iter()
                .filter_map(|r| r.get(k))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(k, s)| format!("{s:<width$}", width = w[k]))
            .collect();
        out.push_str("  ");
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The node table.
pub fn nodes_table(c: &Cluster) -> String {
    let mut rows = vec![vec![
        "NODE".into(),
        "VIP".into(),
        "POD SUBNET".into(),
        "PODS".into(),
        "HOST ADDRESS".into(),
        "NAT".into(),
        "PUBLIC MAPPING (NAT conntrack)".into(),
    ]];
    for (i, n) in c.nodes.iter().enumerate() {
        let maps = public_mappings(c, i);
        let (nat, shown) = match &n.nat {
            None => (
                "none (public host)".to_string(),
                format!("{}:{LISTEN_PORT}", n.host.ip),
            ),
            Some(nat) => (
                format!("{} {}", nat.kind, nat.wan),
                match maps.len() {
                    0 => format!("{} (none yet)", nat.wan),
                    1..=3 => maps.join(" "),
                    k => format!("{} {} ... ({k} mappings)", maps[0], maps[1]),
                },
            ),
        };
        rows.push(vec![
            n.name.clone(),
            n.vip.clone().unwrap_or_else(|| "-".into()),
            n.subnet.clone().unwrap_or_else(|| "-".into()),
            n.pods
                .iter()
                .map(|p| p.ip.as_str())
                .collect::<Vec<_>>()
                .join(","),
            format!("{}:{LISTEN_PORT}", n.host.ip),
            nat,
            shown,
        ]);
    }
    table(&rows)
}

/// The peer path matrix (row: the node reporting; column: the peer).
pub fn paths_table(c: &Cluster, st: &[Option<Value>]) -> String {
    let n = c.nodes.len();
    let mut rows = vec![
        std::iter::once("FROM \\ TO".to_string())
            .chain(c.nodes.iter().map(|x| x.name.clone()))
            .collect::<Vec<_>>(),
    ];
    for i in 0..n {
        let mut r = vec![c.nodes[i].name.clone()];
        for j in 0..n {
            if i == j {
                r.push("-".into());
                continue;
            }
            let p = path(st, c, i, j);
            let ep = st[i]
                .as_ref()
                .and_then(|s| s["peers"].as_array().cloned())
                .and_then(|ps| {
                    ps.into_iter()
                        .find(|x| x["node"] == c.nodes[j].name.as_str())
                })
                .and_then(|x| x["endpoint"].as_str().map(str::to_string));
            r.push(match ep {
                Some(e) if p != "connecting" => format!("{p} via {e}"),
                _ => p,
            });
        }
        rows.push(r);
    }
    table(&rows)
}

/// One probe of the matrix.
struct Probe {
    from_ns: String,
    to_ip: String,
    /// (row, column) in the matrix.
    cell: (usize, usize),
}

/// Pings `to_ip` from `ns` until answered or `end`; returns the round trip time in ms if answered.
fn ping_until(ns: &str, to_ip: &str, end: Instant) -> Option<f64> {
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-c1", "-W1", to_ip])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let rtt = text
                .split("time=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            return Some(rtt);
        }
        if Instant::now() >= end || !signals::sleep(Duration::from_millis(200)) {
            return None;
        }
    }
}

/// A connectivity matrix: cell (i, j) holds the results of the probes from node i to node j.
pub struct Matrix {
    pub title: String,
    pub cells: Vec<Vec<Vec<Option<f64>>>>,
}

impl Matrix {
    pub fn pairs(&self) -> (usize, usize) {
        let mut ok = 0;
        let mut all = 0;
        for row in &self.cells {
            for cell in row {
                all += cell.len();
                ok += cell.iter().filter(|r| r.is_some()).count();
            }
        }
        (ok, all)
    }

    pub fn render(&self, c: &Cluster) -> String {
        let mut rows = vec![
            std::iter::once(self.title.clone())
                .chain(c.nodes.iter().map(|x| x.name.clone()))
                .collect::<Vec<_>>(),
        ];
        for (i, row) in self.cells.iter().enumerate() {
            let mut r = vec![c.nodes[i].name.clone()];
            for (j, cell) in row.iter().enumerate() {
                if i == j {
                    r.push("-".into());
                    continue;
                }
                let ok: Vec<f64> = cell.iter().flatten().copied().collect();
                r.push(if ok.len() == cell.len() && !cell.is_empty() {
                    let avg = ok.iter().sum::<f64>() / ok.len() as f64;
                    if cell.len() == 1 {
                        format!("ok {avg:.2}ms")
                    } else {
                        format!("ok {}/{} {avg:.2}ms", ok.len(), cell.len())
                    }
                } else {
                    format!("FAIL {}/{}", ok.len(), cell.len())
                });
            }
            rows.push(r);
        }
        table(&rows)
    }
}

/// Runs the VIP matrix (every host pings every other host's VIP) and the pod matrix (the first pod of
/// every host pings every pod of every other host), all probes in parallel under one deadline.
pub fn matrices(c: &Cluster, limit: Duration) -> (Matrix, Matrix) {
    let n = c.nodes.len();
    let mut probes: Vec<(usize, Probe)> = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            if let Some(vip) = &c.nodes[j].vip {
                probes.push((
                    0,
                    Probe {
                        from_ns: c.nodes[i].host.ns.clone(),
                        to_ip: vip.clone(),
                        cell: (i, j),
                    },
                ));
            }
            if let Some(src) = c.nodes[i].pods.first() {
                for dst in &c.nodes[j].pods {
                    probes.push((
                        1,
                        Probe {
                            from_ns: src.ns.clone(),
                            to_ip: dst.ip.clone(),
                            cell: (i, j),
                        },
                    ));
                }
            }
        }
    }
    let empty = || vec![vec![Vec::new(); n]; n];
    let result = Mutex::new([empty(), empty()]);
    let queue = Mutex::new(probes.into_iter());
    let end = Instant::now() + limit;
    std::thread::scope(|s| {
        for _ in 0..32 {
            s.spawn(|| {
                loop {
                    let next = queue.lock().expect("queue").next();
                    let Some((m, p)) = next else { break };
                    let r = ping_until(&p.from_ns, &p.to_ip, end);
                    result.lock().expect("result")[m][p.cell.0][p.cell.1].push(r);
                }
            });
        }
    });
    let [vips, pods] = result.into_inner().expect("result");
    (
        Matrix {
            title: "HOST VIP → VIP".into(),
            cells: vips,
        },
        Matrix {
            title: "POD → PODS".into(),
            cells: pods,
        },
    )
}

/// A short iperf3 TCP sample from the first pod of node `i` to the first pod of node `j`; Mbit/s.
pub fn throughput(c: &mut Cluster, i: usize, j: usize, secs: u32) -> Result<f64, String> {
    let (Some(src), Some(dst)) = (c.nodes[i].pods.first(), c.nodes[j].pods.first()) else {
        return Err("no pods".into());
    };
    let (src_ns, dst_ns, dst_ip) = (src.ns.clone(), dst.ns.clone(), dst.ip.clone());
    let server = Command::new("ip")
        .args([
            "netns", "exec", &dst_ns, "iperf3", "-s", "-1", "-B", &dst_ip,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run iperf3: {e}"))?;
    c.extra.push(server);
    let end = Instant::now() + Duration::from_secs(3 + u64::from(secs));
    let result = loop {
        if signals::interrupted() {
            break Err("interrupted".to_string());
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &src_ns, "iperf3", "-J", "-c", &dst_ip])
            .args(["-t", &secs.to_string(), "--connect-timeout", "1000"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run iperf3: {e}"))?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            break Ok(bps / 1e6);
        }
        // Keep the raw output next to the logs for a look later.
        let _ = std::fs::write(c.dir().join("iperf3-failed.json"), &out.stdout);
        if Instant::now() >= end {
            break Err(v["error"]
                .as_str()
                .unwrap_or("iperf3 gave no result")
                .to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for mut s in c.extra.drain(..) {
        let _ = s.kill();
        let _ = s.wait();
    }
    result
}
