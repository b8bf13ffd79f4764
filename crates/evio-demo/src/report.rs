//! What the demo shows once the cluster is up: the nodes, each node's path to each peer, the connectivity
//! matrix (real pings, in parallel, with retries under one deadline) and a short throughput sample.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, LISTEN_PORT, status};
use crate::{probe, signals};

/// Every node's status (`evioctl status --json`, asked in-process and in parallel), by node index; an
/// agent that does not answer gives the reason.
pub type Statuses = Vec<Result<Value, String>>;

/// Asks every agent for its status, all at once.
pub fn statuses(c: &Cluster) -> Statuses {
    std::thread::scope(|s| {
        let handles: Vec<_> = c
            .nodes
            .iter()
            .map(|n| s.spawn(move || status(&n.state_dir())))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("status thread panicked".into()))
            })
            .collect()
    })
}

/// The nodes whose status could not be collected, with the reason (`edge3: cannot reach the agent ...`).
pub fn status_errors(c: &Cluster, st: &Statuses) -> Vec<String> {
    st.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.as_ref()
                .err()
                .map(|e| format!("{}: {e}", c.nodes[i].name))
        })
        .collect()
}

fn peer<'a>(st: &'a Statuses, c: &Cluster, i: usize, j: usize) -> Option<&'a Value> {
    let name = c.nodes[j].name.as_str();
    st[i]
        .as_ref()
        .ok()?
        .get("peers")?
        .as_array()?
        .iter()
        .find(|p| p["node"] == name)
}

