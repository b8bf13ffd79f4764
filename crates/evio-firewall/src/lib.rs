//! IP masquerade for pod traffic leaving the cluster, with nftables, in evio's own table `inet evio_cni`:
//!
//! ```text
//! table inet evio_cni {
//!   set pods4    { type ipv4_addr; }                             # one element per pod address,
//!   set pods6    { type ipv6_addr; }                             #   comment = attachment key
//!   set nomasq4  { type ipv4_addr; flags interval; auto-merge; } # pod subnets, cluster CIDRs, multicast
//!   set nomasq6  { type ipv6_addr; flags interval; auto-merge; }
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr @pods4 ip daddr != @nomasq4 masquerade
//!     ip6 saddr @pods6 ip6 daddr != @nomasq6 masquerade }
//! }
//! ```
//!
//! Every pod address is a set element whose comment is the attachment key (network, container id, ifname),
//! so DEL removes exactly its own entries (by address when it knows them, else by listing the key, which
//! needs neither the netns nor any state) and GC removes the entries of attachments no longer valid.
//!
//! The plugin uses this through the [`Firewall`] trait; [`Nftables`] is the one implementation. It talks to
//! the kernel in two ways, each for what it does best, and keeps one cache:
//!
//! - `nft -f -` scripts (this module): declaring the table, sets and chain, and the fallback for every
//!   change. One run is one atomic transaction, safe under concurrent plugin invocations (the kernel
//!   serialises nftables transactions; table, sets and chain are declared idempotently and the chain's two
//!   rules are flushed and re-added in the same transaction). `nft -j list` reads the entries (GC, DEL
//!   without state, CHECK).
//! - nfnetlink batches (`nfnl`): the per-pod fast path, adding or removing set elements in one message
//!   batch on a netlink socket, well under a millisecond where an `nft` run costs 3-20 ms (process start
//!   and its own netlink cache; docs/bench/cni.md). The socket is `netlink-sys`'s (no `unsafe` here);
//!   the message encoding is this crate's, safe code.
//! - the marker-file cache (`marker`): tells ADD whether the table already holds every no-masquerade CIDR
//!   it needs, so the fast path can be taken; a wrong or missing marker only costs one `nft` run.
//!
//! Dependencies: `serde_json` reads `nft -j` listings; `ipnet` for CIDRs; `netlink-sys` for the netlink
//! socket (already in the workspace through `evio-netlink`); `libc` for errno and flag constants.

mod marker;
mod nfnl;

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::Value;

