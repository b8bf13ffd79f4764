//! Real container runtimes driving a CNI plugin: containerd 1.6 (`ctr run --cni`) and podman 4.3 with
//! its CNI backend, each with its own state in a temp dir, plus a busybox rootfs (no image needed).
//!
//! `ctr run --cni` reads its CNI configuration on the client side from fixed paths (the first conflist in
//! `/etc/cni/net.d`, plugins from `/opt/cni/bin` then `/usr/lib/cni`, the libcni cache in `/var/lib/cni`):
//! containerd 1.6 has no config key for them outside the CRI plugin. So `ctr` runs in a private mount
//! namespace in which a tmpfs covers `/opt` and the test's directories are bound over those paths; the
//! machine's own directories are never written. Podman takes its directories from `containers.conf`; it
//! runs in the same kind of private mount namespace only to keep its libcni cache in the temp dir too.

use crate::Netns;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// CNI directories for a runtime: configuration, plugin binaries, libcni result cache; all in a temp dir.
pub struct CniDirs {
    dir: tempfile::TempDir,
}

impl CniDirs {
    pub fn new() -> CniDirs {
        let dir = tempfile::Builder::new()
            .prefix("evio-cnidirs")
            .tempdir()
            .expect("tempdir");
        for d in ["net.d", "bin", "cache", "ipam"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        CniDirs { dir }
    }

    /// Directory holding the conflists (`/etc/cni/net.d` for the runtime).
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    /// Directory holding plugin binaries (searched before `/usr/lib/cni`).
    pub fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// The libcni result cache (`/var/lib/cni` for the runtime).
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// A directory for host-local's `dataDir`.
    pub fn ipam(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Writes `conf.d/<file>` (e.g. `10-evio.conflist`).
    pub fn write_conf(&self, file: &str, json: &str) {
        std::fs::write(self.conf().join(file), json).expect("write conflist");
    }

    /// Makes plugin `name` available in [`CniDirs::bin`] (a symlink to `path`).
    pub fn add_plugin(&self, name: &str, path: &Path) {
        std::os::unix::fs::symlink(path, self.bin().join(name)).expect("symlink plugin");
    }

    /// Every file under the libcni cache (empty after a clean DEL).
    pub fn cache_files(&self) -> Vec<PathBuf> {
        files_under(&self.cache())
    }
}

impl Default for CniDirs {
    fn default() -> Self {
        Self::new()
    }
}

/// All regular files below `dir` (recursively).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Creates a minimal root filesystem in `dir`: static busybox (busybox-static) and its applets.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs bin");
    for d in ["proc", "sys", "dev", "etc", "tmp", "run"] {
        std::fs::create_dir_all(dir.join(d)).expect("rootfs dir");
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("copy /bin/busybox (is busybox-static installed?)");
    for applet in [
        "sh", "ip", "ping", "cat", "sleep", "ifconfig", "route", "wget", "nc", "hostname", "ls",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
}

/// Runs `cmd` (argv) in a private mount namespace where the CNI paths are the test's directories.
fn private_cni_mounts(dirs: &CniDirs, cmd: &[&str]) -> Command {
    // Positional parameters: $1 bin, $2 conf, $3 cache, then the command.
    let script = "set -e; mount -t tmpfs evio-cni-test /opt; mkdir -p /opt/cni/bin; \
                  mount --bind \"$1\" /opt/cni/bin; mount --bind \"$2\" /etc/cni/net.d; \
                  mount --bind \"$3\" /var/lib/cni; shift 3; exec \"$@\"";
    // The mount points must exist on the machine; /etc/cni/net.d and /var/lib/cni are the standard
    // (empty by default) directories of containernetworking-plugins and libcni.
    for p in ["/etc/cni/net.d", "/var/lib/cni"] {
        let _ = std::fs::create_dir_all(p);
    }
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(dirs.bin())
    .arg(dirs.conf())
    .arg(dirs.cache())
    .args(cmd);
    c
}

/// Every process in cgroup `name` (and below) of any hierarchy.
pub(crate) fn cgroup_pids(name: &str) -> Vec<i32> {
    fn walk(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(
                procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    let rel = name.trim_start_matches('/');
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in rd.flatten() {
            walk(&h.path().join(rel), &mut pids);
        }
    }
    walk(&Path::new("/sys/fs/cgroup").join(rel), &mut pids);
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Pids of processes whose command line contains `needle` (e.g. a containerd shim serving our socket).
pub(crate) fn pids_with_arg(needle: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs `pids` (processes this fixture's runtime started for the test).
pub(crate) fn kill_all(pids: &[i32]) {
    for &pid in pids {
        if pid > 1 && pid != std::process::id() as i32 {
            crate::kill(pid, crate::Signal::SIGKILL);
        }
    }
}

/// Removes cgroup directories named `name` (and everything below) in every hierarchy; they are
/// empty once the container is gone.
pub(crate) fn remove_cgroups(name: &str) {
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in rd.flatten() {
        let top = h.path().join(name.trim_start_matches('/'));
        if top.is_dir() {
            remove_cgroup_tree(&top);
        }
    }
    let top = Path::new("/sys/fs/cgroup").join(name.trim_start_matches('/'));
    if top.is_dir() {
        remove_cgroup_tree(&top);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A containerd 1.6 daemon with its own root, state, socket and config (CRI plugin disabled), running
/// in the machine's root netns (it creates no links there; the CNI plugin runs in `ctr`'s netns).
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    namespace: String,
    shim_sockets_before: std::collections::HashSet<PathBuf>,
}

impl Containerd {
    pub fn start() -> Containerd {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("evio-ctrd")
            .tempdir()
            .expect("tempdir");
        let p = |s: &str| dir.path().join(s).display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = p("root"),
            state = p("state"),
            sock = p("c.sock"),
            opt = p("opt"),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("containerd config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd (is containerd installed?)");
        let namespace = crate::unique("evio-ct");
        let c = Containerd {
            dir,
            child: Some(child),
            namespace,
            shim_sockets_before: shim_sockets(),
        };
        let start = Instant::now();
        while !c.socket().exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The containerd namespace the test's containers live in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr run --rm --cni --rootfs ROOTFS ID /bin/sh -c SCRIPT`, with `ctr` as a client inside `node`
    /// and the CNI directories of `dirs`. The container's DEL comes with an empty `CNI_NETNS`.
    pub fn run_cni(
        &self,
        node: &Netns,
        dirs: &CniDirs,
        rootfs: &Path,
        id: &str,
        script: &str,
    ) -> Output {
        self.run_cni_command(node, dirs, rootfs, id, script)
            .output()
            .expect("run ctr")
    }

    /// The command [`Containerd::run_cni`] runs, to spawn it instead.
    pub fn run_cni_command(
        &self,
        node: &Netns,
        dirs: &CniDirs,
        rootfs: &Path,
        id: &str,
        script: &str,
    ) -> Command {
        let fifo = self.dir.path().join("fifo");
        let _ = std::fs::create_dir_all(&fifo);
        let sock = self.socket().display().to_string();
        let fifo = fifo.display().to_string();
        let rootfs = rootfs.display().to_string();
        let cmd = [
            "ip",
            "netns",
            "exec",
            node.name(),
            "ctr",
            "--address",
            &sock,
            "-n",
            &self.namespace,
            "run",
            "--rm",
            "--cni",
            "--fifo-dir",
            &fifo,
            "--rootfs",
            &rootfs,
            id,
            "/bin/sh",
            "-c",
            script,
        ];
        private_cni_mounts(dirs, &cmd)
    }

    /// Processes of this containerd's containers (by our namespace's cgroups).
    pub fn container_pids(&self) -> Vec<i32> {
        cgroup_pids(&self.namespace)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers still running (a test failed mid-run) and their shims: all started by this
        // containerd, found by our namespace's cgroup and our socket path.
        kill_all(&cgroup_pids(&self.namespace));
        kill_all(&pids_with_arg(&self.socket().display().to_string()));
        if let Some(mut c) = self.child.take() {
            crate::kill(c.id() as i32, crate::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroups(&self.namespace);
        // containerd 1.6 keeps the runc shim's state under a fixed /run/containerd: runc's root per
        // namespace (ours is unique), and one socket per shim in /run/containerd/s. Remove ours: the
        // namespace dir, and the sockets that appeared while we ran and no longer answer (a live one belongs
        // to another containerd, e.g. a test running in parallel).
        let _ = std::fs::remove_dir_all(Path::new(SHIM_STATE).join("runc").join(&self.namespace));
        for sock in shim_sockets().difference(&self.shim_sockets_before) {
            if std::os::unix::net::UnixStream::connect(sock).is_err() {
                let _ = std::fs::remove_file(sock);
            }
        }
    }
}

/// containerd 1.6's fixed state directory for shims (not configurable for `ctr run`).
const SHIM_STATE: &str = "/run/containerd";

/// The shim sockets currently in `/run/containerd/s`.
fn shim_sockets() -> std::collections::HashSet<PathBuf> {
    std::fs::read_dir(Path::new(SHIM_STATE).join("s"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Podman 4.3 with the CNI backend and its own root, runroot, tmp dir, containers.conf and cgroup parent.
pub struct Podman {
    dir: tempfile::TempDir,
    cgroup_parent: String,
}

impl Podman {
    /// Podman configured for CNI with `dirs` (plugins from `dirs.bin()` then `/usr/lib/cni`).
    pub fn new(dirs: &CniDirs) -> Podman {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("evio-podman")
            .tempdir()
            .expect("tempdir");
        let p = |s: &str| dir.path().join(s).display().to_string();
        for d in ["root", "runroot", "tmp"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{tmp}"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "/usr/lib/cni"]
network_config_dir = "{conf}"
"#,
            events = p("events.log"),
            tmp = p("tmp"),
            bin = dirs.bin().display(),
            conf = dirs.conf().display(),
        );
        std::fs::write(dir.path().join("containers.conf"), conf).expect("containers.conf");
        Podman {
            dir,
            cgroup_parent: format!("/{}", crate::unique("evio-pm")),
        }
    }

    /// `podman run --rm --network NETWORK --rootfs ROOTFS /bin/sh -c SCRIPT` inside `node`
    /// (`nsenter --net`, not `ip netns exec`, which would hide the cgroup mounts runc needs).
    pub fn run(
        &self,
        node: &Netns,
        dirs: &CniDirs,
        network: &str,
        rootfs: &Path,
        script: &str,
    ) -> Output {
        let netns = format!("--net={}", node.path().display());
        let root = self.dir.path().join("root").display().to_string();
        let runroot = self.dir.path().join("runroot").display().to_string();
        let rootfs = rootfs.display().to_string();
        let cmd = [
            "nsenter",
            &netns,
            "podman",
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--storage-driver",
            "vfs",
            "run",
            "--rm",
            "--cgroup-parent",
            &self.cgroup_parent,
            "--network",
            network,
            "--rootfs",
            &rootfs,
            "/bin/sh",
            "-c",
            script,
        ];
        let mut c = private_cni_mounts(dirs, &cmd);
        c.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"));
        c.output().expect("run podman")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers (and conmon) still running if a test failed mid-run: everything in our cgroup
        // parent, and anything using our root.
        kill_all(&cgroup_pids(&self.cgroup_parent));
        kill_all(&pids_with_arg(
            &self.dir.path().join("runroot").display().to_string(),
        ));
        std::thread::sleep(Duration::from_millis(50));
        remove_cgroups(&self.cgroup_parent);
    }
}
