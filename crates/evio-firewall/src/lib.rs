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
//! the kernel in two ways, and keeps no cache of its own:
//!
//! - nfnetlink (`nfnl`), for everything a pod does: adding or removing its set elements in one message
//!   batch, listing the elements with their comments (GC, DEL without state, CHECK), and reading the
//!   no-masquerade sets to know whether they already hold every CIDR an ADD needs. Well under a
//!   millisecond where an `nft` run costs 3-20 ms (process start and its own netlink cache;
//!   docs/bench/cni.md). The socket is `netlink-sys`'s (no `unsafe` here); the message encoding is this
//!   crate's, safe code.
//! - one `nft -f -` script (this module) declaring the table, its sets (with the no-masquerade CIDRs) and
//!   the chain with its two rules, run when the table or a CIDR is missing, and the fallback for every
//!   change when netlink fails. One run is one atomic transaction, safe under concurrent plugin
//!   invocations (the kernel serialises nftables transactions; table, sets and chain are declared
//!   idempotently and the chain's two rules are flushed and re-added in the same transaction). Declaring
//!   rules (expressions, interval sets with nft's auto-merge) through netlink too is not done: it would
//!   make this crate an nft compiler.
//!
//! (A marker-file cache, keyed by boot, netns and table handle, used to tell ADD whether the table held
//! its CIDRs; the sets themselves now say so.)
//!
//! Dependencies: `ipnet` for CIDRs; `netlink-sys` for the netlink socket (already in the workspace through
//! `evio-netlink`); `libc` for errno and flag constants.

mod nfnl;

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ipnet::IpNet;

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
}

impl Pending {
    /// A change already made (nothing to wait for): what the netlink fast path returns, and what a
    /// [`Firewall`] that is not nftables (a test double) hands back.
    pub fn done() -> Pending {
        Pending { child: None }
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
    Ok(Pending { child: Some(child) })
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

/// Like [`add`], fast: when our table's no-masquerade sets already hold every CIDR of `no_masq` (read
/// through netlink) the pod entries are changed with one nfnetlink batch (well under a millisecond);
/// otherwise the full `nft` transaction starts and this returns while it runs.
pub fn start_add(key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<Pending> {
    let mut all: Vec<IpNet> = no_masq.iter().map(IpNet::trunc).collect();
    all.sort();
    all.dedup();
    if let Ok(mut nl) = nfnl::Nfnl::open()
        && holds_no_masq(&mut nl, &all)
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
            return Ok(Pending::done());
        }
    }
    spawn_script(&add_script(key, ips, &all))
}

/// True if the no-masquerade sets of our table (and so the table) exist and every CIDR of `cidrs` lies
/// inside one of their intervals (nft merges overlapping ones).
fn holds_no_masq(nl: &mut nfnl::Nfnl, cidrs: &[IpNet]) -> bool {
    for (set, v6) in [("nomasq4", false), ("nomasq6", true)] {
        let need: Vec<(u128, u128)> = cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V6(_)) == v6)
            .map(|c| (addr_bits(&c.network()), addr_bits(&c.broadcast())))
            .collect();
        if need.is_empty() && v6 {
            continue;
        }
        // The IPv4 set is read even when no IPv4 CIDR is needed: its absence means no table.
        let Ok(Some(elems)) = nl.set_elements(TABLE, set) else {
            return false;
        };
        let ivs = intervals(&elems, if v6 { 128 } else { 32 });
        if !need
            .iter()
            .all(|(lo, hi)| ivs.iter().any(|(s, last)| s <= lo && hi <= last))
        {
            return false;
        }
    }
    true
}

fn addr_bits(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

/// The intervals `[first, last]` of an interval set's elements as the kernel lists them: a start element,
/// and an end element (flag `INTERVAL_END`) at the first address after the interval; an interval reaching
/// the top of the address space (`ff00::/8`, `255.255.255.255/32`) has no end element.
fn intervals(elems: &[nfnl::Listed], width: u32) -> Vec<(u128, u128)> {
    let mut keyed: Vec<(u128, bool)> = elems
        .iter()
        .filter(|e| e.key.len() * 8 == width as usize)
        .map(|e| {
            let k = e.key.iter().fold(0u128, |a, b| (a << 8) | u128::from(*b));
            (k, e.flags & nfnl::ELEM_INTERVAL_END != 0)
        })
        .collect();
    keyed.sort();
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (k, end) in keyed {
        match (end, open) {
            (false, None) => open = Some(k),
            (true, Some(s)) if k > s => {
                out.push((s, k - 1));
                open = None;
            }
            // An end without a start (nft's leading 0 end marker), or a start after a start: keep the
            // first start.
            _ => {}
        }
    }
    if let Some(s) = open {
        out.push((s, u128::MAX >> (128 - width)));
    }
    out
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

/// Every pod entry: address and key (comment), read through netlink.
pub fn list() -> Result<Vec<(IpAddr, String)>> {
    let mut nl = nfnl::Nfnl::open().map_err(|e| Error::Nft(format!("netlink: {e}")))?;
    let mut out = Vec::new();
    for set in ["pods4", "pods6"] {
        let elems = nl
            .set_elements(TABLE, set)
            .map_err(|e| Error::Nft(format!("listing {set}: {e}")))?
            .unwrap_or_default();
        for e in elems {
            let ip = match e.key.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(e.key.as_slice()).expect("4 bytes")),
                16 => IpAddr::from(<[u8; 16]>::try_from(e.key.as_slice()).expect("16 bytes")),
                _ => continue,
            };
            out.push((ip, e.comment.unwrap_or_default()));
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
    fn start_add(&self, key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<Pending>;
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
    fn start_add(&self, key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<Pending> {
        start_add(key, ips, no_masq)
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
    fn interval_sets_are_read_as_nft_wrote_them() {
        let e = |k: [u8; 4], end: bool| nfnl::Listed {
            key: k.to_vec(),
            flags: if end { nfnl::ELEM_INTERVAL_END } else { 0 },
            comment: None,
        };
        // nft's leading end marker at 0, 10.0.0.0/8, 224.0.0.0/4 and 255.255.255.255/32 (no end: the top),
        // in the kernel's (descending) order.
        let elems = [
            e([255, 255, 255, 255], false),
            e([240, 0, 0, 0], true),
            e([224, 0, 0, 0], false),
            e([11, 0, 0, 0], true),
            e([10, 0, 0, 0], false),
            e([0, 0, 0, 0], true),
        ];
        let ivs = intervals(&elems, 32);
        let b = |a: [u8; 4]| u128::from(u32::from_be_bytes(a));
        assert_eq!(
            ivs,
            vec![
                (b([10, 0, 0, 0]), b([10, 255, 255, 255])),
                (b([224, 0, 0, 0]), b([239, 255, 255, 255])),
                (b([255, 255, 255, 255]), b([255, 255, 255, 255])),
            ]
        );
        // IPv6: ff00::/8 reaches the top of the space.
        let top = nfnl::Listed {
            key: vec![0xff; 1].into_iter().chain([0u8; 15]).collect(),
            flags: 0,
            comment: None,
        };
        assert_eq!(intervals(&[top], 128), vec![(0xffu128 << 120, u128::MAX)]);
    }
}
