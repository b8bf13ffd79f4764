//! The connection to etcd and the claim operations (subnets and host overlay addresses).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions,
};
use ipnet::Ipv4Net;
use tracing::warn;

use crate::claim::Claim;
use crate::error::StoreError;
use crate::keys;
use crate::records::{AddressClaim, NodeRecord, SubnetClaim};

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
    /// The etcd create revision of each node's address claim (`addresses/by-node/<node>`), by node: which
    /// node claimed first, as etcd (not the claim's own `since`) says.
    pub address_revisions: HashMap<String, i64>,
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

    pub(crate) async fn get_one(
        &self,
        what: &'static str,
        key: &str,
    ) -> Result<Option<KeyValue>, StoreError> {
        let mut c = self.client.clone();
        let mut r = self.op(what, c.get(key, None)).await?;
        Ok(r.take_kvs().into_iter().next())
    }

    pub(crate) async fn list(
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

    // ---------------------------------------------------------------- nodes

    /// The live registrations (nodes whose lease is alive).
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let (_, kvs) = self.list("list nodes", keys::NODES).await?;
        Ok(kvs.iter().filter_map(node_record).collect())
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

    /// Everything under the prefix at one revision. Records and claims that do not speak for the key they
    /// are stored under are left out (see [`ItemIndex`]).
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(self.snapshot_indexed().await?.0)
    }

    /// [`Store::snapshot`] and the by-item claim keys read with it (for the watch's checks).
    pub(crate) async fn snapshot_indexed(&self) -> Result<(Snapshot, ItemIndex), StoreError> {
        let (revision, kvs) = self.list("read snapshot", keys::PREFIX).await?;
        let mut s = Snapshot {
            revision,
            ..Snapshot::default()
        };
        let mut index = ItemIndex::default();
        for kv in &kvs {
            index.apply_put(kv);
        }
        for kv in &kvs {
            let Ok(key) = kv.key_str() else { continue };
            if key.starts_with(keys::NODES) {
                s.nodes.extend(node_record(kv));
            } else if key.starts_with(keys::SUBNETS_BY_NODE) {
                s.subnets.extend(index.by_node_claim::<SubnetClaim>(kv));
            } else if key.starts_with(keys::ADDRESSES_BY_NODE)
                && let Some(c) = index.by_node_claim::<AddressClaim>(kv)
            {
                s.address_revisions
                    .insert(c.node.clone(), kv.create_revision());
                s.addresses.push(c);
            }
        }
        Ok((s, index))
    }
}

/// A `nodes/<name>` record, if it parses and its `node` field is the `<name>` of its key: a record stored
/// under one name never speaks for another.
pub(crate) fn node_record(kv: &KeyValue) -> Option<NodeRecord> {
    let name = kv.key_str().ok()?.strip_prefix(keys::NODES)?;
    let r: NodeRecord = parse_or_warn(kv)?;
    if r.node != name {
        warn!(
            key = name,
            node = r.node,
            "ignoring a node record stored under another name"
        );
        return None;
    }
    Some(r)
}

/// The values of the by-item claim keys (`subnets/by-subnet/...`, `addresses/by-address/...`). A claim is
/// written under both of its keys with the same value in one transaction, so a by-node claim is only
/// believed when its `node` field is the node of its key and the by-item key of what it claims holds the
/// very same value (whose key, in turn, names what the value claims).
#[derive(Debug, Default, Clone)]
pub(crate) struct ItemIndex {
    values: HashMap<String, Vec<u8>>,
}

impl ItemIndex {
    /// Records a put (ignores keys that are not by-item claim keys).
    pub(crate) fn apply_put(&mut self, kv: &KeyValue) {
        let Ok(key) = kv.key_str() else { return };
        if key.starts_with(keys::SUBNETS_BY_SUBNET) || key.starts_with(keys::ADDRESSES_BY_ADDRESS) {
            self.values.insert(key.to_string(), kv.value().to_vec());
        }
    }

    /// Records a delete.
    pub(crate) fn apply_delete(&mut self, kv: &KeyValue) {
        if let Ok(key) = kv.key_str() {
            self.values.remove(key);
        }
    }

    /// The claim stored at a by-node key, if it is consistent with its key and with the by-item index.
    pub(crate) fn by_node_claim<C: Claim>(&self, kv: &KeyValue) -> Option<C> {
        let key = kv.key_str().ok()?;
        let node = key.strip_prefix(C::BY_NODE)?;
        let c: C = parse_or_warn(kv)?;
        if c.node() != node {
            warn!(
                key,
                claimed_for = c.node(),
                "ignoring a claim stored under another node's key"
            );
            return None;
        }
        let item_key = C::by_item(c.item());
        if self.values.get(&item_key).map(Vec::as_slice) != Some(kv.value()) {
            warn!(
                key,
                item_key, "ignoring a claim its by-item key does not hold"
            );
            return None;
        }
        Some(c)
    }
}

pub(crate) fn check_node(node: &str) -> Result<(), StoreError> {
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
