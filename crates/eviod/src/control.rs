//! The control plane: etcd registration and watch, turned into peers and routes.
//!
//! Peers come from the live registrations (`nodes/<name>`, attached to leases). What a peer may send from
//! (its VIP and pod subnet) comes from the compare-and-swap claims (`addresses/by-node`, `subnets/by-node`)
//! when they exist, not from what the peer writes about itself, so a node cannot claim another's prefixes
//! by publishing them. etcd being unreachable changes nothing in the data plane: the last known peers stay.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use evio_store::{NodeRecord, Snapshot, Store, StoreEvent, unix_now};
use evio_tunnel::PeerConfig;
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::keys;
use crate::netcfg;
use crate::state::{PeerMeta, Shared};

/// A peer removed from etcd (lease expired or revoked) is kept this long, so a registration that comes
/// straight back (an etcd restart, a lease lost while etcd was frozen) does not interrupt its tunnel.
const DOWN_GRACE: Duration = Duration::from_secs(2);

/// Cached in `<state-dir>/state.json`, to come back with the same VIP and peers while etcd is unreachable.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    pub address: Option<Ipv4Addr>,
    pub pod_subnet: Option<Ipv4Net>,
    #[serde(default)]
    pub peers: Vec<NodeRecord>,
}

impl Cache {
    pub fn load(dir: &Path) -> Option<Cache> {
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()
    }

    pub fn save(&self, dir: &Path) {
        let tmp = dir.join(".state.json.tmp");
        if let Ok(b) = serde_json::to_vec_pretty(self)
            && std::fs::write(&tmp, b).is_ok()
        {
            let _ = std::fs::rename(&tmp, dir.join("state.json"));
        }
    }
}

/// The control plane's view of the cluster.
pub struct Control {
    pub cfg: Config,
    pub shared: Arc<Shared>,
    pub public_key: [u8; 32],
    pub address: Ipv4Addr,
    pub pod_subnet: Option<Ipv4Net>,
    records: HashMap<String, NodeRecord>,
    subnets: HashMap<String, Ipv4Net>,
    addresses: HashMap<String, Ipv4Addr>,
    down_since: HashMap<String, Instant>,
    routed: HashSet<IpNet>,
    published: Option<NodeRecord>,
}

impl Control {
    pub fn new(
        cfg: Config,
        shared: Arc<Shared>,
        public_key: [u8; 32],
        address: Ipv4Addr,
        pod_subnet: Option<Ipv4Net>,
    ) -> Control {
        Control {
            cfg,
            shared,
            public_key,
            address,
            pod_subnet,
            records: HashMap::new(),
            subnets: HashMap::new(),
            addresses: HashMap::new(),
            down_since: HashMap::new(),
            routed: HashSet::new(),
            published: None,
        }
    }

    /// This node's record as it should be published now.
    pub fn own_record(&self) -> NodeRecord {
        let mut skip: Vec<IpNet> = vec![IpNet::V4(self.cfg.overlay_cidr)];
        if let Some(s) = self.pod_subnet {
            skip.push(IpNet::V4(s));
        }
        let port = self.cfg.listen_port;
        let addrs = netcfg::host_addresses(&self.cfg.interface, &skip);
        let mut r = NodeRecord::new(self.cfg.node_name.clone());
        r.public_key = keys::encode(&self.public_key);
        r.address = self.address;
        r.pod_subnet = self.pod_subnet;
        r.endpoints = addrs
            .iter()
            .map(|a| SocketAddr::new(a.addr, port))
            .collect();
        self.shared
            .nat
            .set_host_addresses(&addrs.iter().map(|a| a.addr).collect::<Vec<_>>());
        r.candidates = crate::nat::to_records(&self.shared.nat.candidates().1);
        r.listen_port = port;
        r.updated = unix_now();
        r
    }

