//! The connection to etcd and the claim operations (subnets and host overlay addresses).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use ipnet::Ipv4Net;
use tracing::{debug, warn};

use crate::error::StoreError;
use crate::keys;
use crate::plan::{SubnetPlan, host_range};
use crate::records::{AddressClaim, NodeRecord, SubnetClaim, unix_now};

/// How many lost races a claim tolerates before giving up. Every lost race means another claim succeeded, so
/// this bounds nothing in practice with a few thousand nodes; it only stops a livelock.
const MAX_ATTEMPTS: u32 = 10_000;

/// The most of the lowest free subnets a claimer that lost races chooses from (a power of two).
const CONTENTION_WINDOW: usize = 64;

/// A pseudo-random number from the node name, the attempt and the clock (no cryptographic need: it only
/// spreads concurrent claimers over different subnets).
fn spread(node: &str, attempt: u32) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(node.as_bytes());
    h.write_u32(attempt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as usize
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://host:port`, `https://host:port`, or bare `host:port`).
    pub endpoints: Vec<String>,
    /// etcd user (auth enabled).
    pub user: Option<String>,
    /// The user's password, read from this file (trailing newline removed).
    pub password_file: Option<PathBuf>,
    /// The user's password given directly (wins over `password_file`).
    pub password: Option<String>,
    /// CA bundle (PEM) to verify the server; enables TLS.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `key`.
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
    /// Bound on connecting and on every request.
    pub timeout: Duration,
}

impl EtcdOptions {
    /// Plain options for `endpoints` with the default 5 s timeout.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            user: None,
            password_file: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Splits a comma-separated endpoint list (`--etcd-endpoints`, `dataStore`).
    pub fn split_endpoints(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            // HTTP/2 pings find a dead or frozen etcd under long-lived streams (watch, lease keep-alive).
            // Not more often than every 10 s and not while idle: etcd (grpc-go) answers pings more frequent
            // than its --grpc-keepalive-min-time (5 s), or without streams, with GOAWAY "too many pings".
            .with_keep_alive(
                Duration::from_secs(10),
                self.timeout.max(Duration::from_secs(1)),
            )
            .with_keep_alive_while_idle(false);
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(f)) => {
                let p = crate::read_secret_file(f, "etcd password").map_err(|e| {
                    StoreError::Config(format!(
                        "cannot read the etcd password file {}: {e}",
                        f.display()
                    ))
                })?;
                Some(p)
            }
            (None, None) => None,
        };
        match (&self.user, password) {
            (Some(u), Some(p)) => o = o.with_user(u.clone(), p).with_auto_token_refresh(true),
            (Some(u), None) => {
                return Err(StoreError::Config(format!(
                    "etcd user {u} given without a password (file)"
                )));
            }
            (None, Some(_)) => {
                return Err(StoreError::Config(
                    "etcd password given without a user".into(),
                ));
            }
            (None, None) => {}
        }
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                StoreError::Config(format!("cannot read the etcd {what} {}: {e}", p.display()))
            })
        };
        if self.ca.is_some() || self.cert.is_some() || self.key.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA")?));
            }
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(
                        read(c, "client certificate")?,
                        read(k, "client key")?,
                    ))
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Config(
                        "--etcd-cert and --etcd-key go together".into(),
                    ));
                }
            }
            o = o.with_tls(tls);
        }
        Ok(o)
    }
}

/// A connection to etcd holding evio's state. Cheap to clone (the connection is shared).
#[derive(Clone)]
pub struct Store {
    pub(crate) client: Client,
    pub(crate) timeout: Duration,
    pub(crate) endpoints: String,
}

/// Where a watch should start and what was there then.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// The etcd revision the snapshot was read at; a watch continues at `revision + 1`.
    pub revision: i64,
    pub nodes: Vec<NodeRecord>,
    pub subnets: Vec<SubnetClaim>,
    pub addresses: Vec<AddressClaim>,
}