pub const TABLE: &str = "evio_cni";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run nft ({path}): {source}")]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("nft failed: {0}")]
    Nft(String),
    #[error("cannot read nft's listing: {0}")]
    Decode(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The attachment key stored as element comment: `evio <network> <container id> <ifname>`, shortened with
/// a hash when longer than nftables' 127-byte comment limit.
pub fn attachment_key(network: &str, container_id: &str, ifname: &str) -> String {
    let full = format!("{} {container_id} {ifname}", network_prefix(network));
    if full.len() <= 127 {
        return full;
    }
    format!(
        "{} h{:016x}",
        network_prefix(network),
        fnv1a(&[container_id.as_bytes(), b"\0", ifname.as_bytes()])
    )
}

/// The prefix every key of `network` starts with (used by GC).
pub fn network_prefix(network: &str) -> String {
    if network.len() <= 60 {
        format!("evio {network}")
    } else {
        format!("evio h{:016x}", fnv1a(&[network.as_bytes()]))
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// The `nft` binary: the usual sbin locations first (plugins often run with a short PATH), then PATH.
fn nft_path() -> PathBuf {
    for p in ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nft")
}

fn set_names(ip: &IpAddr) -> (&'static str, &'static str) {
    if ip.is_ipv4() {
        ("pods4", "nomasq4")
    } else {
        ("pods6", "nomasq6")
    }
}

fn skeleton() -> String {
    format!(
        "add table inet {TABLE}\n\
         add set inet {TABLE} pods4 {{ type ipv4_addr; }}\n\
         add set inet {TABLE} pods6 {{ type ipv6_addr; }}\n\
         add set inet {TABLE} nomasq4 {{ type ipv4_addr; flags interval; auto-merge; }}\n\
         add set inet {TABLE} nomasq6 {{ type ipv6_addr; flags interval; auto-merge; }}\n\
         add element inet {TABLE} nomasq4 {{ 224.0.0.0/4, 255.255.255.255/32 }}\n\
         add element inet {TABLE} nomasq6 {{ ff00::/8 }}\n\
         add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {TABLE} postrouting\n\
         add rule inet {TABLE} postrouting ip saddr @pods4 ip daddr != @nomasq4 masquerade comment \"evio-cni: pods leaving the cluster\"\n\
         add rule inet {TABLE} postrouting ip6 saddr @pods6 ip6 daddr != @nomasq6 masquerade comment \"evio-cni: pods leaving the cluster\"\n"
    )
}

fn quote(comment: &str) -> String {
    // Keys are built from checked names (no quotes or control characters); strip anything odd anyway.
    comment
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .collect()
}

/// A masquerade change in progress (an `nft` run, so the caller can do other work meanwhile), or already
/// done (the netlink fast path).
pub struct Pending {
    child: Option<std::process::Child>,
    /// After a successful full run: record the no-masquerade CIDRs now in the table (`cache_dir`, CIDRs).
    marker: Option<(PathBuf, Vec<IpNet>)>,
}

impl Pending {
    /// A change already made (nothing to wait for): what the netlink fast path returns, and what a
    /// [`Firewall`] that is not nftables (a test double) hands back.
    pub fn done() -> Pending {
        Pending {
            child: None,
            marker: None,
        }
    }

    /// True when the change was already made through netlink (no `nft` run).
    pub fn is_done(&self) -> bool {
        self.child.is_none()
    }

    /// Waits for the transaction; its error text when it failed.
    pub fn wait(self) -> Result<()> {
        let Some(child) = self.child else {
            return Ok(());
        };
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Nft(e.to_string()))?;
        if !out.status.success() {
            return Err(Error::Nft(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        if let Some((dir, cidrs)) = self.marker
            && let Ok(mut nl) = nfnl::Nfnl::open()
            && let Ok(Some(h)) = nl.table_handle(TABLE)
        {
            marker::record(&dir, h, &cidrs);
        }
        Ok(())
    }
}

/// Starts `nft -f -` with `script` as one transaction.
fn spawn_script(script: &str) -> Result<Pending> {
    let path = nft_path();
    let mut child = Command::new(&path)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Spawn {
            path: path.display().to_string(),
            source: e,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| Error::Nft(e.to_string()))?;
    }
    Ok(Pending {
        child: Some(child),
        marker: None,
    })
}

/// Runs `nft -f -` with `script` as one transaction.
fn run_script(script: &str) -> Result<()> {
    spawn_script(script)?.wait()
}

/// The script that adds masquerade entries for `ips` of attachment `key`, with `no_masq` destinations.
pub fn add_script(key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> String {
    let mut s = skeleton();
    for n in no_masq {
        let (_, nm) = set_names(&n.addr());
        s.push_str(&format!(
            "add element inet {TABLE} {nm} {{ {} }}\n",
            n.trunc()
        ));
    }
    for ip in ips {
        let (pods, _) = set_names(ip);
        // add + delete + add: replaces a stale element for the same address (with another key) atomically.
        s.push_str(&format!("add element inet {TABLE} {pods} {{ {ip} }}\n"));
        s.push_str(&format!("delete element inet {TABLE} {pods} {{ {ip} }}\n"));
        s.push_str(&format!(
            "add element inet {TABLE} {pods} {{ {ip} comment \"{}\" }}\n",
            quote(key)
        ));
    }
    s
}

/// Masquerades traffic from `ips` (one attachment, `key`) to anything outside `no_masq`, multicast and
/// broadcast. One `nft` run.
pub fn add(key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<()> {
    run_script(&add_script(key, ips, no_masq))
}

/// Like [`add`], fast: when our table already holds every CIDR of `no_masq` (a marker in `cache_dir`
/// says so for this incarnation of the table) the pod entries are changed with one nfnetlink batch (well
/// under a millisecond); otherwise the full `nft` transaction starts and this returns while it runs.
pub fn start_add(
    cache_dir: &Path,
    key: &str,
    ips: &[IpAddr],
    no_masq: &[IpNet],
) -> Result<Pending> {
    let mut all: Vec<IpNet> = no_masq.iter().map(IpNet::trunc).collect();
    all.sort();
    all.dedup();
    if let Ok(mut nl) = nfnl::Nfnl::open()
        && let Ok(Some(h)) = nl.table_handle(TABLE)
        && marker::has(cache_dir, h, &all)
    {
        use nfnl::{Elem, Op};
        // Usually the address is new: one exclusive add. If a stale element holds it (a leak, another key),
        // replace it: add + delete + add in one batch.
        let excl: Vec<_> = ips
            .iter()
            .map(|ip| {
                (
                    Elem {
                        set: set_names(ip).0,
                        ip: *ip,
                        comment: Some(key),
                    },
                    Op::AddExcl,
                )
            })
            .collect();
        let done = match nl.batch(TABLE, &excl) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // An element of that address exists (a stale entry): replace it with ours.
                let mut ops = remove_ops(ips);
                ops.extend(ips.iter().map(|ip| {
                    let elem = Elem {
                        set: set_names(ip).0,
                        ip: *ip,
                        comment: Some(key),
                    };
                    (elem, Op::Add)
                }));
                nl.batch(TABLE, &ops).is_ok()
            }
            Err(_) => false,
        };
        if done {
            return Ok(Pending {
                child: None,
                marker: None,
            });
        }
    }
    let mut p = spawn_script(&add_script(key, ips, &all))?;
    p.marker = Some((cache_dir.to_path_buf(), all));
    Ok(p)
}

/// nfnetlink operations that remove the elements of `ips` whether they exist or not: an add, then a delete
/// of each.
fn remove_ops(ips: &[IpAddr]) -> Vec<(nfnl::Elem<'static>, nfnl::Op)> {
    let mut ops = Vec::with_capacity(2 * ips.len());
    for ip in ips {
        for op in [nfnl::Op::Add, nfnl::Op::Delete] {
            let elem = nfnl::Elem {
                set: set_names(ip).0,
                ip: *ip,
                comment: None,
            };
            ops.push((elem, op));
        }
    }
    ops
}

fn remove_script(ips: &[IpAddr]) -> String {
    // Declaring the table and sets first makes the removal succeed when they (or the elements) are gone.
    let mut s = format!(
        "add table inet {TABLE}\n\
         add set inet {TABLE} pods4 {{ type ipv4_addr; }}\n\
         add set inet {TABLE} pods6 {{ type ipv6_addr; }}\n"
    );
    for ip in ips {
        let (pods, _) = set_names(ip);
        s.push_str(&format!("add element inet {TABLE} {pods} {{ {ip} }}\n"));
        s.push_str(&format!("delete element inet {TABLE} {pods} {{ {ip} }}\n"));
    }
    s
}

/// Removes the entries for `ips` (whatever their state: missing entries are fine). One `nft` run.
pub fn remove(ips: &[IpAddr]) -> Result<()> {
    if ips.is_empty() {
        return Ok(());
    }
    // Fast path: one nfnetlink batch (add + delete of each element, so a missing one is fine); a missing
    // table or set (ENOENT) means there is nothing to remove.
    if let Ok(mut nl) = nfnl::Nfnl::open() {
        match nl.batch(TABLE, &remove_ops(ips)) {
            Ok(()) => {
                // Closing the socket waits for the kernel to destroy the deleted elements (an RCU grace
                // period): let a helper thread do that so the caller goes on at once.
                std::thread::spawn(move || drop(nl));
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(_) => {}
        }
    }
    run_script(&remove_script(ips))
}

/// Every pod entry: address and key (comment).
pub fn list() -> Result<Vec<(IpAddr, String)>> {
    let path = nft_path();
    let out = Command::new(&path)
        .args(["-j", "list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Spawn {
            path: path.display().to_string(),
            source: e,
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(Vec::new());
        }
        return Err(Error::Nft(err.trim().to_string()));
    }
    parse_listing(&out.stdout)
}

/// Reads the pod entries out of `nft -j list table inet evio_cni`.
pub fn parse_listing(json: &[u8]) -> Result<Vec<(IpAddr, String)>> {
    let v: Value = serde_json::from_slice(json).map_err(|e| Error::Decode(e.to_string()))?;
    let mut out = Vec::new();
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for item in items {
        let Some(set) = item.get("set") else { continue };
        let name = set.get("name").and_then(Value::as_str).unwrap_or("");
        if name != "pods4" && name != "pods6" {
            continue;
        }
        for e in set
            .get("elem")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let (val, comment) = match &e {
                Value::String(s) => (s.clone(), String::new()),
                Value::Object(o) => {
                    let inner = o.get("elem").unwrap_or(&e);
                    (
                        inner
                            .get("val")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        inner
                            .get("comment")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )
                }
                _ => continue,
            };
            if let Ok(ip) = val.parse::<IpAddr>() {
                out.push((ip, comment));
            }
        }
    }
    Ok(out)
}

/// Removes every entry tagged `key` (when the caller does not know the addresses). Returns how many.
pub fn remove_key(key: &str) -> Result<usize> {
    let ips: Vec<IpAddr> = list()?
        .into_iter()
        .filter(|(_, k)| k == key)
        .map(|(ip, _)| ip)
        .collect();
    remove(&ips)?;
    Ok(ips.len())
}

/// CNI GC: removes the entries of network `network` whose key is not in `valid_keys`. Returns how many.
pub fn gc(network: &str, valid_keys: &HashSet<String>) -> Result<usize> {
    let prefix = format!("{} ", network_prefix(network));
    let stale: Vec<IpAddr> = list()?
        .into_iter()
        .filter(|(_, k)| k.starts_with(&prefix) && !valid_keys.contains(k))
        .map(|(ip, _)| ip)
        .collect();
    remove(&stale)?;
    Ok(stale.len())
}

/// The masquerade entries of CNI attachments: the one interface the plugin uses, so the plugin's verbs can
/// be run against a recording double. [`Nftables`] is the implementation.
pub trait Firewall: Send + Sync {
    /// Starts adding the entries of attachment `key` (see [`start_add`]).
    fn start_add(
        &self,
        cache_dir: &Path,
        key: &str,
        ips: &[IpAddr],
        no_masq: &[IpNet],
    ) -> Result<Pending>;
    /// Removes the entries of `ips`, present or not (see [`remove`]).
    fn remove(&self, ips: &[IpAddr]) -> Result<()>;
    /// Removes every entry tagged `key` (see [`remove_key`]).
    fn remove_key(&self, key: &str) -> Result<usize>;
    /// Every pod entry: address and key (see [`list`]).
    fn list(&self) -> Result<Vec<(IpAddr, String)>>;
    /// Removes the entries of `network` whose key is not in `valid_keys` (see [`gc`]).
    fn gc(&self, network: &str, valid_keys: &HashSet<String>) -> Result<usize>;
}

/// evio's nftables table `inet evio_cni` (this module's functions).
#[derive(Debug, Clone, Copy, Default)]
pub struct Nftables;

impl Firewall for Nftables {
    fn start_add(
        &self,
        cache_dir: &Path,
        key: &str,
        ips: &[IpAddr],
        no_masq: &[IpNet],
    ) -> Result<Pending> {
        start_add(cache_dir, key, ips, no_masq)
    }
    fn remove(&self, ips: &[IpAddr]) -> Result<()> {
        remove(ips)
    }
    fn remove_key(&self, key: &str) -> Result<usize> {
        remove_key(key)
    }
    fn list(&self) -> Result<Vec<(IpAddr, String)>> {
        list()
    }
    fn gc(&self, network: &str, valid_keys: &HashSet<String>) -> Result<usize> {
        gc(network, valid_keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fit_nft_comments() {
        let k = attachment_key("evio", "abc", "eth0");
        assert_eq!(k, "evio evio abc eth0");
        let long = "a".repeat(120);
        let k = attachment_key("net", &long, "eth0");
        assert!(k.len() <= 127 && k.starts_with("evio net "), "{k}");
        assert_ne!(k, attachment_key("net", &long, "eth1"));
        let k = attachment_key(&"n".repeat(100), "c", "eth0");
        assert!(k.starts_with(&network_prefix(&"n".repeat(100))) && k.len() <= 127);
    }

    #[test]
    fn scripts() {
        let s = add_script(
            "evio n c eth0",
            &["10.1.0.5".parse().unwrap()],
            &["10.1.0.7/24".parse().unwrap()],
        );
        assert!(s.contains("add element inet evio_cni nomasq4 { 10.1.0.0/24 }"));
        assert!(
            s.contains("add element inet evio_cni pods4 { 10.1.0.5 comment \"evio n c eth0\" }")
        );
        let s = remove_script(&["fd00::5".parse().unwrap()]);
        assert!(s.contains("delete element inet evio_cni pods6 { fd00::5 }"));
    }

    #[test]
    fn listing() {
        let j = br#"{"nftables":[{"metainfo":{}},{"set":{"family":"inet","name":"pods4","table":"evio_cni",
            "type":"ipv4_addr","elem":[{"elem":{"val":"10.0.0.5","comment":"evio n a eth0"}},"10.0.0.6"]}},
            {"set":{"name":"nomasq4","elem":[{"prefix":{"addr":"10.0.0.0","len":24}}]}}]}"#;
        let l = parse_listing(j).unwrap();
        assert_eq!(
            l,
            vec![
                ("10.0.0.5".parse().unwrap(), "evio n a eth0".into()),
                ("10.0.0.6".parse().unwrap(), String::new())
            ]
        );
        assert!(parse_listing(b"x").is_err());
    }
}
