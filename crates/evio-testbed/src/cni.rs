//! A CNI sandbox: a throw-away node netns in which a CNI plugin runs (`ip netns exec`), the real host-local
//! IPAM with its data dir and the plugin's state dir in a temp dir, pods as throw-away netns. Everything is
//! removed on drop, also when a test fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::{Netns, unique};

/// Where Debian's containernetworking-plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The steps of an evio-cni ADD after which `EVIO_CNI_FAIL_AFTER=<step>` makes it fail (in order).
pub const ADD_STEPS: &[&str] = &[
    "veth", "ipam", "bridge", "attach", "gateway", "address", "routes", "masq", "state",
];

/// What one plugin run returned.
#[derive(Debug, Clone)]
pub struct CniOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOut {
    /// stdout as JSON (panics with the output when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The CNI error code (panics unless the run failed with exactly one error object).
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure: {self:?}");
        let v = self.json();
        for k in ["cniVersion", "code", "msg"] {
            assert!(v.get(k).is_some(), "error object lacks {k}: {self:?}");
        }
        v["code"].as_u64().unwrap()
    }
}

/// A node netns with a CNI network config for `plugin`.
pub struct CniSandbox {
    pub node: Netns,
    pub dir: tempfile::TempDir,
    pub plugin: PathBuf,
    /// The network name (also host-local's directory name under its dataDir).
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    /// Extra keys merged into every config.
    pub extra: Value,
    bin: std::sync::OnceLock<String>,
}

impl CniSandbox {
    /// A sandbox for the plugin binary `plugin` (its `type` is its file name), subnet `10.244.3.0/24`.
    pub fn new(plugin: &Path, extra: Value) -> CniSandbox {
        let node = Netns::new("cn");
        let dir = tempfile::Builder::new()
            .prefix("evio-cni")
            .tempdir()
            .expect("tempdir");
        CniSandbox {
            node,
            dir,
            plugin: plugin.to_path_buf(),
            name: "evnet".into(),
            bridge: "eviobr0".into(),
            subnet: "10.244.3.0/24".into(),
            extra,
            bin: std::sync::OnceLock::new(),
        }
    }

