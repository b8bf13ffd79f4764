//! The peer path summary published for `evioctl ui` (`/evio/status/v1/paths/<node>`, attached to the node's
//! lease, docs/ui.md): kind, RTT, bytes and throughput of every peer path, built from the status the agent
//! already serves. Written at a bounded rate and only when it changed enough to matter:
//!
//! * a changed path (peer added or removed, kind or endpoint changed): at once, but at most every
//!   [`MIN_INTERVAL`], or [`PER_PEER`] per peer up to [`MAX_INTERVAL`] (see [`min_interval`]);
//! * changed numbers (RTT or throughput beyond [`RTT_THRESHOLD`] / [`RATE_THRESHOLD`], or byte counters that
//!   moved): at most every [`METRIC_INTERVAL`];
//! * a new lease (registered again): at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use evio_store::etcd_client::PutOptions;
use evio_store::{PathEntry, PathSummary, Store, keys, unix_now};

use crate::state::Shared;

/// Shortest time between two writes.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Time between two writes per peer in the summary (above [`MIN_INTERVAL`]).
pub const PER_PEER: Duration = Duration::from_millis(50);
/// Longest time between two writes of a changed path.
pub const MAX_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest time between two writes for changed numbers only.
pub const METRIC_INTERVAL: Duration = Duration::from_secs(15);
/// How often the summary is computed (throughput is measured over this window).
const SAMPLE: Duration = Duration::from_secs(1);
/// A direct or relayed path with no inner bytes for this long shows as `idle`.
const IDLE_AFTER: Duration = Duration::from_secs(30);
/// Relative change of the RTT that counts (and at least 1 ms).
const RTT_THRESHOLD: f64 = 0.25;
/// Relative change of the throughput that counts (and at least 1 KiB/s).
const RATE_THRESHOLD: f64 = 0.25;

struct Sample {
    at: Instant,
    rx: u64,
    tx: u64,
    last_moved: Instant,
    rx_rate: u64,
    tx_rate: u64,
}

/// A write under way: the summary, when it was computed, its lease, and the task writing it.
type Inflight = (PathSummary, Instant, i64, tokio::task::JoinHandle<bool>);

/// The publisher's memory: what was written, when, with which lease, and the byte counters seen.
#[derive(Default)]
pub struct Publisher {
    written: Option<PathSummary>,
    written_at: Option<Instant>,
    lease: i64,
    last_sample: Option<Instant>,
    samples: HashMap<String, Sample>,
    inflight: Option<Inflight>,
}

impl Publisher {
    pub fn new() -> Publisher {
        Publisher::default()
    }

