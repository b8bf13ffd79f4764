//! `evio-demo`: a whole edge cluster on this machine, in network namespaces, in one command (`make demo`).
//! Its own binary, so that the operator CLI that goes into the image (`evioctl`) does not link the lab.
//!
//! Built with the lab of `evio-testbed` (`evio_testbed::lab`): an "internet" namespace with a real etcd and a real coturn (STUN + TURN), N sites
//! each behind its own NAT (the last M symmetric, the others port-preserving "easy" NATs) with one host
//! each. On every host, as on a real node: `evioctl cni-config` (a real process: claims the node's pod
//! subnet in etcd, writes the conflist and installs evio-cni into a per-host temp dir), `eviod` (a real
//! process in the host namespace with its own state dir, pointed at the lab's STUN/TURN server), and K
//! pods, each a network namespace plugged in by running the conflist's plugin chain through the CNI
//! protocol (environment variables and the network config on stdin), as containerd would.
//!
//! Then it shows the nodes, every node's path to every peer (`evioctl status --json`'s document, asked for in-process), a connectivity
//! matrix (real pings: host VIP to host VIP, pod to pods) and a short iperf3 sample over a direct and a
//! relayed path. Without `--check` it stays up until SIGINT/SIGTERM; with `--check` it exits 0 only if
//! every probe got through. Either way, and on an error or a signal at any moment, it tears everything
//! down (see `cluster.rs`).
//!
//! Dependencies: `nix` (already in the workspace) for `sigaction`, `prctl(PR_SET_PDEATHSIG)`, `kill`,
//! `geteuid`, the probe's raw ICMP socket and poll (`probe.rs`), `getrusage` and `sysconf`, without raw
//! calls; `tempfile` for
//! the self-removing temp dir; `evio-testbed` for the lab topology, shared with the NAT tests.

mod cluster;
mod cni;
mod leftovers;
mod probe;
mod report;
mod signals;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use cluster::{Bins, Cluster};

/// Where Debian's containernetworking-plugins put host-local and portmap.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Exit status after SIGINT/SIGTERM (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: i32 = 130;

#[derive(clap::Parser, Debug)]
#[command(
    name = "evio-demo",
    version,
    about = "Build a whole evio edge cluster on this machine in network namespaces"
)]
pub struct Args {
    /// Number of edge hosts, each at its own site behind its own NAT.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(0..=200))]
    nodes: u16,
    /// Extra hosts with public addresses directly on the internet (like cloud nodes), no NAT.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=50))]
    public_nodes: u16,
    /// Pods plugged into every host.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=100))]
    pods_per_node: u16,
    /// How many of the sites sit behind a symmetric NAT (the others: endpoint-independent "easy" NATs).
    #[arg(long, default_value_t = 1)]
    symmetric_nat: u16,
    /// Run the connectivity check, tear down and exit: 0 only if every pod and host VIP reaches every other.
    #[arg(long)]
    check: bool,
    /// Seconds to wait for every peer path to be up (direct or relayed, handshake done) before the
    /// connectivity matrix runs anyway.
    #[arg(long, default_value_t = 30)]
    paths_timeout: u64,
    /// Seconds the connectivity matrix may take in all: every probe is retried each second until
    /// answered or this deadline.
    #[arg(long, default_value_t = 20)]
    probe_timeout: u64,
    /// Run without a cluster CA: agents get etcd and STUN/TURN flags and trust etcd's claims (by default
    /// every host joins with one token and peers need certificates).
    #[arg(long)]
    no_ca: bool,
    /// Where the topology page (`evioctl ui`) listens; port 0 picks a free one. If the port is taken, a
    /// free one is used.
    #[arg(long, default_value = "127.0.0.1:8080")]
    ui_listen: String,
}

/// Prints a step and how long it took.
struct Progress {
    start: Instant,
}

