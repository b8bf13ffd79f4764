//! The control plane's rules, without I/O: which registrations become peers, with which prefixes, and
//! which routes go through the tunnel.
//!
//! [`Cluster`] takes the store's events (records, claims, node down/up, resync snapshots) and the host's
//! facts ([`HostFacts`]: own name, key, VIP and pod subnet, overlay and pod CIDRs, the addresses that must
//! never be routed into the tunnel) and answers [`Cluster::desired`]: the peers (name, key, allowed
//! prefixes, endpoints) and the routes. `control.rs` applies that to the tunnel core, NAT traversal and the
//! kernel. Everything read from etcd is treated as written by an attacker: see docs/security.md.
//!
//! Without a CA (today's mode) the rules are, for each registration (`nodes/<name>`):
//! - its key decodes to 32 bytes and is not ours, its name is not ours;
//! - its VIP comes only from its address claim (required), its pod subnet only from its subnet claim
//!   (optional); what the record says about itself (`address`, `podSubnet`) is never used;
//! - the VIP lies inside the overlay CIDR (not its network or broadcast address) and is not ours; the pod
//!   subnet lies inside `--pod-cidr` when known, and in any case is at least a /[`MIN_POD_PREFIX`], does not
//!   overlap the overlay CIDR, our own pod subnet, or any protected address (host underlay networks,
//!   etcd/STUN/TURN servers);
//! - across peers, no two grants overlap and no two peers share a key: the older grant wins (one we already
//!   granted, then the earlier claim, then the lower name) and the newer is dropped and logged;
//! - at most [`MAX_PEERS`] peers.
//!
//! With a cluster CA (CA mode, [`Cluster::set_ca`]) a peer's VIP and pod subnet come from its certificate
//! instead of the claims: the record must carry a certificate that the pinned CA signed, that is inside its
//! validity window, that names the record's node and key, and whose key no known revocation names. Every
//! other rule above applies to what the certificate grants. The signature is checked once per certificate
//! received ([`Cluster::apply`]), never per packet or per handshake; the window and revocations at every
//! [`Cluster::desired`].
//!
//! [`Cluster::grant`] is the one place that decides what a single registration may use.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use evio_store::{AddressClaim, NodeRecord, Snapshot, StoreEvent, SubnetClaim};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use evio_trust::{CaPublic, NodeCert, Revocation};

use crate::keys;

/// A peer removed from etcd (lease expired or revoked) is kept this long, so a registration that comes
/// straight back (an etcd restart, a lease lost while etcd was frozen) does not interrupt its tunnel.
pub const DOWN_GRACE: Duration = Duration::from_secs(2);

/// The most peers this host accepts. Records in etcd are written by anyone holding the etcd credentials;
/// this bounds the tunnel core's peer table, the NAT agent's work and the kernel routes whatever is
/// written there (the largest clusters evio targets have a few thousand nodes).
pub const MAX_PEERS: usize = 4096;

/// The most registrations, and claims of each kind, kept in memory (new names beyond it are ignored and
/// logged; known names keep updating). Each record is kept with at most 2 × [`MAX_CANDIDATES`] endpoints
/// and candidates and without the fields this version does not know, so memory stays bounded whatever is
/// written to etcd.
pub const MAX_RECORDS: usize = 4 * MAX_PEERS;

/// The shortest pod subnet accepted when `--pod-cidr` is not given (a /7 or shorter would cover a large part
/// of the address space; no node subnet is that large).
pub const MIN_POD_PREFIX: u8 = 8;

/// The most endpoints and candidates of one peer handed to NAT traversal (each costs probes).
pub const MAX_CANDIDATES: usize = 32;

/// The most revoked keys remembered (CA mode). Revocations are signed by the CA, so only the CA can fill
/// this; the bound keeps a runaway CA from growing it without limit. Revoked keys are never forgotten
/// while the agent runs, even when their etcd entries are deleted.
pub const MAX_REVOCATIONS: usize = 4 * MAX_PEERS;

/// What this host knows about itself and its network.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub name: String,
    pub public_key: [u8; 32],
    /// Our VIP.
    pub address: Ipv4Addr,
    /// `--overlay-cidr`.
    pub overlay: Ipv4Net,
    /// `--pod-cidr`, when given.
    pub pod_cidr: Option<Ipv4Net>,
    /// The IPv6 `--pod-cidr` (dual-stack pods), when given: a peer's IPv6 pod subnet is the one paired
    /// with its granted IPv4 subnet (`evio_store::SubnetPlan6::paired`).
    pub pod_cidr6: Option<Ipv6Net>,
    /// `--pod-node-prefix6`: the IPv6 node subnets' prefix (default: as many subnets as the IPv4 plan).
    pub pod_node_prefix6: Option<u8>,
    /// The IPv6 `--overlay-cidr` (a dual-stack host overlay), when given: a peer's IPv6 VIP is at its IPv4 VIP's
    /// offset in it (`evio_store::paired_address6`).
    pub overlay6: Option<Ipv6Net>,
    /// IPv6 networks never routed into the tunnel (the host's and the servers'), as `protected`.
    pub protected6: Vec<Ipv6Net>,
    /// Networks never routed into the tunnel: the host's underlay networks (connected and loopback) and the
    /// etcd, STUN and TURN servers (as /32).
    pub protected: Vec<Ipv4Net>,
}

/// What one registration may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub public_key: [u8; 32],
    pub address: Ipv4Addr,
    pub pod_subnet: Option<Ipv4Net>,
    /// Paired with `pod_subnet` in the IPv6 `--pod-cidr` (never from the record).
    pub pod_subnet6: Option<Ipv6Net>,
    /// Paired with `address` in the IPv6 `--overlay-cidr` (never from the record).
    pub address6: Option<std::net::Ipv6Addr>,
}

impl Grant {
    /// The prefixes the peer may send from (and that go to it).
    pub fn prefixes(&self) -> Vec<Ipv4Net> {
        let mut v = vec![Ipv4Net::new(self.address, 32).expect("valid /32")];
        v.extend(self.pod_subnet);
        v
    }
}

/// Why a registration is not a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("invalid node name")]
    BadName,
    #[error("no valid public key")]
    BadKey,
    #[error("it is this node (same name or key)")]
    Ourselves,
    #[error("no address claim")]
    NoAddressClaim,
    #[error("address {0} is not a host address of the overlay {1}")]
    AddressOutsideOverlay(Ipv4Addr, Ipv4Net),
    #[error("address {0} is ours")]
    OwnAddress(Ipv4Addr),
    #[error("pod subnet {0} is not inside the pod CIDR {1}")]
    SubnetOutsidePodCidr(Ipv4Net, Ipv4Net),
    #[error("pod subnet {0} is shorter than /{MIN_POD_PREFIX}")]
    SubnetTooLarge(Ipv4Net),
    #[error("pod subnet {0} overlaps the overlay {1}")]
    SubnetOverlapsOverlay(Ipv4Net, Ipv4Net),
    #[error("pod subnet {0} overlaps our own pod subnet {1}")]
    SubnetOverlapsOurs(Ipv4Net, Ipv4Net),
    #[error(
        "{0} overlaps {1}, which is never routed into the tunnel (underlay, etcd, STUN or TURN)"
    )]
    Protected(Ipv4Net, Ipv4Net),
    #[error(
        "its IPv6 prefix {0} overlaps {1}, which is never routed into the tunnel (check the IPv6 \
         --pod-cidr and --overlay-cidr)"
    )]
    Subnet6Protected(Ipv6Net, Ipv6Net),
    #[error("{prefix} overlaps the grant of {holder}, which is older")]
    Overlaps { prefix: Ipv4Net, holder: String },
    #[error("pod subnet {prefix} covers an endpoint of {holder}, which is older")]
    CoversEndpoint { prefix: Ipv4Net, holder: String },
    #[error("its public key is also the key of {holder}, which is older")]
    SharedKey { holder: String },
    #[error("the peer limit ({MAX_PEERS}) is reached")]
    TooMany,
    #[error("no certificate (the cluster has a CA)")]
    NoCertificate,
    #[error("certificate not accepted: {0}")]
    Certificate(String),
}

