//! Open vSwitch fixtures: ovsdb-server and ovs-vswitchd started inside a throw-away node netns with their
//! own run/log/db directories (userspace datapath, as there is no openvswitch kernel module here), and a
//! TCP transfer check between namespaces (ping alone hides the checksum trap with the userspace datapath).

use crate::{Netns, run};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// An ovsdb-server + ovs-vswitchd pair running inside a node netns. Dropping it deletes every bridge,
/// stops both daemons and removes the TAP devices the userspace datapath leaves behind.
pub struct Ovs {
    dir: tempfile::TempDir,
    netns: String,
    vswitchd_stopped: bool,
}

impl Ovs {
    /// Starts OVS in `node` with `other_config:userspace-tso-enable=true` (without it TCP across veth
    /// ports fails on bad checksums while ping works) and waits until ovs-vswitchd applied its first
    /// configuration.
    pub fn start(node: &Netns) -> Ovs {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("evio-ovs")
            .tempdir()
            .expect("tempdir");
        let ovs = Ovs {
            dir,
            netns: node.name().to_string(),
            vswitchd_stopped: false,
        };
        for d in ["run", "log", "db"] {
            std::fs::create_dir(ovs.dir.path().join(d)).expect("ovs dir");
        }
        let db = ovs.dir.path().join("db/conf.db");
        ovs.ok(Command::new("ovsdb-tool")
            .arg("create")
            .arg(&db)
            .arg("/usr/share/openvswitch/vswitch.ovsschema")
            .output());
        let mut c = ovs.daemon("ovsdb-server");
        c.arg(&db)
            .arg(format!("--remote=punix:{}", ovs.socket().display()))
            .arg(format!(
                "--pidfile={}",
                ovs.pidfile("ovsdb-server").display()
            ))
            .arg(format!(
                "--log-file={}",
                ovs.dir.path().join("log/ovsdb-server.log").display()
            ));
        ovs.ok(c.output());
        ovs.vsctl_ok(&["--no-wait", "init"]);
        ovs.vsctl_ok(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:userspace-tso-enable=true",
            "other_config:n-handler-threads=1",
            "other_config:n-revalidator-threads=1",
        ]);
        let mut c = ovs.daemon("ovs-vswitchd");
        c.arg(format!("unix:{}", ovs.socket().display()))
            .arg(format!(
                "--pidfile={}",
                ovs.pidfile("ovs-vswitchd").display()
            ))
            .arg(format!(
                "--log-file={}",
                ovs.dir.path().join("log/ovs-vswitchd.log").display()
            ));
        ovs.ok(c.output());
        // A write that waits for ovs-vswitchd (next_cfg/cur_cfg): the daemon is up and connected.
        ovs.vsctl_ok(&["set", "Open_vSwitch", ".", "external_ids:evio-test=ready"]);
        ovs
    }

    fn daemon(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.netns,
            program,
            "--detach",
            "--no-chdir",
            "-vconsole:off",
        ]);
        for (k, d) in [
            ("OVS_RUNDIR", "run"),
            ("OVS_LOGDIR", "log"),
            ("OVS_DBDIR", "db"),
        ] {
            c.env(k, self.dir.path().join(d));
        }
        c
    }

    fn ok(&self, out: std::io::Result<Output>) {
        let out = out.expect("cannot run an OVS program (is openvswitch-switch installed?)");
        assert!(
            out.status.success(),
            "OVS command failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    fn pidfile(&self, daemon: &str) -> PathBuf {
        self.dir.path().join("run").join(format!("{daemon}.pid"))
    }

    fn pid(&self, daemon: &str) -> Option<i32> {
        std::fs::read_to_string(self.pidfile(daemon))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The ovsdb-server unix socket (the plugin's `ovsdbSocket`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/db.sock")
    }

    /// The node netns name the daemons run in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Runs `ovs-vsctl --db=unix:SOCKET --timeout=10 ARGS`.
    pub fn vsctl(&self, args: &[&str]) -> Output {
        self.vsctl_t(10, args)
    }

    fn vsctl_t(&self, secs: u32, args: &[&str]) -> Output {
        Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.socket().display()))
            .arg(format!("--timeout={secs}"))
            .args(args)
            .output()
            .expect("run ovs-vsctl")
    }

    /// Like [`Ovs::vsctl`], panicking (with the daemons' logs) unless it succeeds; returns stdout.
    pub fn vsctl_ok(&self, args: &[&str]) -> String {
        let out = self.vsctl(args);
        assert!(
            out.status.success(),
            "ovs-vsctl {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Port names on `bridge` (empty when the bridge does not exist). Panics when ovs-vsctl fails for
    /// any other reason (OVSDB down, timeout), so an empty list always means "no ports".
    pub fn ports(&self, bridge: &str) -> Vec<String> {
        let exists = self.vsctl(&["br-exists", bridge]);
        match exists.status.code() {
            Some(0) => {}
            Some(2) => return Vec::new(),
            _ => panic!(
                "ovs-vsctl br-exists {bridge} failed: {}\n{}",
                String::from_utf8_lossy(&exists.stderr),
                self.log()
            ),
        }
        self.vsctl_ok(&["list-ports", bridge])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Names of all rows of `table` (Bridge, Port or Interface).
    pub fn names(&self, table: &str) -> Vec<String> {
        let out = self.vsctl_ok(&["--bare", "--columns=name", "list", table]);
        let mut v: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Both daemons' logs (for assertion messages).
    pub fn log(&self) -> String {
        ["ovsdb-server", "ovs-vswitchd"]
            .iter()
            .map(|d| {
                let p = self.dir.path().join("log").join(format!("{d}.log"));
                format!(
                    "--- {d}.log\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Stops ovs-vswitchd only (ovsdb-server keeps answering), to test what happens without it.
    pub fn stop_vswitchd(&mut self) {
        self.stop("ovs-vswitchd");
        self.vswitchd_stopped = true;
    }

    /// Freezes ovs-vswitchd (SIGSTOP): ovsdb-server answers, but nothing is applied, as with a hung
    /// switch. [`Ovs::thaw_vswitchd`] (or drop) resumes it.
    pub fn freeze_vswitchd(&self) {
        self.signal("ovs-vswitchd", crate::Signal::SIGSTOP);
    }

    pub fn thaw_vswitchd(&self) {
        self.signal("ovs-vswitchd", crate::Signal::SIGCONT);
    }

    fn signal(&self, daemon: &str, sig: crate::Signal) {
        if let Some(pid) = self.pid(daemon).filter(|p| running(*p)) {
            crate::kill(pid, sig);
        }
    }

    fn stop(&self, daemon: &str) {
        let Some(pid) = self.pid(daemon) else { return };
        let ctl = self
            .dir
            .path()
            .join("run")
            .join(format!("{daemon}.{pid}.ctl"));
        let mut args = vec![
            "-t".to_string(),
            ctl.display().to_string(),
            "exit".to_string(),
        ];
        if daemon == "ovs-vswitchd" {
            args.push("--cleanup".to_string());
        }
        let _ = Command::new("ovs-appctl")
            .args(&args)
            .env("OVS_RUNDIR", self.dir.path().join("run"))
            .output();
        let start = Instant::now();
        while running(pid) && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if running(pid) {
            crate::kill(pid, crate::Signal::SIGKILL);
        }
    }
}

/// True while `pid` exists and is not a zombie (a detached daemon is reaped by init, maybe late).
fn running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

impl Drop for Ovs {
    fn drop(&mut self) {
        self.thaw_vswitchd();
        // Never panic here (a panic while unwinding aborts the test binary).
        let out = self.vsctl_t(3, &["--bare", "--columns=name", "list", "Bridge"]);
        let bridges: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !self.vswitchd_stopped {
            for b in &bridges {
                let _ = self.vsctl_t(3, &["--if-exists", "del-br", b]);
            }
        }
        self.stop("ovs-vswitchd");
        self.stop("ovsdb-server");
        // Killing ovs-vswitchd before del-br, or a crash, leaves the TAPs behind.
        for link in bridges.iter().map(String::as_str).chain(["ovs-netdev"]) {
            let _ = run(&["ip", "-n", &self.netns, "link", "del", link]);
        }
    }
}

/// Runs `f` on a new thread that entered network namespace `ns` (namespaces are per thread).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    crate::lab::in_netns(ns, f).unwrap_or_else(|e| panic!("cannot enter netns {ns}: {e}"))
}

/// Sends `bytes` bytes of a known pattern over TCP from netns `client` to `server_ip` in netns `server`
/// and checks that exactly they arrived, all within `limit`. Returns the transfer time.
pub fn tcp_transfer(
    server: &str,
    server_ip: &str,
    client: &str,
    bytes: usize,
    limit: Duration,
) -> Result<Duration, String> {
    let ip = server_ip.to_string();
    let listener = in_netns(server, move || TcpListener::bind((ip.as_str(), 0)))
        .map_err(|e| format!("bind {server_ip} in {server}: {e}"))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let pattern = |i: usize| (i.wrapping_mul(31) ^ (i >> 8)) as u8;
    let start = Instant::now();
    let client_ns = client.to_string();
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut s = in_netns(&client_ns, move || TcpStream::connect_timeout(&addr, limit))
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_write_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = buf.len().min(bytes - sent);
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + k);
            }
            s.write_all(&buf[..n])
                .map_err(|e| format!("send after {sent} bytes: {e}"))?;
            sent += n;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())
    });
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                let why = if sender.is_finished() {
                    sender.join().ok().and_then(|r| r.err())
                } else {
                    None
                };
                return Err(format!(
                    "no connection to {addr}: {e} {}",
                    why.unwrap_or_default()
                ));
            }
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("receive after {got} of {bytes} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            if *b != pattern(got + k) {
                return Err(format!("corrupted byte at offset {}", got + k));
            }
        }
        got += n;
        if start.elapsed() > limit {
            return Err(format!(
                "transfer slower than {limit:?}: {got} of {bytes} bytes"
            ));
        }
    }
    sender.join().map_err(|_| "sender panicked".to_string())??;
    if got != bytes {
        return Err(format!("received {got} of {bytes} bytes"));
    }
    Ok(start.elapsed())
}
