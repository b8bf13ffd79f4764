//! Watching evio's keys: a snapshot, then every change after it, across etcd restarts.

use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};
use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::error::StoreError;
use crate::keys;
use crate::records::{AddressClaim, NodeRecord, SubnetClaim};
use crate::store::{ItemIndex, Snapshot, Store, node_record, parse_or_warn};

/// One change under the evio prefix.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// A node registered (a new key: first registration, or again after its lease was lost).
    NodeUp(NodeRecord),
    /// A registered node rewrote its record.
    NodeUpdated(NodeRecord),
    /// A registration ended (lease expired or revoked).
    NodeDown {
        node: String,
    },
    SubnetClaimed(SubnetClaim),
    SubnetReleased {
        node: String,
        subnet: Option<Ipv4Net>,
    },
    AddressClaimed(AddressClaim),
    AddressReleased {
        node: String,
        address: Option<Ipv4Addr>,
    },
    /// The watch could not resume exactly where it stopped (history compacted, or etcd lost its data): this
    /// is the whole state now; replace what was known.
    Resync(Snapshot),
}

/// The event stream of [`Store::watch`]. Reconnects by itself; dropping it stops the watch.
pub struct Watch {
    rx: mpsc::Receiver<StoreEvent>,
    task: JoinHandle<()>,
}

impl Watch {
    /// The next event; None only if the watch task ended (it does not end on etcd errors).
    pub async fn next(&mut self) -> Option<StoreEvent> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_next(&mut self) -> Option<StoreEvent> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Store {
    /// A snapshot of nodes, subnet and address claims, and a stream of every change after it (from the
    /// snapshot's revision + 1, so nothing is missed). The stream survives etcd restarts: it reconnects and
    /// resumes at the next revision, or sends [`StoreEvent::Resync`] when that history is gone.
    pub async fn watch(&self) -> Result<(Snapshot, Watch), StoreError> {
        let (snap, index) = self.snapshot_indexed().await?;
        let first = self.open_watch(snap.revision + 1).await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(watch_loop(
            self.clone(),
            snap.revision + 1,
            first,
            index,
            tx,
        ));
        Ok((snap, Watch { rx, task }))
    }

    async fn open_watch(&self, start: i64) -> Result<WatchStream, StoreError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_progress_notify()
            .with_start_revision(start);
        self.op("watch", c.watch(keys::PREFIX, Some(opts))).await
    }

    async fn current_revision(&self) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let r = self
            .op(
                "read revision",
                c.get(keys::PREFIX, Some(GetOptions::new().with_count_only())),
            )
            .await?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }
}

async fn watch_loop(
    store: Store,
    mut next: i64,
    first: WatchStream,
    mut index: ItemIndex,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut stream = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                if tx.is_closed() {
                    return;
                }
                match store.current_revision().await {
                    Err(e) => {
                        debug!("watch: etcd not back yet: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                    Ok(cur) if cur < next - 1 => {
                        warn!(
                            "watch: etcd revision went back from {} to {cur} (data lost?); resyncing",
                            next - 1
                        );
                        match resync(&store, &mut index, &tx).await {
                            Some(rev) => next = rev + 1,
                            None => continue,
                        }
                    }
                    Ok(_) => {}
                }
                match store.open_watch(next).await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!("watch: reopening: {e}");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            let resp = match s.message().await {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            if resp.compact_revision() > 0 {
                warn!("watch: revision {next} was compacted; resyncing");
                if let Some(rev) = resync(&store, &mut index, &tx).await {
                    next = rev + 1;
                }
                break;
            }
            if resp.canceled() {
                break;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                next = next.max(kv.mod_revision() + 1);
                if let Some(e) = translate(&mut index, ev.event_type(), kv, ev.prev_kv())
                    && tx.send(e).await.is_err()
                {
                    return;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

async fn resync(
    store: &Store,
    index: &mut ItemIndex,
    tx: &mpsc::Sender<StoreEvent>,
) -> Option<i64> {
    match store.snapshot_indexed().await {
        Ok((s, i)) => {
            let rev = s.revision;
            *index = i;
            let _ = tx.send(StoreEvent::Resync(s)).await;
            Some(rev)
        }
        Err(e) => {
            debug!("watch: resync: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            None
        }
    }
}

/// One etcd event as a [`StoreEvent`], or None when it is not one (other keys, or a record or claim that
/// does not speak for its key: see [`ItemIndex`]). Keeps `index` up to date.
fn translate(
    index: &mut ItemIndex,
    t: EventType,
    kv: &etcd_client::KeyValue,
    prev: Option<&etcd_client::KeyValue>,
) -> Option<StoreEvent> {
    match t {
        EventType::Put => index.apply_put(kv),
        EventType::Delete => index.apply_delete(kv),
    }
    let key = kv.key_str().ok()?;
    if let Some(node) = key.strip_prefix(keys::NODES) {
        return Some(match t {
            EventType::Put => {
                let r: NodeRecord = node_record(kv)?;
                if kv.version() == 1 {
                    StoreEvent::NodeUp(r)
                } else {
                    StoreEvent::NodeUpdated(r)
                }
            }
            EventType::Delete => StoreEvent::NodeDown {
                node: node.to_string(),
            },
        });
    }
    if let Some(node) = key.strip_prefix(keys::SUBNETS_BY_NODE) {
        return Some(match t {
            EventType::Put => StoreEvent::SubnetClaimed(index.by_node_claim(kv)?),
            EventType::Delete => StoreEvent::SubnetReleased {
                node: node.to_string(),
                subnet: prev
                    .and_then(parse_or_warn::<SubnetClaim>)
                    .map(|c| c.subnet),
            },
        });
    }
    if let Some(node) = key.strip_prefix(keys::ADDRESSES_BY_NODE) {
        return Some(match t {
            EventType::Put => StoreEvent::AddressClaimed(index.by_node_claim(kv)?),
            EventType::Delete => StoreEvent::AddressReleased {
                node: node.to_string(),
                address: prev
                    .and_then(parse_or_warn::<AddressClaim>)
                    .map(|c| c.address),
            },
        });
    }
    None
}
