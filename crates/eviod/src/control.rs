//! The control plane's I/O: the etcd session (registration, watch), and applying what [`Cluster`] decides
//! to the tunnel core, NAT traversal and the kernel routes. The rules (which registrations become peers,
//! with which prefixes) are in `cluster.rs`. etcd being unreachable changes nothing in the data plane: the
//! last known peers stay.
//!
//! Blocking work stays off the single-threaded async runtime (its etcd watch and lease keep-alives): route
//! changes (netlink) and the cache file go to the `evio-apply` thread; the tunnel core takes no lock a
//! packet could be waiting for (peer changes build a new table and swap it); NAT traversal computes a
//! peer's check key (X25519, ~50 µs) once per new peer, outside its lock. What remains inline is cheap and
//! waits on nothing outside the kernel: `getifaddrs` (the host's addresses, every 10 s and on changes),
//! the X25519s of new peers, and certificate checks (once per record, `cluster.rs`).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use evio_store::{AddressClaim, NodeRecord, Store, StoreError, SubnetClaim, unix_now};
use evio_tunnel::PeerConfig;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Desired, HostFacts};
use crate::config::Config;
use crate::keys;
use crate::netcfg;
use crate::state::{PeerMeta, Shared};

/// Cached in `<state-dir>/state.json`, to come back with the same VIP and peers while etcd is unreachable.
/// The claims are cached with the records: a peer's prefixes come only from its claims.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    pub address: Option<Ipv4Addr>,
    pub pod_subnet: Option<Ipv4Net>,
    #[serde(default)]
    pub peers: Vec<NodeRecord>,
    #[serde(default)]
    pub addresses: Vec<AddressClaim>,
    #[serde(default)]
    pub subnets: Vec<SubnetClaim>,
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

/// Where routes through the tunnel device are installed (the kernel; a recording fake in tests).
pub trait RouteTable {
    fn add(&mut self, net: &IpNet) -> anyhow::Result<()>;
    fn del(&mut self, net: &IpNet) -> anyhow::Result<()>;
}

/// The kernel's main table, routes through `dev`.
pub struct KernelRoutes {
    pub dev: String,
}

impl RouteTable for KernelRoutes {
    fn add(&mut self, net: &IpNet) -> anyhow::Result<()> {
        netcfg::add_route(&self.dev, net)
    }

    fn del(&mut self, net: &IpNet) -> anyhow::Result<()> {
        netcfg::del_route(&self.dev, net)
    }
}

/// Makes the routes in `table` (of which `routed` are installed) match `want`; a failed change stays to do
/// at the next call.
pub fn sync_routes(table: &mut dyn RouteTable, routed: &mut HashSet<IpNet>, want: &HashSet<IpNet>) {
    let mut add: Vec<IpNet> = want.difference(routed).copied().collect();
    add.sort();
    for n in add {
        match table.add(&n) {
            Ok(()) => {
                tracing::info!(route = %n, "route added");
                routed.insert(n);
            }
            Err(e) => tracing::warn!("adding route {n}: {e:#}"),
        }
    }
    let mut del: Vec<IpNet> = routed.difference(want).copied().collect();
    del.sort();
    for n in del {
        match table.del(&n) {
            Ok(()) => {
                tracing::info!(route = %n, "route removed");
                routed.remove(&n);
            }
            Err(e) => tracing::warn!("removing route {n}: {e:#}"),
        }
    }
}

/// What the control plane hands to its blocking-work thread.
enum Job {
    /// Make the kernel routes through the tunnel these.
    Routes(HashSet<IpNet>),
    /// Write the cache (state.json).
    Save(Cache),
}

/// Starts the thread that does the control plane's blocking work off its async runtime: netlink route
/// changes and the cache file (with many peers, hundreds of route changes or a large file would otherwise
/// stall the etcd watch and lease keep-alives on the single-threaded runtime). Jobs are coalesced: only
/// the latest routes and the latest cache matter; a failed route change is retried with the next job.
fn spawn_blocking_work(
    mut routes: Box<dyn RouteTable + Send>,
    dir: std::path::PathBuf,
) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let r = std::thread::Builder::new()
        .name("evio-apply".into())
        .spawn(move || {
            let mut routed: HashSet<IpNet> = HashSet::new();
            while let Ok(job) = rx.recv() {
                let (mut want, mut save) = (None, None);
                for j in std::iter::once(job).chain(rx.try_iter()) {
                    match j {
                        Job::Routes(w) => want = Some(w),
                        Job::Save(c) => save = Some(c),
                    }
                }
                if let Some(w) = want {
                    sync_routes(routes.as_mut(), &mut routed, &w);
                }
                if let Some(c) = save {
                    c.save(&dir);
                }
            }
        });
    if let Err(e) = r {
        tracing::error!("cannot start the control plane's worker thread: {e}");
    }
    tx
}

