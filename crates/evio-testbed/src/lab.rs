//! Lab topologies in network namespaces, shared by evio's NAT tests and `evio-demo` (once the crate
//! `evio-lab`; now a module of the one fixture crate).
//!
//! A [`Lab`] is an "internet" namespace that is a router (and hosts the services: optionally a real
//! `etcd` and a real coturn `turnserver` as STUN and TURN server with long-term credentials), N sites each
//! with a NAT namespace (`wan` towards the internet, `lan` bridge towards the site, the nftables ruleset of
//! TESTBED.md) and hosts behind it, and public hosts.
//!
//! The internet is **routed**, not bridged: every NAT's `wan` and every public host's `eth0` is one end of
//! its own point-to-point veth link whose other end is in the internet namespace. Each link carries a
//! single neighbour on each side (the router; the site), so no neighbour table anywhere grows with the
//! number of sites squared. (A shared L2 segment did: every NAT kept an ARP entry for every other NAT it
//! talked to, and the machine-wide neighbour table, `gc_thresh3` = 1024 entries for all namespaces
//! together, overflowed at about 35 sites: `neighbor table overflow`, `sendmsg: No buffer space
//! available`.) Per site the machine holds about four entries (host and NAT on the LAN, NAT and router on
//! the WAN link), so 100 sites need ~400: well below the limit, which the lab never changes.
//!
//! Addressing (fixed, so tests and the demo can print and reason about it; all of the internet is
//! `198.18.0.0/15`, TEST-NET benchmark space):
//! - services: `198.18.0.1` (on the router's loopback; etcd on `:2379`, coturn on `:3478`)
//! - site `i` NAT wan: `198.18.1.(i+1)`, site LAN `192.168.(i+1).0/24`, NAT lan `.1`, hosts `.2`, `.3`, …
//! - public host `j`: `198.18.2.(j+1)`
//!
//! Each internet-side address is configured as `ADDR/15 noprefixroute` (so it shows, and is deleted, as
//! before) with one route, `198.18.0.0/15 via 198.18.0.1 onlink`, towards the router; the router holds a
//! `/32` route per link. Nothing has a default route, and nothing on the internet routes to private
//! ranges. [`Lab::renumber_wan`] gives a NAT a new public address (router route included).
//!
//! IPv6 (issue 15), with [`LabBuilder::ipv6`]: the internet is also `2001:db8::/32` (documentation
//! space), the services also listen on `2001:db8::1` (the router's loopback), public host `j` has
//! `2001:db8:2::(j+1)`, and a site added with [`LabBuilder::site_with_ipv6`] gives its hosts public IPv6
//! addresses, `2001:db8:100:i::(k+2)/64`, routed (no NAT, as ISPs hand out IPv6) through the NAT
//! namespace, whose IPv6 firewall is stateful like a home router's (nothing new comes in from `wan`; what
//! the hosts sent out is answered), while its IPv4 stays behind the NAT. Every link's two ends carry fixed
//! link-local addresses (`fe80::1` the router's side, `fe80::2` the other) used as next hops, and every
//! lab namespace turns duplicate address detection off, so addresses work at once.
//!
//! Nothing is ever created in the root namespace: every link is created with `ip -n NS` directly in its
//! namespace, nft rules are applied with `ip netns exec NS`, sysctls by a thread that entered the
//! namespace. Dropping the [`Lab`] kills its processes, kills anything else still running in its
//! namespaces, deletes the namespaces (which deletes their links) and removes its temp dir. A build that
//! fails half way drops the partial lab, so it cleans up as well; a panic while a `Lab` is alive unwinds
//! through the same `Drop`.
//!
//! Dependencies: only `nix` (for `setns`/`kill`, no `unsafe`), `tempfile`, `thiserror`, `tracing`; the lab drives the
//! real tools (`ip`, `nft`, `conntrack`, `etcd`, `turnserver`) as an operator would, so what the tests
//! exercise is exactly what the recipes in TESTBED.md describe.

use std::fmt;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;

/// The router's address in the internet namespace (on its loopback), where the services listen and the
/// next hop of every site and public host.
pub const SERVICES_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Prefix length of the internet's address block (`198.18.0.0/15`), routed through [`SERVICES_IP`].
pub const INTERNET_PREFIX: u8 = 15;
/// The internet's address block.
pub const INTERNET_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// The router's IPv6 address (with [`LabBuilder::ipv6`]): the services listen here too.
pub const SERVICES_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// etcd client port on [`SERVICES_IP`].
pub const ETCD_PORT: u16 = 2379;
/// STUN/TURN port on [`SERVICES_IP`].
pub const TURN_PORT: u16 = 3478;
/// The TURN realm.
pub const TURN_REALM: &str = "evio";
/// The TURN user name.
pub const TURN_USER: &str = "evio";