    /// Computes the summary now (at most every [`SAMPLE`]) and starts writing it when due. Never waits for
    /// etcd: the write runs in a task (one at a time) and its outcome is collected at a later tick; errors
    /// are only logged, the summary is for display.
    pub async fn tick(&mut self, store: &Store, lease: i64, shared: &Shared) {
        if let Some((_, _, _, h)) = &self.inflight {
            if !h.is_finished() {
                return;
            }
            let (summary, at, lease, h) = self.inflight.take().expect("inflight");
            if h.await.unwrap_or(false) {
                self.written = Some(summary);
                self.written_at = Some(at);
                self.lease = lease;
            }
        }
        let now = Instant::now();
        if self.last_sample.is_some_and(|t| now - t < SAMPLE) {
            return;
        }
        self.last_sample = Some(now);
        let summary = self.summarize(shared, now);
        if !self.due(&summary, lease, now) {
            return;
        }
        let key = keys::paths(&summary.node);
        let Ok(value) = serde_json::to_string(&summary) else {
            return;
        };
        if value.len() > PathSummary::MAX_BYTES {
            tracing::debug!(bytes = value.len(), "path summary too large; not published");
            return;
        }
        let (mut c, timeout) = (store.client(), store.timeout());
        let task = tokio::spawn(async move {
            let put = c.put(key, value, Some(PutOptions::new().with_lease(lease)));
            match tokio::time::timeout(timeout, put).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::debug!("publishing the path summary: {e}");
                    false
                }
                Err(_) => {
                    tracing::debug!("publishing the path summary: timed out");
                    false
                }
            }
        });
        self.inflight = Some((summary, now, lease, task));
    }

    /// The summary of the agent's peers now, updating the throughput samples.
    fn summarize(&mut self, shared: &Shared, now: Instant) -> PathSummary {
        let status = shared.status();
        let keys_by_name: HashMap<String, [u8; 32]> = shared
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, m)| (m.node.clone(), *k))
            .collect();
        let nat = shared.overlay.view();
        let mut peers = Vec::with_capacity(status.peers.len().min(PathSummary::MAX_PEERS));
        let mut seen = HashMap::new();
        for p in status.peers.into_iter().take(PathSummary::MAX_PEERS) {
            let s = match self.samples.remove(&p.node) {
                Some(mut s) => {
                    let dt = (now - s.at).as_secs_f64().max(0.001);
                    let (drx, dtx) = (
                        p.rx_bytes.saturating_sub(s.rx),
                        p.tx_bytes.saturating_sub(s.tx),
                    );
                    s.rx_rate = (drx as f64 / dt) as u64;
                    s.tx_rate = (dtx as f64 / dt) as u64;
                    if drx > 0 || dtx > 0 {
                        s.last_moved = now;
                    }
                    s.at = now;
                    s.rx = p.rx_bytes;
                    s.tx = p.tx_bytes;
                    s
                }
                None => Sample {
                    at: now,
                    rx: p.rx_bytes,
                    tx: p.tx_bytes,
                    last_moved: now,
                    rx_rate: 0,
                    tx_rate: 0,
                },
            };
            let rtt_ms = keys_by_name
                .get(&p.node)
                .and_then(|k| nat.path(k))
                .and_then(|path| path.rtt)
                .map(|d| (d.as_secs_f64() * 1e5).round() / 100.0);
            let idle = now - s.last_moved >= IDLE_AFTER;
            let kind = match p.path.as_str() {
                "direct" | "relay" if idle => "idle",
                k => k,
            };
            peers.push(PathEntry {
                peer: p.node.clone(),
                kind: kind.to_string(),
                endpoint: p.endpoint,
                rtt_ms,
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rx_rate: s.rx_rate,
                tx_rate: s.tx_rate,
            });
            seen.insert(p.node, s);
        }
        self.samples = seen;
        PathSummary {
            node: status.node,
            version: env!("CARGO_PKG_VERSION").to_string(),
            time: unix_now(),
            peers,
        }
    }

    /// Whether `s` should be written now (see the module documentation).
    fn due(&self, s: &PathSummary, lease: i64, now: Instant) -> bool {
        let (Some(w), Some(at)) = (&self.written, self.written_at) else {
            return true;
        };
        if lease != self.lease {
            return true;
        }
        let since = now - at;
        if since < min_interval(s.peers.len()) {
            return false;
        }
        if structure_changed(w, s) {
            return true;
        }
        since >= METRIC_INTERVAL && numbers_changed(w, s)
    }
}