/// One peer as it should be.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPeer {
    pub name: String,
    pub grant: Grant,
    /// The record, with its endpoints and candidates limited to those that may be used as underlay
    /// addresses (outside the overlay, the pod CIDR and every grant; at most [`MAX_CANDIDATES`]).
    pub record: NodeRecord,
}

impl DesiredPeer {
    /// The prefixes as the tunnel core takes them (IPv6 pod subnet included).
    pub fn allowed(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self.grant.prefixes().into_iter().map(IpNet::V4).collect();
        v.extend(
            self.grant
                .address6
                .map(|a| IpNet::V6(Ipv6Net::new(a, 128).expect("valid /128"))),
        );
        v.extend(self.grant.pod_subnet6.map(IpNet::V6));
        v
    }
}

/// Peers and routes as they should be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Sorted by name.
    pub peers: Vec<DesiredPeer>,
    /// Routes through the tunnel device: the granted pod subnets (VIPs are covered by the overlay's
    /// connected route).
    pub routes: BTreeSet<IpNet>,
    /// Registrations that are not peers, and why (sorted by name).
    pub rejected: Vec<(String, Rejection)>,
}

/// The cluster as this host sees it.
pub struct Cluster {
    facts: HostFacts,
    /// Our pod subnet (from our subnet claim).
    pod_subnet: Option<Ipv4Net>,
    records: HashMap<String, NodeRecord>,
    subnets: HashMap<String, SubnetClaim>,
    addresses: HashMap<String, AddressClaim>,
    down_since: HashMap<String, Instant>,
    /// The grants of the last [`Cluster::desired`], which keep their prefixes against newer claimants.
    incumbents: HashMap<String, Grant>,
    /// Which node claimed its address first: etcd create revisions from the last snapshot, then the order
    /// claims arrived in after it (the watch delivers them in revision order).
    claim_order: HashMap<String, i64>,
    /// The order given to the next new address claim seen on the watch.
    next_order: i64,
    /// Last rejection logged per name (to log changes only).
    logged: HashMap<String, Rejection>,
    /// CA mode: the pinned CA.
    ca: Option<CaPublic>,
    /// CA mode: each record's certificate, its signature checked against the CA when the record arrived
    /// (the window and revocations are checked in [`Cluster::grant`]).
    certs: HashMap<String, Result<NodeCert, String>>,
    /// CA mode: keys the CA revoked.
    revoked: HashSet<[u8; 32]>,
    /// Unix seconds, for certificate windows ([`Cluster::set_unix_time`]).
    unix: u64,
}

impl Cluster {
    pub fn new(facts: HostFacts, pod_subnet: Option<Ipv4Net>) -> Cluster {
        Cluster {
            facts,
            pod_subnet,
            records: HashMap::new(),
            subnets: HashMap::new(),
            addresses: HashMap::new(),
            down_since: HashMap::new(),
            incumbents: HashMap::new(),
            claim_order: HashMap::new(),
            next_order: 1,
            logged: HashMap::new(),
            ca: None,
            certs: HashMap::new(),
            revoked: HashSet::new(),
            unix: 0,
        }
    }

    /// CA mode: peers are accepted only with a certificate signed by `ca`, for what it grants.
    pub fn set_ca(&mut self, ca: CaPublic) {
        self.ca = Some(ca);
        let records: Vec<NodeRecord> = self.records.values().cloned().collect();
        for r in records {
            self.check_certificate(&r);
        }
    }

    /// The wall clock (Unix seconds) certificates are checked against.
    pub fn set_unix_time(&mut self, unix: u64) {
        self.unix = unix;
    }

    /// Adds revocations (already verified as signed by the CA); true if a key was new.
    pub fn add_revocations(&mut self, revs: &[Revocation]) -> bool {
        let mut changed = false;
        for r in revs {
            if let Ok(k) = r.key()
                && !self.revoked.contains(&k)
            {
                if self.revoked.len() >= MAX_REVOCATIONS {
                    tracing::warn!("ignoring revocations beyond {MAX_REVOCATIONS}");
                    break;
                }
                tracing::info!(node = %r.node, serial = r.serial, "key revoked by the cluster CA");
                self.revoked.insert(k);
                changed = true;
            }
        }
        changed
    }

    /// Checks the signature of `r`'s certificate once, when the record arrives.
    fn check_certificate(&mut self, r: &NodeRecord) {
        let Some(ca) = &self.ca else { return };
        match &r.certificate {
            None => {
                self.certs.remove(&r.node);
            }
            Some(signed) => {
                let same = self
                    .records
                    .get(&r.node)
                    .and_then(|o| o.certificate.as_ref())
                    == Some(signed)
                    && self.certs.contains_key(&r.node);
                if !same {
                    let v = NodeCert::verify_ignoring_time(signed, ca).map_err(|e| e.to_string());
                    self.certs.insert(r.node.clone(), v);
                }
            }
        }
    }

    pub fn facts(&self) -> &HostFacts {
        &self.facts
    }

    /// Replaces the protected networks (the host's addresses changed).
    pub fn set_protected(&mut self, protected: Vec<Ipv4Net>, protected6: Vec<Ipv6Net>) {
        self.facts.protected = protected;
        self.facts.protected6 = protected6;
    }

    /// Our pod subnet, as our subnet claim says.
    pub fn pod_subnet(&self) -> Option<Ipv4Net> {
        self.pod_subnet
    }

    pub fn set_pod_subnet(&mut self, s: Option<Ipv4Net>) {
        self.pod_subnet = s;
    }

    /// The known records, claims (for the cache), sorted by name.
    pub fn state(&self) -> (Vec<NodeRecord>, Vec<AddressClaim>, Vec<SubnetClaim>) {
        let mut r: Vec<NodeRecord> = self.records.values().cloned().collect();
        r.sort_by(|a, b| a.node.cmp(&b.node));
        let mut a: Vec<AddressClaim> = self.addresses.values().cloned().collect();
        a.sort_by(|x, y| x.node.cmp(&y.node));
        let mut s: Vec<SubnetClaim> = self.subnets.values().cloned().collect();
        s.sort_by(|x, y| x.node.cmp(&y.node));
        (r, a, s)
    }

    /// Seeds records and claims from the cache (etcd unreachable at start).
    pub fn load_cache(
        &mut self,
        records: &[NodeRecord],
        addresses: &[AddressClaim],
        subnets: &[SubnetClaim],
    ) {
        for r in records {
            self.keep_record(r.clone());
        }
        for a in addresses {
            keep_claim(&mut self.addresses, &a.node, a.clone());
        }
        for s in subnets {
            keep_claim(&mut self.subnets, &s.node, s.clone());
        }
    }

    /// Keeps `r`, bounded (see [`MAX_RECORDS`]); our own name is never kept.
    fn keep_record(&mut self, mut r: NodeRecord) {
        if r.node == self.facts.name {
            return;
        }
        if !self.records.contains_key(&r.node) && self.records.len() >= MAX_RECORDS {
            tracing::warn!(node = %r.node, "ignoring a registration: {MAX_RECORDS} are known already");
            return;
        }
        r.endpoints.truncate(2 * MAX_CANDIDATES);
        r.candidates.truncate(2 * MAX_CANDIDATES);
        r.extra.clear();
        if r.certificate
            .as_ref()
            .is_some_and(|c| c.len() > evio_trust::MAX_CERT_LEN)
        {
            r.certificate = None;
        }
        if self.ca.is_some() {
            self.check_certificate(&r);
        }
        self.down_since.remove(&r.node);
        self.records.insert(r.node.clone(), r);
    }

    /// Replaces what is known with a snapshot: records missing from it go down (kept for [`DOWN_GRACE`]).
    pub fn load_snapshot(&mut self, snap: &Snapshot, now: Instant) {
        let live: HashSet<&str> = snap.nodes.iter().map(|r| r.node.as_str()).collect();
        for name in self.records.keys() {
            if !live.contains(name.as_str()) {
                self.down_since.entry(name.clone()).or_insert(now);
            }
        }
        for r in &snap.nodes {
            self.keep_record(r.clone());
        }
        self.subnets.clear();
        for c in &snap.subnets {
            keep_claim(&mut self.subnets, &c.node, c.clone());
        }
        self.addresses.clear();
        for c in &snap.addresses {
            keep_claim(&mut self.addresses, &c.node, c.clone());
        }
        self.claim_order = snap.address_revisions.clone();
        self.next_order = snap.revision.saturating_add(1);
        if let Some(s) = self.subnets.get(&self.facts.name) {
            self.pod_subnet = Some(s.subnet);
        }
    }