/// Errors while building or operating a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// How a site's NAT maps outgoing UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// Plain `masquerade`: port-preserving, endpoint-independent mapping (hole punching works).
    EasyNat,
    /// `masquerade random`: a new random port per destination (symmetric NAT; a relay is needed between two).
    Symmetric,
}

impl fmt::Display for NatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatKind::EasyNat => "easy",
            NatKind::Symmetric => "symmetric",
        })
    }
}

/// A name prefix unique to this process and call (`<base><pid><n>`), for tests running in parallel.
pub fn unique_prefix(base: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{base}{:x}x{n:x}", std::process::id())
}

/// Runs a command; errors unless it exits 0. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    check(desc, out)
}

fn check(cmd: String, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string()
                + String::from_utf8_lossy(&out.stdout).trim(),
        })
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// A `Command` running `program` inside namespace `ns` (`ip netns exec`).
pub fn netns_command(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `args` inside namespace `ns`; errors unless it exits 0. Returns stdout.
pub fn netns_exec(ns: &str, args: &[&str]) -> Result<String> {
    run(netns_command(ns, args[0]).args(&args[1..]))
}

/// Runs `f` on a new thread whose network namespace is `ns`. Sockets created by `f` stay in `ns` for their
/// whole life, whichever thread uses them later, so this is how Rust tests open a UDP socket "in a host".
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only this (new, scoped) thread's namespace changes.
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| LabError::Io(io::Error::from(e)))?;
            Ok(f())
        })
        .join()
        .map_err(|_| LabError::Setup(format!("thread in netns {ns} panicked")))?
    })
}

/// Writes `/proc/sys/<key>` (e.g. `net/ipv4/ip_forward`) as seen from namespace `ns`: a thread that entered
/// `ns` opens the file, so the per-namespace value is changed, never the root namespace's.
pub fn sysctl_write(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    in_netns(ns, || std::fs::write(&path, value))?
        .map_err(|e| LabError::Setup(format!("sysctl {key}={value} in {ns}: {e}")))
}

/// Reads `/proc/sys/<key>` as seen from namespace `ns`.
pub fn sysctl_read(ns: &str, key: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(key);
    Ok(in_netns(ns, || std::fs::read_to_string(&path))??
        .trim()
        .to_string())
}

fn kill_netns_pids(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Sends `sig` to `pid`, ignoring errors (the process may be gone already).
pub fn kill(pid: i32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// Removes the namespaces of a lab named `prefix` whose process died without running `Drop` (SIGKILL):
/// kills what runs in them and deletes them. Only names the lab itself would make are touched
/// (`<prefix>-inet`, `<prefix>-natN`, `<prefix>-sNhK`, `<prefix>-pubN`, `<prefix>-sixN`). Returns the names
/// removed.
pub fn remove_leftovers(prefix: &str) -> Result<Vec<String>> {
    let list = run(Command::new("ip").args(["netns", "list"]))?;
    let ours = |rest: &str| -> bool {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        rest == "inet"
            || rest.strip_prefix("nat").is_some_and(digits)
            || rest.strip_prefix("pub").is_some_and(digits)
            || rest.strip_prefix("six").is_some_and(digits)
            || rest
                .strip_prefix('s')
                .and_then(|r| r.split_once('h'))
                .is_some_and(|(a, b)| digits(a) && digits(b))
    };
    let mut removed = Vec::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(ours)
        {
            kill_netns_pids(name);
            run(Command::new("ip").args(["netns", "del", name]))?;
            removed.push(name.to_string());
        }
    }
    Ok(removed)
}

/// The arguments of a single-member etcd (`etcd <these>`) named `name`, with its data in `data`, clients on
/// `client_url`, the peer port on `peer_url`, and short Raft timers (a one-member cluster on one machine
/// elects itself in ~100 ms instead of ~1 s). The lab and the test fixtures start etcd the same way.
pub fn etcd_args(
    name: &str,
    data: &Path,
    client_url: &str,
    peer_url: &str,
) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["--name".into(), name.into(), "--data-dir".into()];
    v.push(data.into());
    for a in [
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        &format!("{name}={peer_url}"),
        "--heartbeat-interval",
        "10",
        "--election-timeout",
        "100",
        "--log-level",
        "warn",
    ] {
        v.push(a.into());
    }
    v
}