/// The shortest time between two writes of a summary of `peers` peers: 50 ms per peer, between 1 and 5 s.
/// A summary grows with the peers, and every node writes one: at 100 nodes starting together, writes
/// every second were 1,147 of etcd's 1,792 revisions (15 KB each) while the paths came up (issue 12).
/// With the interval growing with the summary, what a node writes per second stays about the same
/// whatever the fleet's size, and a small cluster's page still follows within a second.
pub fn min_interval(peers: usize) -> Duration {
    (PER_PEER * peers.min(1000) as u32).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Peers, kinds or endpoints differ.
fn structure_changed(a: &PathSummary, b: &PathSummary) -> bool {
    a.node != b.node
        || a.peers.len() != b.peers.len()
        || a.peers
            .iter()
            .zip(&b.peers)
            .any(|(x, y)| x.peer != y.peer || x.kind != y.kind || x.endpoint != y.endpoint)
}

fn beyond(old: f64, new: f64, rel: f64, abs: f64) -> bool {
    let d = (new - old).abs();
    d >= abs && d >= rel * old.abs()
}

/// RTT or throughput changed beyond the thresholds, or bytes moved (same structure assumed).
fn numbers_changed(a: &PathSummary, b: &PathSummary) -> bool {
    a.peers.iter().zip(&b.peers).any(|(x, y)| {
        let rtt = match (x.rtt_ms, y.rtt_ms) {
            (Some(o), Some(n)) => beyond(o, n, RTT_THRESHOLD, 1.0),
            (o, n) => o.is_some() != n.is_some(),
        };
        rtt || beyond(x.rx_rate as f64, y.rx_rate as f64, RATE_THRESHOLD, 1024.0)
            || beyond(x.tx_rate as f64, y.tx_rate as f64, RATE_THRESHOLD, 1024.0)
            || x.rx_bytes != y.rx_bytes
            || x.tx_bytes != y.tx_bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(kind: &str, rtt: Option<f64>, rate: u64, bytes: u64) -> PathSummary {
        PathSummary {
            node: "a".into(),
            version: "0".into(),
            time: 1,
            peers: vec![PathEntry {
                peer: "b".into(),
                kind: kind.into(),
                endpoint: Some("192.0.2.1:51820".into()),
                rtt_ms: rtt,
                last_handshake: Some(1),
                rx_bytes: bytes,
                tx_bytes: bytes,
                rx_rate: rate,
                tx_rate: rate,
            }],
        }
    }

    #[test]
    fn writes_are_rate_limited_and_need_a_change() {
        let t0 = Instant::now();
        let mut p = Publisher::new();
        let s = summary("direct", Some(1.0), 0, 10);
        assert!(p.due(&s, 7, t0), "first summary is written");
        p.written = Some(s.clone());
        p.written_at = Some(t0);
        p.lease = 7;
        // Unchanged: never, however late.
        assert!(!p.due(&s, 7, t0 + Duration::from_secs(100)));
        // A new lease: at once.
        assert!(p.due(&s, 8, t0));
        // A kind change: after MIN_INTERVAL only.
        let relay = summary("relay", Some(1.0), 0, 10);
        assert!(!p.due(&relay, 7, t0 + Duration::from_millis(500)));
        assert!(p.due(&relay, 7, t0 + MIN_INTERVAL));
        // Numbers: only beyond the thresholds, and only after METRIC_INTERVAL.
        let small = summary("direct", Some(1.2), 0, 10);
        assert!(!p.due(&small, 7, t0 + METRIC_INTERVAL));
        let slower = summary("direct", Some(5.0), 0, 10);
        assert!(!p.due(&slower, 7, t0 + Duration::from_secs(2)));
        assert!(p.due(&slower, 7, t0 + METRIC_INTERVAL));
        let busier = summary("direct", Some(1.0), 1 << 20, 10);
        assert!(p.due(&busier, 7, t0 + METRIC_INTERVAL));
        let moved = summary("direct", Some(1.0), 0, 11);
        assert!(p.due(&moved, 7, t0 + METRIC_INTERVAL));
    }

    #[test]
    fn a_large_summary_is_written_less_often() {
        assert_eq!(min_interval(0), MIN_INTERVAL);
        assert_eq!(min_interval(3), MIN_INTERVAL);
        assert_eq!(min_interval(40), Duration::from_secs(2));
        assert_eq!(min_interval(99), Duration::from_millis(4950));
        assert_eq!(min_interval(5000), MAX_INTERVAL);
        let t0 = Instant::now();
        let mut p = Publisher::new();
        let many = |kind: &str| {
            let mut s = summary(kind, Some(1.0), 0, 10);
            s.peers = (0..99)
                .map(|i| PathEntry {
                    peer: format!("n{i}"),
                    ..s.peers[0].clone()
                })
                .collect();
            s
        };
        let (direct, relay) = (many("direct"), many("relay"));
        p.written = Some(direct);
        p.written_at = Some(t0);
        p.lease = 7;
        assert!(!p.due(&relay, 7, t0 + Duration::from_secs(4)));
        assert!(p.due(&relay, 7, t0 + Duration::from_millis(4950)));
    }

    #[test]
    fn a_summary_of_many_peers_stays_small() {
        let mut s = summary("direct", Some(12.34), 123_456, 1 << 40);
        let e = s.peers[0].clone();
        s.peers = (0..100)
            .map(|i| PathEntry {
                peer: format!("edge-node-{i:03}"),
                ..e.clone()
            })
            .collect();
        let n = serde_json::to_string(&s).unwrap().len();
        // docs/ui.md quotes about 200 bytes a peer.
        assert!(n < 100 * 220, "{n}");
    }
}