    /// A directory for CNI_PATH holding the plugin and host-local (symlinks), so the plugin's own
    /// directory (target/...) need not be on CNI_PATH.
    pub fn cni_path(&self) -> String {
        self.bin
            .get_or_init(|| {
                let d = self.dir.path().join("bin");
                std::fs::create_dir_all(&d).unwrap();
                for p in ["host-local", "bridge", "loopback"] {
                    let _ =
                        std::os::unix::fs::symlink(Path::new(REFERENCE_PLUGINS).join(p), d.join(p));
                }
                let name = self.plugin.file_name().unwrap();
                std::os::unix::fs::symlink(&self.plugin, d.join(name)).unwrap();
                d.display().to_string()
            })
            .clone()
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The network config for `version`.
    pub fn conf(&self, version: &str) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": self.name,
            "type": self.plugin.file_name().unwrap().to_string_lossy(),
            "bridge": self.bridge,
            "stateDir": self.state_dir(),
            "logFile": self.dir.path().join("plugin.log"),
            "logLevel": "debug",
            "ipam": {"type": "host-local", "subnet": self.subnet, "dataDir": self.ipam_dir()},
        });
        if let (Value::Object(c), Value::Object(e)) = (&mut c, &self.extra) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    /// A new pod netns.
    pub fn pod(&self) -> Netns {
        Netns::new("cp")
    }

    /// Runs the plugin in the node netns with `command`, the given env (`None` leaves a variable unset)
    /// and `stdin`.
    pub fn run_raw(&self, env: &[(&str, Option<&str>)], stdin: &[u8]) -> CniOut {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.node.name()])
            .arg(&self.plugin);
        for k in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ] {
            c.env_remove(k);
        }
        for (k, v) in env {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("run plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        CniOut {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `command` for attachment (`cid`, `ifname`) in `netns` (empty: unset) with `conf`.
    pub fn run(
        &self,
        command: &str,
        cid: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> CniOut {
        let path = self.cni_path();
        let mut env: Vec<(&str, Option<&str>)> = vec![
            ("CNI_COMMAND", Some(command)),
            ("CNI_CONTAINERID", Some(cid)),
            (
                "CNI_NETNS",
                if netns.is_empty() { None } else { Some(netns) },
            ),
            ("CNI_IFNAME", Some(ifname)),
            ("CNI_PATH", Some(&path)),
            ("CNI_ARGS", Some("IgnoreUnknown=1;K8S_POD_NAME=p")),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (*k, Some(*v))));
        self.run_raw(&env, conf.to_string().as_bytes())
    }

    /// ADD that must succeed; returns the result.
    pub fn add(&self, pod: &Netns, cid: &str, version: &str) -> Value {
        let out = self.run(
            "ADD",
            cid,
            &pod.path().display().to_string(),
            "eth0",
            &self.conf(version),
            &[],
        );
        assert!(out.ok, "ADD failed: {out:?}\nlog:\n{}", self.log());
        out.json()
    }

    /// Makes ADD fail right after each of its steps in turn (evio-cni's `EVIO_CNI_FAIL_AFTER` hook): every
    /// failure must be an I/O error (code 5) naming the step, and leave no pod interface; `clean()` then
    /// checks the node is as before (no veth, reservation, firewall entry, port, state).
    pub fn fail_add_after_each_step(&self, pod: &Netns, clean: impl Fn()) {
        let netns = pod.path().display().to_string();
        for step in ADD_STEPS {
            let out = self.run(
                "ADD",
                &self.cid(),
                &netns,
                "eth0",
                &self.conf("1.1.0"),
                &[("EVIO_CNI_FAIL_AFTER", step)],
            );
            assert!(!out.ok, "{step}: {out:?}");
            assert_eq!(out.code(), 5, "{step}: {out:?}");
            let msg = out.json()["msg"].as_str().unwrap_or_default().to_string();
            assert!(msg.contains(step), "{step}: {msg}");
            eprintln!("checking the rollback after {step}");
            clean();
            assert!(
                !pod.links().contains(&"eth0".to_string()),
                "{step}: pod interface left"
            );
        }
    }

    /// DEL that must succeed.
    pub fn del(&self, netns: &str, cid: &str, version: &str) {
        let out = self.run("DEL", cid, netns, "eth0", &self.conf(version), &[]);
        assert!(
            out.ok && out.stdout.is_empty(),
            "DEL failed: {out:?}\nlog:\n{}",
            self.log()
        );
    }

    /// The plugin's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// Addresses host-local has reserved (its per-address files).
    pub fn reservations(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.ipam_dir().join(&self.name)) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        v.sort();
        v
    }

    /// veth links in the node netns.
    pub fn veths(&self) -> Vec<String> {
        self.node
            .links()
            .into_iter()
            .filter(|l| l.starts_with("veth"))
            .collect()
    }

    /// The masquerade table's element lines (empty when there is no table).
    pub fn nft_pod_entries(&self) -> Vec<String> {
        let out = self
            .node
            .exec(&["nft", "-j", "list", "table", "inet", "evio_cni"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut entries = Vec::new();
        for item in v["nftables"].as_array().unwrap() {
            let Some(set) = item.get("set") else { continue };
            if set["name"] == "pods4" || set["name"] == "pods6" {
                for e in set
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    entries.push(e.to_string());
                }
            }
        }
        entries
    }

    /// State files the plugin keeps for the network.
    pub fn state_files(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.state_dir().join(&self.name)) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Asserts that no attachment is left: no veth, no reservation, no masquerade entry, no state.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.veths(),
            Vec::<String>::new(),
            "veths left\nlog:\n{}",
            self.log()
        );
        assert_eq!(
            self.reservations(),
            Vec::<String>::new(),
            "IP reservations left"
        );
        assert_eq!(
            self.nft_pod_entries(),
            Vec::<String>::new(),
            "masquerade entries left"
        );
        assert_eq!(self.state_files(), Vec::<String>::new(), "state files left");
    }

    /// A unique container id.
    pub fn cid(&self) -> String {
        format!("ctr-{}", unique("c"))
    }
}