/// The IPv4 neighbour (ARP) entries of namespace `ns`, in any state (`ip -4 neigh show`), one a line.
pub fn neighbours(ns: &str) -> Result<Vec<String>> {
    Ok(ip(ns, &["-4", "neigh", "show"])?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// The machine's IPv4 neighbour table, shared by all namespaces (`/proc/net/stat/arp_cache`): the entries
/// it holds now and how many times an entry could not be added because it was full (`table_fulls`,
/// summed over CPUs). None if the file cannot be read.
pub fn arp_table_stats() -> Option<ArpTableStats> {
    let text = std::fs::read_to_string("/proc/net/stat/arp_cache").ok()?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| head.iter().position(|h| *h == name);
    let (e, f) = (col("entries")?, col("table_fulls")?);
    let rows: Vec<Vec<u64>> = lines
        .map(|l| {
            l.split_whitespace()
                .map(|v| u64::from_str_radix(v, 16).unwrap_or(0))
                .collect()
        })
        .collect();
    Some(ArpTableStats {
        entries: rows.first()?.get(e).copied()?,
        table_fulls: rows.iter().filter_map(|r| r.get(f)).sum(),
    })
}

/// See [`arp_table_stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpTableStats {
    /// Entries in the table now (all namespaces together).
    pub entries: u64,
    /// Times an entry could not be added since boot (a full table: `neighbor table overflow`).
    pub table_fulls: u64,
}

/// The machine-wide hard limit of the IPv4 neighbour table (`gc_thresh3`), if readable.
pub fn arp_table_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Polls `f` every 10 ms until it returns true or `limit` passes; returns whether it did.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A host: a network namespace with one interface `eth0`.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace name.
    pub ns: String,
    /// Its address on `eth0` (private for hosts behind a NAT; unspecified for an IPv6-only host).
    pub ip: Ipv4Addr,
    /// Its public IPv6 address on `eth0`, if its site or the lab has IPv6.
    pub ip6: Option<Ipv6Addr>,
    /// The site it belongs to (`None` for a public host).
    pub site: Option<usize>,
}

impl Host {
    /// Runs `args` in the host; errors unless it exits 0. Returns stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        netns_exec(&self.ns, args)
    }

    /// A `Command` for `program` in the host (for daemons; the caller owns the child).
    pub fn command(&self, program: &str) -> Command {
        netns_command(&self.ns, program)
    }

    /// Runs `f` with this host's network namespace (see [`in_netns`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.ns, f)
    }

    /// A UDP socket bound to `0.0.0.0:port` in the host (`port` 0 for any).
    pub fn udp_socket(&self, port: u16) -> Result<UdpSocket> {
        self.run(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))?
            .map_err(LabError::Io)
    }
}

/// A site: a NAT namespace and the hosts behind it.
#[derive(Clone, Debug)]
pub struct Site {
    pub index: usize,
    /// The NAT's namespace.
    pub nat_ns: String,
    pub kind: NatKind,
    /// The NAT's public address (on `wan`).
    pub wan_ip: Ipv4Addr,
    /// The NAT's address on the site LAN (the hosts' default gateway).
    pub lan_ip: Ipv4Addr,
    pub hosts: Vec<Host>,
}

impl Site {
    /// Drops every conntrack entry of the NAT (all its UDP mappings), like a NAT reboot.
    pub fn flush_conntrack(&self) -> Result<()> {
        // `conntrack -F` exits 0 and prints a summary on stderr.
        netns_exec(&self.nat_ns, &["conntrack", "-F"]).map(|_| ())
    }

