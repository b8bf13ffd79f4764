//! Node registrations: `nodes/<node>` attached to a lease that a background task keeps alive.
//!
//! A name is bound to the first public key registered under it: every write of the record is one
//! compare-and-swap transaction that creates the key if it is absent, or replaces it only when the record
//! there carries the same public key. A second key for a live name is refused with
//! [`StoreError::NameTaken`] until the first registration's lease expires (or it is revoked).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::StoreError;
use crate::keys;
use crate::records::{NodeRecord, unix_now};
use crate::store::Store;

/// Writes of one record lost to concurrent writers before giving up (each lost race means the record
/// changed between the read and the write; only a livelock gets this far).
const MAX_WRITE_ATTEMPTS: u32 = 16;

/// A live registration. It stays alive while this value exists: a task renews the lease every TTL/3, and
/// when the lease was lost (etcd unreachable for longer than the TTL, or restarted without its data) it
/// registers again as soon as etcd answers. Dropping it (or [`Registration::revoke`]) revokes the lease, so
/// the record disappears at once; a crashed holder's record disappears after the TTL.
pub struct Registration {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

struct Shared {
    store: Store,
    key: String,
    ttl: i64,
    record: Mutex<NodeRecord>,
    lease: AtomicI64,
    /// Set when the keeper saw the lease expire and registered again (for tests and metrics).
    reregistered: AtomicBool,
}

impl Store {
    /// Publishes `record` under `nodes/<record.node>` with a lease of `ttl` (whole seconds, at least 1) and
    /// keeps it alive in a background task (needs a tokio runtime). Refused with [`StoreError::NameTaken`]
    /// while a record with another public key is registered under that name.
    pub async fn register(
        &self,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<Registration, StoreError> {
        if !keys::valid_node_name(&record.node) {
            return Err(StoreError::InvalidNodeName(record.node));
        }
        let shared = Arc::new(Shared {
            store: self.clone(),
            key: keys::node(&record.node),
            ttl: ttl.as_secs().max(1) as i64,
            record: Mutex::new(record),
            lease: AtomicI64::new(0),
            reregistered: AtomicBool::new(false),
        });
        shared.establish().await?;
        let task = tokio::spawn(keeper(shared.clone()));
        Ok(Registration {
            shared,
            task: Some(task),
        })
    }
}

impl Registration {
    /// Replaces the published record (same lease). The record is kept even when the write fails, and is
    /// published when the keeper registers again.
    pub async fn update(&self, record: NodeRecord) -> Result<(), StoreError> {
        if record.node != self.record().node {
            return Err(StoreError::Config(format!(
                "a registration for {} cannot publish a record for {}",
                self.record().node,
                record.node
            )));
        }
        *self.shared.record.lock().expect("record lock") = record;
        self.shared.put(self.lease_id()).await
    }

    /// The record as last set (not necessarily written yet if etcd is unreachable).
    pub fn record(&self) -> NodeRecord {
        self.shared.record.lock().expect("record lock").clone()
    }

    /// The current lease id.
    pub fn lease_id(&self) -> i64 {
        self.shared.lease.load(Ordering::SeqCst)
    }

    /// The lease TTL in seconds.
    pub fn ttl(&self) -> i64 {
        self.shared.ttl
    }

    /// True once the keeper had to register again after the lease was lost.
    pub fn reregistered(&self) -> bool {
        self.shared.reregistered.load(Ordering::SeqCst)
    }

    /// Ends the registration now: stops renewing and revokes the lease (the record disappears at once).
    pub async fn revoke(mut self) -> Result<(), StoreError> {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let mut c = self.shared.store.client.clone();
        self.shared
            .store
            .op("revoke lease", c.lease_revoke(self.lease_id()))
            .await
            .map(|_| ())
    }

    /// Stops renewing without revoking, as a crashed holder would: the record disappears when the TTL runs
    /// out. For tests and for handing over to another process.
    pub fn abandon(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        task.abort();
        let shared = self.shared.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut c = shared.store.client.clone();
                let lease = shared.lease.load(Ordering::SeqCst);
                if let Err(e) = shared.store.op("revoke lease", c.lease_revoke(lease)).await {
                    debug!("revoking lease {lease:x} on drop: {e}");
                }
            });
        }
    }
}

