//! Cleaning up after a demo that could not clean up itself (killed with SIGKILL, machine-wide OOM kill):
//! its namespaces are named `evdemo<pid-hex>x<n>-…`, so a later demo finds those whose process is gone,
//! kills what still runs in them (etcd and coturn in the internet namespace; the agents already died with
//! the demo through PR_SET_PDEATHSIG), removes the lab temp dirs those processes name on their command
//! lines, deletes the namespaces and removes the dead demo's own temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The namespace prefix base of every demo.
pub const BASE: &str = "evdemo";

/// The pid encoded in a demo namespace name (`evdemo<hex>x<n>-rest`).
fn pid_of(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(BASE)?;
    let (hex, tail) = rest.split_once('x')?;
    let (n, _) = tail.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    i32::from_str_radix(hex, 16).ok()
}

fn alive(pid: i32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn netns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Lab temp dirs (`evio-lab*`, made by the dead demo's lab) named on a process's command line. Any
/// parent: the dead demo may have had another TMPDIR.
fn lab_dirs_of(pid: i32) -> Vec<PathBuf> {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for arg in cmd.split(|&b| b == 0) {
        let p = Path::new(std::str::from_utf8(arg).unwrap_or(""));
        for a in p.ancestors() {
            if a.parent().is_some_and(|p| p.is_absolute())
                && a.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("evio-lab"))
            {
                dirs.push(a.to_path_buf());
            }
        }
    }
    dirs
}

/// Removes what dead demos left behind; returns a line per thing removed.
pub fn remove_stale() -> Vec<String> {
    let mut done = Vec::new();
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
        return done;
    };
    let tmp = std::env::temp_dir();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut dead = std::collections::BTreeSet::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = pid_of(name) else { continue };
        if alive(pid) {
            continue;
        }
        dead.insert(pid);
        for p in netns_pids(name) {
            for d in lab_dirs_of(p) {
                if std::fs::remove_dir_all(&d).is_ok() {
                    done.push(format!("removed {}", d.display()));
                }
            }
            evio_testbed::lab::kill(p, evio_testbed::lab::Signal::SIGKILL);
        }
        if Command::new("ip")
            .args(["netns", "del", name])
            .status()
            .is_ok_and(|s| s.success())
        {
            done.push(format!("deleted namespace {name}"));
        }
    }
    // The dead demos' own temp dirs (`evio-demo-evdemo<hex>x<n>-*`).
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.filter_map(|e| e.ok()) {
            let f = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = f.strip_prefix("evio-demo-") else {
                continue;
            };
            if pid_of(rest).is_some_and(|p| !alive(p) || dead.contains(&p))
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                done.push(format!("removed {}", e.path().display()));
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_read_from_demo_names_only() {
        assert_eq!(pid_of("evdemo1f2x0-inet"), Some(0x1f2));
        assert_eq!(pid_of("evdemo1f2x0-e1p2"), Some(0x1f2));
        assert_eq!(pid_of("evdemo1f2x0-ABC"), Some(0x1f2));
        assert_eq!(pid_of("evdemo1f2x0"), None);
        assert_eq!(pid_of("evdemozzx0-inet"), None);
        assert_eq!(pid_of("other-inet"), None);
        assert_eq!(pid_of("evdemo1f2x-inet"), None);
    }
}