    /// True when the record to publish differs from the last one published (ignoring the timestamp).
    fn own_record_changed(&self) -> Option<NodeRecord> {
        let mut r = self.own_record();
        match &self.published {
            Some(p) => {
                r.updated = p.updated;
                if *p == r {
                    None
                } else {
                    r.updated = unix_now();
                    Some(r)
                }
            }
            None => Some(r),
        }
    }

    pub fn load_snapshot(&mut self, snap: &Snapshot) {
        let me = &self.cfg.node_name;
        let now = Instant::now();
        let live: HashSet<&str> = snap.nodes.iter().map(|r| r.node.as_str()).collect();
        for name in self.records.keys() {
            if !live.contains(name.as_str()) {
                self.down_since.entry(name.clone()).or_insert(now);
            }
        }
        for r in &snap.nodes {
            if &r.node != me {
                self.down_since.remove(&r.node);
                self.records.insert(r.node.clone(), r.clone());
            }
        }
        self.subnets = snap
            .subnets
            .iter()
            .map(|c| (c.node.clone(), c.subnet))
            .collect();
        self.addresses = snap
            .addresses
            .iter()
            .map(|c| (c.node.clone(), c.address))
            .collect();
        if let Some(s) = self.subnets.get(me) {
            self.pod_subnet = Some(*s);
        }
    }

    /// Applies one watch event; returns true if the peers or our record may have changed.
    pub fn apply(&mut self, ev: StoreEvent) {
        let me = self.cfg.node_name.clone();
        match ev {
            StoreEvent::NodeUp(r) | StoreEvent::NodeUpdated(r) => {
                if r.node != me {
                    self.down_since.remove(&r.node);
                    self.records.insert(r.node.clone(), r);
                }
            }
            StoreEvent::NodeDown { node } => {
                if node != me && self.records.contains_key(&node) {
                    self.down_since.insert(node, Instant::now());
                }
            }
            StoreEvent::SubnetClaimed(c) => {
                if c.node == me {
                    self.pod_subnet = Some(c.subnet);
                }
                self.subnets.insert(c.node, c.subnet);
            }
            StoreEvent::SubnetReleased { node, .. } => {
                if node == me {
                    self.pod_subnet = None;
                }
                self.subnets.remove(&node);
            }
            StoreEvent::AddressClaimed(c) => {
                self.addresses.insert(c.node, c.address);
            }
            StoreEvent::AddressReleased { node, .. } => {
                self.addresses.remove(&node);
            }
            StoreEvent::Resync(snap) => self.load_snapshot(&snap),
        }
    }

    /// Peers as they should be: one per live record with a valid key, prefixes from the claims.
    fn desired(&self) -> Vec<(PeerConfig, PeerMeta)> {
        let now = Instant::now();
        let subnet_owner: HashMap<Ipv4Net, &str> =
            self.subnets.iter().map(|(n, s)| (*s, n.as_str())).collect();
        let addr_owner: HashMap<Ipv4Addr, &str> = self
            .addresses
            .iter()
            .map(|(n, a)| (*a, n.as_str()))
            .collect();
        let mut out = Vec::new();
        for (name, r) in &self.records {
            if self
                .down_since
                .get(name)
                .is_some_and(|t| now.duration_since(*t) >= DOWN_GRACE)
            {
                continue;
            }
            let Ok(pk) = keys::decode32(&r.public_key) else {
                tracing::warn!(node = %name, "ignoring a registration without a valid public key");
                continue;
            };
            if pk == self.public_key {
                continue;
            }
            // VIP: the address claim of that node; a record's own address only if nobody else claimed it.
            let address = match self.addresses.get(name) {
                Some(a) => *a,
                None if !r.address.is_unspecified()
                    && addr_owner.get(&r.address).is_none_or(|o| o == name) =>
                {
                    r.address
                }
                None => continue,
            };
            let pod = match self.subnets.get(name) {
                Some(s) => Some(*s),
                None => r
                    .pod_subnet
                    .filter(|s| subnet_owner.get(s).is_none_or(|o| o == name)),
            };
            let pod = pod.filter(|s| Some(*s) != self.pod_subnet);
            let mut allowed = vec![IpNet::V4(Ipv4Net::new(address, 32).expect("valid /32"))];
            if let Some(p) = pod {
                allowed.push(IpNet::V4(p));
            }
            // Endpoints are NAT traversal's to choose (crate::nat): the core gets none of its own.
            out.push((
                PeerConfig {
                    name: name.clone(),
                    public_key: pk,
                    allowed,
                    candidates: Vec::new(),
                },
                PeerMeta {
                    node: name.clone(),
                    address,
                    pod_subnet: pod,
                },
            ));
        }
        out
    }

