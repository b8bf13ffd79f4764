//! Prometheus metrics over a minimal HTTP/1.0 server (`GET /metrics`) on `--metrics-addr`.
//!
//! The text is encoded by `prometheus-client` (the Prometheus project's Rust client: OpenMetrics text,
//! label escaping, counters' `_total`, `# EOF`) rather than by hand. The values are read at scrape time
//! from the data plane's atomics and one snapshot of the tunnel core, so a scrape takes no lock on the
//! packet path: each scrape fills a fresh registry ([`Exposition`]) with constant values.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use std::sync::atomic::{AtomicU64, Ordering};

use evio_overlay::CandidateKind;
use evio_tunnel::PeerStatus;

use crate::state::Shared;

/// The OpenMetrics text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape's metrics: values set once, then encoded.
#[derive(Default)]
pub struct Exposition {
    registry: Registry,
}

type Labels = Vec<(&'static str, String)>;

impl Exposition {
    /// A counter; `name` ends in `_total` (the encoder adds it to the family name).
    pub fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.registry
            .register(family_name(name), help, ConstCounter::new(v));
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: i64) {
        self.registry.register(name, help, ConstGauge::new(v));
    }

    /// A counter with one label, a sample per `(label value, count)`.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        values: impl IntoIterator<Item = (String, u64)>,
    ) {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in values {
            f.get_or_create(&vec![(label, l)]).inc_by(v);
        }
        self.registry.register(family_name(name), help, f);
    }

    /// A gauge with one label.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        values: impl IntoIterator<Item = (String, i64)>,
    ) {
        let f = Family::<Labels, Gauge>::default();
        for (l, v) in values {
            f.get_or_create(&vec![(label, l)]).set(v);
        }
        self.registry.register(name, help, f);
    }

    /// An info metric (`<name>_info{labels} 1`); `name` ends in `_info`.
    pub fn info(&mut self, name: &str, help: &str, labels: Labels) {
        let family = name
            .strip_suffix("_info")
            .expect("info metrics end in _info");
        self.registry.register(family, help, Info::new(labels));
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

fn family_name(counter: &str) -> &str {
    counter
        .strip_suffix("_total")
        .expect("counter names end in _total")
}

pub fn serve(shared: Arc<Shared>, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    std::thread::Builder::new().name("evio-metrics".into()).spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
            let mut req = [0u8; 2048];
            let n = c.read(&mut req).unwrap_or(0);
            let head = String::from_utf8_lossy(&req[..n]);
            let (status, ctype, body) = if head.starts_with("GET /metrics") || head.starts_with("GET / ") {
                ("200 OK", CONTENT_TYPE, render(&shared))
            } else if head.starts_with("GET /status") {
                ("200 OK", "application/json", serde_json::to_string(&shared.status()).unwrap_or_default())
            } else {
                ("404 Not Found", "text/plain", "not found\n".to_string())
            };
            let _ = write!(
                c,
                "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}

/// Prometheus text exposition of the agent's metrics (the control socket's `metrics` and `GET /metrics`).
pub fn render(shared: &Shared) -> String {
    let c = &shared.counters;
    let (peers, drops, handshakes) = {
        let n = shared.node();
        (n.peers(), n.drops(), n.handshakes_total())
    };
    let meta = shared
        .meta
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let up = peers
        .iter()
        .filter(|p| p.path != evio_tunnel::PathKind::Connecting)
        .count();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut m = Exposition::default();
    m.info(
        "evio_build_info",
        "The agent's version.",
        vec![("version", env!("CARGO_PKG_VERSION").to_string())],
    );
    m.gauge(
        "evio_peers",
        "Peers known from the control plane.",
        peers.len() as i64,
    );
    m.gauge("evio_peers_connected", "Peers with a session.", up as i64);
    m.counter("evio_handshakes_total", "Completed handshakes.", handshakes);
    m.counters(
        "evio_drops_total",
        "Dropped packets and datagrams by reason.",
        "reason",
        drops.iter().map(|(r, n)| (r.as_str().to_string(), n)),
    );
    let name = |p: &PeerStatus| {
        meta.get(&p.public_key)
            .map(|m| m.node.clone())
            .unwrap_or_else(|| p.name.clone())
    };
    type PeerCounter = (&'static str, &'static str, fn(&PeerStatus) -> u64);
    let per_peer: [PeerCounter; 3] = [
        (
            "evio_peer_rx_bytes_total",
            "Inner bytes received from a peer.",
            |p| p.rx_bytes,
        ),
        (
            "evio_peer_tx_bytes_total",
            "Inner bytes sent to a peer.",
            |p| p.tx_bytes,
        ),
        (
            "evio_peer_handshakes_total",
            "Completed handshakes with a peer.",
            |p| p.handshakes,
        ),
    ];
    for (metric, help, value) in per_peer {
        m.counters(
            metric,
            help,
            "peer",
            peers.iter().map(|p| (name(p), value(p))),
        );
    }
    for (metric, help, v) in [
        (
            "evio_tun_rx_packets_total",
            "Packets read from the TUN device.",
            &c.tun_rx_packets,
        ),
        (
            "evio_tun_tx_packets_total",
            "Packets written to the TUN device.",
            &c.tun_tx_packets,
        ),
        (
            "evio_udp_rx_datagrams_total",
            "Datagrams received.",
            &c.udp_rx_datagrams,
        ),
        (
            "evio_udp_tx_datagrams_total",
            "Datagrams sent.",
            &c.udp_tx_datagrams,
        ),
        (
            "evio_etcd_errors_total",
            "Failed etcd operations.",
            &c.etcd_errors,
        ),
    ] {
        m.counter(metric, help, load(v));
    }
    m.gauge(
        "evio_etcd_connected",
        "Whether the control plane reaches etcd.",
        c.etcd_connected.load(Ordering::Relaxed) as i64,
    );
    m.gauge(
        "evio_registrations_rejected",
        "Registrations in etcd not accepted as peers (see the log for why).",
        load(&c.registrations_rejected) as i64,
    );
    m.gauge(
        "evio_name_taken",
        "Whether this node's name is registered with another public key (registration refused).",
        c.name_taken.load(Ordering::Relaxed) as i64,
    );
    nat(&shared.overlay, &mut m);
    m.encode()
}

/// Adds the NAT traversal metrics.
fn nat(node: &evio_overlay::OverlayNode, m: &mut Exposition) {
    let (cands, relayed) = (node.candidates().1, node.relay_allocated());
    let c = node.counters();
    for (name, help, v) in [
        (
            "evio_path_changes_total",
            "Path changes chosen by NAT traversal (direct, relay, none).",
            &c.path_changes,
        ),
        (
            "evio_relay_tx_bytes_total",
            "Bytes sent through our TURN allocation (framing included).",
            &c.relay_tx_bytes,
        ),
        (
            "evio_relay_rx_bytes_total",
            "Bytes received through our TURN allocation (framing included).",
            &c.relay_rx_bytes,
        ),
        (
            "evio_nat_stun_rx_datagrams_total",
            "STUN/TURN datagrams handled by NAT traversal.",
            &c.checks_rx,
        ),
        (
            "evio_lazy_peers_woken_total",
            "Lazy peers taken up (a packet to them, or a check from them).",
            &c.peers_woken,
        ),
        (
            "evio_lazy_peers_idled_total",
            "Lazy peers put to rest after the idle timeout.",
            &c.peers_idled,
        ),
        (
            "evio_overlay_events_dropped_total",
            "Overlay node events (paths, sessions, lazy peers) dropped undrained: never expected.",
            &c.events_dropped,
        ),
    ] {
        m.counter(name, help, v.load(Ordering::Relaxed));
    }
    m.gauges(
        "evio_candidates",
        "Local candidates by kind.",
        "kind",
        [
            CandidateKind::Host,
            CandidateKind::ServerReflexive,
            CandidateKind::Relayed,
        ]
        .into_iter()
        .map(|k| {
            let n = cands.iter().filter(|c| c.kind == k).count();
            (k.as_str().to_string(), n as i64)
        }),
    );
    m.gauge(
        "evio_turn_allocated",
        "Whether a TURN allocation exists.",
        relayed as i64,
    );
}

#[cfg(test)]
mod tests {
    use super::Exposition;

    #[test]
    fn exposition_keeps_the_metric_names_prometheus_queries() {
        let mut m = Exposition::default();
        m.info(
            "evio_build_info",
            "Version.",
            vec![("version", "1.2.3".into())],
        );
        m.gauge("evio_peers", "Peers.", 2);
        m.counter("evio_handshakes_total", "Handshakes.", 7);
        m.counters(
            "evio_drops_total",
            "Drops.",
            "reason",
            [("no_route".to_string(), 3), ("replay".to_string(), 0)],
        );
        m.gauges(
            "evio_candidates",
            "Candidates.",
            "kind",
            [("host".to_string(), 1)],
        );
        let text = m.encode();
        for line in [
            "evio_build_info{version=\"1.2.3\"} 1",
            "evio_peers 2",
            "# TYPE evio_handshakes counter",
            "evio_handshakes_total 7",
            "evio_drops_total{reason=\"no_route\"} 3",
            "evio_drops_total{reason=\"replay\"} 0",
            "evio_candidates{kind=\"host\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
