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
                ("200 OK", CONTENT_TYPE, shared.metrics())
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