    /// The NAT's conntrack table for UDP (`conntrack -L -p udp`), one entry a line.
    pub fn conntrack_udp(&self) -> Result<Vec<String>> {
        let out = netns_exec(&self.nat_ns, &["conntrack", "-L", "-p", "udp"])?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// Sets the NAT's UDP conntrack timeouts (unreplied and stream) to `secs`, so mappings expire fast.
    pub fn set_udp_timeout(&self, secs: u32) -> Result<()> {
        let v = secs.to_string();
        sysctl_write(&self.nat_ns, "net/netfilter/nf_conntrack_udp_timeout", &v)?;
        sysctl_write(
            &self.nat_ns,
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            &v,
        )
    }
}

/// The coturn server of a lab (STUN and TURN on `198.18.0.1:3478`, long-term credentials).
pub struct TurnServer {
    child: Option<Child>,
    ns: String,
    conf: PathBuf,
    log: PathBuf,
    /// `198.18.0.1:3478`.
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    /// A file (mode 0600) holding the password, for `eviod --turn-password-file`.
    pub password_file: PathBuf,
}

impl TurnServer {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = netns_command(&self.ns, "turnserver")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: "turnserver (is coturn installed?)".into(),
                source,
            })?;
        self.child = Some(child);
        let needle = format!("{}:{}", SERVICES_IP, TURN_PORT);
        let ns = self.ns.clone();
        let ok = wait_until(Duration::from_secs(10), || {
            netns_exec(&ns, &["ss", "-Hnul"])
                .map(|o| o.contains(&needle))
                .unwrap_or(false)
        });
        if !ok {
            return Err(LabError::Setup(format!(
                "turnserver did not listen on {needle}: {}",
                self.log()
            )));
        }
        Ok(())
    }

    /// Kills the server (SIGKILL): every allocation is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed server again on the same address and credentials.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real etcd in the internet namespace, on `198.18.0.1:2379`.
struct EtcdServer {
    child: Option<Child>,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What to build: see [`Lab::builder`].
#[derive(Clone, Debug)]
pub struct LabBuilder {
    prefix: String,
    etcd: bool,
    turn: bool,
    stale_nonce: Option<u32>,
    /// Per site: NAT kind, hosts, whether the hosts have IPv6.
    sites: Vec<(NatKind, usize, bool)>,
    public_hosts: usize,
    public_hosts_v6: usize,
    ipv6: bool,
}

impl LabBuilder {
    /// Makes coturn's nonces expire after `secs` (`stale-nonce`), to exercise 438 handling quickly.
    pub fn turn_stale_nonce(mut self, secs: u32) -> Self {
        self.stale_nonce = Some(secs);
        self
    }

    /// Starts a real etcd in the internet namespace.
    pub fn etcd(mut self, on: bool) -> Self {
        self.etcd = on;
        self
    }

    /// Starts a real coturn (STUN + TURN) in the internet namespace.
    pub fn turn(mut self, on: bool) -> Self {
        self.turn = on;
        self
    }

    /// Adds a site behind a NAT of `kind` with `hosts` hosts.
    pub fn site(mut self, kind: NatKind, hosts: usize) -> Self {
        self.sites.push((kind, hosts, false));
        self
    }

    /// Adds a site whose IPv4 is behind a NAT of `kind` and whose `hosts` hosts also have public IPv6
    /// addresses behind a stateful firewall (see the module docs). Implies [`LabBuilder::ipv6`].
    pub fn site_with_ipv6(mut self, kind: NatKind, hosts: usize) -> Self {
        self.sites.push((kind, hosts, true));
        self.ipv6 = true;
        self
    }

    /// Adds `n` public hosts with IPv6 only (no IPv4 address at all: `Host::ip` is unspecified), at
    /// `2001:db8:3::(j+1)`. Implies [`LabBuilder::ipv6`].
    pub fn public_hosts_ipv6_only(mut self, n: usize) -> Self {
        self.public_hosts_v6 = n;
        self.ipv6 = true;
        self
    }

    /// An IPv6 internet beside the IPv4 one: the services listen on [`SERVICES_IP6`] too and public
    /// hosts get IPv6 addresses.
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// Adds `n` public hosts directly on the internet.
    pub fn public_hosts(mut self, n: usize) -> Self {
        self.public_hosts = n;
        self
    }

