//! Kubernetes' own path to a CNI plugin: containerd 1.6's CRI plugin, driven by a CRI client as kubelet
//! drives it (the CRI protobuf API, runtime.v1, over gRPC on a unix socket).
//!
//! [`CriNode`] starts Debian's containerd with its own config, root, state, socket and runc root, in a
//! node's network namespace (`nsenter --net`, not `ip netns exec`: runc needs the host's cgroup mounts),
//! with the CRI plugin's CNI directories pointing at the test's. Pods get their own netns
//! (`/run/netns/cni-<uuid>`, made by containerd) and their own cgroup parent, unique to the node. On drop
//! every sandbox still there is stopped and removed through the CRI (so the CNI DEL runs), then the daemon,
//! its shims and containers are killed and everything it made is removed.
//!
//! Images come from OCI image archives imported with `ctr images import` (no registry):
//! [`busybox_image`] writes one from busybox-static.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
/// A container's state as the CRI reports it.
pub use k8s_cri::v1::ContainerState;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Netns;
use crate::runtimes::{kill_all, pids_with_arg, remove_cgroups};

/// The reference [`busybox_image`] gives its image.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/evio-test-busybox:1";

/// The containerd namespace the CRI plugin keeps its pods in (fixed by containerd).
const K8S_NS: &str = "k8s.io";

/// Writes an OCI image archive of busybox-static (every applet in /bin, a /www/index.html saying
/// `evio-test`, /etc/passwd) to `out`, named [`BUSYBOX_IMAGE`]. Its entrypoint waits for SIGTERM and
/// exits 0 (the pods' "pause"). Built with GNU tar and sha256sum: no registry, no base image.
pub fn busybox_image(out: &Path) {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path().join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp", "run", "www", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("copy /bin/busybox (is busybox-static installed?)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::write(root.join("www/index.html"), "evio-test\n").unwrap();

    let layout = t.path().join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = t.path().join("layer.tar");
    crate::run_ok(&[
        "tar",
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "-C",
        root.to_str().unwrap(),
        "-cf",
        layer.to_str().unwrap(),
        ".",
    ]);
    let add_blob = |path: &Path| -> (String, u64) {
        let sum = crate::run_ok(&["sha256sum", path.to_str().unwrap()]);
        let digest = sum.split_whitespace().next().unwrap().to_string();
        let size = std::fs::metadata(path).unwrap().len();
        std::fs::copy(path, blobs.join(&digest)).unwrap();
        (format!("sha256:{digest}"), size)
    };
    let (layer_digest, layer_size) = add_blob(&layer);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Entrypoint": ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let json_blob = |name: &str, v: &serde_json::Value| -> (String, u64) {
        let p = t.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        add_blob(&p)
    };
    let (config_digest, config_size) = json_blob("config.json", &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = json_blob("manifest.json", &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"io.containerd.image.name": BUSYBOX_IMAGE,
                            "org.opencontainers.image.ref.name": "1"},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    crate::run_ok(&[
        "tar",
        "--numeric-owner",
        "-C",
        layout.to_str().unwrap(),
        "-cf",
        out.to_str().unwrap(),
        "oci-layout",
        "index.json",
        "blobs",
    ]);
}

/// A pod sandbox to run: name, port mappings (TCP `(container_port, host_port)`), and whether it shares
/// the node's network namespace (`hostNetwork`).
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    pub name: String,
    pub ports: Vec<(i32, i32)>,
    pub host_network: bool,
}

impl PodSpec {
    pub fn new(name: &str) -> PodSpec {
        PodSpec {
            name: name.to_string(),
            ..PodSpec::default()
        }
    }
}

/// What a container of a pod runs (the CRI's `ContainerConfig`, the parts tests use).
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `(container path, host path, read only)`.
    pub mounts: Vec<(String, PathBuf, bool)>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub readonly_rootfs: bool,
    pub drop_all_capabilities: bool,
    pub no_new_privs: bool,
}