/// The IPv4 addresses of the etcd endpoints (URLs or `host:port`), resolved now. Unresolvable ones are left
/// out (and logged).
pub fn etcd_addresses(endpoints: &[String]) -> Vec<IpAddr> {
    let mut v = Vec::new();
    for e in endpoints {
        let rest = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
        let hostport = rest.split('/').next().unwrap_or(rest);
        let hostport = if hostport.rsplit_once(':').is_some() {
            hostport.to_string()
        } else {
            format!("{hostport}:2379")
        };
        match hostport.to_socket_addrs() {
            Ok(a) => v.extend(a.map(|a| a.ip())),
            Err(err) => tracing::warn!("cannot resolve etcd endpoint {e}: {err}"),
        }
    }
    v
}

/// CA mode: the pinned CA, this node's certificate and what renewing it takes.
pub struct CaMode {
    pub ca: evio_trust::CaPublic,
    pub private_key: [u8; 32],
    pub cert: evio_trust::NodeCert,
    /// The certificate as signed (published in our record).
    pub signed: String,
}

/// How often revocations are read from etcd (CA mode): a revoked node leaves every host within this and a
/// reconcile.
const REVOCATION_POLL: Duration = Duration::from_secs(2);
/// How long a registration waits for NAT traversal's candidates (STUN mapping, relay) before going out
/// without them (they follow in an update).
const GATHER_WAIT: Duration = Duration::from_secs(1);
/// Watch events are reconciled at most this often (and the control loop ticks at this period).
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// The peer cache (for a start while etcd is unreachable) is written at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(2);
/// How often peers' certificates are checked against the clock even when nothing changed (CA mode).
const EXPIRY_CHECK: Duration = Duration::from_secs(5);
/// How long after a failed renewal the next one is tried.
const RENEW_RETRY: Duration = Duration::from_secs(30);

type Renewal =
    tokio::task::JoinHandle<Result<(evio_trust::NodeCert, String), evio_trust::client::JoinError>>;

/// The control plane: the etcd session around a [`Cluster`].
pub struct Control {
    pub cfg: Config,
    pub shared: Arc<Shared>,
    pub address: Ipv4Addr,
    cluster: Cluster,
    /// Servers never routed into the tunnel (etcd, STUN, TURN).
    servers: Vec<IpAddr>,
    /// Route changes and cache writes go to the `evio-apply` thread ([`spawn_blocking_work`]).
    work: std::sync::mpsc::Sender<Job>,
    published: Option<NodeRecord>,
    public_key: [u8; 32],
    ca_mode: Option<CaMode>,
    renewal: Option<Renewal>,
    last_renewal: Option<Instant>,
}

impl Control {
    pub fn new(
        cfg: Config,
        shared: Arc<Shared>,
        public_key: [u8; 32],
        address: Ipv4Addr,
        pod_subnet: Option<Ipv4Net>,
        servers: Vec<IpAddr>,
    ) -> Control {
        let facts = HostFacts {
            name: cfg.node_name.clone(),
            public_key,
            address,
            overlay: cfg.overlay_cidr,
            pod_cidr: cfg.pod_cidr,
            pod_cidr6: cfg.pod_cidr6,
            pod_node_prefix6: cfg.pod_node_prefix6,
            overlay6: cfg.overlay_cidr6,
            protected: protected_networks(&cfg, pod_subnet, &servers),
            protected6: protected_networks6(&cfg, &servers),
        };
        let work = spawn_blocking_work(
            Box::new(KernelRoutes {
                dev: cfg.interface.clone(),
            }),
            cfg.state_dir.clone(),
        );
        Control {
            cfg,
            shared,
            address,
            cluster: Cluster::new(facts, pod_subnet),
            servers,
            work,
            published: None,
            public_key,
            ca_mode: None,
            renewal: None,
            last_renewal: None,
        }
    }

    /// Switches to CA mode: peers need certificates from `mode.ca`; ours is published and renewed.
    pub fn set_ca_mode(&mut self, mode: CaMode) {
        self.cluster.set_ca(mode.ca.clone());
        self.cluster
            .set_pod_subnet(mode.cert.pod_subnets.first().copied());
        self.ca_mode = Some(mode);
    }