    /// Builds the topology. On error the part already built is torn down before returning.
    pub fn build(self) -> Result<Lab> {
        if self.sites.len() > 250
            || self.public_hosts > 250
            || self.public_hosts_v6 > 250
            || self.sites.iter().any(|s| s.1 > 250)
        {
            return Err(LabError::Setup(
                "at most 250 sites, 250 hosts a site and 250 public hosts".into(),
            ));
        }
        let mut tools = vec![("ip", "iproute2"), ("nft", "nftables"), ("ss", "iproute2")];
        if self.etcd {
            tools.extend([("etcd", "etcd-server"), ("curl", "curl")]);
        }
        if self.turn {
            tools.push(("turnserver", "coturn"));
        }
        for (tool, package) in tools {
            if find_tool(tool).is_none() {
                return Err(LabError::Setup(format!(
                    "`{tool}` not found on PATH: install the Debian package {package} (scripts/deps.sh does)"
                )));
            }
        }
        let dir = tempfile::Builder::new().prefix("evio-lab").tempdir()?;
        let mut lab = Lab {
            turn: None,
            etcd: None,
            namespaces: Vec::new(),
            internet: format!("{}-inet", self.prefix),
            sites: Vec::new(),
            public: Vec::new(),
            prefix: self.prefix.clone(),
            ipv6: self.ipv6,
            dir,
        };
        let t0 = Instant::now();
        lab.add_netns(&lab.internet.clone())?;
        let inet = lab.internet.clone();
        // The router: the services address on its loopback, forwarding between the point-to-point links.
        ip(
            &inet,
            &["addr", "add", &format!("{SERVICES_IP}/32"), "dev", "lo"],
        )?;
        sysctl_write(&inet, "net/ipv4/ip_forward", "1")?;
        if self.ipv6 {
            ip(
                &inet,
                &["addr", "add", &format!("{SERVICES_IP6}/128"), "dev", "lo"],
            )?;
            sysctl_write(&inet, "net/ipv6/conf/all/forwarding", "1")?;
        }

        for (i, &(kind, nhosts, v6)) in self.sites.iter().enumerate() {
            lab.add_site(i, kind, nhosts, v6)?;
        }
        for j in 0..self.public_hosts {
            let ns = format!("{}-pub{j}", self.prefix);
            lab.add_netns(&ns)?;
            let addr = Ipv4Addr::new(198, 18, 2, (j + 1) as u8);
            let peer = format!("p{j}");
            lab.uplink(&ns, "eth0", &peer, addr)?;
            let ip6 = if self.ipv6 {
                let a = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, (j + 1) as u16);
                lab.uplink6(&ns, "eth0", &peer, a)?;
                Some(a)
            } else {
                None
            };
            lab.public.push(Host {
                ns,
                ip: addr,
                ip6,
                site: None,
            });
        }
        for j in 0..self.public_hosts_v6 {
            let ns = format!("{}-six{j}", self.prefix);
            lab.add_netns(&ns)?;
            let peer = format!("q{j}");
            ip(
                &ns,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &inet,
                ],
            )?;
            ip(&inet, &["link", "set", &peer, "up"])?;
            ip(&ns, &["link", "set", "eth0", "up"])?;
            let a = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, (j + 1) as u16);
            lab.uplink6(&ns, "eth0", &peer, a)?;
            lab.public.push(Host {
                ns,
                ip: Ipv4Addr::UNSPECIFIED,
                ip6: Some(a),
                site: None,
            });
        }
        if self.etcd {
            lab.start_etcd()?;
        }
        if self.turn {
            lab.start_turn(self.stale_nonce)?;
        }
        tracing::debug!(prefix = %self.prefix, elapsed = ?t0.elapsed(), "lab built");
        Ok(lab)
    }
}

/// A built lab topology; dropping it tears everything down.
pub struct Lab {
    // Field order matters for Drop: processes first, then namespaces, then the temp dir.
    turn: Option<TurnServer>,
    etcd: Option<EtcdServer>,
    namespaces: Vec<String>,
    internet: String,
    sites: Vec<Site>,
    public: Vec<Host>,
    prefix: String,
    ipv6: bool,
    dir: tempfile::TempDir,
}

impl Lab {
    /// A builder for a lab whose namespaces are all named `<prefix>-…`.
    pub fn builder(prefix: &str) -> LabBuilder {
        LabBuilder {
            prefix: prefix.to_string(),
            etcd: false,
            turn: false,
            stale_nonce: None,
            sites: Vec::new(),
            public_hosts: 0,
            public_hosts_v6: 0,
            ipv6: false,
        }
    }

    fn add_netns(&mut self, ns: &str) -> Result<()> {
        run(Command::new("ip").args(["netns", "add", ns]))?;
        self.namespaces.push(ns.to_string());
        ip(ns, &["link", "set", "lo", "up"])?;
        if self.ipv6 {
            // The namespace's own settings: IPv6 addresses usable at once (no duplicate detection).
            for k in ["all", "default"] {
                sysctl_write(ns, &format!("net/ipv6/conf/{k}/accept_dad"), "0")?;
            }
        }
        Ok(())
    }

