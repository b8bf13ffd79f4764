//! The marker-file cache of the ADD fast path: which no-masquerade CIDRs a given incarnation of our table
//! already holds, so an ADD can skip the `nft` transaction that declares them and add its pod element with
//! one nfnetlink batch. One file per incarnation, `<cache dir>/nft-<boot id>-<netns inode>-<table handle>`
//! (the handle is new each time the table is created, so a recreated table is never mistaken for the one a
//! marker describes), one CIDR per line; stale markers are removed when a new one is written. Only
//! [`crate::start_add`] reads it and only [`crate::Pending::wait`] writes it: a missing or wrong marker
//! costs one `nft` run, never a wrong table.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// The marker naming what a given incarnation of our table holds: keyed by boot, network namespace and the
/// table's handle (new each time the table is created), so a recreated or flushed-and-recreated table is
/// never mistaken for ours.
fn path(dir: &Path, handle: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::metadata("/proc/thread-self/ns/net").ok()?.ino();
    Some(dir.join(format!("nft-{}-{ns}-{handle}", boot.trim())))
}

pub(crate) fn has(dir: &Path, handle: u64, cidrs: &[IpNet]) -> bool {
    let Some(p) = path(dir, handle) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(p) else {
        return false;
    };
    cidrs
        .iter()
        .all(|c| text.lines().any(|l| l == c.trunc().to_string()))
}

pub(crate) fn record(dir: &Path, handle: u64, cidrs: &[IpNet]) {
    let Some(p) = path(dir, handle) else {
        return;
    };
    let mut lines: Vec<String> = std::fs::read_to_string(&p)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    for c in cidrs {
        let c = c.trunc().to_string();
        if !lines.contains(&c) {
            lines.push(c);
        }
    }
    let _ = std::fs::create_dir_all(dir);
    // Markers of earlier boots, or of earlier incarnations of the table in this namespace, are stale.
    if let (Some(name), Ok(rd)) = (
        p.file_name().and_then(|n| n.to_str()),
        std::fs::read_dir(dir),
    ) {
        let parts: Vec<&str> = name.split('-').collect();
        let boot = parts.iter().take(6).copied().collect::<Vec<_>>().join("-");
        let boot_ns = parts.iter().take(7).copied().collect::<Vec<_>>().join("-") + "-";
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("nft-")
                && n != name
                && (!n.starts_with(&boot) || n.starts_with(&boot_ns))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tmp = dir.join(format!(
        ".nft-marker.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&tmp, lines.join("\n") + "\n").is_ok() {
        let _ = std::fs::rename(&tmp, &p);
    }
}
