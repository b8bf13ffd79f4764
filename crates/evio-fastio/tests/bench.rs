//! Micro-benchmark (not run by default): one TCP stream (iperf3) through the plain forwarder of
//! `common` (no crypto) with offloads on and off, against the bare underlay veth, interleaved
//! rounds, medians. Run with:
//!
//! `cargo test --release -p evio-fastio --test bench -- --ignored --nocapture`
//!
//! Env: `EVIO_BENCH_ROUNDS` (default 3), `EVIO_BENCH_SECS` (default 5), `EVIO_BENCH_ONLY` (comma
//! separated config indices, e.g. `1,3`), `EVIO_BENCH_GSO_MAX` (sets the TUNs' `gso_max_size`).

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::{A_UNDER, B_UNDER, B_V4, SideStats, Topology};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// iperf3 from a to `dst` (in b) for `secs`; returns (Gb/s received, sender CPU %, receiver CPU %).
fn iperf(t: &Topology, dst: &str, secs: u64) -> (f64, f64, f64) {
    let port = evio_testbed::free_port().to_string();
    let srv = Server(
        t.b.ns
            .command("iperf3")
            .args(["-s", "-1", "-B", dst, "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 server"),
    );
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(40));
        let o = t.a.ns.exec(&[
            "iperf3",
            "-c",
            dst,
            "-p",
            &port,
            "-t",
            &secs.to_string(),
            "-J",
        ]);
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    drop(srv);
    let o = out.expect("iperf3 client never succeeded");
    let j = String::from_utf8_lossy(&o.stdout).into_owned();
    let bps = json_num(&j, "sum_received", "bits_per_second");
    let host = json_num(&j, "cpu_utilization_percent", "host_total");
    let remote = json_num(&j, "cpu_utilization_percent", "remote_total");
    (bps / 1e9, host, remote)
}

/// The first number after `"field":` that follows `"section"` (enough for iperf3's fixed JSON).
fn json_num(j: &str, section: &str, field: &str) -> f64 {
    let s = &j[j.find(&format!("\"{section}\"")).expect(section)..];
    let f = &s[s.find(&format!("\"{field}\"")).expect(field) + field.len() + 3..];
    let end = f.find([',', '\n', '}']).unwrap();
    f[..end].trim().parse().expect("number")
}

/// CPU seconds (user + system) used by this process so far: both forwarder threads (and the
/// idle test harness) when a benchmark round runs.
fn process_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed rusage struct that lives across the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn selected(i: usize) -> bool {
    match std::env::var("EVIO_BENCH_ONLY") {
        Ok(v) => v.split(',').any(|x| x.trim().parse() == Ok(i)),
        Err(_) => true,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore]
fn forwarder_throughput() {
    let rounds = env_num("EVIO_BENCH_ROUNDS", 3);
    let secs = env_num("EVIO_BENCH_SECS", 5);
    let configs: [(&str, Option<(bool, bool)>); 4] = [
        ("underlay veth (no tunnel)", None),
        ("forwarder, TUN offload + UDP GSO/GRO", Some((true, true))),
        (
            "forwarder, TUN offload, no UDP GSO/GRO",
            Some((true, false)),
        ),
        (
            "forwarder, no offloads (recvmmsg/sendmmsg only)",
            Some((false, false)),
        ),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut last_stats: Vec<Option<(SideStats, SideStats)>> = vec![None; configs.len()];
    for r in 0..rounds {
        for (i, (name, cfg)) in configs.iter().enumerate() {
            if !selected(i) {
                continue;
            }
            let t = match cfg {
                None => Topology::new(false, false, false),
                Some((tun, udp)) => Topology::new(*tun, *tun, *udp),
            };
            let dst = if cfg.is_none() { B_UNDER } else { B_V4 };
            if let (Some(_), Ok(max)) = (cfg, std::env::var("EVIO_BENCH_GSO_MAX")) {
                for side in [&t.a, &t.b] {
                    side.ns.exec_ok(&[
                        "ip",
                        "link",
                        "set",
                        "dev",
                        &side.tun_name,
                        "gso_max_size",
                        &max,
                    ]);
                }
            }
            let cpu0 = process_cpu();
            let wall = std::time::Instant::now();
            let (gbps, cpu_a, cpu_b) = iperf(&t, dst, secs);
            let fwd_cpu = (process_cpu() - cpu0) / wall.elapsed().as_secs_f64() * 100.0;
            let st = t.stop();
            eprintln!(
                "round {r} {name}: {gbps:.2} Gb/s (both forwarders {fwd_cpu:.0}% of a core; \
                 iperf3 cpu sender {cpu_a:.0}%, receiver {cpu_b:.0}%)"
            );
            results[i].push(gbps);
            last_stats[i] = Some(st);
        }
    }
    eprintln!("\nmedians over {rounds} rounds of {secs} s, one TCP stream {A_UNDER} -> b:");
    for (i, (name, _)) in configs.iter().enumerate() {
        if !selected(i) {
            continue;
        }
        eprintln!("  {name:50} {:6.2} Gb/s", median(&mut results[i]));
        if let Some((a, b)) = &last_stats[i]
            && configs[i].1.is_some()
        {
            let segs = a.tun.read_packets as f64 / a.tun.reads.max(1) as f64;
            let coal = b.tun.written_packets as f64 / b.tun.writes.max(1) as f64;
            let gso = a.udp.sent_datagrams as f64 / a.udp.send_calls.max(1) as f64;
            let gro = b.udp.recv_datagrams as f64 / b.udp.recv_calls.max(1) as f64;
            eprintln!(
                "  {:50} packets/TUN read {segs:.1}, packets/TUN write {coal:.1}, datagrams/send {gso:.1}, datagrams/recv {gro:.1}",
                ""
            );
        }
    }
}