    /// IPv6 on a link made by [`Lab::uplink`]: fixed link-local next hops on both ends, `addr/128` on
    /// `ifname` in `ns` with the IPv6 internet routed via the router, and the router's `/128` route back.
    fn uplink6(&self, ns: &str, ifname: &str, peer: &str, addr: Ipv6Addr) -> Result<()> {
        ip(
            &self.internet,
            &["-6", "addr", "add", "fe80::1/64", "dev", peer, "nodad"],
        )?;
        ip(
            ns,
            &["-6", "addr", "add", "fe80::2/64", "dev", ifname, "nodad"],
        )?;
        let a = format!("{addr}/128");
        ip(ns, &["-6", "addr", "add", &a, "dev", ifname, "nodad"])?;
        ip(
            ns,
            &[
                "-6",
                "route",
                "add",
                "2001:db8::/32",
                "via",
                "fe80::1",
                "dev",
                ifname,
            ],
        )?;
        ip(
            &self.internet,
            &["-6", "route", "add", &a, "via", "fe80::2", "dev", peer],
        )?;
        Ok(())
    }

    /// Connects `ns` to the internet router over its own point-to-point veth link: `ifname` in `ns` with
    /// `addr` and a route to the internet via the router, `peer` in the internet namespace with a `/32`
    /// route to `addr`.
    fn uplink(&self, ns: &str, ifname: &str, peer: &str, addr: Ipv4Addr) -> Result<()> {
        ip(
            ns,
            &[
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                &self.internet,
            ],
        )?;
        ip(&self.internet, &["link", "set", peer, "up"])?;
        ip(
            &self.internet,
            &["route", "add", &format!("{addr}/32"), "dev", peer],
        )?;
        ip(ns, &["link", "set", ifname, "up"])?;
        wan_address(ns, ifname, addr)
    }

    /// Gives site `i`'s NAT the public address `new` instead of its current one, as an ISP renumbering
    /// the site would: the address on `wan` and the router's route change; the NAT's conntrack entries
    /// (mappings made with the old address) are left to the caller ([`Site::flush_conntrack`]).
    pub fn renumber_wan(&mut self, i: usize, new: Ipv4Addr) -> Result<()> {
        let site = &self.sites[i];
        let (nat, old) = (site.nat_ns.clone(), site.wan_ip);
        let peer = format!("n{i}");
        // The old address first: a second address in the same /15 would be a secondary one, deleted
        // along with the primary. Deleting the last address also drops the route through `wan`;
        // `wan_address` puts it back.
        ip(
            &nat,
            &[
                "addr",
                "del",
                &format!("{old}/{INTERNET_PREFIX}"),
                "dev",
                "wan",
            ],
        )?;
        wan_address(&nat, "wan", new)?;
        ip(
            &self.internet,
            &["route", "del", &format!("{old}/32"), "dev", &peer],
        )?;
        ip(
            &self.internet,
            &["route", "add", &format!("{new}/32"), "dev", &peer],
        )?;
        self.sites[i].wan_ip = new;
        Ok(())
    }

