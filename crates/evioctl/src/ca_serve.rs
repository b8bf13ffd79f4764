//! `evioctl ca serve`: the signer. Watches join requests (`/evio/v1/join/<node>`) and renewal requests
//! (`/evio/v1/renew/<node>`) and answers each with a certificate (`/evio/v1/certs/<node>`) or a CA-signed
//! refusal (`/evio/v1/refused/<node>`, on a 2-minute lease), then deletes the request.
//!
//! A join is granted when: the request parses and is for the node its key names; its token is known, not
//! expired and not used up; its MAC verifies with the token's key and its time is within the clock skew;
//! the node's key is not revoked; the name is not certified (current, unrevoked certificate) for another key;
//! and the node's VIP (and, with `--pod-cidr`, pod subnet) can be claimed. The certificate grants exactly
//! those claims. A refused join writes no claim and no certificate (a subnet claim failing after the address
//! claim releases the address claim again when it was new).
//!
//! A renewal is granted when the node's current certificate (unexpired, unrevoked) has the request's key and
//! serial, the request's MAC proves the node holds that key, and the node still holds the same claims.
//!
//! Everything read from etcd is attacker input: values over the size bound are deleted unread, at most
//! [`MAX_PENDING`] requests of each kind are read at a time and at most [`CONCURRENT_REQUESTS`] handled at
//! once (one per node), and every field is checked by evio-trust.
//! One signer per CA directory (an exclusive lock on `<ca-dir>/serve.lock`).
//!
//! The signer decides from its own ledger in the CA directory (`issued/`, `revoked/`, see
//! `evio_trust::ledger`) as well as from etcd, since an etcd writer can delete a certificate (to free a name
//! for another key) or a revocation (to let a revoked key back in).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use evio_store::etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use evio_store::{Store, StoreError, SubnetPlan, keys, parse_cidr};
use evio_trust::{
    CaKey, CaPublic, CertRecord, JoinRequest, MAX_CERT_LIFETIME_SECS, MAX_REQUEST_LEN, NodeCert,
    Refusal, RefusalRecord, RenewRequest, TokenRecord, TrustError, unix_now,
};
use ipnet::Ipv4Net;
use tracing::{info, warn};

use crate::cni_config::{EtcdArgs, runtime};
use crate::duration::parse_duration;

/// Most requests of each kind read at once (more are read when a slot is free).
pub const MAX_PENDING: i64 = 64;
/// Requests handled at once.
const CONCURRENT_REQUESTS: usize = 64;
/// A request whose handling failed (etcd, files) is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A join or renewal request as read from etcd.
struct Request {
    join: bool,
    key: String,
    node: String,
    value: Vec<u8>,
    /// The revision the request was written at.
    written: i64,
}

/// What the requests being served share.
#[derive(Default)]
struct Serving {
    /// Nodes with a request being handled.
    busy: HashSet<String>,
    /// Nodes whose last request failed, and when to try again.
    failed: HashMap<String, Instant>,
    /// The revision of each node's request last handled: a read taken before its deletion still shows it,
    /// and it must not be handled (a certificate issued) twice.
    handled: HashMap<String, i64>,
}
/// How long a refusal stays in etcd (seconds).
pub const REFUSAL_TTL: i64 = 120;

#[derive(clap::Args)]
pub struct Args {
    /// The CA directory (`evioctl ca init --dir`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The overlay network host VIPs are claimed in (as eviod's --overlay-cidr).
    #[arg(long, default_value = "10.10.0.0/16")]
    pub overlay_cidr: String,
    /// The pod CIDR node subnets are cut from; without it certificates grant no pod subnet.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// Bits of the pod CIDR that number the nodes (node subnet prefix = pod CIDR prefix + node bits).
    #[arg(long, default_value_t = 8)]
    pub node_bits: u8,
    /// Lifetime of the certificates (e.g. 24h, 30d; at most 366d). Nodes renew before it ends.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: u64,
}