    /// CA mode: reads the revocations (signed by the CA; others are skipped) and drops revoked peers.
    async fn poll_revocations(&mut self, store: &Store) {
        let Some(m) = &self.ca_mode else { return };
        match evio_trust::client::revocations(store, &m.ca).await {
            Ok(revs) => {
                if revs
                    .iter()
                    .any(|r| r.key().is_ok_and(|k| k == self.public_key))
                {
                    tracing::error!(
                        "this node's key was revoked by the cluster CA: peers no longer accept it"
                    );
                }
                if self.cluster.add_revocations(&revs) {
                    self.reconcile();
                }
            }
            Err(e) => tracing::warn!("reading revocations: {e}"),
        }
    }

    /// CA mode: starts a renewal when the certificate is due, and adopts a renewed one.
    async fn renew_if_due(&mut self, store: &Store) -> bool {
        let Some(m) = &mut self.ca_mode else {
            return false;
        };
        if let Some(h) = &self.renewal
            && h.is_finished()
        {
            let h = self.renewal.take().expect("renewal");
            match h.await {
                Ok(Ok((cert, signed))) => {
                    if let Err(e) = crate::trust::store_certificate(&self.cfg.state_dir, &signed) {
                        tracing::warn!("keeping the renewed certificate: {e:#}");
                    }
                    tracing::info!(
                        serial = cert.serial,
                        not_after = cert.not_after,
                        "certificate renewed"
                    );
                    m.cert = cert;
                    m.signed = signed;
                    return true;
                }
                Ok(Err(e)) => tracing::warn!("renewing the certificate: {e}"),
                Err(e) => tracing::warn!("renewal task: {e}"),
            }
        }
        let due = unix_now() >= m.cert.renew_at();
        let waited = self.last_renewal.is_none_or(|t| t.elapsed() >= RENEW_RETRY);
        if due && waited && self.renewal.is_none() {
            self.last_renewal = Some(Instant::now());
            let (store, ca, key, cert) =
                (store.clone(), m.ca.clone(), m.private_key, m.cert.clone());
            tracing::info!(not_after = cert.not_after, "renewing the certificate");
            self.renewal = Some(tokio::spawn(async move {
                evio_trust::client::renew(&store, &ca, &key, &cert, crate::trust::SIGNER_TIMEOUT)
                    .await
            }));
        }
        false
    }

    fn pod_subnet(&self) -> Option<Ipv4Net> {
        self.cluster.pod_subnet()
    }

