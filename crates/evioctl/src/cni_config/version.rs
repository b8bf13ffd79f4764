//! The conflist's `cniVersion`: one that every plugin of the chain and the runtime accept.
//!
//! A runtime cannot be asked which versions it takes, and the newest one is not what most nodes run:
//! containerd 1.6/1.7 (libcni 1.1), CRI-O and podman 4 refuse a 1.1.0 conflist ("unsupported CNI result
//! version"), and so do the reference plugins 1.1.x (portmap). So when the net-conf names no version, the
//! conflist gets the newest version that evio-cni and every chained plugin found answer to `VERSION`, never
//! above [`DEFAULT_MAX`]. A version the net-conf names is checked against the same answers and refused
//! when a plugin does not speak it, before anything is claimed or written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use evio_cni_types::version::{SUPPORTED, Version, parse_version_info};

/// The newest version chosen when the net-conf names none: what containerd 1.6/1.7, CRI-O and podman 4
/// accept. A net-conf may still ask for 1.1.0 where the runtime takes it.
pub const DEFAULT_MAX: &str = "1.0.0";

/// How long a plugin may take to answer `VERSION` (the reference plugins answer in milliseconds).
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A plugin of the chain and the versions it said it speaks (`None`: not found, so not asked).
#[derive(Debug)]
pub struct PluginVersions {
    pub name: String,
    pub path: Option<PathBuf>,
    pub supported: Option<Vec<String>>,
}

/// The conflist's version: `named` (the net-conf's) if every plugin found speaks it, otherwise the newest
/// version evio-cni speaks, not above [`DEFAULT_MAX`], that every plugin found speaks.
pub fn choose(named: Option<&str>, plugins: &[PluginVersions]) -> Result<String> {
    let speaks = |p: &PluginVersions, v: &str| {
        p.supported
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == v))
    };
    if let Some(v) = named {
        for p in plugins {
            if !speaks(p, v) {
                bail!(
                    "cniVersion {v} in the net-conf is not supported by the {} plugin ({} speaks {}); \
                     name one it speaks, or leave cniVersion out to have it chosen",
                    p.name,
                    p.path.as_deref().unwrap_or(Path::new("?")).display(),
                    p.supported.as_deref().unwrap_or_default().join(", ")
                );
            }
        }
        return Ok(v.to_string());
    }
    let max = Version::parse(DEFAULT_MAX).expect("DEFAULT_MAX is a version");
    SUPPORTED
        .iter()
        .rev()
        .filter(|v| Version::parse(v).is_some_and(|x| x <= max))
        .find(|v| plugins.iter().all(|p| speaks(p, v)))
        .map(|v| v.to_string())
        .ok_or_else(|| {
            let list: Vec<String> = plugins
                .iter()
                .filter_map(|p| {
                    p.supported
                        .as_ref()
                        .map(|s| format!("{} speaks {}", p.name, s.join(", ")))
                })
                .collect();
            anyhow!(
                "no CNI version up to {DEFAULT_MAX} is spoken by every plugin of the chain ({})",
                list.join("; ")
            )
        })
}

/// Asks `name` for its versions: the binary at `exe` if given, else the first `name` on `search`.
pub fn ask(name: &str, exe: Option<&Path>, search: &[PathBuf]) -> Result<PluginVersions> {
    let path = match exe {
        Some(p) => Some(p.to_path_buf()),
        None => search.iter().map(|d| d.join(name)).find(|p| p.is_file()),
    };
    let supported = match &path {
        Some(p) => Some(version_of(p).with_context(|| {
            format!(
                "cannot ask the {name} plugin {} which CNI versions it speaks",
                p.display()
            )
        })?),
        None => None,
    };
    Ok(PluginVersions {
        name: name.to_string(),
        path,
        supported,
    })
}

/// Runs `exe` with `CNI_COMMAND=VERSION` (CNI spec: stdin holds a config's `cniVersion`) and parses its
/// `supportedVersions`.
fn version_of(exe: &Path) -> Result<Vec<String>> {
    let spawn = || {
        Command::new(exe)
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // "Text file busy": a binary just written (being installed, or its writer's descriptor still held
    // by a process forked meanwhile) cannot be executed for a moment. Retried, as libcni does.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20 * tries));
            }
            r => break r.context("cannot run it")?,
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that does not read stdin closes the pipe: not an error.
        let _ = stdin.write_all(format!(r#"{{"cniVersion":"{DEFAULT_MAX}"}}"#).as_bytes());
    }
    let deadline = Instant::now() + VERSION_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer to VERSION within {VERSION_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "VERSION failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_version_info(&out.stdout).map_err(|e| {
        anyhow!(
            "{e}: {}",
            String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(200)])
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, v: Option<&[&str]>) -> PluginVersions {
        PluginVersions {
            name: name.into(),
            path: Some(PathBuf::from(format!("/x/{name}"))),
            supported: v.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    const REFERENCE: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"];

    #[test]
    fn default_is_the_newest_common_version_up_to_1_0_0() {
        // evio-cni speaks 1.1.0, the chained plugins too: still 1.0.0 (the runtime cannot be asked).
        let all = [
            p("evio-cni", Some(SUPPORTED)),
            p("portmap", Some(SUPPORTED)),
        ];
        assert_eq!(choose(None, &all).unwrap(), "1.0.0");
        // The reference plugins 1.1.1.
        let refs = [
            p("evio-cni", Some(SUPPORTED)),
            p("portmap", Some(REFERENCE)),
        ];
        assert_eq!(choose(None, &refs).unwrap(), "1.0.0");
        // An old portmap.
        let old = [
            p("evio-cni", Some(SUPPORTED)),
            p("portmap", Some(&["0.3.0", "0.3.1", "0.4.0"])),
        ];
        assert_eq!(choose(None, &old).unwrap(), "0.4.0");
        // A plugin not found is not asked.
        let missing = [p("evio-cni", Some(SUPPORTED)), p("portmap", None)];
        assert_eq!(choose(None, &missing).unwrap(), "1.0.0");
        // No common version.
        let none = [
            p("evio-cni", Some(SUPPORTED)),
            p("portmap", Some(&["0.2.0"])),
        ];
        let e = choose(None, &none).unwrap_err().to_string();
        assert!(e.contains("portmap speaks 0.2.0"), "{e}");
    }

    #[test]
    fn a_named_version_must_be_spoken_by_every_plugin() {
        let refs = [
            p("evio-cni", Some(SUPPORTED)),
            p("portmap", Some(REFERENCE)),
        ];
        assert_eq!(choose(Some("0.4.0"), &refs).unwrap(), "0.4.0");
        let e = choose(Some("1.1.0"), &refs).unwrap_err().to_string();
        assert!(
            e.contains("1.1.0") && e.contains("portmap") && e.contains("/x/portmap"),
            "{e}"
        );
        let all = [
            p("evio-cni", Some(SUPPORTED)),
            p("portmap", Some(SUPPORTED)),
        ];
        assert_eq!(choose(Some("1.1.0"), &all).unwrap(), "1.1.0");
    }
}