/// The signer's state: the CA and what it may grant.
pub struct Signer {
    ca: CaKey,
    public: CaPublic,
    ca_dir: PathBuf,
    overlay: Ipv4Net,
    plan: Option<SubnetPlan>,
    cert_ttl: u64,
    /// Held while a token's use is re-read and saved: joins handled at once must not both spend the last
    /// use of a token.
    spending: tokio::sync::Mutex<()>,
}

/// Runs file work (writes that fsync) on tokio's blocking pool: on the signer's one async thread, two
/// fsyncs per join stalled every request in flight (issue 12: 100 hosts joining at once were signed about
/// 9 a second on a busy disk).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a file task of the signer failed")
}

/// What spending a use of a token came to.
enum Spend {
    Spent,
    /// Gone, expired or used up since the request was first checked.
    Unusable(TrustError),
    NotSaved(TrustError),
}

enum Verdict {
    Issue(NodeCert),
    Refuse(String),
}

/// Store errors that are the etcd connection's fault are retried; the rest refuse the request.
fn refusal_or_retry(e: StoreError) -> Result<Verdict> {
    match e {
        StoreError::Unreachable { .. } | StoreError::Tls { .. } | StoreError::Etcd { .. } => {
            Err(e.into())
        }
        other => Ok(Verdict::Refuse(other.to_string())),
    }
}

impl Signer {
    pub fn new(args: &Args) -> Result<Signer> {
        let ca = CaKey::load_dir(&args.ca_dir)
            .with_context(|| format!("loading the CA in {}", args.ca_dir.display()))?;
        let overlay = parse_cidr(&args.overlay_cidr).map_err(|e| anyhow!("--overlay-cidr: {e}"))?;
        let first = overlay.network();
        if first.is_loopback()
            || first.is_multicast()
            || first.is_unspecified()
            || overlay.prefix_len() > 30
        {
            bail!("--overlay-cidr {overlay}: not a usable overlay network");
        }
        let plan = args
            .pod_cidr
            .as_deref()
            .map(|p| SubnetPlan::parse(p, args.node_bits))
            .transpose()
            .map_err(|e| anyhow!("--pod-cidr/--node-bits: {e}"))?;
        if args.cert_ttl > MAX_CERT_LIFETIME_SECS {
            bail!("--cert-ttl is longer than {MAX_CERT_LIFETIME_SECS} s");
        }
        Ok(Signer {
            public: ca.public(),
            ca,
            ca_dir: args.ca_dir.clone(),
            overlay,
            plan,
            cert_ttl: args.cert_ttl,
            spending: tokio::sync::Mutex::new(()),
        })
    }

    /// The pending requests, joins first, and the revision they were read at.
    async fn pending(&self, store: &Store) -> Result<(i64, Vec<Request>)> {
        let mut c = store.client();
        let opts = || GetOptions::new().with_prefix().with_limit(MAX_PENDING);
        let joins = c.get(keys::JOIN, Some(opts())).await?;
        let rev = joins.header().map(|h| h.revision()).unwrap_or(0);
        let renews = c.get(keys::RENEW, Some(opts())).await?;
        let mut out = Vec::new();
        for (join, prefix, kvs) in [
            (true, keys::JOIN, joins.kvs()),
            (false, keys::RENEW, renews.kvs()),
        ] {
            for kv in kvs {
                let Ok(key) = kv.key_str() else { continue };
                out.push(Request {
                    join,
                    key: key.to_string(),
                    node: key.strip_prefix(prefix).unwrap_or_default().to_string(),
                    value: kv.value().to_vec(),
                    written: kv.mod_revision(),
                });
            }
        }
        Ok((rev, out))
    }