    /// This node's record as it should be published now.
    pub fn own_record(&self) -> NodeRecord {
        let mut skip: Vec<IpNet> = self.cfg.overlay_networks();
        if let Some(s) = self.pod_subnet() {
            skip.push(IpNet::V4(s));
        }
        let port = self.cfg.listen_port;
        let addrs = netcfg::host_addresses(&self.cfg.interface, &skip);
        let mut r = NodeRecord::new(self.cfg.node_name.clone());
        r.public_key = keys::encode(&self.public_key);
        r.address = self.address;
        r.pod_subnet = self.pod_subnet();
        r.endpoints = addrs
            .iter()
            .map(|a| SocketAddr::new(a.addr, port))
            .collect();
        self.shared
            .overlay
            .set_host_addresses(&addrs.iter().map(|a| a.network).collect::<Vec<_>>());
        r.candidates = crate::nat::to_records(&self.shared.overlay.candidates().1);
        r.listen_port = port;
        r.certificate = self.ca_mode.as_ref().map(|m| m.signed.clone());
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

    /// Makes the tunnel core, NAT traversal and the kernel routes match what the cluster allows now.
    pub fn reconcile(&mut self) {
        self.cluster.set_unix_time(unix_now());
        let desired = self.cluster.desired(Instant::now());
        self.apply_desired(&desired);
    }

    fn apply_desired(&mut self, desired: &Desired) {
        let keys: HashSet<[u8; 32]> = desired.peers.iter().map(|p| p.grant.public_key).collect();
        let now = Instant::now();
        {
            let node = self.shared.node();
            let current: Vec<[u8; 32]> = node.peers().iter().map(|p| p.public_key).collect();
            for k in current {
                if !keys.contains(&k) {
                    node.remove_peer(&k);
                    tracing::info!(key = %keys::encode(&k), "peer removed");
                }
            }
            for p in &desired.peers {
                // Endpoints are NAT traversal's to choose (the overlay node's): the core gets none of its own.
                let cfg = PeerConfig {
                    name: p.name.clone(),
                    public_key: p.grant.public_key,
                    allowed: p.allowed(),
                };
                if node.peer_id(&cfg.public_key).is_none() {
                    tracing::info!(peer = %cfg.name, allowed = ?cfg.allowed, "peer added");
                }
                node.upsert_peer(now, cfg);
            }
        }
        if self.shared.overlay.lazy() {
            let pinned = &self.cfg.peers.pinned;
            self.shared.overlay.set_pinned(
                desired
                    .peers
                    .iter()
                    .filter(|p| pinned.contains(&p.name))
                    .map(|p| p.grant.public_key)
                    .collect(),
            );
        }
        let nat_peers: Vec<([u8; 32], Vec<evio_overlay::Candidate>)> = desired
            .peers
            .iter()
            .map(|p| (p.grant.public_key, crate::nat::from_record(&p.record)))
            .collect();
        self.shared.overlay.set_peers(&nat_peers, Instant::now());
        {
            let mut meta = self.shared.meta.lock().unwrap_or_else(|e| e.into_inner());
            meta.clear();
            for p in &desired.peers {
                meta.insert(
                    p.grant.public_key,
                    PeerMeta {
                        node: p.name.clone(),
                        address: p.grant.address,
                        pod_subnet: p.grant.pod_subnet,
                    },
                );
            }
        }
        {
            let mut me = self.shared.me.lock().unwrap_or_else(|e| e.into_inner());
            me.pod_subnet = self.pod_subnet();
        }
        self.shared
            .counters
            .registrations_rejected
            .store(desired.rejected.len() as u64, Ordering::Relaxed);
        let want: HashSet<IpNet> = desired.routes.iter().copied().collect();
        let _ = self.work.send(Job::Routes(want));
        self.shared
            .counters
            .peer_updates
            .fetch_add(1, Ordering::Relaxed);
    }

    fn save_cache(&self) {
        let (peers, addresses, subnets) = self.cluster.state();
        let _ = self.work.send(Job::Save(Cache {
            address: Some(self.address),
            pod_subnet: self.pod_subnet(),
            peers,
            addresses,
            subnets,
        }));
    }

    /// Seeds the peers from the cache (etcd unreachable at start).
    pub fn load_cache(&mut self, cache: &Cache) {
        self.cluster
            .load_cache(&cache.peers, &cache.addresses, &cache.subnets);
    }

    /// Recomputes the protected networks (the host's addresses may have changed).
    fn refresh_protected(&mut self) {
        let p = protected_networks(&self.cfg, self.pod_subnet(), &self.servers);
        let p6 = protected_networks6(&self.cfg, &self.servers);
        let f = self.cluster.facts();
        if p != f.protected || p6 != f.protected6 {
            tracing::info!(protected = ?p, protected6 = ?p6, "networks never routed into the tunnel");
            self.cluster.set_protected(p, p6);
            self.reconcile();
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
                    // A refused registration (logged by the session) is not an etcd failure.
                    if !matches!(e, StoreError::NameTaken { .. }) {
                        self.etcd_down(&e);
                    }
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

    async fn session(&mut self, store: &Store) -> Result<(), StoreError> {
        let (snap, mut watch) = store.watch().await?;
        self.shared
            .counters
            .etcd_connected
            .store(true, Ordering::Relaxed);
        self.cluster.load_snapshot(&snap, Instant::now());
        if self.pod_subnet().is_none() {
            let s = store
                .subnet_of(&self.cfg.node_name)
                .await?
                .map(|c| c.subnet);
            self.cluster.set_pod_subnet(s);
        }
        // The first registration waits (at most GATHER_WAIT) for the STUN mapping and the relay: every
        // update of our record goes to every watcher in the fleet, and a record registered before
        // gathering was updated twice more within a few milliseconds (issue 12).
        let _ = self.own_record(); // gives the agent our host addresses
        let gather_until = Instant::now() + GATHER_WAIT;
        while !self.shared.overlay.gathered() && Instant::now() < gather_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut published_candidates = self.shared.overlay.candidates_version();
        let record = self.own_record();
        let reg = match store
            .register(record.clone(), Duration::from_secs(self.cfg.lease_ttl))
            .await
        {
            Ok(r) => {
                self.shared
                    .counters
                    .name_taken
                    .store(false, Ordering::Relaxed);
                r
            }
            Err(e @ StoreError::NameTaken { .. }) => {
                self.shared
                    .counters
                    .name_taken
                    .store(true, Ordering::Relaxed);
                // Not an etcd failure: another agent holds our name. Keep the last known peers and retry (the
                // name is free again when that registration's lease expires), loudly.
                tracing::error!("{e}; retrying");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.published = Some(record);
        tracing::info!(node = %self.cfg.node_name, address = %self.address, pod_subnet = ?self.pod_subnet(), ttl = self.cfg.lease_ttl, "registered");
        self.poll_revocations(store).await;
        self.reconcile();
        self.save_cache();
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        let (mut last_reconcile, mut pending_reconcile) = (Instant::now(), false);
        let (mut last_save, mut pending_save) = (Instant::now(), false);
        let mut last_addr_check = Instant::now();
        let mut last_revocations = Instant::now();
        let mut last_expiry_check = Instant::now();
        let mut paths = crate::paths::Publisher::new();
        loop {
            tokio::select! {
                ev = watch.next() => {
                    let Some(ev) = ev else { return Err(evio_store::StoreError::Config("watch ended".into())) };
                    self.shared.counters.etcd_connected.store(true, Ordering::Relaxed);
                    self.cluster.apply(ev, Instant::now());
                    while let Some(ev) = watch.try_next() {
                        self.cluster.apply(ev, Instant::now());
                    }
                    // A burst of events (a fleet starting: registrations, claims, certificates, each
                    // sent to every watcher) is applied at once but reconciled at most every
                    // RECONCILE_EVERY: the rest waits for the tick, so a node's work per second stays
                    // bounded however many nodes change.
                    if last_reconcile.elapsed() >= RECONCILE_EVERY {
                        self.reconcile();
                        last_reconcile = Instant::now();
                    } else {
                        pending_reconcile = true;
                    }
                    pending_save = true;
                }
                _ = tick.tick() => {
                    if pending_reconcile {
                        pending_reconcile = false;
                        self.reconcile();
                        last_reconcile = Instant::now();
                    }
                    if pending_save && last_save.elapsed() >= SAVE_EVERY {
                        pending_save = false;
                        self.save_cache();
                        last_save = Instant::now();
                    }
                    // Expire peers past their grace period, and republish our record when it changed (pod
                    // subnet claimed after start, host addresses changed).
                    if self.cluster.has_pending_downs() && self.cluster.expire(Instant::now()) {
                        self.reconcile();
                        self.save_cache();
                    }
                    let mut renewed = false;
                    if self.ca_mode.is_some() {
                        if last_revocations.elapsed() >= REVOCATION_POLL {
                            last_revocations = Instant::now();
                            self.poll_revocations(store).await;
                        }
                        if last_expiry_check.elapsed() >= EXPIRY_CHECK {
                            last_expiry_check = Instant::now();
                            self.reconcile();
                        }
                        renewed = self.renew_if_due(store).await;
                    }
                    let check = renewed
                        || self.published.as_ref().map(|p| p.pod_subnet) != Some(self.pod_subnet())
                        || last_addr_check.elapsed() >= Duration::from_secs(10)
                        || self.shared.overlay.candidates_version() != published_candidates;
                    if check {
                        last_addr_check = Instant::now();
                        self.refresh_protected();
                        let version = self.shared.overlay.candidates_version();
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
                    paths.tick(store, reg.lease_id(), &self.shared).await;
                    if self.shared.stopping() {
                        if pending_save {
                            self.save_cache();
                        }
                        let _ = reg.revoke().await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// The networks never routed into the tunnel: the host's own addresses and networks (every interface but
/// the tunnel's, loopback included) and the etcd, STUN and TURN servers. A network that overlaps the
/// overlay, the pod CIDR or our own pod subnet (the pod bridge's) is protected by its address alone: those
/// ranges are the overlay's own.
fn protected_networks(cfg: &Config, own_pod: Option<Ipv4Net>, servers: &[IpAddr]) -> Vec<Ipv4Net> {
    let overlaps = |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
    let ours: Vec<Ipv4Net> = [Some(cfg.overlay_cidr), cfg.pod_cidr, own_pod]
        .into_iter()
        .flatten()
        .collect();
    let mut v = Vec::new();
    for n in netcfg::host_networks(&cfg.interface) {
        v.push(Ipv4Net::new(n.addr(), 32).expect("valid /32"));
        let net = n.trunc();
        if !ours.iter().any(|o| overlaps(o, &net)) {
            v.push(net);
        }
    }
    for s in servers {
        if let IpAddr::V4(a) = s {
            v.push(Ipv4Net::new(*a, 32).expect("valid /32"));
        }
    }
    v.sort();
    v.dedup();
    v
}

/// The IPv6 networks never routed into the tunnel (with IPv6 ranges, their pod subnets and VIPs are): the
/// host's own (a network overlapping those ranges protected by its address alone) and the servers'.
fn protected_networks6(cfg: &Config, servers: &[IpAddr]) -> Vec<Ipv6Net> {
    let ours: Vec<Ipv6Net> = [cfg.pod_cidr6, cfg.overlay_cidr6]
        .into_iter()
        .flatten()
        .collect();
    if ours.is_empty() {
        return Vec::new();
    }
    let mut v = Vec::new();
    for n in netcfg::host_networks6(&cfg.interface) {
        v.push(Ipv6Net::new(n.addr(), 128).expect("valid /128"));
        let net = n.trunc();
        if !ours
            .iter()
            .any(|o| net.contains(&o.network()) || o.contains(&net.network()))
        {
            v.push(net);
        }
    }
    for s in servers {
        if let IpAddr::V6(a) = s {
            v.push(Ipv6Net::new(*a, 128).expect("valid /128"));
        }
    }
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recording {
        ops: Vec<String>,
        fail: HashSet<IpNet>,
    }

    impl RouteTable for Recording {
        fn add(&mut self, net: &IpNet) -> anyhow::Result<()> {
            self.ops.push(format!("add {net}"));
            if self.fail.contains(net) {
                anyhow::bail!("refused");
            }
            Ok(())
        }

        fn del(&mut self, net: &IpNet) -> anyhow::Result<()> {
            self.ops.push(format!("del {net}"));
            Ok(())
        }
    }

    fn nets(v: &[&str]) -> HashSet<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn routes_follow_the_desired_set_and_failures_are_retried() {
        let mut t = Recording::default();
        let mut routed = HashSet::new();
        t.fail = nets(&["10.244.3.0/24"]);
        sync_routes(
            &mut t,
            &mut routed,
            &nets(&["10.244.2.0/24", "10.244.3.0/24"]),
        );
        assert_eq!(routed, nets(&["10.244.2.0/24"]));
        t.fail.clear();
        t.ops.clear();
        sync_routes(&mut t, &mut routed, &nets(&["10.244.3.0/24"]));
        assert_eq!(t.ops, ["add 10.244.3.0/24", "del 10.244.2.0/24"]);
        assert_eq!(routed, nets(&["10.244.3.0/24"]));
        t.ops.clear();
        sync_routes(&mut t, &mut routed, &nets(&["10.244.3.0/24"]));
        assert!(t.ops.is_empty());
    }

    fn config(extra: &[&str]) -> Config {
        use clap::Parser;
        let base = [
            "eviod",
            "--node-name",
            "n",
            "--etcd-endpoints",
            "x",
            "--state-dir",
            "/tmp",
        ];
        crate::config::Args::parse_from(base.iter().chain(extra))
            .resolve()
            .unwrap()
    }

    #[test]
    fn protected_networks_are_the_hosts_and_the_servers() {
        let n = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let servers: Vec<IpAddr> =
            vec!["192.0.2.7".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let p = protected_networks(&config(&[]), None, &servers);
        // Loopback (up in every namespace) with its network, and the servers as /32.
        assert!(
            p.contains(&n("127.0.0.1/32")) && p.contains(&n("127.0.0.0/8")),
            "{p:?}"
        );
        assert!(p.contains(&n("192.0.2.7/32")), "{p:?}");
        // A host network that overlaps the overlay (or the pod CIDR, or our pod subnet) is protected by its
        // address only.
        for extra in [
            &["--overlay-cidr", "127.1.0.0/16"][..],
            &["--pod-cidr", "127.0.0.0/16"][..],
        ] {
            let p = protected_networks(&config(extra), None, &servers);
            assert!(
                p.contains(&n("127.0.0.1/32")) && !p.contains(&n("127.0.0.0/8")),
                "{extra:?} {p:?}"
            );
        }
        let p = protected_networks(&config(&[]), Some(n("127.0.0.0/24")), &[]);
        assert!(!p.contains(&n("127.0.0.0/8")), "{p:?}");
    }

    #[test]
    fn etcd_endpoints_resolve_to_their_addresses() {
        let v = etcd_addresses(&[
            "http://127.0.0.7:2379".into(),
            "127.0.0.8:1".into(),
            "https://127.0.0.9".into(),
        ]);
        let want: Vec<IpAddr> = ["127.0.0.7", "127.0.0.8", "127.0.0.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v, want);
    }
}
