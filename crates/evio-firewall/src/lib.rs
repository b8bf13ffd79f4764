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
//! The plugin uses this through the [`Firewall`] trait; [`Nftables`] is the one implementation, and it
//! talks to the kernel one way: nfnetlink (`nfnl`), on a `netlink-sys` socket (no `unsafe` here; the
//! message encoding is this crate's, safe code). An ADD first reads the no-masquerade sets: when they
//! already hold every CIDR it needs (the usual case, the pod CIDR being the same for every pod of a node),
//! its pod elements are added in one batch; otherwise one transaction declares the table, the four sets,
//! the chain with its two rules (flushed and re-added, so a damaged chain is repaired) and merges the
//! missing CIDRs into the interval sets (as nft's `auto-merge` would: overlapping or adjacent intervals
//! become one; the kernel refuses overlaps), with the pod elements. DEL is one batch (add + delete of each
//! element, so a missing one is fine); GC, DEL without state and CHECK list the pod sets with their
//! comments. Every change is one atomic transaction, safe under concurrent plugin invocations (the kernel
//! serialises them; a merge that raced with another is recomputed and retried). Each takes well under a
//! millisecond where an `nft` run costs 3-20 ms (process start and its own netlink cache;
//! docs/bench/cni.md). The `nft` binary is not used (tests and operators read the table with it).
//!
//! Dependencies: `ipnet` for CIDRs; `netlink-sys` for the netlink socket (already in the workspace through
//! `evio-netlink`); `libc` for errno constants.

mod nfnl;

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;

pub const TABLE: &str = "evio_cni";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nftables: {0}")]
    Nft(String),
}

fn nft_err(what: &str, e: io::Error) -> Error {
    Error::Nft(format!("{what}: {e}"))
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

use nfnl::{Change, Elem, Op, SetSpec};

const POD_SETS: [SetSpec<'static>; 2] = [
    SetSpec {
        name: "pods4",
        v6: false,
        interval: false,
        id: 1,
    },
    SetSpec {
        name: "pods6",
        v6: true,
        interval: false,
        id: 2,
    },
];
const NO_MASQ_SETS: [SetSpec<'static>; 2] = [
    SetSpec {
        name: "nomasq4",
        v6: false,
        interval: true,
        id: 3,
    },
    SetSpec {
        name: "nomasq6",
        v6: true,
        interval: true,
        id: 4,
    },
];
const CHAIN: &str = "postrouting";
const RULE_COMMENT: &str = "evio-cni: pods leaving the cluster";
/// Never masqueraded, whatever the configuration: multicast and broadcast.
const ALWAYS_NO_MASQ: [&str; 3] = ["224.0.0.0/4", "255.255.255.255/32", "ff00::/8"];
/// Attempts of a declaring transaction that raced with another's merge.
const ATTEMPTS: usize = 5;

fn pod_set(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "pods4" } else { "pods6" }
}

fn open() -> Result<nfnl::Nfnl> {
    nfnl::Nfnl::open().map_err(|e| nft_err("netlink socket", e))
}

/// The element changes that make `ips` ours (`key`) whatever was there: add, delete, add with the comment
/// (replaces a stale element of the same address, a leak or another key's, atomically).
fn replace_ops<'a>(key: &'a str, ips: &[IpAddr]) -> Vec<(Elem<'a>, Op)> {
    let mut ops = Vec::with_capacity(3 * ips.len());
    for ip in ips {
        let e = |comment| Elem {
            set: pod_set(ip),
            ip: *ip,
            comment,
        };
        ops.push((e(None), Op::Add));
        ops.push((e(None), Op::Delete));
        ops.push((e(Some(key)), Op::Add));
    }
    ops
}

/// Masquerades traffic from `ips` (one attachment, `key`) to anything outside `no_masq`, multicast and
/// broadcast: one nfnetlink batch when the sets already hold every CIDR of `no_masq`, else one transaction
/// declaring the table and merging the CIDRs in (see the module docs).
pub fn add(key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<()> {
    let mut all: Vec<IpNet> = no_masq.iter().map(IpNet::trunc).collect();
    all.sort();
    all.dedup();
    let mut nl = open()?;
    if holds_no_masq(&mut nl, &all) {
        // Usually the address is new: one exclusive add. If a stale element holds it, replace it.
        let excl: Vec<_> = ips
            .iter()
            .map(|ip| {
                let e = Elem {
                    set: pod_set(ip),
                    ip: *ip,
                    comment: Some(key),
                };
                (e, Op::AddExcl)
            })
            .collect();
        match nl.batch(TABLE, &excl) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if nl.batch(TABLE, &replace_ops(key, ips)).is_ok() {
                    return Ok(());
                }
            }
            // The table went away meanwhile: declare it below.
            Err(_) => {}
        }
    }
    declare(&mut nl, &all, &replace_ops(key, ips))
}

