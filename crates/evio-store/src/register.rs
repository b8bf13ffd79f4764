//! Node registrations: `nodes/<node>` attached to a lease that a background task keeps alive.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::StoreError;
use crate::keys;
use crate::records::{NodeRecord, unix_now};
use crate::store::Store;

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
    /// keeps it alive in a background task (needs a tokio runtime).
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
    /// Grants a new lease and writes the record with it.
    async fn establish(&self) -> Result<(), StoreError> {
        let mut c = self.store.client.clone();
        let g = self
            .store
            .op("grant lease", c.lease_grant(self.ttl, None))
            .await?;
        self.lease.store(g.id(), Ordering::SeqCst);
        self.put(g.id()).await
    }

    async fn put(&self, lease: i64) -> Result<(), StoreError> {
        let value = {
            let mut r = self.record.lock().expect("record lock");
            r.updated = unix_now();
            serde_json::to_string(&*r).expect("record serializes")
        };
        let mut c = self.store.client.clone();
        self.store
            .op(
                "register node",
                c.put(
                    self.key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await
            .map(|_| ())
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