    /// Applies one watch event.
    pub fn apply(&mut self, ev: StoreEvent, now: Instant) {
        let me = self.facts.name.clone();
        match ev {
            StoreEvent::NodeUp(r) | StoreEvent::NodeUpdated(r) => self.keep_record(r),
            StoreEvent::NodeDown { node } => {
                if node != me && self.records.contains_key(&node) {
                    self.down_since.insert(node, now);
                }
            }
            StoreEvent::SubnetClaimed(c) => {
                if c.node == me {
                    self.pod_subnet = Some(c.subnet);
                }
                let node = c.node.clone();
                keep_claim(&mut self.subnets, &node, c);
            }
            StoreEvent::SubnetReleased { node, .. } => {
                if node == me {
                    self.pod_subnet = None;
                }
                self.subnets.remove(&node);
            }
            StoreEvent::AddressClaimed(c) => {
                let node = c.node.clone();
                if keep_claim(&mut self.addresses, &node, c)
                    && !self.claim_order.contains_key(&node)
                {
                    self.claim_order.insert(node, self.next_order);
                    self.next_order = self.next_order.saturating_add(1);
                }
            }
            StoreEvent::AddressReleased { node, .. } => {
                self.claim_order.remove(&node);
                self.addresses.remove(&node);
            }
            StoreEvent::Resync(snap) => self.load_snapshot(&snap, now),
        }
    }

    /// True while some peer is down but within its grace period (the caller should call [`Cluster::expire`]
    /// soon).
    pub fn has_pending_downs(&self) -> bool {
        !self.down_since.is_empty()
    }

    /// Forgets the records down for longer than [`DOWN_GRACE`]; true if any was.
    pub fn expire(&mut self, now: Instant) -> bool {
        let gone: Vec<String> = self
            .down_since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= DOWN_GRACE)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            self.down_since.remove(n);
            self.records.remove(n);
            self.certs.remove(n);
        }
        !gone.is_empty()
    }

    fn is_down(&self, name: &str, now: Instant) -> bool {
        self.down_since
            .get(name)
            .is_some_and(|t| now.duration_since(*t) >= DOWN_GRACE)
    }

    /// What `record` may use on its own (without looking at other peers): the CA-less rules. The one place a
    /// certificate check plugs into.
    pub fn grant(&self, record: &NodeRecord) -> Result<Grant, Rejection> {
        let f = &self.facts;
        let name = record.node.as_str();
        if !evio_store::keys::valid_node_name(name) {
            return Err(Rejection::BadName);
        }
        let public_key = keys::decode32(&record.public_key).map_err(|_| Rejection::BadKey)?;
        if name == f.name || public_key == f.public_key {
            return Err(Rejection::Ourselves);
        }
        // Prefixes come from the certificate (CA mode) or the claims, never from the record's own
        // `address`/`podSubnet`.
        let (address, claimed_subnet) = match &self.ca {
            Some(_) => {
                let c = self.certified(record, &public_key)?;
                if c.pod_subnets.len() > 1 {
                    return Err(Rejection::Certificate(
                        "more than one pod subnet (this version routes one)".into(),
                    ));
                }
                (c.address, c.pod_subnets.first().copied())
            }
            None => {
                let claim = self.addresses.get(name).ok_or(Rejection::NoAddressClaim)?;
                (claim.address, self.subnets.get(name).map(|c| c.subnet))
            }
        };
        let (lo, hi) = evio_store::host_range(&f.overlay);
        if !f.overlay.contains(&address) || !(lo..=hi).contains(&u32::from(address)) {
            return Err(Rejection::AddressOutsideOverlay(address, f.overlay));
        }
        if address == f.address {
            return Err(Rejection::OwnAddress(address));
        }
        let vip = Ipv4Net::new(address, 32).expect("valid /32");
        check_protected(&f.protected, vip)?;
        let pod_subnet = match claimed_subnet {
            None => None,
            Some(s) => {
                let s = s.trunc();
                if let Some(cidr) = f.pod_cidr
                    && !cidr.contains(&s)
                {
                    return Err(Rejection::SubnetOutsidePodCidr(s, cidr));
                }
                if s.prefix_len() < MIN_POD_PREFIX {
                    return Err(Rejection::SubnetTooLarge(s));
                }
                if overlap(&s, &f.overlay) {
                    return Err(Rejection::SubnetOverlapsOverlay(s, f.overlay));
                }
                if let Some(own) = self.pod_subnet
                    && overlap(&s, &own)
                {
                    return Err(Rejection::SubnetOverlapsOurs(s, own));
                }
                check_protected(&f.protected, s)?;
                Some(s)
            }
        };
        let pod_subnet6 = match (pod_subnet, f.pod_cidr, f.pod_cidr6) {
            (Some(s), Some(pool), Some(pool6)) => {
                paired6(pool, s, pool6, f.pod_node_prefix6, &f.protected6)?
            }
            _ => None,
        };
        let address6 = match f.overlay6 {
            Some(o6) => {
                let a6 = evio_store::paired_address6(f.overlay, address, o6)
                    .ok_or(Rejection::AddressOutsideOverlay(address, f.overlay))?;
                let n = Ipv6Net::new(a6, 128).expect("valid /128");
                if let Some(p) = f
                    .protected6
                    .iter()
                    .find(|p| p.contains(&n.network()) || n.contains(&p.network()))
                {
                    return Err(Rejection::Subnet6Protected(n, *p));
                }
                Some(a6)
            }
            None => None,
        };
        Ok(Grant {
            public_key,
            address,
            pod_subnet,
            pod_subnet6,
            address6,
        })
    }

    /// CA mode: the certificate of `record`, if it is current, names the record's node and key, and its key
    /// is not revoked.
    fn certified(&self, record: &NodeRecord, key: &[u8; 32]) -> Result<&NodeCert, Rejection> {
        let c = match self.certs.get(&record.node) {
            None => return Err(Rejection::NoCertificate),
            Some(Err(e)) => return Err(Rejection::Certificate(e.clone())),
            Some(Ok(c)) => c,
        };
        if c.node != record.node {
            return Err(Rejection::Certificate(format!("it is for node {}", c.node)));
        }
        if c.public_key != *key {
            return Err(Rejection::Certificate("it is for another key".into()));
        }
        if !c.is_current(self.unix) {
            return Err(Rejection::Certificate(format!(
                "outside its validity ({}..{}, now {})",
                c.not_before, c.not_after, self.unix
            )));
        }
        if self.revoked.contains(key) {
            return Err(Rejection::Certificate(
                "its key was revoked by the cluster CA".into(),
            ));
        }
        Ok(c)
    }

    /// The peers and routes as they should be now. Grants kept here are the incumbents of the next call.
    pub fn desired(&mut self, now: Instant) -> Desired {
        let mut rejected: Vec<(String, Rejection)> = Vec::new();
        let mut candidates: Vec<(&NodeRecord, Grant)> = Vec::new();
        for (name, r) in &self.records {
            if self.is_down(name, now) {
                continue;
            }
            match self.grant(r) {
                Ok(g) => candidates.push((r, g)),
                Err(e) => rejected.push((name.clone(), e)),
            }
        }
        // The older grant wins: one granted before (unchanged), then the address claim etcd created first,
        // then (claims known only from the cache) the earlier claim time, then the name.
        candidates.sort_by_cached_key(|(r, g)| {
            let incumbent = self.incumbents.get(&r.node) == Some(g);
            let order = self.claim_order.get(&r.node).copied().unwrap_or(i64::MAX);
            let since = self.addresses.get(&r.node).map(|c| c.since).unwrap_or(0);
            (!incumbent, order, since, r.node.clone())
        });
        let mut taken = Prefixes::default();
        let mut endpoints_taken = Prefixes::default();
        let mut keys_taken: HashMap<[u8; 32], &str> = HashMap::new();
        let mut accepted: Vec<(&NodeRecord, Grant)> = Vec::new();
        'next: for (r, g) in candidates {
            if accepted.len() >= MAX_PEERS {
                rejected.push((r.node.clone(), Rejection::TooMany));
                continue;
            }
            if let Some(holder) = keys_taken.get(&g.public_key) {
                rejected.push((
                    r.node.clone(),
                    Rejection::SharedKey {
                        holder: holder.to_string(),
                    },
                ));
                continue;
            }
            for p in g.prefixes() {
                if let Some(holder) = taken.overlapping(&p) {
                    rejected.push((
                        r.node.clone(),
                        Rejection::Overlaps {
                            prefix: p,
                            holder: holder.to_string(),
                        },
                    ));
                    continue 'next;
                }
            }
            // Without a pod CIDR a subnet could lie anywhere: it must not cover where an older peer is
            // reached (its endpoints and candidates outside the overlay and the grants so far).
            if self.facts.pod_cidr.is_none()
                && let Some(s) = g.pod_subnet
                && let Some(holder) = endpoints_taken.overlapping(&s)
            {
                rejected.push((
                    r.node.clone(),
                    Rejection::CoversEndpoint {
                        prefix: s,
                        holder: holder.to_string(),
                    },
                ));
                continue;
            }
            for p in g.prefixes() {
                taken.insert(p, r.node.as_str());
            }
            if self.facts.pod_cidr.is_none() {
                let addrs = r.endpoints.iter().map(|e| e.ip());
                let addrs = addrs.chain(r.candidates.iter().map(|c| c.addr.ip()));
                for ip in addrs.take(4 * MAX_CANDIDATES) {
                    if let IpAddr::V4(v4) = ip {
                        let p = Ipv4Net::new(v4, 32).expect("valid /32");
                        if !self.facts.overlay.contains(&v4) && taken.overlapping(&p).is_none() {
                            endpoints_taken.insert(p, r.node.as_str());
                        }
                    }
                }
            }
            keys_taken.insert(g.public_key, r.node.as_str());
            accepted.push((r, g));
        }
        // Endpoints a peer may be reached at: never inside the overlay, the pod CIDR or a grant (that traffic
        // would go into the tunnel itself).
        let mut outer: Vec<Ipv4Net> = vec![self.facts.overlay];
        outer.extend(self.facts.pod_cidr);
        outer.extend(self.pod_subnet);
        let usable = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => {
                !outer.iter().any(|n| n.contains(&v4))
                    && taken
                        .overlapping(&Ipv4Net::new(v4, 32).expect("valid /32"))
                        .is_none()
            }
            // Only addresses a datagram can be sent to without an interface (no link-local: it needs a
            // scope), no loopback, multicast or unspecified address, and none inside the IPv6 pod CIDR
            // (that traffic would go into the tunnel itself).
            IpAddr::V6(v6) => {
                !(v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unspecified()
                    || v6.is_unicast_link_local()
                    || v6.to_ipv4_mapped().is_some()
                    || self.facts.pod_cidr6.is_some_and(|p| p.contains(&v6))
                    || self.facts.overlay6.is_some_and(|o| o.contains(&v6)))
            }
        };
        let mut peers: Vec<DesiredPeer> = accepted
            .into_iter()
            .map(|(r, g)| {
                let mut record = r.clone();
                record.endpoints.retain(|e| usable(e.ip()));
                record.endpoints.truncate(MAX_CANDIDATES);
                record.candidates.retain(|c| usable(c.addr.ip()));
                record.candidates.truncate(MAX_CANDIDATES);
                DesiredPeer {
                    name: r.node.clone(),
                    grant: g,
                    record,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let routes = peers
            .iter()
            .flat_map(|p| p.grant.prefixes())
            .filter(|n| !self.facts.overlay.contains(n))
            .map(IpNet::V4)
            .chain(
                peers
                    .iter()
                    .filter_map(|p| p.grant.pod_subnet6.map(IpNet::V6)),
            )
            .collect();
        rejected.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, why) in &rejected {
            if self.logged.get(name) != Some(why) {
                tracing::warn!(node = %name, "registration not accepted as a peer: {why}");
            }
        }
        self.logged = rejected.iter().cloned().collect();
        self.incumbents = peers
            .iter()
            .map(|p| (p.name.clone(), p.grant.clone()))
            .collect();
        Desired {
            peers,
            routes,
            rejected,
        }
    }
}