/// One transaction: the table, its sets, the chain and its two rules, `no_masq` (and the multicast and
/// broadcast ranges) merged into the no-masquerade sets, then `pod_ops`. Retried when another plugin's
/// change of the sets raced with ours.
fn declare(nl: &mut nfnl::Nfnl, no_masq: &[IpNet], pod_ops: &[(Elem<'_>, Op)]) -> Result<()> {
    let mut required: Vec<IpNet> = no_masq.to_vec();
    required.extend(
        ALWAYS_NO_MASQ
            .iter()
            .map(|s| s.parse::<IpNet>().expect("valid CIDR")),
    );
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let mut changes = vec![Change::Table];
        changes.extend(
            POD_SETS
                .iter()
                .chain(&NO_MASQ_SETS)
                .map(|s| Change::Set(*s)),
        );
        changes.push(Change::NatPostrouting(CHAIN));
        changes.push(Change::FlushChain(CHAIN));
        for (pods, no_masq) in POD_SETS.iter().zip(&NO_MASQ_SETS) {
            changes.push(Change::MasqRule {
                chain: CHAIN,
                pods: *pods,
                no_masq: *no_masq,
                comment: RULE_COMMENT,
            });
        }
        for set in &NO_MASQ_SETS {
            let width = if set.v6 { 128 } else { 32 };
            let have = match nl.set_elements(TABLE, set.name) {
                Ok(Some(elems)) => intervals(&elems, width),
                Ok(None) => Vec::new(),
                Err(e) => return Err(nft_err(&format!("listing {}", set.name), e)),
            };
            let mut want = have.clone();
            want.extend(
                required
                    .iter()
                    .filter(|c| matches!(c, IpNet::V6(_)) == set.v6)
                    .map(|c| (addr_bits(&c.network()), addr_bits(&c.broadcast()))),
            );
            let want = merge(want);
            for (iv, op) in have
                .iter()
                .filter(|iv| !want.contains(iv))
                .map(|iv| (iv, Op::Delete))
                .chain(
                    want.iter()
                        .filter(|iv| !have.contains(iv))
                        .map(|iv| (iv, Op::Add)),
                )
            {
                for (key, end) in interval_keys(*iv, width) {
                    changes.push(Change::IntervalKey {
                        set: set.name,
                        key,
                        end,
                        op,
                    });
                }
            }
        }
        changes.extend(pod_ops.iter().map(|(e, op)| {
            Change::Elem(
                Elem {
                    set: e.set,
                    ip: e.ip,
                    comment: e.comment,
                },
                *op,
            )
        }));
        match nl.apply(TABLE, &changes) {
            Ok(()) => return Ok(()),
            // Another transaction changed the intervals between our read and our write: read again.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EEXIST)
                        | Some(libc::ENOENT)
                        | Some(libc::ENOTEMPTY)
                        | Some(libc::EBUSY)
                ) =>
            {
                last = Some(e)
            }
            Err(e) => return Err(nft_err("declaring the table", e)),
        }
    }
    Err(nft_err(
        "declaring the table (raced with other changes)",
        last.unwrap_or_else(|| io::Error::other("no attempt")),
    ))
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
    // At one key, an interval's end before the next one's start (adjacent intervals not merged).
    keyed.sort_by_key(|(k, end)| (*k, !*end));
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (k, end) in keyed {
        match (end, open) {
            (false, None) => open = Some(k),
            (true, Some(s)) if k > s => {
                out.push((s, k - 1));
                open = None;
            }
            // An end without a start (nft's leading end marker at 0), or a start after a start: keep
            // the first start.
            _ => {}
        }
    }
    if let Some(s) = open {
        out.push((s, u128::MAX >> (128 - width)));
    }
    out
}