impl Store {
    /// Connects and checks that etcd answers within `opts.timeout` (so an unreachable etcd is reported at once,
    /// not at the first claim).
    pub async fn connect(opts: &EtcdOptions) -> Result<Store, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Config("no etcd endpoints given".into()));
        }
        let tls = opts.ca.is_some() || opts.cert.is_some();
        for e in &opts.endpoints {
            if tls && e.starts_with("http://") {
                return Err(StoreError::Config(format!(
                    "TLS options given but endpoint {e} is http://"
                )));
            }
            if !tls && e.starts_with("https://") && opts.ca.is_none() {
                // System roots are not compiled in: an https endpoint needs --etcd-ca.
                return Err(StoreError::Config(format!(
                    "endpoint {e} is https:// but no CA (--etcd-ca) was given"
                )));
            }
        }
        let co = opts.connect_options()?;
        let endpoints = opts.endpoints.join(",");
        // Keep trying until the bound while etcd refuses connections (starting, restarting): only the
        // deadline, a TLS failure or a refusal by etcd itself (e.g. authentication) ends the loop.
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let mut last = String::from("timed out");
        loop {
            let attempt = async {
                let mut client = Client::connect(&opts.endpoints, Some(co.clone())).await?;
                let probe = GetOptions::new().with_keys_only().with_limit(1);
                client.get(keys::PREFIX, Some(probe)).await?;
                Ok::<_, etcd_client::Error>(client)
            };
            let unreachable = |detail: String| StoreError::Unreachable {
                endpoints: endpoints.clone(),
                what: "connect",
                timeout: opts.timeout,
                detail,
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => return Err(unreachable(last)),
                Ok(Ok(client)) => {
                    return Ok(Store {
                        client,
                        timeout: opts.timeout,
                        endpoints,
                    });
                }
                Ok(Err(e)) => match classify(&endpoints, "connect", opts.timeout, e) {
                    StoreError::Unreachable { detail, .. } => {
                        if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                            return Err(unreachable(detail));
                        }
                        last = detail;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => return Err(other),
                },
            }
        }
    }

    /// The bound applied to every request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The underlying etcd client (for callers that need more than this API).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd request under the timeout, mapping errors.
    pub(crate) async fn op<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(StoreError::Unreachable {
                endpoints: self.endpoints.clone(),
                what,
                timeout: self.timeout,
                detail: "timed out".into(),
            }),
            Ok(Err(e)) => Err(classify(&self.endpoints, what, self.timeout, e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    async fn get_one(&self, what: &'static str, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut c = self.client.clone();
        let mut r = self.op(what, c.get(key, None)).await?;
        Ok(r.take_kvs().into_iter().next())
    }

    async fn list(
        &self,
        what: &'static str,
        prefix: &str,
    ) -> Result<(i64, Vec<KeyValue>), StoreError> {
        let mut c = self.client.clone();
        let mut r = self
            .op(what, c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok((rev, r.take_kvs()))
    }

    // ---------------------------------------------------------------- pod subnets

    /// Claims a pod subnet for `node`: its existing claim if it has one, else the lowest free subnet of
    /// `plan`, with one compare-and-swap transaction that creates both index keys or nothing.
    pub async fn claim_subnet(
        &self,
        plan: &SubnetPlan,
        node: &str,
    ) -> Result<SubnetClaim, StoreError> {
        check_node(node)?;
        let by_node = keys::subnet_by_node(node);
        let state_ops = || {
            vec![
                TxnOp::get(by_node.clone(), None),
                TxnOp::get(
                    keys::SUBNETS_BY_SUBNET,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            ]
        };
        // Read the node's own claim and the taken subnets in one consistent read.
        let mut c = self.client.clone();
        let r = self
            .op(
                "claim subnet (read)",
                c.txn(Txn::new().and_then(state_ops())),
            )
            .await?;
        let (mut own, mut taken) = subnet_state(plan, &r.op_responses())?;
        for attempt in 0..MAX_ATTEMPTS {
            if let Some(kv) = own {
                let claim: SubnetClaim = parse_kv(&kv)?;
                if plan.index_of(&claim.subnet).is_none() {
                    return Err(StoreError::OutsidePlan {
                        node: node.to_string(),
                        held: claim.subnet.to_string(),
                        pool: plan.pool(),
                    });
                }
                return Ok(claim);
            }
            // Lowest free first. A claimer that lost a race picks at random among the lowest free subnets
            // instead, in a window that doubles with every lost race (2, 4, ... up to CONTENTION_WINDOW):
            // a few simultaneous claimers still get the lowest subnets, while hundreds do not all retry on
            // the same one (each round costs an etcd commit). The pool fills from the bottom.
            let window = 1usize << attempt.min(CONTENTION_WINDOW.trailing_zeros());
            let free = plan.lowest_free_n(&taken, window);
            let Some(&index) = free.get(if free.is_empty() {
                0
            } else {
                spread(node, attempt) % free.len()
            }) else {
                let held = self
                    .subnet_claims()
                    .await
                    .map(|v| v.len())
                    .unwrap_or(taken.len());
                return Err(StoreError::Exhausted {
                    pool: plan.pool(),
                    capacity: plan.len(),
                    held,
                });
            };
            let subnet = plan.subnet(index).expect("index below len").subnet;
            let claim = SubnetClaim {
                node: node.to_string(),
                subnet,
                since: unix_now(),
            };
            let value = serde_json::to_string(&claim).expect("claim serializes");
            let by_subnet = keys::subnet_by_subnet(&subnet);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(by_subnet.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(by_node.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(by_subnet, value.clone(), None),
                    TxnOp::put(by_node.clone(), value, None),
                ])
                .or_else(state_ops());
            let r = self.op("claim subnet", c.txn(txn)).await?;
            if r.succeeded() {
                debug!(node, %subnet, attempt, "claimed pod subnet");
                return Ok(claim);
            }
            (own, taken) = subnet_state(plan, &r.op_responses())?;
        }
        Err(StoreError::Contention {
            what: "claim subnet",
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The node's subnet claim, if any.
    pub async fn subnet_of(&self, node: &str) -> Result<Option<SubnetClaim>, StoreError> {
        check_node(node)?;
        self.get_one("read subnet claim", &keys::subnet_by_node(node))
            .await?
            .map(|kv| parse_kv(&kv))
            .transpose()
    }

    /// All subnet claims, lowest subnet first.
    pub async fn subnet_claims(&self) -> Result<Vec<SubnetClaim>, StoreError> {
        let (_, kvs) = self
            .list("list subnet claims", keys::SUBNETS_BY_NODE)
            .await?;
        let mut v: Vec<SubnetClaim> = kvs.iter().filter_map(parse_or_warn).collect();
        v.sort_by_key(|c| (u32::from(c.subnet.network()), c.subnet.prefix_len()));
        Ok(v)
    }

    /// Frees the node's subnet claim (both keys in one transaction). Returns the claim that was freed.
    pub async fn release_subnet(&self, node: &str) -> Result<Option<SubnetClaim>, StoreError> {
        check_node(node)?;
        let by_node = keys::subnet_by_node(node);
        for _ in 0..100 {
            let Some(kv) = self.get_one("release subnet (read)", &by_node).await? else {
                return Ok(None);
            };
            let claim: SubnetClaim = parse_kv(&kv)?;
            let by_subnet = keys::subnet_by_subnet(&claim.subnet);
            let mut c = self.client.clone();
            // Delete the by-subnet key only if it still names this node (it always should).
            let owner_is_us = Txn::new()
                .when([Compare::mod_revision(
                    by_subnet.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(by_subnet.clone(), None)]);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    by_node.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([
                    TxnOp::delete(by_node.clone(), None),
                    TxnOp::txn(owner_is_us),
                ]);
            if self.op("release subnet", c.txn(txn)).await?.succeeded() {
                return Ok(Some(claim));
            }
        }
        Err(StoreError::Contention {
            what: "release subnet",
            attempts: 100,
        })
    }

    // ---------------------------------------------------------------- host overlay addresses

    /// Claims a host overlay address (VIP) in `pool` for `node`. Stable: a node that holds one gets it back.
    /// With `requested`, the node gets exactly that address (moving its claim if it held another), or
    /// [`StoreError::Conflict`] when another node holds it. Network and broadcast addresses are never handed
    /// out.
    pub async fn claim_address(
        &self,
        pool: &Ipv4Net,
        node: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<AddressClaim, StoreError> {
        check_node(node)?;
        let pool = pool.trunc();
        let (first, last) = host_range(&pool);
        if let Some(a) = requested {
            let n = u32::from(a);
            if n < first || n > last {
                return Err(StoreError::BadAddress { address: a, pool });
            }
        }
        let by_node = keys::address_by_node(node);
        let state_ops = |target: Option<Ipv4Addr>| {
            let mut v = vec![
                TxnOp::get(by_node.clone(), None),
                TxnOp::get(
                    keys::ADDRESSES_BY_ADDRESS,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            ];
            if let Some(t) = target {
                v.push(TxnOp::get(keys::address_by_address(t), None));
            }
            v
        };
        let mut c = self.client.clone();
        let r = self
            .op(
                "claim address (read)",
                c.txn(Txn::new().and_then(state_ops(requested))),
            )
            .await?;
        let mut state = address_state(&r.op_responses())?;
        for _ in 0..MAX_ATTEMPTS {
            let own: Option<AddressClaim> = state.own.as_ref().map(parse_kv).transpose()?;
            if let Some(o) = &own {
                let inside = (first..=last).contains(&u32::from(o.address));
                if (requested.is_none() || requested == Some(o.address)) && inside {
                    return Ok(o.clone());
                }
            }
            let target = match requested {
                Some(a) => {
                    if let Some(holder) = state.holder.as_ref() {
                        let h: AddressClaim = parse_kv(holder)?;
                        if h.node != node {
                            return Err(StoreError::Conflict {
                                address: a,
                                holder: h.node,
                            });
                        }
                    }
                    a
                }
                None => match (first..=last).find(|n| !state.taken.contains(n)) {
                    Some(n) => Ipv4Addr::from(n),
                    None => {
                        return Err(StoreError::AddressesExhausted {
                            pool,
                            held: state.taken.len(),
                        });
                    }
                },
            };
            let claim = AddressClaim {
                node: node.to_string(),
                address: target,
                since: unix_now(),
            };
            let value = serde_json::to_string(&claim).expect("claim serializes");
            let by_addr = keys::address_by_address(target);
            let mut when = vec![Compare::create_revision(
                by_addr.clone(),
                CompareOp::Equal,
                0,
            )];
            let mut then = vec![
                TxnOp::put(by_addr, value.clone(), None),
                TxnOp::put(by_node.clone(), value, None),
            ];
            match (&state.own, &own) {
                (Some(kv), Some(o)) => {
                    // Moving (requested another address, or the old one is outside the pool): free the old one.
                    when.push(Compare::mod_revision(
                        by_node.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    ));
                    then.push(TxnOp::delete(keys::address_by_address(o.address), None));
                }
                _ => when.push(Compare::create_revision(
                    by_node.clone(),
                    CompareOp::Equal,
                    0,
                )),
            }
            let txn = Txn::new()
                .when(when)
                .and_then(then)
                .or_else(state_ops(Some(target)));
            let r = self.op("claim address", c.txn(txn)).await?;
            if r.succeeded() {
                return Ok(claim);
            }
            state = address_state(&r.op_responses())?;
            if requested.is_none() {
                state.holder = None;
            }
        }
        Err(StoreError::Contention {
            what: "claim address",
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The node's address claim, if any.
    pub async fn address_of(&self, node: &str) -> Result<Option<AddressClaim>, StoreError> {
        check_node(node)?;
        self.get_one("read address claim", &keys::address_by_node(node))
            .await?
            .map(|kv| parse_kv(&kv))
            .transpose()
    }

    /// All address claims, lowest address first.
    pub async fn address_claims(&self) -> Result<Vec<AddressClaim>, StoreError> {
        let (_, kvs) = self
            .list("list address claims", keys::ADDRESSES_BY_NODE)
            .await?;
        let mut v: Vec<AddressClaim> = kvs.iter().filter_map(parse_or_warn).collect();
        v.sort_by_key(|c| u32::from(c.address));
        Ok(v)
    }

    /// Frees the node's address claim (both keys in one transaction).
    pub async fn release_address(&self, node: &str) -> Result<Option<AddressClaim>, StoreError> {
        check_node(node)?;
        let by_node = keys::address_by_node(node);
        for _ in 0..100 {
            let Some(kv) = self.get_one("release address (read)", &by_node).await? else {
                return Ok(None);
            };
            let claim: AddressClaim = parse_kv(&kv)?;
            let by_addr = keys::address_by_address(claim.address);
            let owner_is_us = Txn::new()
                .when([Compare::value(
                    by_addr.clone(),
                    CompareOp::Equal,
                    kv.value().to_vec(),
                )])
                .and_then([TxnOp::delete(by_addr, None)]);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    by_node.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([
                    TxnOp::delete(by_node.clone(), None),
                    TxnOp::txn(owner_is_us),
                ]);
            let mut c = self.client.clone();
            if self.op("release address", c.txn(txn)).await?.succeeded() {
                return Ok(Some(claim));
            }
        }
        Err(StoreError::Contention {
            what: "release address",
            attempts: 100,
        })
    }

    // ---------------------------------------------------------------- nodes

    /// The live registrations (nodes whose lease is alive).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let (_, kvs) = self.list("list nodes", keys::NODES).await?;
        Ok(kvs.iter().filter_map(parse_or_warn).collect())
    }

    /// The node's live registration, if any.
    pub async fn node(&self, node: &str) -> Result<Option<NodeRecord>, StoreError> {
        check_node(node)?;
        self.get_one("read node", &keys::node(node))
            .await?
            .map(|kv| parse_kv(&kv))
            .transpose()
    }

    /// True while the node is registered with a live lease.
    pub async fn is_alive(&self, node: &str) -> Result<bool, StoreError> {
        Ok(self.node(node).await?.is_some())
    }

    /// Everything under the prefix at one revision.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (revision, kvs) = self.list("read snapshot", keys::PREFIX).await?;
        let mut s = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for kv in &kvs {
            let Ok(key) = kv.key_str() else { continue };
            if key.starts_with(keys::NODES) {
                s.nodes.extend(parse_or_warn::<NodeRecord>(kv));
            } else if key.starts_with(keys::SUBNETS_BY_NODE) {
                s.subnets.extend(parse_or_warn::<SubnetClaim>(kv));
            } else if key.starts_with(keys::ADDRESSES_BY_NODE) {
                s.addresses.extend(parse_or_warn::<AddressClaim>(kv));
            }
        }
        Ok(s)
    }
}

/// The first op response of a txn as a plain list of key-values.
fn kvs_of(r: &TxnOpResponse) -> &[KeyValue] {
    match r {
        TxnOpResponse::Get(g) => g.kvs(),
        _ => &[],
    }
}

fn subnet_state(
    plan: &SubnetPlan,
    rs: &[TxnOpResponse],
) -> Result<(Option<KeyValue>, HashSet<u64>), StoreError> {
    let own = rs.first().and_then(|r| kvs_of(r).first().cloned());
    let mut taken = HashSet::new();
    if let Some(r) = rs.get(1) {
        for kv in kvs_of(r) {
            let key = kv.key_str().unwrap_or_default();
            let seg = key
                .strip_prefix(keys::SUBNETS_BY_SUBNET)
                .unwrap_or_default();
            match keys::parse_subnet_segment(seg) {
                Some(net) => taken.extend(plan.overlapping(&net)),
                None => warn!(key, "ignoring an unparsable subnet claim key"),
            }
        }
    }
    Ok((own, taken))
}

struct AddressState {
    own: Option<KeyValue>,
    taken: HashSet<u32>,
    holder: Option<KeyValue>,
}

fn address_state(rs: &[TxnOpResponse]) -> Result<AddressState, StoreError> {
    let own = rs.first().and_then(|r| kvs_of(r).first().cloned());
    let mut taken = HashSet::new();
    if let Some(r) = rs.get(1) {
        for kv in kvs_of(r) {
            let key = kv.key_str().unwrap_or_default();
            match key
                .strip_prefix(keys::ADDRESSES_BY_ADDRESS)
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            {
                Some(a) => {
                    taken.insert(u32::from(a));
                }
                None => warn!(key, "ignoring an unparsable address claim key"),
            }
        }
    }
    let holder = rs.get(2).and_then(|r| kvs_of(r).first().cloned());
    Ok(AddressState { own, taken, holder })
}

fn check_node(node: &str) -> Result<(), StoreError> {
    if keys::valid_node_name(node) {
        Ok(())
    } else {
        Err(StoreError::InvalidNodeName(node.to_string()))
    }
}

pub(crate) fn parse_kv<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: e.to_string(),
    })
}

pub(crate) fn parse_or_warn<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    match parse_kv(kv) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!("{e}");
            None
        }
    }
}

/// Maps an etcd client error: transport failures and "unavailable" become [`StoreError::Unreachable`].
pub(crate) fn classify(
    endpoints: &str,
    what: &'static str,
    timeout: Duration,
    e: etcd_client::Error,
) -> StoreError {
    use etcd_client::Error as E;
    let unreachable = match &e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) || (s.code() == tonic::Code::Unknown && s.message().contains("transport"))
        }
        _ => false,
    };
    let detail = e.to_string();
    let tls_words = [
        "Certificate",
        "certificate",
        "handshake",
        "alert",
        "UnknownIssuer",
        "TLS",
        "tls",
    ];
    if unreachable && tls_words.iter().any(|w| detail.contains(w)) {
        StoreError::Tls {
            endpoints: endpoints.to_string(),
            what,
            detail,
        }
    } else if unreachable {
        StoreError::Unreachable {
            endpoints: endpoints.to_string(),
            what,
            timeout,
            detail,
        }
    } else {
        StoreError::Etcd { what, source: e }
    }
}

/// Map of node name to subnet, handy for routing.
pub fn subnets_by_node(claims: &[SubnetClaim]) -> HashMap<String, Ipv4Net> {
    claims.iter().map(|c| (c.node.clone(), c.subnet)).collect()
}