    /// Makes the tunnel core and the kernel routes match the desired peers.
    pub fn reconcile(&mut self) {
        let desired = self.desired();
        let keys: HashSet<[u8; 32]> = desired.iter().map(|(p, _)| p.public_key).collect();
        let now = Instant::now();
        let mut want_routes: HashSet<IpNet> = HashSet::new();
        {
            let mut node = self.shared.node();
            let current: Vec<[u8; 32]> = node.peers().iter().map(|p| p.public_key).collect();
            for k in current {
                if !keys.contains(&k) {
                    node.remove_peer(&k);
                    tracing::info!(key = %keys::encode(&k), "peer removed");
                }
            }
            for (cfg, _) in &desired {
                if node.peer_id(&cfg.public_key).is_none() {
                    tracing::info!(peer = %cfg.name, allowed = ?cfg.allowed, candidates = ?cfg.candidates, "peer added");
                }
                for n in &cfg.allowed {
                    if !IpNet::V4(self.cfg.overlay_cidr).contains(n) {
                        want_routes.insert(*n);
                    }
                }
                node.upsert_peer(now, cfg.clone());
            }
        }
        let nat_peers: Vec<([u8; 32], Vec<evio_nat::Candidate>)> = desired
            .iter()
            .filter_map(|(p, m)| {
                self.records
                    .get(&m.node)
                    .map(|r| (p.public_key, crate::nat::from_record(r)))
            })
            .collect();
        self.shared.nat.set_peers(&nat_peers);
        crate::nat::sync_paths(&self.shared);
        {
            let mut meta = self.shared.meta.lock().unwrap_or_else(|e| e.into_inner());
            meta.clear();
            for (cfg, m) in &desired {
                meta.insert(cfg.public_key, m.clone());
            }
        }
        {
            let mut me = self.shared.me.lock().unwrap_or_else(|e| e.into_inner());
            me.pod_subnet = self.pod_subnet;
        }
        let dev = self.cfg.interface.clone();
        for n in want_routes.difference(&self.routed.clone()) {
            match netcfg::add_route(&dev, n) {
                Ok(()) => {
                    tracing::info!(route = %n, "route added");
                    self.routed.insert(*n);
                }
                Err(e) => tracing::warn!("adding route {n}: {e:#}"),
            }
        }
        for n in self.routed.clone().difference(&want_routes) {
            match netcfg::del_route(&dev, n) {
                Ok(()) => {
                    tracing::info!(route = %n, "route removed");
                    self.routed.remove(n);
                }
                Err(e) => tracing::warn!("removing route {n}: {e:#}"),
            }
        }
        self.shared
            .counters
            .peer_updates
            .fetch_add(1, Ordering::Relaxed);
    }

    fn save_cache(&self) {
        let mut peers: Vec<NodeRecord> = self.records.values().cloned().collect();
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        Cache {
            address: Some(self.address),
            pod_subnet: self.pod_subnet,
            peers,
        }
        .save(&self.cfg.state_dir);
    }

    /// Seeds the peers from the cache (etcd unreachable at start).
    pub fn load_cache(&mut self, cache: &Cache) {
        for r in &cache.peers {
            self.records.insert(r.node.clone(), r.clone());
        }
    }