    fn add_site(&mut self, i: usize, kind: NatKind, nhosts: usize, v6: bool) -> Result<()> {
        let nat = format!("{}-nat{i}", self.prefix);
        self.add_netns(&nat)?;
        let wan_ip = Ipv4Addr::new(198, 18, 1, (i + 1) as u8);
        let lan_ip = Ipv4Addr::new(192, 168, (i + 1) as u8, 1);
        self.uplink(&nat, "wan", &format!("n{i}"), wan_ip)?;
        // The site's IPv6 prefix, routed to the NAT namespace (no NAT for IPv6).
        let lan6 = |k: u16| Ipv6Addr::new(0x2001, 0xdb8, 0x100, i as u16, 0, 0, 0, k);
        if v6 {
            let wan6 = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, (i + 1) as u16);
            let peer = format!("n{i}");
            self.uplink6(&nat, "wan", &peer, wan6)?;
            let net = format!("{}/64", lan6(0));
            ip(
                &self.internet,
                &["-6", "route", "add", &net, "via", "fe80::2", "dev", &peer],
            )?;
            sysctl_write(&nat, "net/ipv6/conf/all/forwarding", "1")?;
        }
        ip(&nat, &["link", "add", "lan", "type", "bridge"])?;
        ip(
            &nat,
            &["addr", "add", &format!("{lan_ip}/24"), "dev", "lan"],
        )?;
        ip(&nat, &["link", "set", "lan", "up"])?;
        if v6 {
            let a = format!("{}/64", lan6(1));
            ip(&nat, &["-6", "addr", "add", &a, "dev", "lan", "nodad"])?;
        }
        sysctl_write(&nat, "net/ipv4/ip_forward", "1")?;
        // Where br_netfilter is loaded, bridged LAN frames would go through the NAT's forward chain (policy
        // drop); a real site switch doesn't do that. Absent module: no such sysctl and nothing to turn off.
        if Path::new("/proc/sys/net/bridge").exists() {
            sysctl_write(&nat, "net/bridge/bridge-nf-call-iptables", "0")?;
        }
        let masq = match kind {
            NatKind::EasyNat => "masquerade",
            NatKind::Symmetric => "masquerade random",
        };
        let ruleset = format!(
            "table ip nat0 {{\n\
             \x20 chain postrouting {{ type nat hook postrouting priority srcnat; oifname \"wan\" {masq}; }}\n\
             \x20 chain forward {{ type filter hook forward priority filter; policy drop;\n\
             \x20   iifname \"wan\" ct state new drop; ct state established,related accept;\n\
             \x20   iifname \"lan\" oifname \"wan\" accept; }}\n\
             \x20 chain input {{ type filter hook input priority filter;\n\
             \x20   iifname \"wan\" ct state established,related accept; iifname \"wan\" drop; }}\n\
             }}\n"
        );
        // IPv6: routed, behind a stateful firewall (what the hosts sent out is answered, nothing new
        // comes in: hole punching works, unsolicited traffic does not).
        let ruleset = if v6 {
            format!(
                "{ruleset}table ip6 fw6 {{\n\
                 \x20 chain forward {{ type filter hook forward priority filter; policy drop;\n\
                 \x20   ct state established,related accept; meta l4proto ipv6-icmp accept;\n\
                 \x20   iifname \"lan\" oifname \"wan\" accept; }}\n\
                 }}\n"
            )
        } else {
            ruleset
        };
        let file = self.dir.path().join(format!("nat{i}.nft"));
        std::fs::write(&file, ruleset)?;
        netns_exec(&nat, &["nft", "-f", &file.to_string_lossy()])?;
        let mut hosts = Vec::new();
        for k in 0..nhosts {
            let ns = format!("{}-s{i}h{k}", self.prefix);
            self.add_netns(&ns)?;
            let addr = Ipv4Addr::new(192, 168, (i + 1) as u8, (k + 2) as u8);
            let port = format!("h{k}");
            ip(
                &ns,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &nat,
                ],
            )?;
            ip(&nat, &["link", "set", &port, "master", "lan", "up"])?;
            ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&ns, &["link", "set", "eth0", "up"])?;
            ip(
                &ns,
                &["route", "add", "default", "via", &lan_ip.to_string()],
            )?;
            let ip6 = if v6 {
                let a = lan6((k + 2) as u16);
                let net = format!("{a}/64");
                ip(&ns, &["-6", "addr", "add", &net, "dev", "eth0", "nodad"])?;
                let gw = lan6(1).to_string();
                ip(&ns, &["-6", "route", "add", "default", "via", &gw])?;
                Some(a)
            } else {
                None
            };
            hosts.push(Host {
                ns,
                ip: addr,
                ip6,
                site: Some(i),
            });
        }
        self.sites.push(Site {
            index: i,
            nat_ns: nat,
            kind,
            wan_ip,
            lan_ip,
            hosts,
        });
        Ok(())
    }

    fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.path().join("etcd");
        std::fs::create_dir(&data)?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let mut c = format!("http://{SERVICES_IP}:{ETCD_PORT}");
        if self.ipv6 {
            c = format!("{c},http://[{SERVICES_IP6}]:{ETCD_PORT}");
        }
        let p = "http://127.0.0.1:2380";
        let child = netns_command(&self.internet, "etcd")
            .args(etcd_args("lab", &data, &c, p))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: "etcd (is etcd-server installed?)".into(),
                source,
            })?;
        self.etcd = Some(EtcdServer { child: Some(child) });
        let inet = self.internet.clone();
        let url = format!("http://{SERVICES_IP}:{ETCD_PORT}/health");
        let ok = wait_until(Duration::from_secs(20), || {
            netns_exec(&inet, &["curl", "-sf", "--max-time", "1", &url])
                .map(|o| o.contains("true"))
                .unwrap_or(false)
        });
        if !ok {
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            return Err(LabError::Setup(format!(
                "etcd did not become healthy: {log}"
            )));
        }
        Ok(())
    }

    fn start_turn(&mut self, stale_nonce: Option<u32>) -> Result<()> {
        let password = random_hex(16)?;
        let password_file = self.dir.path().join("turn-password");
        write_secret(&password_file, &password)?;
        let conf = self.dir.path().join("turnserver.conf");
        let log = self.dir.path().join("turnserver.log");
        let pid = self.dir.path().join("turnserver.pid");
        let text = format!(
            "listening-ip={SERVICES_IP}\nrelay-ip={SERVICES_IP}\nlistening-port={TURN_PORT}\nrealm={TURN_REALM}\n\
             lt-cred-mech\nuser={TURN_USER}:{password}\nfingerprint\nno-tls\nno-dtls\nno-cli\n\
             no-software-attribute\nmin-port=49152\nmax-port=65535\nallowed-peer-ip=198.18.0.0-198.19.255.255\n\
             pidfile={}\nlog-file=stdout\nsimple-log\n",
            pid.display()
        );
        // Also on the IPv6 internet (the relayed addresses stay IPv4: `relay-ip`).
        let text = if self.ipv6 {
            format!("{text}listening-ip={SERVICES_IP6}\n")
        } else {
            text
        };
        let text = match stale_nonce {
            Some(s) => format!("{text}stale-nonce={s}\n"),
            None => text,
        };
        write_secret(&conf, &text)?;
        let mut t = TurnServer {
            child: None,
            ns: self.internet.clone(),
            conf,
            log,
            addr: SocketAddr::from((SERVICES_IP, TURN_PORT)),
            user: TURN_USER.to_string(),
            password,
            password_file,
        };
        t.start()?;
        self.turn = Some(t);
        Ok(())
    }

    /// The name prefix of every namespace of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The internet namespace.
    pub fn internet_ns(&self) -> &str {
        &self.internet
    }

    /// Every namespace of the lab, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn site(&self, i: usize) -> &Site {
        &self.sites[i]
    }

    /// Host `k` of site `i`.
    pub fn site_host(&self, i: usize, k: usize) -> &Host {
        &self.sites[i].hosts[k]
    }

    pub fn public_hosts(&self) -> &[Host] {
        &self.public
    }

    /// Every host: the sites' hosts in order, then the public hosts.
    pub fn hosts(&self) -> Vec<&Host> {
        self.sites
            .iter()
            .flat_map(|s| s.hosts.iter())
            .chain(self.public.iter())
            .collect()
    }

    /// The etcd client URL (`http://198.18.0.1:2379`), if etcd was started.
    pub fn etcd_endpoint(&self) -> Option<String> {
        self.etcd
            .as_ref()
            .map(|_| format!("http://{SERVICES_IP}:{ETCD_PORT}"))
    }

    /// etcd's client URL over IPv6 (with [`LabBuilder::ipv6`]).
    pub fn etcd_endpoint6(&self) -> Option<String> {
        (self.ipv6 && self.etcd.is_some()).then(|| format!("http://[{SERVICES_IP6}]:{ETCD_PORT}"))
    }

    pub fn turn(&self) -> Option<&TurnServer> {
        self.turn.as_ref()
    }

    pub fn turn_mut(&mut self) -> Option<&mut TurnServer> {
        self.turn.as_mut()
    }

    /// The lab's temp dir (logs, secrets); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `args` in the internet namespace.
    pub fn internet_exec(&self, args: &[&str]) -> Result<String> {
        netns_exec(&self.internet, args)
    }

    /// Runs `f` in the internet namespace (see [`in_netns`]).
    pub fn in_internet<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.internet, f)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.turn.take();
        self.etcd.take();
        for ns in self.namespaces.iter().rev() {
            kill_netns_pids(ns);
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
                tracing::warn!(%ns, error = %e, "cannot delete lab namespace");
            }
        }
    }
}

/// Puts internet address `addr` on `ifname` in `ns` (`addr/15 noprefixroute`) and routes the internet
/// through the router (`198.18.0.0/15 via 198.18.0.1 onlink`): every packet to the internet goes to the
/// one neighbour on the link, the router.
fn wan_address(ns: &str, ifname: &str, addr: Ipv4Addr) -> Result<()> {
    ip(
        ns,
        &[
            "addr",
            "add",
            &format!("{addr}/{INTERNET_PREFIX}"),
            "dev",
            ifname,
            "noprefixroute",
        ],
    )?;
    ip(
        ns,
        &[
            "route",
            "replace",
            &format!("{INTERNET_NET}/{INTERNET_PREFIX}"),
            "via",
            &SERVICES_IP.to_string(),
            "dev",
            ifname,
            "onlink",
        ],
    )?;
    Ok(())
}

/// The path of `tool` on `PATH` (also looking in the sbin directories, which a non-login PATH may lack).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
