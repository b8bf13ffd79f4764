//! Running a delegated plugin (IPAM) found on `CNI_PATH`, with version negotiation.
//!
//! The delegate may speak an older version than our config (Debian's host-local 1.1.1 stops at 1.0.0 while
//! a config says 1.1.0): we ask it `VERSION` once, cache its answer in the state dir keyed by the binary's
//! path, size and mtime, and talk to it in the newest version both sides speak.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use evio_cni_types::config::{NetConf, check_plugin_type};
use evio_cni_types::env::Env;
use evio_cni_types::version::{self, negotiate, parse_version_info};
use evio_cni_types::{CniError, ErrorCode};
use serde_json::{Value, json};

/// A delegate plugin binary and the version we talk to it in.
pub struct Delegate {
    pub path: PathBuf,
    pub version: String,
}

/// Finds `kind` on `CNI_PATH`. Code 50-ish situations (missing) are reported as code 5 with a clear text,
/// except for STATUS which maps it itself.
pub fn find(kind: &str, env: &Env) -> Result<PathBuf, CniError> {
    check_plugin_type(kind)
        .map_err(|e| CniError::with_details(ErrorCode::InvalidConfig, "invalid ipam.type", e))?;
    for dir in &env.path {
        let p = Path::new(dir).join(kind);
        if let Ok(m) = std::fs::metadata(&p)
            && m.is_file()
            && m.mode() & 0o111 != 0
        {
            return Ok(p);
        }
    }
    Err(CniError::with_details(
        ErrorCode::Io,
        format!("failed to find plugin {kind:?} in CNI_PATH"),
        format!("searched {:?}", env.path),
    ))
}

fn cache_file(state_dir: &Path, kind: &str) -> PathBuf {
    state_dir.join("delegates").join(format!("{kind}.json"))
}

/// The versions the delegate at `path` supports (cached).
fn supported_versions(path: &Path, kind: &str, state_dir: &Path) -> Result<Vec<String>, CniError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| CniError::with_details(ErrorCode::Io, "stat delegate", e.to_string()))?;
    let stamp = json!({"path": path, "size": meta.size(), "mtime": meta.mtime(), "mtimeNs": meta.mtime_nsec()});
    let cf = cache_file(state_dir, kind);
    if let Ok(b) = std::fs::read(&cf)
        && let Ok(v) = serde_json::from_slice::<Value>(&b)
        && v.get("stamp") == Some(&stamp)
        && let Some(list) = v.get("versions").and_then(Value::as_array)
    {
        return Ok(list
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect());
    }
    let out = Command::new(path)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                let _ =
                    i.write_all(format!("{{\"cniVersion\":\"{}\"}}", version::LATEST).as_bytes());
            }
            c.wait_with_output()
        })
        .map_err(|e| {
            CniError::with_details(
                ErrorCode::Io,
                format!("cannot run {}", path.display()),
                e.to_string(),
            )
        })?;
    let versions = parse_version_info(&out.stdout)?;
    if let Some(dir) = cf.parent() {
        let _ = std::fs::create_dir_all(dir);
        let tmp = dir.join(format!(".{kind}.{}.tmp", std::process::id()));
        if std::fs::write(
            &tmp,
            json!({"stamp": stamp, "versions": versions}).to_string(),
        )
        .is_ok()
        {
            let _ = std::fs::rename(&tmp, &cf);
        }
    }
    Ok(versions)
}

impl Delegate {
    /// Finds the IPAM plugin of `conf` and the version to talk to it in.
    pub fn ipam(conf: &NetConf, env: &Env) -> Result<Delegate, CniError> {
        let ipam = conf
            .ipam
            .as_ref()
            .ok_or_else(|| CniError::new(ErrorCode::InvalidConfig, "no ipam section"))?;
        let path = find(&ipam.kind, env)?;
        let theirs = supported_versions(&path, &ipam.kind, &conf.state_dir)?;
        let version = negotiate(&conf.cni_version, &theirs)?;
        Ok(Delegate { path, version })
    }

    /// Starts `command` with `stdin` (config bytes), overriding the attachment variables when given.
    pub fn spawn(
        &self,
        command: &str,
        stdin: &[u8],
        attachment: Option<(&str, &str)>,
    ) -> Result<Child, CniError> {
        let mut c = Command::new(&self.path);
        c.env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((cid, ifname)) = attachment {
            c.env("CNI_CONTAINERID", cid).env("CNI_IFNAME", ifname);
        }
        let mut child = c.spawn().map_err(|e| {
            CniError::with_details(
                ErrorCode::Io,
                format!("cannot run {}", self.path.display()),
                e.to_string(),
            )
        })?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin).map_err(|e| {
                CniError::with_details(ErrorCode::Io, "write to delegate", e.to_string())
            })?;
        }
        Ok(child)
    }

    /// Waits for a started delegate: its stdout on success, its CNI error otherwise.
    pub fn finish(&self, child: Child, command: &str) -> Result<Vec<u8>, CniError> {
        let out = child.wait_with_output().map_err(|e| {
            CniError::with_details(ErrorCode::Io, "wait for delegate", e.to_string())
        })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
            && let Some(code) = v.get("code").and_then(Value::as_u64)
        {
            let msg = v.get("msg").and_then(Value::as_str).unwrap_or("");
            let details = v.get("details").and_then(Value::as_str).unwrap_or("");
            return Err(CniError::raw(
                code as u32,
                format!("{name} {command}: {msg}"),
                details,
            ));
        }
        Err(CniError::with_details(
            ErrorCode::Delegate,
            format!("{name} {command} failed ({})", out.status),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string(),
        ))
    }
}