/// The path node `i` reports towards node `j` (`direct`, `relay`, `connecting`, `-` if it does not know
/// the peer, `?` if its status could not be collected).
pub fn path(st: &Statuses, c: &Cluster, i: usize, j: usize) -> String {
    if st[i].is_err() {
        return "?".into();
    }
    peer(st, c, i, j)
        .and_then(|p| p["path"].as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// Whether node `i` reports its path to `j` up: `direct` or `relay`, and a completed handshake.
pub fn path_up(st: &Statuses, c: &Cluster, i: usize, j: usize) -> bool {
    matches!(path(st, c, i, j).as_str(), "direct" | "relay")
        && peer(st, c, i, j).is_some_and(|p| p["lastHandshake"].is_u64())
}

fn pairs(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).flat_map(move |i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
}

/// What [`wait_paths`] saw.
pub struct PathsUp {
    pub up: usize,
    pub total: usize,
    /// For each path seen up: seconds from `since` to the first poll that saw it up, and its kind.
    pub times: Vec<(f64, String)>,
}

impl PathsUp {
    /// Seconds from `since` until `q` (0..=1) of all paths were up, if they were.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let need = ((self.total as f64) * q).ceil() as usize;
        if need == 0 {
            return Some(0.0);
        }
        let mut t: Vec<f64> = self.times.iter().map(|x| x.0).collect();
        t.sort_by(f64::total_cmp);
        t.get(need - 1).copied()
    }

    /// "50% 1.2 s, 90% 3.4 s, 99% ..., all ..." (from `since`).
    pub fn timeline(&self) -> String {
        [(0.5, "50%"), (0.9, "90%"), (0.99, "99%"), (1.0, "all")]
            .iter()
            .map(|&(q, name)| match self.quantile(q) {
                Some(t) => format!("{name} {t:.1} s"),
                None => format!("{name} never"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The kinds of the paths that came up last (the slowest 1%, at least one): `relay 95, direct 4`.
    pub fn slowest_kinds(&self) -> String {
        let mut t = self.times.clone();
        t.sort_by(|a, b| b.0.total_cmp(&a.0));
        let k = (t.len() / 100).max(1).min(t.len());
        let mut by = std::collections::BTreeMap::<&str, usize>::new();
        for (_, kind) in &t[..k] {
            *by.entry(kind.as_str()).or_default() += 1;
        }
        by.iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Waits until every node reports every other with a path up (see [`path_up`]), or the limit; records
/// when each path was first seen up (seconds since `since`).
pub fn wait_paths(c: &Cluster, limit: Duration, since: Instant) -> PathsUp {
    let n = c.nodes.len();
    let total = n * n.saturating_sub(1);
    let end = Instant::now() + limit;
    let mut first: Vec<Vec<Option<(f64, String)>>> = vec![vec![None; n]; n];
    loop {
        let st = statuses(c);
        let at = since.elapsed().as_secs_f64();
        let mut up = 0;
        for (i, j) in pairs(n) {
            if path_up(&st, c, i, j) {
                up += 1;
                if first[i][j].is_none() {
                    first[i][j] = Some((at, path(&st, c, i, j)));
                }
            }
        }
        // Every poll asks every agent (which locks its tunnel state to answer): less often for many.
        let every = Duration::from_millis(if n > 30 { 500 } else { 250 });
        if up == total || Instant::now() >= end || !signals::sleep(every) {
            return PathsUp {
                up,
                total,
                times: first.into_iter().flatten().flatten().collect(),
            };
        }
    }
}

/// The host's public UDP mappings as its NAT's conntrack table shows them (the agent's port, translated).
pub fn public_mappings(c: &Cluster, i: usize) -> Result<Vec<String>, String> {
    let n = &c.nodes[i];
    let Some(nat) = &n.nat else {
        return Ok(Vec::new());
    };
    let out = evio_testbed::lab::netns_exec(&nat.ns, &["conntrack", "-L", "-p", "udp"])
        .map_err(|e| format!("conntrack in {}: {e}", nat.ns))?;
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
    Ok(set.into_iter().collect())
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

/// The node table, and the mappings that could not be read (an error each, never a silent blank).
pub fn nodes_table(c: &Cluster) -> (String, Vec<String>) {
    let mut rows = vec![vec![
        "NODE".into(),
        "VIP".into(),
        "POD SUBNET".into(),
        "PODS".into(),
        "HOST ADDRESS".into(),
        "NAT".into(),
        "PUBLIC MAPPING (NAT conntrack)".into(),
    ]];
    let maps: Vec<Result<Vec<String>, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..c.nodes.len())
            .map(|i| s.spawn(move || public_mappings(c, i)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut errors = Vec::new();
    for (n, maps) in c.nodes.iter().zip(maps) {
        let (nat, shown) = match (&n.nat, maps) {
            (None, _) => (
                "none (public host)".to_string(),
                format!("{}:{LISTEN_PORT}", n.host.ip),
            ),
            (Some(nat), Err(e)) => {
                errors.push(format!("{}: {e}", n.name));
                (format!("{} {}", nat.kind, nat.wan), "? (see below)".into())
            }
            (Some(nat), Ok(maps)) => (
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
    (table(&rows), errors)
}

/// Clusters larger than this get one summary row per node instead of N×N matrices.
pub const FULL_MATRIX_MAX: usize = 12;

/// The peer path matrix (row: the node reporting; column: the peer); for a large cluster, per node the
/// number of peers by path.
pub fn paths_table(c: &Cluster, st: &Statuses) -> String {
    let n = c.nodes.len();
    if n > FULL_MATRIX_MAX {
        let mut rows = vec![
            ["NODE", "DIRECT", "RELAY", "NOT UP", "NOT UP (first 5)"]
                .map(String::from)
                .to_vec(),
        ];
        for i in 0..n {
            if let Err(e) = &st[i] {
                rows.push(vec![
                    c.nodes[i].name.clone(),
                    format!("status not collected: {e}"),
                ]);
                continue;
            }
            let count = |k: &str| {
                (0..n)
                    .filter(|&j| j != i && path_up(st, c, i, j) && path(st, c, i, j) == k)
                    .count()
            };
            let down: Vec<String> = (0..n)
                .filter(|&j| j != i && !path_up(st, c, i, j))
                .map(|j| format!("{} ({})", c.nodes[j].name, path(st, c, i, j)))
                .collect();
            rows.push(vec![
                c.nodes[i].name.clone(),
                count("direct").to_string(),
                count("relay").to_string(),
                down.len().to_string(),
                down.iter().take(5).cloned().collect::<Vec<_>>().join(" "),
            ]);
        }
        return table(&rows);
    }
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
            let ep = peer(st, c, i, j).and_then(|x| x["endpoint"].as_str().map(str::to_string));
            r.push(match ep {
                Some(e) if p != "connecting" => format!("{p} via {e}"),
                _ => p,
            });
        }
        rows.push(r);
    }
    table(&rows)
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

    /// Whether every probe from `i` to `j` was answered (false for an empty cell).
    pub fn ok(&self, i: usize, j: usize) -> bool {
        let cell = &self.cells[i][j];
        !cell.is_empty() && cell.iter().all(Option::is_some)
    }

    pub fn render(&self, c: &Cluster) -> String {
        if self.cells.len() > FULL_MATRIX_MAX {
            return self.render_summary(c);
        }
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

    /// One row per source node: probes answered, mean round trip, the first unanswered destinations.
    fn render_summary(&self, c: &Cluster) -> String {
        let mut rows = vec![vec![
            self.title.clone(),
            "ANSWERED".into(),
            "MEAN RTT".into(),
            "NOT REACHED (first 5)".into(),
        ]];
        for (i, row) in self.cells.iter().enumerate() {
            let all: usize = row.iter().map(Vec::len).sum();
            let ok: Vec<f64> = row.iter().flatten().flatten().copied().collect();
            let failed: Vec<String> = row
                .iter()
                .enumerate()
                .filter(|(j, cell)| *j != i && cell.iter().any(Option::is_none))
                .map(|(j, _)| c.nodes[j].name.clone())
                .take(5)
                .collect();
            let mean = if ok.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}ms", ok.iter().sum::<f64>() / ok.len() as f64)
            };
            rows.push(vec![
                c.nodes[i].name.clone(),
                format!("{}/{all}", ok.len()),
                mean,
                failed.join(" "),
            ]);
        }
        table(&rows)
    }
}

/// Runs the VIP matrix (every host pings every other host's VIP) and the pod matrix (the first pod of
/// every host pings every pod of every other host): every source at once, each sending to all its targets
/// and retrying until answered or one common deadline (see `probe.rs`). Also returns the sources that
/// could not probe at all.
pub fn matrices(c: &Cluster, limit: Duration) -> (Matrix, Matrix, Vec<String>) {
    let n = c.nodes.len();
    // (matrix, source node, destination node per target)
    let mut plan: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    let mut sources: Vec<probe::Source> = Vec::new();
    for i in 0..n {
        let mut to = Vec::new();
        let mut targets = Vec::new();
        for j in (0..n).filter(|&j| j != i) {
            if let Some(ip) = c.nodes[j].vip.as_ref().and_then(|v| v.parse().ok()) {
                to.push(j);
                targets.push(ip);
            }
        }
        sources.push(probe::Source {
            ns: c.nodes[i].host.ns.clone(),
            targets,
        });
        plan.push((0, i, to));
        if let Some(src) = c.nodes[i].pods.first() {
            let mut to = Vec::new();
            let mut targets = Vec::new();
            for j in (0..n).filter(|&j| j != i) {
                for dst in &c.nodes[j].pods {
                    if let Ok(ip) = dst.ip.parse() {
                        to.push(j);
                        targets.push(ip);
                    }
                }
            }
            sources.push(probe::Source {
                ns: src.ns.clone(),
                targets,
            });
            plan.push((1, i, to));
        }
    }
    let results = probe::run(&sources, Instant::now() + limit);
    let empty = || vec![vec![Vec::new(); n]; n];
    let mut cells = [empty(), empty()];
    let mut errors = Vec::new();
    for ((m, i, to), r) in plan.into_iter().zip(results) {
        let r = r.unwrap_or_else(|e| {
            errors.push(format!("{}: {e}", c.nodes[i].name));
            vec![None; to.len()]
        });
        for (j, rtt) in to.into_iter().zip(r) {
            cells[m][i][j].push(rtt);
        }
    }
    let [vips, pods] = cells;
    (
        Matrix {
            title: "HOST VIP → VIP".into(),
            cells: vips,
        },
        Matrix {
            title: "POD → PODS".into(),
            cells: pods,
        },
        errors,
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

/// CPU time (user + system, all threads) process `pid` has used, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) closing with ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Where the CPU went since the agents started: the agents together (and the busiest one), coturn, etcd.
pub fn cpu_line(c: &Cluster) -> String {
    let agents: Vec<f64> = c
        .nodes
        .iter()
        .filter_map(|n| n.agent.as_ref().and_then(|a| cpu_secs(a.id())))
        .collect();
    let mut by_name = std::collections::BTreeMap::<String, f64>::new();
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", c.lab().internet_ns()])
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            *by_name.entry(name.trim().to_string()).or_default() += cpu_secs(pid).unwrap_or(0.0);
        }
    }
    let total: f64 = agents.iter().sum();
    let max = agents.iter().copied().fold(0.0, f64::max);
    let me = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|ru| {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            tv(ru.user_time()) + tv(ru.system_time())
        })
        .unwrap_or(0.0);
    let turn = match turn_datagrams(c) {
        Some((received, dropped)) => {
            format!(" (its socket: {received} datagrams received, {dropped} dropped: buffer full)")
        }
        None => String::new(),
    };
    format!(
        "CPU so far: {} agents {total:.1} s (busiest {max:.2} s), coturn {:.1} s{turn}, etcd {:.1} s, this demo {me:.1} s",
        agents.len(),
        by_name.get("turnserver").copied().unwrap_or(0.0),
        by_name.get("etcd").copied().unwrap_or(0.0),
    )
}

/// UDP datagrams received and dropped for a full receive buffer in the internet namespace, where coturn
/// is the only UDP listener: how hard the one TURN server was pushed (issue 12).
fn turn_datagrams(c: &Cluster) -> Option<(u64, u64)> {
    let snmp = c.lab().internet_exec(&["cat", "/proc/net/snmp"]).ok()?;
    udp_counters(&snmp)
}

/// `InDatagrams` and `RcvbufErrors` of the `Udp:` lines of `/proc/net/snmp`.
fn udp_counters(snmp: &str) -> Option<(u64, u64)> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some((get("InDatagrams")?, get("RcvbufErrors")?))
}

/// The warnings and errors of all agents' logs, alike lines merged (timestamps dropped, numbers and
/// addresses masked), most frequent first: (count, nodes with it, the line). For a check that failed,
/// a clue where the agents struggled, before the teardown removes the logs.
pub fn agent_log_digest(c: &Cluster, top: usize) -> Vec<(usize, usize, String)> {
    let mut by: std::collections::HashMap<String, (usize, BTreeSet<usize>)> = Default::default();
    for (i, n) in c.nodes.iter().enumerate() {
        let text = std::fs::read_to_string(n.agent_log()).unwrap_or_default();
        for line in text.lines() {
            let Some(pos) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
                continue;
            };
            let masked: String = line[pos + 1..]
                .chars()
                .map(|ch| if ch.is_ascii_digit() { '#' } else { ch })
                .collect();
            let mut key = masked.split_whitespace().collect::<Vec<_>>().join(" ");
            key.truncate(160);
            let e = by.entry(key).or_default();
            e.0 += 1;
            e.1.insert(i);
        }
    }
    let mut v: Vec<(usize, usize, String)> = by
        .into_iter()
        .map(|(k, (count, nodes))| (count, nodes.len(), k))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
    v.truncate(top);
    v
}

#[cfg(test)]
mod tests {
    use super::udp_counters;

    #[test]
    fn udp_counters_are_read_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 337143 0 42368 314630 42368 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 0 0\n";
        assert_eq!(udp_counters(snmp), Some((337143, 42368)));
        assert_eq!(udp_counters("Ip: Forwarding\nIp: 1\n"), None);
    }
}