/// `ivs` sorted, overlapping and adjacent intervals merged (nft's `auto-merge`).
fn merge(mut ivs: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ivs.sort();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ivs.len());
    for (s, e) in ivs {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The elements of interval `[first, last]` in a set of `width`-bit keys: its start, and its end (the
/// first key after it) unless it reaches the top.
fn interval_keys((first, last): (u128, u128), width: u32) -> Vec<(Vec<u8>, bool)> {
    let bytes = |k: u128| k.to_be_bytes()[16 - (width as usize / 8)..].to_vec();
    let mut v = vec![(bytes(first), false)];
    if last < u128::MAX >> (128 - width) {
        v.push((bytes(last + 1), true));
    }
    v
}

/// nfnetlink operations that remove the elements of `ips` whether they exist or not: an add, then a delete
/// of each.
fn remove_ops(ips: &[IpAddr]) -> Vec<(Elem<'static>, Op)> {
    let mut ops = Vec::with_capacity(2 * ips.len());
    for ip in ips {
        for op in [Op::Add, Op::Delete] {
            let elem = Elem {
                set: pod_set(ip),
                ip: *ip,
                comment: None,
            };
            ops.push((elem, op));
        }
    }
    ops
}

/// Removes the entries for `ips` (whatever their state: missing entries, sets or table are fine). One
/// nfnetlink batch.
pub fn remove(ips: &[IpAddr]) -> Result<()> {
    if ips.is_empty() {
        return Ok(());
    }
    let mut nl = open()?;
    match nl.batch(TABLE, &remove_ops(ips)) {
        Ok(()) => {
            // Closing the socket waits for the kernel to destroy the deleted elements (an RCU grace
            // period): let a helper thread do that so the caller goes on at once.
            std::thread::spawn(move || drop(nl));
            Ok(())
        }
        // No table or set: nothing to remove.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(nft_err("removing pod entries", e)),
    }
}

/// Every pod entry: address and key (comment).
pub fn list() -> Result<Vec<(IpAddr, String)>> {
    let mut nl = open()?;
    let mut out = Vec::new();
    for set in ["pods4", "pods6"] {
        let elems = nl
            .set_elements(TABLE, set)
            .map_err(|e| nft_err(&format!("listing {set}"), e))?
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
    /// Adds the entries of attachment `key` (see [`add`]).
    fn add(&self, key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<()>;
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
    fn add(&self, key: &str, ips: &[IpAddr], no_masq: &[IpNet]) -> Result<()> {
        add(key, ips, no_masq)
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

    fn b(a: [u8; 4]) -> u128 {
        u128::from(u32::from_be_bytes(a))
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
        assert_eq!(
            intervals(&elems, 32),
            vec![
                (b([10, 0, 0, 0]), b([10, 255, 255, 255])),
                (b([224, 0, 0, 0]), b([239, 255, 255, 255])),
                (b([255, 255, 255, 255]), b([255, 255, 255, 255])),
            ]
        );
        // IPv6: ff00::/8 reaches the top of the space.
        let top = nfnl::Listed {
            key: [0xff].into_iter().chain([0u8; 15]).collect(),
            flags: 0,
            comment: None,
        };
        assert_eq!(intervals(&[top], 128), vec![(0xffu128 << 120, u128::MAX)]);
        // Adjacent intervals (two concurrent adds): the end of one and the start of the next share a key.
        let adjacent = [
            e([10, 0, 2, 0], true),
            e([10, 0, 1, 0], false),
            e([10, 0, 1, 0], true),
            e([10, 0, 0, 0], false),
        ];
        assert_eq!(
            intervals(&adjacent, 32),
            vec![
                (b([10, 0, 0, 0]), b([10, 0, 0, 255])),
                (b([10, 0, 1, 0]), b([10, 0, 1, 255]))
            ]
        );
    }

    #[test]
    fn intervals_merge_as_auto_merge_does_and_become_elements() {
        let m = merge(vec![
            (b([10, 244, 3, 0]), b([10, 244, 3, 255])),
            (b([10, 0, 0, 0]), b([10, 255, 255, 255])),
            (b([11, 0, 0, 0]), b([11, 0, 0, 255])),
            (b([192, 168, 0, 0]), b([192, 168, 0, 255])),
        ]);
        assert_eq!(
            m,
            vec![
                (b([10, 0, 0, 0]), b([11, 0, 0, 255])),
                (b([192, 168, 0, 0]), b([192, 168, 0, 255])),
            ]
        );
        assert_eq!(
            interval_keys(m[0], 32),
            vec![(vec![10, 0, 0, 0], false), (vec![11, 0, 1, 0], true)]
        );
        // The top of the space has no end element.
        assert_eq!(
            interval_keys((b([255, 255, 255, 255]), b([255, 255, 255, 255])), 32),
            vec![(vec![255; 4], false)]
        );
        assert_eq!(interval_keys((0xffu128 << 120, u128::MAX), 128).len(), 1);
    }
}