    /// Runs forever: connect, register, watch, reconcile; reconnect on any etcd failure.
    pub async fn run(mut self, mut store: Option<Store>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let s = match store.take() {
                Some(s) => s,
                None => match Store::connect(&self.cfg.etcd).await {
                    Ok(s) => s,
                    Err(e) => {
                        self.etcd_down(&e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(3));
                        continue;
                    }
                },
            };
            match self.session(&s).await {
                Ok(()) => return,
                Err(e) => {
                    self.etcd_down(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                    store = Some(s);
                }
            }
        }
    }

    fn etcd_down(&self, e: &dyn std::fmt::Display) {
        self.shared
            .counters
            .etcd_errors
            .fetch_add(1, Ordering::Relaxed);
        self.shared
            .counters
            .etcd_connected
            .store(false, Ordering::Relaxed);
        tracing::warn!("etcd: {e}; keeping the last known peers");
    }

    async fn session(&mut self, store: &Store) -> Result<(), evio_store::StoreError> {
        let (snap, mut watch) = store.watch().await?;
        self.shared
            .counters
            .etcd_connected
            .store(true, Ordering::Relaxed);
        self.load_snapshot(&snap);
        if self.pod_subnet.is_none() {
            self.pod_subnet = store
                .subnet_of(&self.cfg.node_name)
                .await?
                .map(|c| c.subnet);
        }
        let mut published_candidates = self.shared.nat.candidates_version();
        let record = self.own_record();
        let reg = store
            .register(record.clone(), Duration::from_secs(self.cfg.lease_ttl))
            .await?;
        self.published = Some(record);
        tracing::info!(node = %self.cfg.node_name, address = %self.address, pod_subnet = ?self.pod_subnet, ttl = self.cfg.lease_ttl, "registered");
        self.reconcile();
        self.save_cache();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_addr_check = Instant::now();
        loop {
            tokio::select! {
                ev = watch.next() => {
                    let Some(ev) = ev else { return Err(evio_store::StoreError::Config("watch ended".into())) };
                    self.shared.counters.etcd_connected.store(true, Ordering::Relaxed);
                    self.apply(ev);
                    while let Some(ev) = watch.try_next() {
                        self.apply(ev);
                    }
                    self.reconcile();
                    self.save_cache();
                }
                _ = tick.tick() => {
                    // Expire peers past their grace period, and republish our record when it changed (pod
                    // subnet claimed after start, host addresses changed).
                    if !self.down_since.is_empty() {
                        let now = Instant::now();
                        let gone: Vec<String> = self.down_since.iter().filter(|(_, t)| now.duration_since(**t) >= DOWN_GRACE).map(|(n, _)| n.clone()).collect();
                        if !gone.is_empty() {
                            self.reconcile();
                            for n in gone {
                                self.down_since.remove(&n);
                                self.records.remove(&n);
                            }
                            self.save_cache();
                        }
                    }
                    let check = self.published.as_ref().map(|p| p.pod_subnet) != Some(self.pod_subnet)
                        || last_addr_check.elapsed() >= Duration::from_secs(10)
                        || self.shared.nat.candidates_version() != published_candidates;
                    if check {
                        last_addr_check = Instant::now();
                        let version = self.shared.nat.candidates_version();
                        if let Some(r) = self.own_record_changed() {
                            match reg.update(r.clone()).await {
                                Ok(()) => {
                                    tracing::info!(pod_subnet = ?r.pod_subnet, endpoints = ?r.endpoints, candidates = r.candidates.len(), "registration updated");
                                    self.published = Some(r);
                                    published_candidates = version;
                                }
                                Err(e) => self.etcd_down(&e),
                            }
                        } else {
                            published_candidates = version;
                        }
                    }
                    if self.shared.stopping() {
                        let _ = reg.revoke().await;
                        return Ok(());
                    }
                }
            }
        }
    }
}