impl Shared {
    /// Grants a new lease and writes the record with it (the lease is revoked again if the write fails).
    async fn establish(&self) -> Result<(), StoreError> {
        let mut c = self.store.client.clone();
        let g = self
            .store
            .op("grant lease", c.lease_grant(self.ttl, None))
            .await?;
        match self.put(g.id()).await {
            Ok(()) => {
                self.lease.store(g.id(), Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                if let Err(r) = self.store.op("revoke lease", c.lease_revoke(g.id())).await {
                    debug!("revoking unused lease {:x}: {r}", g.id());
                }
                Err(e)
            }
        }
    }

    /// Writes the record with `lease`: creates the key if absent, or replaces the record there only if it
    /// carries the same public key, in one transaction per attempt.
    async fn put(&self, lease: i64) -> Result<(), StoreError> {
        let (value, public_key, node) = {
            let mut r = self.record.lock().expect("record lock");
            r.updated = unix_now();
            (
                serde_json::to_string(&*r).expect("record serializes"),
                r.public_key.clone(),
                r.node.clone(),
            )
        };
        let put = || {
            TxnOp::put(
                self.key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let mut c = self.store.client.clone();
        // Create if absent; otherwise read what is there.
        let mut when = Compare::create_revision(self.key.clone(), CompareOp::Equal, 0);
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let txn = Txn::new()
                .when([when])
                .and_then([put()])
                .or_else([TxnOp::get(self.key.clone(), None)]);
            let r = self.store.op("register node", c.txn(txn)).await?;
            if r.succeeded() {
                return Ok(());
            }
            let held = r.op_responses().into_iter().find_map(|o| match o {
                TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
                _ => None,
            });
            let Some(kv) = held else {
                // Deleted in between: try to create it again.
                when = Compare::create_revision(self.key.clone(), CompareOp::Equal, 0);
                continue;
            };
            let holder_key = match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(h) => h.public_key,
                Err(e) => {
                    warn!(
                        key = self.key,
                        "unreadable registration held under this name: {e}"
                    );
                    String::from("<unreadable record>")
                }
            };
            if holder_key != public_key {
                warn!(
                    key = self.key,
                    holder_key, "refusing to register: the name is held by another key"
                );
                return Err(StoreError::NameTaken { node, holder_key });
            }
            // Our own key (a previous lease of ours, or our last write): replace exactly that revision.
            when = Compare::mod_revision(self.key.clone(), CompareOp::Equal, kv.mod_revision());
        }
        Err(StoreError::Contention {
            what: "register node",
            attempts: MAX_WRITE_ATTEMPTS,
        })
    }

    async fn reestablish(&self) {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.establish().await {
                Ok(()) => {
                    self.reregistered.store(true, Ordering::SeqCst);
                    info!(key = self.key, "registered again with a new lease");
                    return;
                }
                Err(e @ StoreError::NameTaken { .. }) => {
                    warn!("registering again: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    debug!("registering again: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Renews the lease every TTL/3 over a keep-alive stream (at once when the stream is new); reopens the stream after errors, re-puts the
/// record after a reconnection, and registers again when the lease is gone.
async fn keeper(sh: Arc<Shared>) {
    let period = Duration::from_millis((sh.ttl as u64 * 1000) / 3).max(Duration::from_millis(300));
    let mut reput = false;
    loop {
        let lease = sh.lease.load(Ordering::SeqCst);
        let mut c = sh.store.client.clone();
        let (mut keeper, mut stream) = match sh
            .store
            .op("keep lease alive", c.lease_keep_alive(lease))
            .await
        {
            Ok(v) => v,
            Err(StoreError::Etcd {
                source: etcd_client::Error::LeaseKeepAliveError(m),
                ..
            }) => {
                warn!(
                    key = sh.key,
                    "lease {lease:x} is gone ({m}); registering again"
                );
                sh.reestablish().await;
                reput = false;
                continue;
            }
            Err(e) => {
                debug!("keep-alive stream: {e}");
                reput = true;
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        if reput && sh.put(lease).await.is_ok() {
            reput = false;
        }
        // Renew at once on a fresh stream (after an outage the lease may have little time left), then every
        // period.
        let mut first = true;
        loop {
            if !first {
                tokio::time::sleep(period).await;
            }
            first = false;
            if keeper.keep_alive().await.is_err() {
                reput = true;
                break;
            }
            match tokio::time::timeout(sh.store.timeout, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    if reput && sh.put(lease).await.is_ok() {
                        reput = false;
                    }
                }
                Ok(Ok(Some(_))) => {
                    warn!(key = sh.key, "lease {lease:x} expired; registering again");
                    sh.reestablish().await;
                    reput = false;
                    break;
                }
                _ => {
                    reput = true;
                    break;
                }
            }
        }
    }
}
