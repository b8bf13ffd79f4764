//! A minimal CNI runtime, as containerd's libcni drives plugins: reads the conflist `evioctl cni-config`
//! wrote, and runs every plugin of the chain in order (ADD) inside the node's network namespace, with the
//! CNI environment variables and the plugin's network config (plus `prevResult`) on stdin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// One attachment to make.
pub struct Attach<'a> {
    /// The node's network namespace (where plugins run, as a runtime on that node would run them).
    pub node_ns: &'a str,
    pub container_id: &'a str,
    /// Path of the pod's network namespace (`/run/netns/NAME`).
    pub netns_path: &'a Path,
    pub ifname: &'a str,
    pub pod_name: &'a str,
}

/// Finds plugin `kind` on `cni_path` (colon-separated), refusing names with path separators.
fn find_plugin(kind: &str, cni_path: &str) -> Result<PathBuf> {
    if kind.is_empty() || kind.contains('/') || kind == "." || kind == ".." {
        bail!("invalid plugin type {kind:?}");
    }
    cni_path
        .split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("CNI plugin {kind} not found on CNI_PATH {cni_path}"))
}

/// Runs ADD for every plugin of `conflist`; returns the final result.
pub fn add(conflist: &Value, cni_path: &str, a: &Attach) -> Result<Value> {
    let name = conflist["name"].as_str().context("conflist has no name")?;
    let version = conflist["cniVersion"]
        .as_str()
        .context("conflist has no cniVersion")?;
    let plugins = conflist["plugins"]
        .as_array()
        .context("conflist has no plugins")?;
    let mut prev: Option<Value> = None;
    for p in plugins {
        let kind = p["type"].as_str().context("plugin without type")?;
        let mut conf = p.clone();
        conf["name"] = Value::from(name);
        conf["cniVersion"] = Value::from(version);
        if let Some(r) = &prev {
            conf["prevResult"] = r.clone();
        }
        let exe = find_plugin(kind, cni_path)?;
        let out = exec(&exe, "ADD", &conf, cni_path, a)?;
        prev = Some(out);
    }
    prev.context("empty plugin chain")
}

fn exec(exe: &Path, cmd: &str, conf: &Value, cni_path: &str, a: &Attach) -> Result<Value> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", a.node_ns])
        .arg(exe)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", a.container_id)
        .env("CNI_NETNS", a.netns_path)
        .env("CNI_IFNAME", a.ifname)
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={}",
                a.pod_name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} {cmd} failed ({}): {} {}",
            exe.display(),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_str(&stdout)
        .with_context(|| format!("{} {cmd} printed no JSON result: {stdout}", exe.display()))
}

/// The first IPv4 address (without prefix) of a CNI result.
pub fn first_ipv4(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let host = a.split('/').next()?;
        host.parse::<std::net::Ipv4Addr>()
            .ok()
            .map(|_| host.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_with_separators_are_refused() {
        assert!(find_plugin("../x", "/usr/lib/cni").is_err());
        assert!(find_plugin("", "/usr/lib/cni").is_err());
        assert!(find_plugin("..", "/usr/lib/cni").is_err());
    }

    #[test]
    fn first_ipv4_skips_v6() {
        let r = serde_json::json!({"ips":[{"address":"fd00::2/64"},{"address":"10.244.1.2/24"}]});
        assert_eq!(first_ipv4(&r).as_deref(), Some("10.244.1.2"));
        assert_eq!(first_ipv4(&serde_json::json!({})), None);
    }
}