impl Progress {
    fn step<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        print!("  {what} ...");
        let _ = std::io::stdout().flush();
        let t = Instant::now();
        let r = f();
        let took = t.elapsed().as_secs_f64();
        match &r {
            Ok(_) if signals::interrupted() => println!(" interrupted"),
            Ok(_) => println!(" ok ({took:.2} s)"),
            Err(_) => println!(" FAILED ({took:.2} s)"),
        }
        r
    }

    fn total(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

pub fn run(args: Args) -> Result<()> {
    // First thing: from here on a signal only sets a flag, and every path below ends in the teardown.
    signals::install();
    if args.symmetric_nat > args.nodes {
        bail!(
            "--symmetric-nat {} is more than --nodes {}",
            args.symmetric_nat,
            args.nodes
        );
    }
    if args.nodes + args.public_nodes < 2 {
        bail!("a cluster needs at least two hosts (--nodes plus --public-nodes)");
    }
    let bins = preflight()?;
    neighbour_budget(&args)?;
    for line in leftovers::remove_stale() {
        println!("cleaning up after a demo that was killed: {line}");
    }
    let prefix = evio_testbed::lab::unique_prefix(leftovers::BASE);
    let mut cluster = Cluster::new(&prefix)?;
    let outcome = demo(&args, &bins, &mut cluster);
    let code = match &outcome {
        Ok(code) => *code,
        Err(e) => {
            eprintln!("evio-demo: {e:#}");
            if signals::interrupted() {
                EXIT_INTERRUPTED
            } else {
                1
            }
        }
    };
    let t = Instant::now();
    print!("tearing down ...");
    let _ = std::io::stdout().flush();
    let problems = cluster.teardown();
    drop(cluster);
    if problems.is_empty() {
        println!(
            " done ({:.2} s): no namespaces, processes or files left",
            t.elapsed().as_secs_f64()
        );
    } else {
        println!(" done with problems:");
        for p in &problems {
            println!("  {p}");
        }
    }
    std::process::exit(if code == 0 && !problems.is_empty() {
        1
    } else {
        code
    });
}

/// Builds, shows and (without --check) holds the cluster; returns the exit status.
fn demo(args: &Args, bins: &Bins, c: &mut Cluster) -> Result<i32> {
    let sites = args.nodes as usize;
    let public = args.public_nodes as usize;
    let n = sites + public;
    let k = args.pods_per_node as usize;
    let m = args.symmetric_nat as usize;
    let p = Progress {
        start: Instant::now(),
    };
    let public_text = if public > 0 {
        format!(", {public} public")
    } else {
        String::new()
    };
    println!(
        "evio demo: {sites} edge hosts each behind its own NAT ({m} symmetric){public_text}, {k} pods each; namespaces {}-*",
        c.prefix
    );
    let arp_before = evio_testbed::lab::arp_table_stats();
    macro_rules! stop_if_interrupted {
        () => {
            if signals::interrupted() {
                println!("interrupted during start-up");
                return Ok(EXIT_INTERRUPTED);
            }
        };
    }
    p.step(
        &format!(
            "internet with etcd and coturn, {sites} sites behind NATs ({} easy, {m} symmetric){public_text}",
            sites - m
        ),
        || c.build_lab(sites, m, public),
    )?;
    stop_if_interrupted!();
    p.step(
        "evioctl cni-config on every host (subnet claims in etcd, conflists)",
        || c.cni_config(bins),
    )?;
    stop_if_interrupted!();
    let nat_flags = eviod_has_nat_flags(&bins.eviod);
    let what = if nat_flags {
        "eviod on every host (STUN/TURN: coturn on 198.18.0.1:3478)"
    } else {
        "eviod on every host (this eviod has no --stun/--turn)"
    };
    // Pods first: evio-cni needs no agent, and the agents then start (and are timed) on a machine that is
    // not also running a few hundred plugin processes.
    p.step(
        &format!(
            "{} pods through the CNI chain (evio-cni + host-local, portmap)",
            n * k
        ),
        || c.add_pods(k),
    )?;
    stop_if_interrupted!();
    let token = if args.no_ca {
        None
    } else {
        let (pin, token) = p.step(
            "cluster CA (evioctl ca init), its signer (evioctl ca serve) and one join token",
            || c.start_ca(bins),
        )?;
        println!("  CA pin {pin}; every host is given only its name and the token");
        Some(token)
    };
    stop_if_interrupted!();
    let what = match &token {
        Some(_) => "eviod on every host, joining with the token (certificate: VIP and pod subnet)",
        None => what,
    };
    let agents_started = Instant::now();
    p.step(what, || {
        c.start_agents(bins, nat_flags, token.as_deref())?;
        c.wait_agents(Duration::from_secs(20))
    })?;
    stop_if_interrupted!();
    let ui = c
        .start_ui(bins, &args.ui_listen)
        .or_else(|_| c.start_ui(bins, "127.0.0.1:0"))?;
    println!("topology page: {ui}");
    stop_if_interrupted!();
    print!("  tunnels between every pair of hosts (direct or relayed, handshake done) ...");
    let _ = std::io::stdout().flush();
    let t = Instant::now();
    let paths = report::wait_paths(c, Duration::from_secs(args.paths_timeout), agents_started);
    stop_if_interrupted!();
    println!(
        " {}/{} peer paths up ({:.2} s; {:.2} s after the agents started){}",
        paths.up,
        paths.total,
        t.elapsed().as_secs_f64(),
        agents_started.elapsed().as_secs_f64(),
        if paths.up < paths.total {
            "; the matrix shows what that means"
        } else {
            ""
        }
    );
    if paths.total > 0 {
        println!(
            "  paths up after the agents started: {}; the last 1% to come up: {}",
            paths.timeline(),
            paths.slowest_kinds()
        );
    }
    println!("  {}", report::cpu_line(c));
    // Every status or mapping the demo could not collect is an error: listed, and --check fails.
    let mut not_collected = Vec::new();
    println!("\nnodes:");
    let (table, errors) = report::nodes_table(c);
    print!("{table}");
    not_collected.extend(errors);
    let st = report::statuses(c);
    not_collected.extend(report::status_errors(c, &st));
    let mut how = "row: the node reporting, column: its peer";
    if n > report::FULL_MATRIX_MAX {
        how = "per node, its peers by path; up = direct or relay with a handshake";
    }
    println!("\npaths (from `evioctl status --json`; {how}):");
    print!("{}", report::paths_table(c, &st));

    let t = Instant::now();
    let (vips, pods, errors) = report::matrices(c, Duration::from_secs(args.probe_timeout));
    not_collected.extend(errors);
    stop_if_interrupted!();
    println!(
        "\nconnectivity (ICMP echo from every source to all its targets at once, retried each second until answered; {:.3} s in all):",
        t.elapsed().as_secs_f64()
    );
    print!("{}", vips.render(c));
    if k > 0 {
        println!();
        print!("{}", pods.render(c));
    }
    let (ok_v, all_v) = vips.pairs();
    let (ok_p, all_p) = pods.pairs();
    let all_ok = ok_v == all_v && ok_p == all_p;
    println!(
        "  host VIPs: {ok_v}/{all_v} reached, pods: {ok_p}/{all_p} reached{}",
        if all_ok {
            " — every pair reaches every other"
        } else {
            " — NOT every pair"
        }
    );
    // The agents' word against the data plane's: a path reported up that no ping crossed is a lie.
    let up_now: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
        .filter(|&(i, j)| report::path_up(&st, c, i, j))
        .collect();
    let dead: Vec<String> = up_now
        .iter()
        .filter(|&&(i, j)| !vips.ok(i, j))
        .map(|&(i, j)| format!("{} → {}", c.nodes[i].name, c.nodes[j].name))
        .collect();
    println!(
        "  data plane: {} of the {} peer paths the agents report up carried a ping (VIP to VIP){}",
        up_now.len() - dead.len(),
        up_now.len(),
        if dead.is_empty() {
            String::new()
        } else {
            format!(
                "; reported up but NO ping through: {}{}",
                dead.iter().take(8).cloned().collect::<Vec<_>>().join(", "),
                if dead.len() > 8 { ", ..." } else { "" }
            )
        }
    );
    if let (Some(a), Some(b)) = (arp_before, evio_testbed::lab::arp_table_stats()) {
        let limit = evio_testbed::lab::arp_table_limit()
            .map(|l| format!(" of {l}"))
            .unwrap_or_default();
        let full = b.table_fulls.saturating_sub(a.table_fulls);
        println!(
            "  neighbour table (machine-wide, all namespaces): {} entries{limit}; {}",
            b.entries,
            if full == 0 {
                "never full during the run".to_string()
            } else {
                format!("FULL {full} times during the run (neighbor table overflow: packets lost)")
            }
        );
    }
    if !not_collected.is_empty() {
        println!("  could not collect ({}):", not_collected.len());
        for e in not_collected.iter().take(20) {
            println!("    {e}");
        }
    }
    let all_ok = all_ok && not_collected.is_empty();
    if !all_ok || paths.up < paths.total {
        let digest = report::agent_log_digest(c, 8);
        if !digest.is_empty() {
            println!("  the agents' warnings and errors (count, nodes, line with numbers masked):");
            for (count, nodes, line) in digest {
                println!("    {count:>6} {nodes:>4}  {line}");
            }
        }
    }

    if args.check && !all_ok {
        println!("\nthroughput: skipped (the check failed)");
    } else if k > 0 && which("iperf3").is_some() {
        println!("\nthroughput (iperf3 TCP, 2 s, pod to pod):");
        let st = report::statuses(c);
        for kind in ["direct", "relay"] {
            let pair = (0..n)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .find(|&(i, j)| i != j && report::path(&st, c, i, j) == kind);
            match pair {
                Some((i, j)) => {
                    let (a, b) = (c.nodes[i].name.clone(), c.nodes[j].name.clone());
                    match report::throughput(c, i, j, 2) {
                        Ok(mbps) => println!("  {kind:<6} {a} → {b}: {mbps:.0} Mbit/s"),
                        Err(e) => println!("  {kind:<6} {a} → {b}: failed ({e})"),
                    }
                }
                None => println!("  {kind:<6} no {kind} path in this cluster"),
            }
            stop_if_interrupted!();
        }
    } else if k > 0 {
        println!("\nthroughput: skipped (iperf3 is not installed: apt-get install iperf3)");
    }
    println!("\ncluster up in {:.1} s", p.total());

    if args.check {
        let mut why = Vec::new();
        if ok_v < all_v || ok_p < all_p {
            why.push(format!(
                "{} of {} probes unanswered",
                all_v + all_p - ok_v - ok_p,
                all_v + all_p
            ));
        }
        if !not_collected.is_empty() {
            why.push(format!(
                "{} statuses or mappings not collected",
                not_collected.len()
            ));
        }
        if why.is_empty() {
            println!("check: passed");
        } else {
            println!("check: FAILED ({})", why.join("; "));
        }
        return Ok(if all_ok { 0 } else { 1 });
    }
    hold(c, bins);
    Ok(0)
}

/// Prints how to look around and waits for Ctrl-C.
fn hold(c: &Cluster, bins: &Bins) {
    let n0 = &c.nodes[0];
    let mut hints: Vec<(String, String)> = Vec::new();
    if let Some(pod) = n0.pods.first() {
        hints.push((
            format!("ip netns exec {} sh", pod.ns),
            format!("a shell in pod {}/{} ({})", n0.name, pod.name, pod.ip),
        ));
        if let Some((other, node)) = c.nodes.get(1).and_then(|x| x.pods.first().map(|p| (p, x))) {
            hints.push((
                format!("ip netns exec {} ping {}", pod.ns, other.ip),
                format!("from it to a pod on {}", node.name),
            ));
        }
    }
    hints.push((
        format!("ip netns exec {} sh", n0.host.ns),
        format!("a shell on host {}", n0.name),
    ));
    hints.push((
        format!("ip netns exec {} ip route", n0.host.ns),
        "its routes into the tunnel device evio0".into(),
    ));
    hints.push((
        format!(
            "{} status --state-dir {}",
            bins.evioctl.display(),
            n0.state_dir().display()
        ),
        format!("{}'s peers and paths", n0.name),
    ));
    hints.push((
        format!(
            "ip netns exec {} etcdctl --endpoints {} get --prefix /evio/v1/ --keys-only",
            c.lab().internet_ns(),
            c.etcd_url()
        ),
        "the claims and node records".into(),
    ));
    if let Some(nat) = &n0.nat {
        hints.push((
            format!("ip netns exec {} conntrack -L -p udp", nat.ns),
            format!("the mappings of {}'s NAT", n0.name),
        ));
    }
    println!("\nThe cluster stays up until Ctrl-C. Look around (as root, in another terminal):");
    for (cmd, what) in &hints {
        println!("  # {what}\n  {cmd}");
    }
    println!("  # logs and state: {}", c.dir().display());
    println!(
        "  # every namespace of the demo\n  ip netns list | grep {}",
        c.prefix
    );
    while signals::sleep(Duration::from_secs(1)) {}
    println!();
}

fn eviod_has_nat_flags(eviod: &Path) -> bool {
    std::process::Command::new(eviod)
        .arg("--help")
        .output()
        .map(|o| {
            let t = String::from_utf8_lossy(&o.stdout);
            t.contains("--stun") && t.contains("--turn")
        })
        .unwrap_or(false)
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Neighbour (ARP) entries the demo's cluster needs, measured: a site's host and NAT know each other on
/// the LAN, its NAT and the router on the WAN link, and every pod and its host on the pod bridge (a
/// public host: its link to the router and its pods). 100 nodes with one pod each held 718-806.
fn neighbour_entries(args: &Args) -> u64 {
    let k = u64::from(args.pods_per_node);
    u64::from(args.nodes) * (6 + 2 * k) + u64::from(args.public_nodes) * (2 + 2 * k)
}

/// The machine's neighbour table is one for all namespaces, with a hard limit (`gc_thresh3`): a cluster
/// that needs more than what is free would lose packets (`neighbor table overflow`), so it is refused
/// before anything is created, with what to do. The demo never changes the limit itself.
fn neighbour_budget(args: &Args) -> Result<()> {
    let (Some(limit), Some(now)) = (
        evio_testbed::lab::arp_table_limit(),
        evio_testbed::lab::arp_table_stats(),
    ) else {
        return Ok(());
    };
    let need = neighbour_entries(args);
    // Entries of namespaces just deleted (a previous run) stay counted until the kernel's garbage
    // collector drops them, within about 30 s: wait for them rather than refuse a run that fits.
    let mut now = now;
    if now.entries + need > limit && need <= limit {
        eprintln!(
            "  waiting for the kernel to drop stale neighbour entries ({} in use, {need} needed of {limit}) ...",
            now.entries
        );
        let until = Instant::now() + Duration::from_secs(45);
        while now.entries + need > limit && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500));
            match evio_testbed::lab::arp_table_stats() {
                Some(s) => now = s,
                None => break,
            }
        }
    }
    if now.entries + need > limit {
        bail!(
            "this cluster needs about {need} neighbour (ARP) entries and the machine's table, shared by all \
             network namespaces, holds {limit} ({} in use): fewer --nodes or --pods-per-node, or raise \
             net.ipv4.neigh.default.gc_thresh3 (and gc_thresh2) for the run and restore it afterwards",
            now.entries
        );
    }
    Ok(())
}