/// Keeps the claim of `node`, bounded by [`MAX_RECORDS`] names; false if refused.
fn keep_claim<C>(map: &mut HashMap<String, C>, node: &str, c: C) -> bool {
    if !map.contains_key(node) && map.len() >= MAX_RECORDS {
        tracing::warn!(node, "ignoring a claim: {MAX_RECORDS} are known already");
        return false;
    }
    map.insert(node.to_string(), c);
    true
}

/// Prefixes held, for overlap queries in O(log n): two IPv4 prefixes either are disjoint or one contains
/// the other, so the held ones are kept as disjoint ranges (a prefix inside one held already adds nothing;
/// one containing held ones replaces them), and a query looks at the range starting at or before it and
/// at the first one starting inside it. (It probed all 33 supernets, one map lookup each: the hottest
/// symbol of the control plane at 100 nodes, `desired()` asking for every prefix and endpoint.)
#[derive(Default)]
struct Prefixes<'a> {
    /// By first address: (last address, holder).
    by_start: BTreeMap<u32, (u32, &'a str)>,
}

fn bounds(p: &Ipv4Net) -> (u32, u32) {
    (u32::from(p.network()), u32::from(p.broadcast()))
}

impl<'a> Prefixes<'a> {
    fn insert(&mut self, p: Ipv4Net, holder: &'a str) {
        let (start, end) = bounds(&p);
        if self.containing(start, end).is_some() {
            return;
        }
        let inside: Vec<u32> = self.by_start.range(start..=end).map(|(k, _)| *k).collect();
        for k in inside {
            self.by_start.remove(&k);
        }
        self.by_start.insert(start, (end, holder));
    }

    /// The holder of the held range that contains `start..=end`, if any.
    fn containing(&self, start: u32, end: u32) -> Option<&'a str> {
        self.by_start
            .range(..=start)
            .next_back()
            .filter(|(_, (last, _))| *last >= end)
            .map(|(_, (_, h))| *h)
    }

    /// The holder of a prefix that overlaps `p`, if any.
    fn overlapping(&self, p: &Ipv4Net) -> Option<&'a str> {
        let (start, end) = bounds(p);
        // One that contains p's first address (then it contains p: the ranges are aligned blocks)...
        if let Some(h) = self.containing(start, start) {
            return Some(h);
        }
        // ... or the lowest one starting inside p.
        self.by_start
            .range(start..=end)
            .next()
            .map(|(_, (_, h))| *h)
    }
}