/// containerd with its CRI plugin in a node's network namespace, and a CRI client to it.
pub struct CriNode {
    dir: tempfile::TempDir,
    netns: String,
    child: Option<Child>,
    /// The cgroup parent of this node's pods (unique): everything in it is ours.
    cgroup: String,
    rt: tokio::runtime::Runtime,
    channel: Option<Channel>,
    shim_sockets_before: std::collections::HashSet<PathBuf>,
}

impl CriNode {
    /// Starts containerd in `node` with the CRI plugin's CNI configuration in `cni_conf_dir` (the first
    /// conflist there is used) and plugins in `cni_bin_dir`; `sandbox_image` must be imported before the
    /// first pod ([`CriNode::import`]).
    pub fn start(
        node: &Netns,
        cni_conf_dir: &Path,
        cni_bin_dir: &Path,
        sandbox_image: &str,
    ) -> Self {
        crate::require_root();
        let dir = tempfile::Builder::new()
            .prefix("evio-cri")
            .tempdir()
            .expect("tempdir");
        let p = |s: &str| dir.path().join(s).display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs"]
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
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            root = p("root"),
            state = p("state"),
            sock = p("c.sock"),
            opt = p("opt"),
            runc = p("runc"),
            bin = cni_bin_dir.display(),
            conf = cni_conf_dir.display(),
        );
        std::fs::write(dir.path().join("config.toml"), config).expect("containerd config");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut n = CriNode {
            netns: node.name().to_string(),
            cgroup: format!("/{}", crate::unique("evcri")),
            dir,
            child: None,
            rt,
            channel: None,
            shim_sockets_before: shim_sockets(),
        };
        n.start_daemon();
        n
    }

    fn start_daemon(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd (is containerd installed?)");
        self.child = Some(child);
        // Up means the CRI answering, not only the socket existing.
        let start = Instant::now();
        loop {
            if self.socket().exists() {
                let sock = self.socket();
                let ch = self.rt.block_on(async move {
                    Endpoint::try_from("http://[::]:50051")
                        .unwrap()
                        .connect_with_connector(tower::service_fn(move |_: Uri| {
                            let sock = sock.clone();
                            async move {
                                Ok::<_, std::io::Error>(TokioIo::new(
                                    tokio::net::UnixStream::connect(sock).await?,
                                ))
                            }
                        }))
                        .await
                });
                if let Ok(ch) = ch {
                    self.channel = Some(ch);
                    if self
                        .rt
                        .block_on(self.runtime().version(cri::VersionRequest::default()))
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd (CRI) did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd (SIGTERM) and starts it again with the same config and state, as after a
    /// restart of the runtime under running pods (their shims and containers keep running).
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.start_daemon();
    }

    fn stop_daemon(&mut self) {
        self.channel = None;
        if let Some(mut c) = self.child.take() {
            crate::kill(c.id() as i32, crate::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone().expect("containerd is running"))
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone().expect("containerd is running"))
    }

    /// Imports an OCI image archive into the CRI's namespace (unpacked for the CRI's snapshotter).
    pub fn import(&self, archive: &Path) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", K8S_NS, "images", "import", "--snapshotter", "native"])
            .arg(archive)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The image's id if the CRI has it (kubelet's check for `imagePullPolicy: IfNotPresent`).
    pub fn image_id(&self, image: &str) -> Option<String> {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        let r = self.rt.block_on(self.images().image_status(req)).ok()?;
        r.into_inner().image.map(|i| i.id)
    }

    fn sandbox_config(&self, spec: &PodSpec) -> cri::PodSandboxConfig {
        let uid = crate::unique("uid");
        let logs = self.dir.path().join("logs").join(&uid);
        std::fs::create_dir_all(&logs).unwrap();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.clone(),
                uid,
                namespace: "default".into(),
                attempt: 0,
            }),
            // kubelet leaves the hostname empty for hostNetwork pods (they share the node's UTS).
            hostname: if spec.host_network {
                String::new()
            } else {
                spec.name.clone()
            },
            log_directory: logs.display().to_string(),
            port_mappings: spec
                .ports
                .iter()
                .map(|&(container_port, host_port)| cri::PortMapping {
                    protocol: cri::Protocol::Tcp as i32,
                    container_port,
                    host_port,
                    host_ip: String::new(),
                })
                .collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if spec.host_network {
                            cri::NamespaceMode::Node as i32
                        } else {
                            cri::NamespaceMode::Pod as i32
                        },
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox; the sandbox id, or the CRI's error message.
    pub fn run_pod(&self, spec: &PodSpec) -> Result<Sandbox, String> {
        let config = self.sandbox_config(spec);
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let r = self
            .rt
            .block_on(self.runtime().run_pod_sandbox(req))
            .map_err(|e| e.message().to_string())?;
        Ok(Sandbox {
            id: r.into_inner().pod_sandbox_id,
            config,
        })
    }

    /// PodSandboxStatus: (state is ready, the pod's IP).
    pub fn pod_status(&self, id: &str) -> Result<(bool, String), String> {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        };
        let r = self
            .rt
            .block_on(self.runtime().pod_sandbox_status(req))
            .map_err(|e| e.message().to_string())?
            .into_inner();
        let s = r.status.ok_or("no status")?;
        let ip = s.network.map(|n| n.ip).unwrap_or_default();
        Ok((s.state == cri::PodSandboxState::SandboxReady as i32, ip))
    }

    /// CreateContainer and StartContainer in `sandbox`; the container id.
    pub fn start_container(&self, sandbox: &Sandbox, c: &ContainerSpec) -> Result<String, String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: c.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            args: c.args.clone(),
            envs: c
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: c
                .mounts
                .iter()
                .map(|(cp, hp, ro)| cri::Mount {
                    container_path: cp.clone(),
                    host_path: hp.display().to_string(),
                    readonly: *ro,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", c.name),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: c.drop_all_capabilities.then(|| cri::Capability {
                        drop_capabilities: vec!["ALL".into()],
                        ..Default::default()
                    }),
                    run_as_user: c.run_as_user.map(|value| cri::Int64Value { value }),
                    run_as_group: c.run_as_group.map(|value| cri::Int64Value { value }),
                    readonly_rootfs: c.readonly_rootfs,
                    no_new_privs: c.no_new_privs,
                    namespace_options: sandbox
                        .config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.id.clone(),
            config: Some(config),
            sandbox_config: Some(sandbox.config.clone()),
        };
        let id = self
            .rt
            .block_on(self.runtime().create_container(req))
            .map_err(|e| format!("CreateContainer: {}", e.message()))?
            .into_inner()
            .container_id;
        let req = cri::StartContainerRequest {
            container_id: id.clone(),
        };
        self.rt
            .block_on(self.runtime().start_container(req))
            .map_err(|e| format!("StartContainer: {}", e.message()))?;
        Ok(id)
    }

    /// ContainerStatus: (state, exit code).
    pub fn container_state(&self, id: &str) -> Result<(cri::ContainerState, i32), String> {
        let req = cri::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        let s = self
            .rt
            .block_on(self.runtime().container_status(req))
            .map_err(|e| e.message().to_string())?
            .into_inner()
            .status
            .ok_or("no status")?;
        let state =
            cri::ContainerState::try_from(s.state).unwrap_or(cri::ContainerState::ContainerUnknown);
        Ok((state, s.exit_code))
    }

    /// Waits up to `limit` for container `id` to exit; its exit code.
    pub fn wait_exit(&self, id: &str, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok((cri::ContainerState::ContainerExited, code)) = self.container_state(id) {
                return Some(code);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The log a container wrote (stdout and stderr, CRI log format).
    pub fn container_log(&self, sandbox: &Sandbox, name: &str) -> String {
        let dir = sandbox.config.log_directory.clone();
        std::fs::read_to_string(Path::new(&dir).join(format!("{name}.log"))).unwrap_or_default()
    }

    /// StopContainer with a grace period of `timeout` seconds.
    pub fn stop_container(&self, id: &str, timeout: i64) -> Result<(), String> {
        let req = cri::StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        };
        self.rt
            .block_on(self.runtime().stop_container(req))
            .map(|_| ())
            .map_err(|e| e.message().to_string())
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub fn exec(&self, container: &str, cmd: &[&str]) -> (i32, String, String) {
        let req = cri::ExecSyncRequest {
            container_id: container.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        };
        match self.rt.block_on(self.runtime().exec_sync(req)) {
            Ok(r) => {
                let r = r.into_inner();
                (
                    r.exit_code,
                    String::from_utf8_lossy(&r.stdout).into_owned(),
                    String::from_utf8_lossy(&r.stderr).into_owned(),
                )
            }
            Err(e) => (-1, String::new(), format!("ExecSync: {}", e.message())),
        }
    }

    /// StopPodSandbox (the CNI DEL runs here).
    pub fn stop_pod(&self, id: &str) -> Result<(), String> {
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rt
            .block_on(self.runtime().stop_pod_sandbox(req))
            .map(|_| ())
            .map_err(|e| e.message().to_string())
    }

    /// RemovePodSandbox.
    pub fn remove_pod(&self, id: &str) -> Result<(), String> {
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.rt
            .block_on(self.runtime().remove_pod_sandbox(req))
            .map(|_| ())
            .map_err(|e| e.message().to_string())
    }

    /// Ids of the sandboxes the CRI knows.
    pub fn pods(&self) -> Vec<String> {
        let req = cri::ListPodSandboxRequest { filter: None };
        self.rt
            .block_on(self.runtime().list_pod_sandbox(req))
            .map(|r| r.into_inner().items.into_iter().map(|s| s.id).collect())
            .unwrap_or_default()
    }

    /// The pod's network namespace path as containerd reports it (verbose PodSandboxStatus).
    pub fn pod_netns(&self, id: &str) -> Option<PathBuf> {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        let r = self
            .rt
            .block_on(self.runtime().pod_sandbox_status(req))
            .ok()?
            .into_inner();
        let info: serde_json::Value = serde_json::from_str(r.info.get("info")?).ok()?;
        let path = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()?
            .iter()
            .find(|n| n["type"] == "network")?["path"]
            .as_str()?
            .to_string();
        Some(PathBuf::from(path))
    }
}

/// A sandbox the CRI runs, with the config it was made with (CreateContainer needs it again).
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

impl Drop for CriNode {
    fn drop(&mut self) {
        // Through the CRI first, so the CNI DEL of every pod still there runs and frees what it holds.
        // A sandbox whose network setup failed may keep its netns (state SANDBOX_UNKNOWN): removed below.
        let mut netns = Vec::new();
        if self.channel.is_some() {
            for id in self.pods() {
                netns.extend(self.pod_netns(&id));
                let _ = self.stop_pod(&id);
                let _ = self.remove_pod(&id);
            }
        }
        self.stop_daemon();
        let sock = self.socket().display().to_string();
        kill_all(&crate::runtimes::cgroup_pids(&self.cgroup));
        kill_all(&pids_with_arg(&sock));
        std::thread::sleep(Duration::from_millis(100));
        remove_cgroups(&self.cgroup);
        // Mounts containerd left under our directory (rootfs, shm), innermost first.
        let dir = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        for n in netns
            .iter()
            .filter(|n| n.starts_with("/run/netns") || n.starts_with("/var/run/netns"))
        {
            let _ = Command::new("umount").arg(n).status();
            let _ = std::fs::remove_file(n);
        }
        for s in shim_sockets().difference(&self.shim_sockets_before) {
            if std::os::unix::net::UnixStream::connect(s).is_err() {
                let _ = std::fs::remove_file(s);
            }
        }
    }
}

/// The shim sockets in containerd 1.6's fixed `/run/containerd/s`.
fn shim_sockets() -> std::collections::HashSet<PathBuf> {
    std::fs::read_dir("/run/containerd/s")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}
