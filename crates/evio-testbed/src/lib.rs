//! evio's one fixture crate, shared by the workspace's integration tests and the demo: throw-away network
//! namespaces and a real etcd (here), the CNI sandbox (`cni`), OVS (`ovs`), containerd and podman
//! (`runtimes`), the CRI client as kubelet drives it (`cri`, feature `cri`), and the lab topologies (`lab`:
//! an internet, NATed sites, public hosts, etcd and coturn; once the crate `evio-lab`).
//!
//! Everything here creates real things (network namespaces, an etcd server) with unique names and removes
//! them on `Drop`, so a failing test still cleans up. Tests must run as root; [`require_root`] fails loudly
//! instead of silently skipping.

pub mod cni;
#[cfg(feature = "cri")]
pub mod cri;
pub mod lab;
pub mod ovs;
pub mod runtimes;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Panics with a clear message unless the test runs as root (the suite needs namespaces).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and must run as root"
    );
}

pub use lab::{Signal, kill};

/// A name unique to this process and call: `prefix`, then the pid (6 hex digits: Linux pids fit in 22
/// bits) and a per-process counter (4 hex digits), both fixed width so two (pid, counter) pairs never
/// print alike. With a prefix of at most 5 characters it fits an interface name (15 characters).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!("{prefix}{:06x}{:04x}", pid & 0x3f_ffff, n & 0xffff)
}

/// Runs a command, returning its output; panics with stderr if it cannot be started.
pub fn run(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics unless it succeeds; returns stdout.
pub fn run_ok(cmd: &[&str]) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A throw-away network namespace (`/run/netns/<name>`), deleted with every process in it on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `prefix` + a unique suffix, with `lo` up.
    pub fn new(prefix: &str) -> Netns {
        require_root();
        let name = unique(prefix);
        run_ok(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread that entered this namespace (sockets it opens stay here), returning its
    /// result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        crate::lab::in_netns(&self.name, f)
            .unwrap_or_else(|e| panic!("cannot enter netns {}: {e}", self.name))
    }

    /// `/run/netns/<name>`, usable as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `cmd` inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }

    /// Runs `cmd` inside the namespace and panics unless it succeeds; returns stdout.
    pub fn exec_ok(&self, cmd: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run_ok(&full)
    }

    /// A `Command` that runs `program` inside the namespace (for long-running daemons).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Links in the namespace, by name (without the `@peer` suffix).
    pub fn links(&self) -> Vec<String> {
        self.exec_ok(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// The `veth*` links left in the namespace once they stop disappearing (up to 5 s). When a runtime
    /// tears a container down, the kernel destroys the container's netns asynchronously (a workqueue), and
    /// the host end of a veth whose pod end lived there goes away only then, a moment after the runtime
    /// exited. An empty result means nothing leaked.
    pub fn settled_veths(&self) -> Vec<String> {
        let veths = || -> Vec<String> {
            self.links()
                .into_iter()
                .filter(|l| l.starts_with("veth"))
                .collect()
        };
        wait_until(Duration::from_secs(5), || veths().is_empty());
        veths()
    }

    /// Connects this namespace to `other` with a veth pair named `a` (here) and `b` (there).
    pub fn veth_to(&self, a: &str, other: &Netns, b: &str) {
        self.exec_ok(&[
            "ip",
            "link",
            "add",
            a,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            other.name(),
        ]);
        self.exec_ok(&["ip", "link", "set", a, "up"]);
        other.exec_ok(&["ip", "link", "set", b, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    kill(pid, Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A free TCP port on 127.0.0.1 (bind to port 0, read it back, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A real etcd server on loopback with its own data directory, killed and removed on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    netns: Option<String>,
    listen_ip: String,
}

impl Etcd {
    /// Starts etcd on 127.0.0.1 and waits until `/health` says true.
    pub fn start() -> Etcd {
        Self::start_in(None, "127.0.0.1")
    }

    /// Starts etcd inside network namespace `netns` (if given), listening on `ip`. The ports are picked
    /// free and bound by etcd a moment later: when another process took one in between, etcd exits with
    /// "address already in use" and it starts again on new ports.
    pub fn start_in(netns: Option<&Netns>, ip: &str) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("evio-etcd")
            .tempdir()
            .expect("tempdir");
        let mut e = Etcd {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            netns: netns.map(|n| n.name().to_string()),
            listen_ip: ip.to_string(),
        };
        std::fs::create_dir(e.dir.path().join("data")).expect("data dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            e.dir.path().join("data"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        for attempt in 1.. {
            let _ = std::fs::remove_file(e.dir.path().join("etcd.log"));
            match e.spawn() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("address already in use") => {
                    e.kill();
                    // A fresh data dir, so nothing of the failed start is reused.
                    let data = e.dir.path().join("data");
                    std::fs::remove_dir_all(&data).expect("remove data dir");
                    std::fs::create_dir(&data).expect("data dir");
                    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
                        .expect("chmod");
                    e.client_port = free_port();
                    e.peer_port = free_port();
                }
                Err(log) => panic!("etcd exited at start: {log}"),
            }
        }
        e
    }

    /// Starts etcd and waits until it is healthy; Err(its log) when it exits first.
    fn spawn(&mut self) -> Result<(), String> {
        let c = format!("http://{}:{}", self.listen_ip, self.client_port);
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        cmd.args(crate::lab::etcd_args(
            "t",
            &self.dir.path().join("data"),
            &c,
            &p,
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        self.child = Some(cmd.spawn().expect("start etcd (is etcd-server installed?)"));
        self.wait_healthy(Duration::from_secs(20))
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        panic!("etcd did not become healthy: {log}");
    }

    /// True when etcd answers its `/health` endpoint with `"health":"true"`.
    pub fn healthy(&self) -> bool {
        if self.netns.is_some() {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    self.netns.as_deref().unwrap_or_default(),
                    "curl",
                    "-sf",
                ])
                .arg(format!("{}/health", self.endpoint()))
                .output();
            return out
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("true"))
                .unwrap_or(false);
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.listen_ip, self.client_port)
    }

    /// The network namespace etcd runs in, if not the caller's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs `etcdctl <args>` against this server (inside its namespace) and panics unless it succeeds;
    /// returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let endpoint = self.endpoint();
        let mut cmd: Vec<&str> = match &self.netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => vec![],
        };
        cmd.extend(["etcdctl", "--endpoints", &endpoint]);
        cmd.extend_from_slice(args);
        run_ok(&cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Freezes the server (SIGSTOP): connections hang, as with a partitioned etcd.
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
        // SIGSTOP stops each thread when it is next scheduled: on a loaded machine a request sent right
        // after `kill` returned was once still answered (CI). Return only once every thread is stopped.
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && !self.pids().iter().all(|p| all_threads_stopped(*p)) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, sig: Signal) {
        for pid in self.pids() {
            kill(pid, sig);
        }
    }

    /// The etcd pid (the child itself; `ip netns exec` execs etcd, so it is the same process).
    fn pids(&self) -> Vec<i32> {
        self.child
            .as_ref()
            .map(|c| vec![c.id() as i32])
            .unwrap_or_default()
    }

    /// Stops the server (kill -9) and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn() {
            panic!("etcd exited at restart: {log}");
        }
    }

    /// Kills the server (kill -9) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// etcd's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

/// True if every thread of `pid` is stopped (state `T` in `/proc/<pid>/task/<tid>/stat`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(true)
    })
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
    }
}

/// Polls `f` until it returns true or `limit` passes; returns whether it did.
pub use crate::lab::wait_until;

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`), found from the
/// test executable's own path (`target/<profile>/deps/test-xxxx`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}