/// Checks everything the demo needs before creating anything, with the package to install if missing.
fn preflight() -> Result<Bins> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces: run it as root (sudo)");
    }
    let mut missing = Vec::new();
    for (prog, pkg) in [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("nft", "nftables"),
        ("sysctl", "procps"),
        ("etcd", "etcd-server"),
        ("curl", "curl"),
        ("turnserver", "coturn"),
        ("ping", "iputils-ping"),
        ("conntrack", "conntrack"),
    ] {
        if which(prog).is_none() {
            missing.push(format!("{prog} (package {pkg})"));
        }
    }
    for plugin in ["host-local", "portmap"] {
        if !Path::new(REFERENCE_PLUGINS).join(plugin).is_file() {
            missing.push(format!(
                "{REFERENCE_PLUGINS}/{plugin} (package containernetworking-plugins)"
            ));
        }
    }
    let me = std::env::current_exe().context("cannot find this executable")?;
    let dir = me.parent().context("executable has no directory")?;
    let bins = Bins {
        evioctl: dir.join("evioctl"),
        eviod: dir.join("eviod"),
        evio_cni: dir.join("evio-cni"),
    };
    for b in [&bins.evioctl, &bins.eviod, &bins.evio_cni] {
        if !b.is_file() {
            missing.push(format!(
                "{} (build it: cargo build --release --workspace --bins)",
                b.display()
            ));
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing: {} (scripts/deps.sh installs the packages)",
            missing.join(", ")
        );
    }
    Ok(bins)
}

fn main() {
    use clap::Parser;
    if let Err(e) = run(Args::parse()) {
        eprintln!("evio-demo: {e:#}");
        std::process::exit(1);
    }
}