    /// Serves requests until the task is dropped. Requests of different nodes are independent (claims
    /// are etcd transactions, the ledger has a file per node), so up to [`CONCURRENT_REQUESTS`] are
    /// handled at once, each as soon as it is read: a join costs several etcd round trips, and a hundred
    /// hosts joining together must not wait for each other's in turn, nor for the slowest of a batch (the
    /// signer handled the requests of one read before reading new ones: at 100 nodes the joins took
    /// 4.7-8.5 s). A node has one request handled at a time (its join and renewal never run at once); one
    /// that failed (etcd, files) is retried after [`RETRY_AFTER`].
    pub async fn serve(self: Arc<Self>, store: Store) {
        let state = Arc::new(std::sync::Mutex::new(Serving::default()));
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_REQUESTS));
        let finished = Arc::new(tokio::sync::Notify::new());
        let mut watches: Option<(WatchStream, WatchStream)> = None;
        loop {
            let (rev, requests) = match self.pending(&store).await {
                Ok(r) => r,
                Err(e) => {
                    warn!("reading the requests: {e:#}; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            let now = Instant::now();
            let mut retry_soon = false;
            {
                // Forget what was handled once the read no longer shows it (deleted): bounded by the
                // requests pending.
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.handled
                    .retain(|n, _| requests.iter().any(|r| &r.node == n));
            }
            for r in requests {
                {
                    let st = state.lock().unwrap_or_else(|e| e.into_inner());
                    if st.busy.contains(&r.node)
                        || st.handled.get(&r.node).is_some_and(|w| *w >= r.written)
                    {
                        continue;
                    }
                    if st.failed.get(&r.node).is_some_and(|t| *t > now) {
                        retry_soon = true;
                        continue;
                    }
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    break;
                };
                state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .busy
                    .insert(r.node.clone());
                let (signer, store) = (self.clone(), store.clone());
                let (state, finished) = (state.clone(), finished.clone());
                tokio::spawn(async move {
                    let res = signer
                        .handle(&store, r.join, &r.key, &r.node, &r.value)
                        .await;
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.busy.remove(&r.node);
                    match res {
                        Ok(()) => {
                            st.failed.remove(&r.node);
                            st.handled.insert(r.node, r.written);
                        }
                        Err(e) => {
                            warn!(node = %r.node, "handling a request: {e:#}; retrying");
                            st.failed.insert(r.node, Instant::now() + RETRY_AFTER);
                        }
                    }
                    drop(st);
                    drop(slot);
                    finished.notify_one();
                });
            }
            // Wait for a new request (the watches), a finished one (a free slot; the next read shows what
            // is left), a retry due, or 30 s.
            if watches.is_none() {
                match open_watches(&store, rev).await {
                    Ok(w) => watches = Some(w),
                    Err(e) => {
                        warn!("watching the requests: {e:#}");
                        retry_soon = true;
                    }
                }
            }
            let wait = if retry_soon {
                RETRY_AFTER
            } else {
                Duration::from_secs(30)
            };
            let ok = match &mut watches {
                Some((joins, renews)) => tokio::select! {
                    r = changed(joins) => r.unwrap_or(false),
                    r = changed(renews) => r.unwrap_or(false),
                    _ = finished.notified() => true,
                    _ = tokio::time::sleep(wait) => true,
                },
                None => tokio::select! {
                    _ = finished.notified() => true,
                    _ = tokio::time::sleep(wait) => true,
                },
            };
            if !ok {
                watches = None;
            }
        }
    }

    async fn handle(
        &self,
        store: &Store,
        join: bool,
        key: &str,
        node: &str,
        value: &[u8],
    ) -> Result<()> {
        let what = if join { "join" } else { "renewal" };
        if value.len() > MAX_REQUEST_LEN {
            warn!(
                key,
                len = value.len(),
                "deleting an oversized {what} request unread"
            );
            return withdraw(store, key, value).await;
        }
        let (verdict, nonce) = if join {
            match JoinRequest::parse(value) {
                Ok(r) if r.node == node => (self.judge_join(store, &r).await?, r.nonce),
                Ok(r) => (
                    Verdict::Refuse(format!(
                        "request for node {} under the key of {node}",
                        r.node
                    )),
                    r.nonce,
                ),
                Err(e) => {
                    warn!(key, "deleting a malformed join request: {e}");
                    return withdraw(store, key, value).await;
                }
            }
        } else {
            match RenewRequest::parse(value) {
                Ok(r) if r.node == node => (self.judge_renew(store, &r).await?, r.nonce),
                Ok(r) => (
                    Verdict::Refuse(format!(
                        "request for node {} under the key of {node}",
                        r.node
                    )),
                    r.nonce,
                ),
                Err(e) => {
                    warn!(key, "deleting a malformed renewal request: {e}");
                    return withdraw(store, key, value).await;
                }
            }
        };
        match verdict {
            Verdict::Refuse(reason) => self.refused(store, what, node, &nonce, &reason).await?,
            Verdict::Issue(cert) => match cert.sign(&self.ca) {
                // Fields that fail the checks (e.g. a VIP the overlay CIDR should not contain): a refusal,
                // not an error retried forever.
                Err(e) => {
                    let reason = format!("cannot sign the certificate: {e}");
                    self.refused(store, what, node, &nonce, &reason).await?
                }
                Ok(signed) => {
                    let (dir, c, s) = (self.ca_dir.clone(), cert.clone(), signed.clone());
                    blocking(move || evio_trust::ledger::record_issued(&dir, &c, &s)).await??;
                    let rec = serde_json::to_string(&CertRecord { cert: signed })?;
                    let mut c = store.client();
                    c.put(keys::cert(node), rec, None).await?;
                    info!(
                        node,
                        address = %cert.address,
                        subnets = ?cert.pod_subnets,
                        serial = cert.serial,
                        not_after = cert.not_after,
                        "issued a certificate ({what})"
                    );
                }
            },
        }
        withdraw(store, key, value).await
    }

    /// Logs a refusal and answers it in etcd.
    async fn refused(
        &self,
        store: &Store,
        what: &str,
        node: &str,
        nonce: &str,
        reason: &str,
    ) -> Result<()> {
        warn!(node, "refused the {what} request: {reason}");
        self.refuse(store, node, nonce, reason).await
    }

    async fn refuse(&self, store: &Store, node: &str, nonce: &str, reason: &str) -> Result<()> {
        if !keys::valid_node_name(node) {
            return Ok(());
        }
        let r = Refusal {
            node: node.to_string(),
            nonce: nonce.to_string(),
            reason: reason.to_string(),
            time: unix_now(),
        };
        let rec = serde_json::to_string(&RefusalRecord {
            refusal: r.sign(&self.ca),
        })?;
        let mut c = store.client();
        let lease = c.lease_grant(REFUSAL_TTL, None).await?.id();
        c.put(
            keys::refused(node),
            rec,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        Ok(())
    }

    /// True when `key` is revoked in the CA directory's ledger or in etcd (an etcd writer can delete the
    /// etcd copy, never the ledger's).
    async fn revoked(&self, store: &Store, key: &[u8; 32]) -> Result<bool> {
        let mut revs = evio_trust::ledger::revocations(&self.ca_dir, &self.public)?;
        revs.extend(evio_trust::client::revocations(store, &self.public).await?);
        Ok(revs.iter().any(|r| r.key().ok().as_ref() == Some(key)))
    }

    /// The certificates that may bind `node`'s name: the last one this CA issued (the ledger) and the one
    /// in etcd (which can only add to the refusals: it needs the CA signature too).
    async fn bound_certs(&self, store: &Store, node: &str) -> Result<Vec<NodeCert>> {
        let mut v: Vec<NodeCert> =
            evio_trust::ledger::last_issued(&self.ca_dir, &self.public, node)?
                .into_iter()
                .collect();
        if let Some(c) = self.existing_cert(store, node).await?
            && !v.contains(&c)
        {
            v.push(c);
        }
        Ok(v)
    }

    /// The node's certificate in etcd, if it verifies (whatever its validity window).
    async fn existing_cert(&self, store: &Store, node: &str) -> Result<Option<NodeCert>> {
        let mut c = store.client();
        let r = c.get(keys::cert(node), None).await?;
        let Some(kv) = r.kvs().first() else {
            return Ok(None);
        };
        let cert = serde_json::from_slice::<CertRecord>(kv.value())
            .ok()
            .and_then(|rec| NodeCert::verify_ignoring_time(&rec.cert, &self.public).ok());
        if cert.is_none() {
            warn!(node, "the certificate in etcd does not verify: ignoring it");
        }
        Ok(cert.filter(|c| c.node == node))
    }

    fn new_cert(
        &self,
        node: &str,
        key: [u8; 32],
        address: Ipv4Addr,
        subnets: Vec<Ipv4Net>,
    ) -> NodeCert {
        let now = unix_now();
        NodeCert {
            node: node.to_string(),
            public_key: key,
            address,
            pod_subnets: subnets,
            not_before: now,
            not_after: now + self.cert_ttl,
            serial: NodeCert::new_serial(),
        }
    }

    async fn judge_join(&self, store: &Store, req: &JoinRequest) -> Result<Verdict> {
        let now = unix_now();
        let refuse = |e: TrustError| Ok(Verdict::Refuse(e.to_string()));
        let record = match TokenRecord::load(&self.ca_dir, &req.token_id) {
            Ok(r) => r,
            Err(e) => return refuse(e),
        };
        if let Err(e) = record.check_usable(now) {
            return refuse(e);
        }
        if let Err(e) = req.verify(&*record.mac_key()?, now) {
            return refuse(e);
        }
        let key = req.key()?;
        if self.revoked(store, &key).await? {
            return Ok(Verdict::Refuse(
                "this node key was revoked: generate a new key".into(),
            ));
        }
        for existing in self.bound_certs(store, &req.node).await? {
            if existing.public_key != key
                && existing.is_current(now)
                && !self.revoked(store, &existing.public_key).await?
            {
                return Ok(Verdict::Refuse(format!(
                    "node name {} is certified for another key until {}: revoke it first (evioctl revoke {})",
                    req.node, existing.not_after, req.node
                )));
            }
        }
        let had_address = store.address_of(&req.node).await?.is_some();
        let address = match store.claim_address(&self.overlay, &req.node, None).await {
            Ok(a) => a.address,
            Err(e) => return refusal_or_retry(e),
        };
        let mut subnets = Vec::new();
        let had_subnet = self.plan.is_some() && store.subnet_of(&req.node).await?.is_some();
        if let Some(plan) = &self.plan {
            match store.claim_subnet(plan, &req.node).await {
                Ok(s) => subnets.push(s.subnet),
                Err(e) => {
                    if !had_address {
                        store.release_address(&req.node).await?;
                    }
                    return refusal_or_retry(e);
                }
            }
        }
        // Spend the token last, just before issuing (re-read: the operator may have deleted it meanwhile,
        // or another join handled at the same time spent a single-use token). Joins handled concurrently
        // re-read and save one at a time (`spending`), so they cannot both spend the last use; a join
        // refused here gives back the claims it made.
        let spent = {
            let _one_at_a_time = self.spending.lock().await;
            let (dir, id) = (self.ca_dir.clone(), req.token_id.clone());
            blocking(move || {
                match TokenRecord::load(&dir, &id).and_then(|r| r.check_usable(now).map(|()| r)) {
                    Err(e) => Spend::Unusable(e),
                    Ok(mut r) => {
                        r.uses += 1;
                        match r.save(&dir) {
                            Ok(()) => Spend::Spent,
                            Err(e) => Spend::NotSaved(e),
                        }
                    }
                }
            })
            .await?
        };
        match spent {
            Spend::Spent => {}
            // Saving the spent use failed: an error (the request stays and is retried), not a refusal.
            Spend::NotSaved(e) => return Err(e.into()),
            Spend::Unusable(e) => {
                if !had_subnet && self.plan.is_some() {
                    store.release_subnet(&req.node).await?;
                }
                if !had_address {
                    store.release_address(&req.node).await?;
                }
                return refuse(e);
            }
        }
        Ok(Verdict::Issue(
            self.new_cert(&req.node, key, address, subnets),
        ))
    }

    async fn judge_renew(&self, store: &Store, req: &RenewRequest) -> Result<Verdict> {
        let now = unix_now();
        // The ledger, not etcd, says which certificate is current (etcd could be made to show an older one).
        let Some(cur) = evio_trust::ledger::last_issued(&self.ca_dir, &self.public, &req.node)?
        else {
            return Ok(Verdict::Refuse(
                "this CA issued no certificate to this node: join with a token".into(),
            ));
        };
        if !cur.is_current(now) {
            return Ok(Verdict::Refuse(
                "the certificate expired: join again with a token".into(),
            ));
        }
        if cur.public_key != req.key()? || cur.serial != req.serial {
            return Ok(Verdict::Refuse(
                "not the node's current certificate (key or serial differ)".into(),
            ));
        }
        if let Err(e) = req.verify(&self.ca, now) {
            return Ok(Verdict::Refuse(e.to_string()));
        }
        if self.revoked(store, &cur.public_key).await? {
            return Ok(Verdict::Refuse("this node key was revoked".into()));
        }
        let address = store.address_of(&req.node).await?.map(|a| a.address);
        let subnet = store.subnet_of(&req.node).await?.map(|s| s.subnet);
        let subnets: Vec<Ipv4Net> = subnet.into_iter().collect();
        if address != Some(cur.address) || subnets != cur.pod_subnets {
            return Ok(Verdict::Refuse(format!(
                "the node's claims changed (address {address:?}, subnet {subnet:?}): join again with a token"
            )));
        }
        Ok(Verdict::Issue(self.new_cert(
            &req.node,
            cur.public_key,
            cur.address,
            subnets,
        )))
    }
}

/// Deletes the request at `key` if it still holds `value` (a newer request is left for the next pass).
async fn withdraw(store: &Store, key: &str, value: &[u8]) -> Result<()> {
    let txn = Txn::new()
        .when([Compare::value(key, CompareOp::Equal, value.to_vec())])
        .and_then([TxnOp::delete(key, None)]);
    store.client().txn(txn).await?;
    Ok(())
}

/// Watches of the join and renewal keys from just after `rev`.
async fn open_watches(store: &Store, rev: i64) -> Result<(WatchStream, WatchStream)> {
    let mut c = store.client();
    let opts = || {
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1)
    };
    let joins = c.watch(keys::JOIN, Some(opts())).await?;
    let renews = c.watch(keys::RENEW, Some(opts())).await?;
    Ok((joins, renews))
}

/// Returns when the watch reports a change: true, or false when it ended, was cancelled or compacted (the
/// caller opens a new one). The first message of every watch only says it was created: returning on it
/// made an idle signer a busy loop of reads and new watches (issue 12: 1,300 of each a second against
/// etcd at 100 nodes).
async fn changed(w: &mut WatchStream) -> Result<bool> {
    loop {
        match w.message().await? {
            None => return Ok(false),
            Some(r) if r.canceled() || r.compact_revision() > 0 => return Ok(false),
            Some(r) if !r.events().is_empty() => return Ok(true),
            Some(_) => {}
        }
    }
}

fn lock(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("serve.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another `evioctl ca serve` runs with the CA directory {} (one signer per CA)",
            dir.display()
        )
    })
}

pub fn run(args: Args) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let signer = Arc::new(Signer::new(&args)?);
    let _lock = lock(&args.ca_dir)?;
    let opts = args.etcd.options(None)?;
    runtime()?.block_on(async {
        let store = Store::connect(&opts).await?;
        info!(
            ca = %signer.public.pin(),
            overlay = %signer.overlay,
            pod_cidr = ?signer.plan.as_ref().map(|p| p.pool()),
            cert_ttl = signer.cert_ttl,
            "signing join and renewal requests"
        );
        let serve = signer.clone().serve(store);
        tokio::select! {
            _ = serve => Ok(()),
            _ = tokio::signal::ctrl_c() => {
                info!("stopping");
                Ok(())
            }
        }
    })
}