fn overlap(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The IPv6 pod subnet paired with granted IPv4 subnet `s`: the one at `s`'s index (in `pool` cut with the
/// node bits `s` has) in `pool6` cut into `node_prefix6` subnets (default: as many as `pool`'s). `None` if
/// `s` is not one of `pool`'s node subnets or its index does not fit. Refused if it overlaps a protected
/// IPv6 network (a misconfigured IPv6 `--pod-cidr`).
fn paired6(
    pool: Ipv4Net,
    s: Ipv4Net,
    pool6: Ipv6Net,
    node_prefix6: Option<u8>,
    protected6: &[Ipv6Net],
) -> Result<Option<Ipv6Net>, Rejection> {
    let Some(bits) = s.prefix_len().checked_sub(pool.prefix_len()) else {
        return Ok(None);
    };
    let bits6 = match node_prefix6 {
        Some(n) => match n.checked_sub(pool6.prefix_len()) {
            Some(b) => b,
            None => return Ok(None),
        },
        None => bits,
    };
    let (Ok(plan), Ok(plan6)) = (
        evio_store::SubnetPlan::new(pool, bits),
        evio_store::SubnetPlan6::new(pool6, bits6),
    ) else {
        return Ok(None);
    };
    let Some(s6) = plan6.paired(&plan, &s) else {
        return Ok(None);
    };
    if let Some(p) = protected6
        .iter()
        .find(|p| p.contains(&s6.network()) || s6.contains(&p.network()))
    {
        return Err(Rejection::Subnet6Protected(s6, *p));
    }
    Ok(Some(s6))
}

fn check_protected(protected: &[Ipv4Net], n: Ipv4Net) -> Result<(), Rejection> {
    match protected.iter().find(|p| overlap(p, &n)) {
        Some(p) => Err(Rejection::Protected(n, *p)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evio_store::{Candidate, CandidateKind};

    fn key(i: u8) -> [u8; 32] {
        [i; 32]
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn facts() -> HostFacts {
        HostFacts {
            name: "me".into(),
            public_key: key(1),
            address: "10.10.0.1".parse().unwrap(),
            overlay: net("10.10.0.0/16"),
            pod_cidr: Some(net("10.244.0.0/16")),
            pod_cidr6: None,
            pod_node_prefix6: None,
            overlay6: None,
            protected: vec![net("192.168.1.0/24"), net("192.168.9.9/32")],
            protected6: vec![],
        }
    }

    fn cluster() -> Cluster {
        Cluster::new(facts(), Some(net("10.244.1.0/24")))
    }

    fn record(name: &str, k: u8) -> NodeRecord {
        let mut r = NodeRecord::new(name);
        r.public_key = keys::encode(&key(k));
        r
    }

    /// A live node with a record, an address claim and optionally a subnet claim.
    fn add(c: &mut Cluster, name: &str, k: u8, addr: &str, subnet: Option<&str>, since: u64) {
        let now = Instant::now();
        c.apply(StoreEvent::NodeUp(record(name, k)), now);
        c.apply(
            StoreEvent::AddressClaimed(AddressClaim {
                node: name.into(),
                address: addr.parse().unwrap(),
                since,
            }),
            now,
        );
        if let Some(s) = subnet {
            c.apply(
                StoreEvent::SubnetClaimed(SubnetClaim {
                    node: name.into(),
                    subnet: net(s),
                    since,
                }),
                now,
            );
        }
    }

    fn rejection(d: &Desired, name: &str) -> Option<Rejection> {
        d.rejected
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.clone())
    }

    fn names(d: &Desired) -> Vec<&str> {
        d.peers.iter().map(|p| p.name.as_str()).collect()
    }

    /// A certificate for `name`/`k`, signed by `ca`, valid from `nb` to `na` (Unix seconds).
    fn cert(
        ca: &evio_trust::CaKey,
        name: &str,
        k: u8,
        addr: &str,
        subnets: &[&str],
        nb: u64,
        na: u64,
    ) -> String {
        NodeCert {
            node: name.into(),
            public_key: key(k),
            address: addr.parse().unwrap(),
            pod_subnets: subnets.iter().map(|s| net(s)).collect(),
            not_before: nb,
            not_after: na,
            serial: u64::from(k),
        }
        .sign(ca)
        .unwrap()
    }

    const T: u64 = 1_800_000_000;

    fn ca_cluster(ca: &evio_trust::CaKey) -> Cluster {
        let mut c = cluster();
        c.set_ca(ca.public());
        c.set_unix_time(T);
        c
    }

    fn certified(c: &mut Cluster, name: &str, k: u8, cert: Option<String>) {
        let mut r = record(name, k);
        r.certificate = cert;
        c.apply(StoreEvent::NodeUp(r), Instant::now());
    }

    #[test]
    fn dual_stack_peers_get_the_ipv6_subnet_paired_with_their_grant() {
        let six = |s: &str| s.parse::<Ipv6Net>().unwrap();
        let mut c = Cluster::new(
            HostFacts {
                pod_cidr6: Some(six("fd00:10:244::/48")),
                overlay6: Some(six("fd00:10:10::/64")),
                protected6: vec![six("fd00:10:244:900::1/128"), six("2001:db8::/64")],
                ..facts()
            },
            Some(net("10.244.1.0/24")),
        );
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 1);
        // A peer whose pair holds a protected address (an IPv6 --pod-cidr overlapping the host's) is refused.
        add(&mut c, "b", 3, "10.10.0.3", Some("10.244.9.0/24"), 2);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["a"]);
        let a = &d.peers[0];
        assert_eq!(a.grant.pod_subnet6, Some(six("fd00:10:244:200::/56")));
        assert!(
            a.allowed()
                .contains(&IpNet::V6(six("fd00:10:244:200::/56")))
        );
        assert!(d.routes.contains(&IpNet::V6(six("fd00:10:244:200::/56"))));
        // Its IPv6 VIP: the IPv4 VIP's offset (10.10.0.2) in the IPv6 overlay, allowed, not routed (the
        // overlay's connected route through the device covers it).
        assert_eq!(a.grant.address6, Some("fd00:10:10::2".parse().unwrap()));
        assert!(a.allowed().contains(&IpNet::V6(six("fd00:10:10::2/128"))));
        assert!(!d.routes.contains(&IpNet::V6(six("fd00:10:10::2/128"))));
        assert!(matches!(
            d.rejected.as_slice(),
            [(n, Rejection::Subnet6Protected(..))] if n == "b"
        ));
        // IPv6 node subnets of their own prefix (/64s): the same index.
        let mut c = Cluster::new(
            HostFacts {
                pod_cidr6: Some(six("fd00:10:244::/48")),
                pod_node_prefix6: Some(64),
                ..facts()
            },
            Some(net("10.244.1.0/24")),
        );
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 1);
        let d = c.desired(Instant::now());
        assert_eq!(
            d.peers[0].grant.pod_subnet6,
            Some(six("fd00:10:244:2::/64"))
        );
        // Without an IPv6 pod CIDR: IPv4 only, as before.
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 1);
        let d = c.desired(Instant::now());
        assert_eq!(d.peers[0].grant.pod_subnet6, None);
        assert!(d.routes.iter().all(|r| matches!(r, IpNet::V4(_))));
    }

    #[test]
    fn ca_mode_grants_what_the_certificate_says_and_ignores_claims() {
        let ca = evio_trust::CaKey::generate("t");
        let mut c = ca_cluster(&ca);
        // Claims that disagree with the certificate (an etcd writer's) change nothing.
        add(&mut c, "a", 2, "10.10.0.9", Some("10.244.9.0/24"), 1);
        certified(
            &mut c,
            "a",
            2,
            Some(cert(
                &ca,
                "a",
                2,
                "10.10.0.2",
                &["10.244.2.0/24"],
                T - 10,
                T + 3600,
            )),
        );
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["a"]);
        assert_eq!(
            d.peers[0].grant.address,
            "10.10.0.2".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(d.peers[0].grant.pod_subnet, Some(net("10.244.2.0/24")));
        // The claim-only rules still bound what a certificate grants: a subnet outside the pod CIDR.
        certified(
            &mut c,
            "b",
            3,
            Some(cert(
                &ca,
                "b",
                3,
                "10.10.0.3",
                &["10.99.0.0/24"],
                T - 10,
                T + 3600,
            )),
        );
        let d = c.desired(Instant::now());
        assert!(matches!(
            rejection(&d, "b"),
            Some(Rejection::SubnetOutsidePodCidr(..))
        ));
    }

    #[test]
    fn ca_mode_refuses_missing_foreign_mismatched_and_expired_certificates() {
        let ca = evio_trust::CaKey::generate("t");
        let other = evio_trust::CaKey::generate("other");
        let mut c = ca_cluster(&ca);
        add(&mut c, "none", 2, "10.10.0.2", None, 1);
        certified(
            &mut c,
            "foreign",
            3,
            Some(cert(
                &other,
                "foreign",
                3,
                "10.10.0.3",
                &[],
                T - 10,
                T + 3600,
            )),
        );
        certified(
            &mut c,
            "named",
            4,
            Some(cert(&ca, "victim", 4, "10.10.0.4", &[], T - 10, T + 3600)),
        );
        certified(
            &mut c,
            "keyed",
            5,
            Some(cert(&ca, "keyed", 6, "10.10.0.5", &[], T - 10, T + 3600)),
        );
        certified(
            &mut c,
            "old",
            7,
            Some(cert(&ca, "old", 7, "10.10.0.7", &[], T - 7200, T - 3600)),
        );
        certified(&mut c, "junk", 8, Some("x.y".into()));
        certified(
            &mut c,
            "huge",
            9,
            Some("a".repeat(evio_trust::MAX_CERT_LEN + 1)),
        );
        let d = c.desired(Instant::now());
        assert!(d.peers.is_empty(), "{:?}", names(&d));
        assert_eq!(rejection(&d, "none"), Some(Rejection::NoCertificate));
        assert_eq!(rejection(&d, "huge"), Some(Rejection::NoCertificate));
        for n in ["foreign", "named", "keyed", "old", "junk"] {
            assert!(
                matches!(rejection(&d, n), Some(Rejection::Certificate(_))),
                "{n}: {:?}",
                rejection(&d, n)
            );
        }
        // A certificate expires while its record stays: the peer goes at the next check.
        certified(
            &mut c,
            "soon",
            10,
            Some(cert(&ca, "soon", 10, "10.10.0.10", &[], T - 10, T + 60)),
        );
        assert_eq!(names(&c.desired(Instant::now())), ["soon"]);
        c.set_unix_time(T + 60 + evio_trust::CLOCK_SKEW_SECS + 1);
        assert!(c.desired(Instant::now()).peers.is_empty());
    }

    #[test]
    fn ca_mode_revoked_keys_stay_out_with_any_certificate() {
        let ca = evio_trust::CaKey::generate("t");
        let mut c = ca_cluster(&ca);
        let signed = cert(&ca, "a", 2, "10.10.0.2", &[], T - 10, T + 3600);
        certified(&mut c, "a", 2, Some(signed.clone()));
        assert_eq!(names(&c.desired(Instant::now())), ["a"]);
        let rev =
            evio_trust::Revocation::of(&NodeCert::verify(&signed, &ca.public(), T).unwrap(), T);
        assert!(c.add_revocations(std::slice::from_ref(&rev)));
        assert!(
            !c.add_revocations(&[rev]),
            "a known revocation changes nothing"
        );
        assert!(c.desired(Instant::now()).peers.is_empty());
        // A new certificate for the same key (another name, a new serial) is refused too.
        certified(
            &mut c,
            "b",
            2,
            Some(cert(&ca, "b", 2, "10.10.0.3", &[], T - 10, T + 3600)),
        );
        let d = c.desired(Instant::now());
        assert!(d.peers.is_empty());
        assert!(
            matches!(rejection(&d, "b"), Some(Rejection::Certificate(e)) if e.contains("revoked"))
        );
    }

    #[test]
    fn claimed_peer_gets_its_claims_and_a_route_for_its_subnet() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 1);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["a"]);
        let p = &d.peers[0];
        assert_eq!(p.grant.public_key, key(2));
        assert_eq!(
            p.allowed(),
            vec![
                "10.10.0.2/32".parse::<IpNet>().unwrap(),
                "10.244.2.0/24".parse().unwrap()
            ]
        );
        assert_eq!(
            d.routes.iter().copied().collect::<Vec<_>>(),
            vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(d.rejected.is_empty());
    }

    #[test]
    fn no_fallback_to_self_declared_prefixes() {
        let mut c = cluster();
        let mut r = record("a", 2);
        r.address = "10.10.0.2".parse().unwrap();
        r.pod_subnet = Some(net("10.244.2.0/24"));
        c.apply(StoreEvent::NodeUp(r), Instant::now());
        let d = c.desired(Instant::now());
        assert!(d.peers.is_empty() && d.routes.is_empty());
        assert_eq!(rejection(&d, "a"), Some(Rejection::NoAddressClaim));

        // With an address claim, the record's own (different) address and subnet are ignored, and without a
        // subnet claim there is no subnet.
        c.apply(
            StoreEvent::AddressClaimed(AddressClaim {
                node: "a".into(),
                address: "10.10.0.7".parse().unwrap(),
                since: 0,
            }),
            Instant::now(),
        );
        let d = c.desired(Instant::now());
        assert_eq!(
            d.peers[0].grant.address,
            "10.10.0.7".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(d.peers[0].grant.pod_subnet, None);
        assert!(d.routes.is_empty());
    }

    #[test]
    fn bad_names_and_keys_and_ourselves_are_rejected() {
        let mut c = cluster();
        add(&mut c, "nokey", 2, "10.10.0.2", None, 0);
        c.records.get_mut("nokey").unwrap().public_key = "short".into();
        add(&mut c, "mykey", 1, "10.10.0.3", None, 0);
        add(&mut c, "bad/name", 4, "10.10.0.4", None, 0);
        let d = c.desired(Instant::now());
        assert!(d.peers.is_empty());
        assert_eq!(rejection(&d, "nokey"), Some(Rejection::BadKey));
        assert_eq!(rejection(&d, "mykey"), Some(Rejection::Ourselves));
        assert_eq!(rejection(&d, "bad/name"), Some(Rejection::BadName));
        // Our own name is never a peer (not even stored).
        add(&mut c, "me", 5, "10.10.0.5", None, 0);
        assert!(c.desired(Instant::now()).peers.is_empty());
    }

    #[test]
    fn vip_must_be_a_host_address_of_the_overlay_and_not_ours() {
        for (addr, want) in [
            (
                "10.11.0.2",
                Rejection::AddressOutsideOverlay("10.11.0.2".parse().unwrap(), net("10.10.0.0/16")),
            ),
            (
                "10.10.0.0",
                Rejection::AddressOutsideOverlay("10.10.0.0".parse().unwrap(), net("10.10.0.0/16")),
            ),
            (
                "10.10.255.255",
                Rejection::AddressOutsideOverlay(
                    "10.10.255.255".parse().unwrap(),
                    net("10.10.0.0/16"),
                ),
            ),
            (
                "10.10.0.1",
                Rejection::OwnAddress("10.10.0.1".parse().unwrap()),
            ),
        ] {
            let mut c = cluster();
            add(&mut c, "a", 2, addr, None, 0);
            let d = c.desired(Instant::now());
            assert!(d.peers.is_empty(), "{addr}");
            assert_eq!(rejection(&d, "a"), Some(want), "{addr}");
        }
    }

    #[test]
    fn subnet_must_be_inside_the_pod_cidr() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("0.0.0.0/0"), 0);
        add(&mut c, "b", 3, "10.10.0.3", Some("10.245.0.0/24"), 0);
        let d = c.desired(Instant::now());
        assert!(d.peers.is_empty() && d.routes.is_empty());
        assert!(matches!(
            rejection(&d, "a"),
            Some(Rejection::SubnetOutsidePodCidr(..))
        ));
        assert!(matches!(
            rejection(&d, "b"),
            Some(Rejection::SubnetOutsidePodCidr(..))
        ));
    }

    #[test]
    fn without_a_pod_cidr_large_overlay_and_protected_subnets_are_refused() {
        let mut f = facts();
        f.pod_cidr = None;
        let mut c = Cluster::new(f, Some(net("10.244.1.0/24")));
        add(&mut c, "huge", 2, "10.10.0.2", Some("0.0.0.0/0"), 0);
        add(&mut c, "seven", 3, "10.10.0.3", Some("10.0.0.0/7"), 0);
        add(&mut c, "ovl", 4, "10.10.0.4", Some("10.10.128.0/24"), 0);
        add(&mut c, "ours", 5, "10.10.0.5", Some("10.244.0.0/16"), 0);
        add(&mut c, "etcd", 6, "10.10.0.6", Some("192.168.9.9/32"), 0);
        add(&mut c, "lan", 7, "10.10.0.7", Some("192.168.0.0/16"), 0);
        add(&mut c, "ok", 8, "10.10.0.8", Some("172.16.5.0/24"), 0);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["ok"]);
        assert_eq!(
            rejection(&d, "huge"),
            Some(Rejection::SubnetTooLarge(net("0.0.0.0/0")))
        );
        assert_eq!(
            rejection(&d, "seven"),
            Some(Rejection::SubnetTooLarge(net("10.0.0.0/7")))
        );
        assert!(matches!(
            rejection(&d, "ovl"),
            Some(Rejection::SubnetOverlapsOverlay(..))
        ));
        assert!(matches!(
            rejection(&d, "ours"),
            Some(Rejection::SubnetOverlapsOurs(..))
        ));
        assert_eq!(
            rejection(&d, "etcd"),
            Some(Rejection::Protected(
                net("192.168.9.9/32"),
                net("192.168.9.9/32")
            ))
        );
        assert!(matches!(
            rejection(&d, "lan"),
            Some(Rejection::Protected(..))
        ));
        assert_eq!(
            d.routes.iter().copied().collect::<Vec<_>>(),
            vec!["172.16.5.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn without_a_pod_cidr_a_subnet_over_an_older_peers_endpoint_is_refused() {
        let mut f = facts();
        f.pod_cidr = None;
        let mut c = Cluster::new(f, None);
        add(&mut c, "old", 2, "10.10.0.2", Some("172.16.2.0/24"), 0);
        let mut r = record("old", 2);
        r.endpoints = vec!["203.0.113.5:51820".parse().unwrap()];
        c.apply(StoreEvent::NodeUpdated(r), Instant::now());
        add(&mut c, "new", 3, "10.10.0.3", Some("203.0.113.0/24"), 0);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["old"]);
        assert_eq!(
            rejection(&d, "new"),
            Some(Rejection::CoversEndpoint {
                prefix: net("203.0.113.0/24"),
                holder: "old".into()
            })
        );
        // With a pod CIDR the subnet is refused for lying outside it (the endpoint rule is not needed).
        let mut c = cluster();
        add(&mut c, "new", 3, "10.10.0.3", Some("203.0.113.0/24"), 0);
        assert!(matches!(
            rejection(&c.desired(Instant::now()), "new"),
            Some(Rejection::SubnetOutsidePodCidr(..))
        ));
    }

    #[test]
    fn a_protected_vip_is_refused() {
        let mut f = facts();
        f.protected.push(net("10.10.0.9/32"));
        let mut c = Cluster::new(f, None);
        add(&mut c, "a", 2, "10.10.0.9", None, 0);
        let d = c.desired(Instant::now());
        assert!(matches!(rejection(&d, "a"), Some(Rejection::Protected(..))));
    }

    #[test]
    fn overlapping_grants_keep_the_older_claim() {
        // Claims seen on the watch: the first to arrive is the older (whatever their own `since` says).
        let mut c = cluster();
        add(&mut c, "old", 2, "10.10.0.2", Some("10.244.2.0/24"), 20);
        add(&mut c, "new", 3, "10.10.0.3", Some("10.244.2.0/25"), 10);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["old"]);
        assert!(matches!(
            rejection(&d, "new"),
            Some(Rejection::Overlaps { holder, .. }) if holder == "old"
        ));
        // Claims known only from the cache: the earlier claim time, then the lower name.
        let claim = |node: &str, addr: &str, since| AddressClaim {
            node: node.into(),
            address: addr.parse().unwrap(),
            since,
        };
        let mut c = cluster();
        c.load_cache(
            &[record("b", 3), record("a", 2), record("c", 4)],
            &[
                claim("b", "10.10.0.3", 5),
                claim("a", "10.10.0.3", 5),
                claim("c", "10.10.0.3", 4),
            ],
            &[],
        );
        assert_eq!(names(&c.desired(Instant::now())), ["c"]);
        c.addresses.get_mut("c").unwrap().address = "10.10.0.4".parse().unwrap();
        let mut fresh = cluster();
        let (r, a, s) = c.state();
        fresh.load_cache(&r, &a, &s);
        assert_eq!(names(&fresh.desired(Instant::now())), ["a", "c"]);
    }

    #[test]
    fn an_incumbent_keeps_its_grant_against_an_earlier_looking_newcomer() {
        let mut c = cluster();
        add(&mut c, "victim", 2, "10.10.0.2", Some("10.244.2.0/24"), 100);
        assert_eq!(names(&c.desired(Instant::now())), ["victim"]);
        // A newcomer whose claim says it is older still loses against a grant already in place.
        add(&mut c, "forger", 3, "10.10.0.3", Some("10.244.2.0/24"), 1);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["victim"]);
        assert!(matches!(
            rejection(&d, "forger"),
            Some(Rejection::Overlaps { .. })
        ));
    }

    #[test]
    fn etcd_order_wins_over_the_claims_own_time() {
        // A fresh host (no incumbents) decides by etcd's create revisions, not by the forgeable `since`.
        let claim = |node: &str, addr: &str, since| AddressClaim {
            node: node.into(),
            address: addr.parse().unwrap(),
            since,
        };
        let sub = |node: &str, s: &str| SubnetClaim {
            node: node.into(),
            subnet: net(s),
            since: 0,
        };
        let snap = Snapshot {
            revision: 50,
            nodes: vec![record("victim", 2), record("forger", 3)],
            subnets: vec![
                sub("victim", "10.244.2.0/24"),
                sub("forger", "10.244.2.0/25"),
            ],
            addresses: vec![
                claim("victim", "10.10.0.2", 100),
                claim("forger", "10.10.0.3", 1),
            ],
            address_revisions: [("victim".to_string(), 7), ("forger".to_string(), 40)].into(),
        };
        let mut c = cluster();
        c.load_snapshot(&snap, Instant::now());
        assert_eq!(names(&c.desired(Instant::now())), ["victim"]);
        // Claims seen on the watch come after every claim of the snapshot, in the order they arrive.
        let mut c = cluster();
        c.load_snapshot(
            &Snapshot {
                nodes: vec![record("victim", 2)],
                addresses: vec![claim("victim", "10.10.0.2", 100)],
                address_revisions: [("victim".to_string(), 7)].into(),
                ..snap.clone()
            },
            Instant::now(),
        );
        c.apply(StoreEvent::NodeUp(record("forger", 3)), Instant::now());
        c.apply(
            StoreEvent::AddressClaimed(claim("forger", "10.10.0.2", 1)),
            Instant::now(),
        );
        c.apply(StoreEvent::NodeUp(record("third", 4)), Instant::now());
        c.apply(
            StoreEvent::AddressClaimed(claim("third", "10.10.0.9", 0)),
            Instant::now(),
        );
        c.apply(
            StoreEvent::SubnetClaimed(sub("third", "10.244.2.0/24")),
            Instant::now(),
        );
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["victim"]);
        assert!(
            matches!(rejection(&d, "forger"), Some(Rejection::Overlaps { holder, .. }) if holder == "victim")
        );
        assert!(
            matches!(rejection(&d, "third"), Some(Rejection::Overlaps { holder, .. }) if holder == "victim")
        );
    }

    #[test]
    fn two_names_with_one_key_keep_the_older() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", None, 1);
        add(&mut c, "b", 2, "10.10.0.3", None, 2);
        let d = c.desired(Instant::now());
        assert_eq!(names(&d), ["a"]);
        assert_eq!(
            rejection(&d, "b"),
            Some(Rejection::SharedKey { holder: "a".into() })
        );
    }

    #[test]
    fn prefix_overlap_queries() {
        let mut t = Prefixes::default();
        t.insert(net("10.244.2.0/24"), "a");
        t.insert(net("10.10.0.5/32"), "b");
        for (q, want) in [
            ("10.244.2.0/24", Some("a")),
            ("10.244.2.128/25", Some("a")),
            ("10.244.0.0/16", Some("a")),
            // Overlaps both: the one with the lowest address.
            ("0.0.0.0/0", Some("b")),
            ("10.244.3.0/24", None),
            ("10.244.1.255/32", None),
            ("10.10.0.5/32", Some("b")),
            ("10.10.0.4/31", Some("b")),
            ("10.10.0.6/31", None),
        ] {
            assert_eq!(t.overlapping(&net(q)), want, "{q}");
        }
        // A prefix inside a held one adds nothing; one covering held ones takes their place.
        t.insert(net("10.244.2.7/32"), "c");
        assert_eq!(t.overlapping(&net("10.244.2.0/30")), Some("a"));
        assert_eq!(t.overlapping(&net("10.244.2.7/32")), Some("a"));
        t.insert(net("10.10.0.0/16"), "d");
        assert_eq!(t.overlapping(&net("10.10.0.5/32")), Some("d"));
        assert_eq!(t.overlapping(&net("10.10.200.0/24")), Some("d"));
        assert_eq!(t.by_start.len(), 2);
        // Against a brute-force check: held prefixes of every length, queries of every length.
        let mut t = Prefixes::default();
        let held: Vec<Ipv4Net> = [
            "10.0.0.0/30",
            "10.0.0.8/29",
            "10.0.1.0/24",
            "10.0.0.64/26",
            "10.0.0.5/32",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        for h in &held {
            t.insert(*h, "x");
        }
        for len in 20..=32u8 {
            for i in 0..1024u32 {
                let q = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), len)
                    .unwrap()
                    .trunc();
                let want = held.iter().any(|h| overlap(h, &q));
                assert_eq!(t.overlapping(&q).is_some(), want, "{q}");
            }
        }
    }

    #[test]
    fn peers_are_capped() {
        let mut c = Cluster::new(
            HostFacts {
                overlay: net("10.0.0.0/8"),
                ..facts()
            },
            None,
        );
        let now = Instant::now();
        for i in 0..(MAX_PEERS as u32 + 3) {
            let name = format!("n{i}");
            let mut r = NodeRecord::new(name.clone());
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&(i + 100).to_be_bytes());
            r.public_key = keys::encode(&k);
            c.apply(StoreEvent::NodeUp(r), now);
            c.apply(
                StoreEvent::AddressClaimed(AddressClaim {
                    node: name,
                    address: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i),
                    since: 0,
                }),
                now,
            );
        }
        let d = c.desired(now);
        assert_eq!(d.peers.len(), MAX_PEERS);
        assert_eq!(
            d.rejected
                .iter()
                .filter(|(_, r)| *r == Rejection::TooMany)
                .count(),
            3
        );
    }

    #[test]
    fn memory_is_bounded_whatever_etcd_holds() {
        let mut c = cluster();
        let now = Instant::now();
        for i in 0..(MAX_RECORDS + 10) {
            let name = format!("n{i}");
            let mut r = NodeRecord::new(name.clone());
            if i == 0 {
                r.endpoints = vec!["192.0.2.1:1".parse().unwrap(); 1000];
                r.extra
                    .insert("junk".into(), serde_json::Value::String("x".repeat(10_000)));
            }
            c.apply(StoreEvent::NodeUp(r), now);
            c.apply(
                StoreEvent::AddressClaimed(AddressClaim {
                    node: name,
                    address: "10.10.0.9".parse().unwrap(),
                    since: 0,
                }),
                now,
            );
        }
        assert_eq!(c.records.len(), MAX_RECORDS);
        assert_eq!(c.addresses.len(), MAX_RECORDS);
        assert_eq!(c.claim_order.len(), MAX_RECORDS);
        let first = &c.records["n0"];
        assert_eq!(first.endpoints.len(), 2 * MAX_CANDIDATES);
        assert!(first.extra.is_empty());
        // Known names still update.
        let mut r = NodeRecord::new("n1");
        r.listen_port = 7;
        c.apply(StoreEvent::NodeUpdated(r), now);
        assert_eq!(c.records["n1"].listen_port, 7);
    }

    #[test]
    fn down_peers_stay_for_the_grace_period_then_go() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", None, 0);
        let t0 = Instant::now();
        c.apply(StoreEvent::NodeDown { node: "a".into() }, t0);
        assert_eq!(names(&c.desired(t0 + DOWN_GRACE / 2)), ["a"]);
        assert!(c.desired(t0 + DOWN_GRACE).peers.is_empty());
        assert!(!c.expire(t0 + DOWN_GRACE / 2));
        assert!(c.expire(t0 + DOWN_GRACE));
        assert!(c.state().0.is_empty());
        // Back up within the grace: kept throughout.
        add(&mut c, "b", 3, "10.10.0.3", None, 0);
        c.apply(StoreEvent::NodeDown { node: "b".into() }, t0);
        c.apply(StoreEvent::NodeUp(record("b", 3)), t0 + DOWN_GRACE / 2);
        assert_eq!(names(&c.desired(t0 + DOWN_GRACE * 2)), ["b"]);
    }

    #[test]
    fn snapshot_replaces_claims_and_marks_missing_records_down() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 0);
        let t0 = Instant::now();
        let snap = Snapshot {
            revision: 9,
            nodes: vec![record("b", 3)],
            subnets: vec![SubnetClaim {
                node: "me".into(),
                subnet: net("10.244.7.0/24"),
                since: 0,
            }],
            addresses: vec![AddressClaim {
                node: "b".into(),
                address: "10.10.0.3".parse().unwrap(),
                since: 0,
            }],
            address_revisions: HashMap::new(),
        };
        c.apply(StoreEvent::Resync(snap), t0);
        assert_eq!(c.pod_subnet(), Some(net("10.244.7.0/24")));
        // "a" lost its claims with the snapshot: rejected during its grace, gone after.
        let d = c.desired(t0);
        assert_eq!(names(&d), ["b"]);
        assert_eq!(rejection(&d, "a"), Some(Rejection::NoAddressClaim));
        assert!(c.expire(t0 + DOWN_GRACE));
        assert_eq!(c.state().0.len(), 1);
    }

    #[test]
    fn released_claims_withdraw_the_grant() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 0);
        assert_eq!(c.desired(Instant::now()).routes.len(), 1);
        c.apply(
            StoreEvent::SubnetReleased {
                node: "a".into(),
                subnet: None,
            },
            Instant::now(),
        );
        let d = c.desired(Instant::now());
        assert_eq!(d.peers[0].grant.pod_subnet, None);
        assert!(d.routes.is_empty());
        c.apply(
            StoreEvent::AddressReleased {
                node: "a".into(),
                address: None,
            },
            Instant::now(),
        );
        assert!(c.desired(Instant::now()).peers.is_empty());
    }

    #[test]
    fn endpoints_inside_the_overlay_pods_or_grants_are_not_used() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 0);
        let mut r = record("a", 2);
        r.endpoints = vec![
            "192.0.2.1:51820".parse().unwrap(),
            "10.10.0.9:51820".parse().unwrap(),
            "10.244.2.5:51820".parse().unwrap(),
            "[2001:db8::1]:51820".parse().unwrap(),
            "[fe80::1]:51820".parse().unwrap(),
            "[ff02::1]:51820".parse().unwrap(),
            "[::1]:51820".parse().unwrap(),
            "[::ffff:10.10.0.9]:51820".parse().unwrap(),
        ];
        r.candidates = (0..100)
            .map(|i| Candidate {
                kind: CandidateKind::Srflx,
                addr: format!("198.51.100.{}:{}", i % 250, 1000 + i)
                    .parse()
                    .unwrap(),
            })
            .chain([Candidate {
                kind: CandidateKind::Host,
                addr: "10.244.9.9:1".parse().unwrap(),
            }])
            .collect();
        c.apply(StoreEvent::NodeUpdated(r), Instant::now());
        let d = c.desired(Instant::now());
        let p = &d.peers[0].record;
        // A global IPv6 address is an underlay address like any other (issue 15); link-local, multicast,
        // loopback and IPv4-mapped ones are not.
        assert_eq!(
            p.endpoints,
            vec![
                "192.0.2.1:51820".parse().unwrap(),
                "[2001:db8::1]:51820".parse().unwrap()
            ]
        );
        assert_eq!(p.candidates.len(), MAX_CANDIDATES);
        assert!(
            p.candidates
                .iter()
                .all(|c| c.addr.ip().to_string().starts_with("198.51.100."))
        );
    }

    #[test]
    fn cache_round_trip_restores_the_peers() {
        let mut c = cluster();
        add(&mut c, "a", 2, "10.10.0.2", Some("10.244.2.0/24"), 0);
        let before = c.desired(Instant::now());
        let (r, a, s) = c.state();
        let mut again = cluster();
        again.load_cache(&r, &a, &s);
        assert_eq!(again.desired(Instant::now()).peers, before.peers);
    }
}
