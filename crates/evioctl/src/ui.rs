//! `evioctl ui --etcd-endpoints URLS --listen ADDR`: a live topology page of the cluster, read from etcd
//! only (docs/ui.md). Serves the page (assets compiled in: no CDN, works offline), a JSON API and a
//! server-sent event stream that announces every change.
//!
//! Everything read from etcd is treated as attacker-written: values are size-bounded, parsed into typed
//! records, names validated, strings truncated; the page puts data into the DOM with `textContent` and SVG
//! attributes only.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use evio_store::etcd_client::{GetOptions, WatchOptions};
use evio_store::{CandidateKind, NodeRecord, PathEntry, PathSummary, Store, keys, unix_now};
use serde::Serialize;

use crate::cni_config::EtcdArgs;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Address to serve the page on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Reach etcd from inside this network namespace (a name under /run/netns, e.g. the demo's internet):
    /// the page is still served where evioctl was started.
    #[arg(long)]
    pub etcd_netns: Option<String>,
}

/// Moves this thread (the only one: call before starting the runtime) into the named network namespace.
fn enter_netns(name: &str) -> Result<()> {
    anyhow::ensure!(
        !name.is_empty() && !name.contains('/') && name != "." && name != "..",
        "invalid namespace name {name:?}"
    );
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening network namespace {name}"))?;
    // Changes only this thread's namespace.
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}

/// A node as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    pub address: Option<String>,
    pub pod_subnet: Option<String>,
    /// `nat` (a server-reflexive mapping differs from the host addresses), `none` (a public address: the
    /// mapping equals a host address, or the node has a TURN allocation and no mapping of its own),
    /// `unknown` (neither published).
    pub nat: &'static str,
    /// The server-reflexive (public) mappings the node published.
    pub public_mapping: Vec<String>,
    pub relay: bool,
    pub version: Option<String>,
    /// A live registration (lease) in etcd.
    pub up: bool,
    /// When its path summary was written (Unix seconds).
    pub summary_time: Option<u64>,
}

/// A peer path between two nodes, as reported by one of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeView {
    pub a: String,
    pub b: String,
    pub kind: String,
    pub rtt_ms: Option<f64>,
    /// Bytes per second, both directions.
    pub rate: u64,
    /// The node whose report this is.
    pub reporter: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// Changes whenever anything shown changed.
    pub version: u64,
    pub etcd_connected: bool,
    pub nodes: Vec<NodeView>,
    pub edges: Vec<EdgeView>,
}

/// One node's detail: what it published and its peers (as `evioctl status` shows them).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDetail {
    pub node: NodeView,
    pub endpoints: Vec<String>,
    pub candidates: Vec<String>,
    pub now: u64,
    pub peers: Vec<PathEntry>,
}

#[derive(Default)]
struct Model {
    topology: Topology,
    details: HashMap<String, NodeDetail>,
}

struct AppState {
    model: RwLock<Model>,
    changes: tokio::sync::watch::Sender<u64>,
}

const MAX_LIST: usize = 16;
const KINDS: [&str; 4] = ["direct", "relay", "connecting", "idle"];

fn bounded(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(max)
        .collect::<String>()
}

/// A path summary from etcd, or None when it does not speak for its key or is out of bounds.
pub fn parse_summary(key_node: &str, value: &[u8]) -> Option<PathSummary> {
    if value.len() > PathSummary::MAX_BYTES || !keys::valid_node_name(key_node) {
        return None;
    }
    let mut s: PathSummary = serde_json::from_slice(value).ok()?;
    if s.node != key_node {
        return None;
    }
    s.version = bounded(&s.version, 32);
    s.peers.truncate(PathSummary::MAX_PEERS);
    s.peers.retain(|p| keys::valid_node_name(&p.peer));
    for p in &mut s.peers {
        if !KINDS.contains(&p.kind.as_str()) {
            p.kind = "unknown".into();
        }
        p.endpoint = p
            .endpoint
            .take()
            .filter(|e| e.parse::<SocketAddr>().is_ok());
        p.rtt_ms = p.rtt_ms.filter(|r| r.is_finite() && *r >= 0.0 && *r < 1e7);
    }
    Some(s)
}

fn node_view(name: &str, rec: Option<&NodeRecord>, sum: Option<&PathSummary>) -> NodeView {
    let srflx: Vec<String> = rec
        .map(|r| {
            r.candidates
                .iter()
                .filter(|c| c.kind == CandidateKind::Srflx)
                .take(MAX_LIST)
                .map(|c| c.addr.to_string())
                .collect()
        })
        .unwrap_or_default();
    let nat = match rec {
        Some(r) if !srflx.is_empty() => {
            let hosts: Vec<_> = r
                .candidates
                .iter()
                .filter(|c| c.kind == CandidateKind::Host)
                .map(|c| c.addr.ip())
                .chain(r.endpoints.iter().map(|e| e.ip()))
                .collect();
            let natted = r
                .candidates
                .iter()
                .filter(|c| c.kind == CandidateKind::Srflx)
                .any(|c| !hosts.contains(&c.addr.ip()));
            if natted { "nat" } else { "none" }
        }
        // No server-reflexive candidate but a TURN allocation: the servers answered and saw a host address
        // (an agent does not publish a mapping equal to a host candidate).
        Some(r) if r.candidates.iter().any(|c| c.kind == CandidateKind::Relay) => "none",
        _ => "unknown",
    };
    NodeView {
        name: name.to_string(),
        address: rec
            .map(|r| r.address)
            .filter(|a| !a.is_unspecified())
            .map(|a| a.to_string()),
        pod_subnet: rec.and_then(|r| r.pod_subnet).map(|s| s.to_string()),
        nat,
        public_mapping: srflx,
        relay: rec.is_some_and(|r| r.candidates.iter().any(|c| c.kind == CandidateKind::Relay)),
        version: sum.map(|s| s.version.clone()).filter(|v| !v.is_empty()),
        up: rec.is_some(),
        summary_time: sum.map(|s| s.time),
    }
}

/// Builds what the page shows from what etcd holds: live records, claims (nodes known but down) and path
/// summaries. `summaries` are already validated ([`parse_summary`]).
pub fn build(
    records: &[NodeRecord],
    claimed: &[(String, Option<String>, Option<String>)],
    summaries: &BTreeMap<String, PathSummary>,
    etcd_connected: bool,
) -> (Topology, HashMap<String, NodeDetail>) {
    let recs: BTreeMap<&str, &NodeRecord> = records
        .iter()
        .filter(|r| keys::valid_node_name(&r.node))
        .map(|r| (r.node.as_str(), r))
        .collect();
    let mut names: Vec<String> = recs.keys().map(|s| s.to_string()).collect();
    for (n, _, _) in claimed {
        if keys::valid_node_name(n) {
            names.push(n.clone());
        }
    }
    names.sort();
    names.dedup();
    let claims: HashMap<&str, (&Option<String>, &Option<String>)> = claimed
        .iter()
        .map(|(n, a, s)| (n.as_str(), (a, s)))
        .collect();
    let mut nodes = Vec::new();
    let mut details = HashMap::new();
    for n in &names {
        let rec = recs.get(n.as_str()).copied();
        // A down node's summary is gone with its lease; a stale one is not shown.
        let sum = summaries.get(n).filter(|_| rec.is_some());
        let mut v = node_view(n, rec, sum);
        if let Some((a, s)) = claims.get(n.as_str()) {
            v.address = v.address.or_else(|| (*a).clone());
            v.pod_subnet = v.pod_subnet.or_else(|| (*s).clone());
        }
        details.insert(
            n.clone(),
            NodeDetail {
                node: v.clone(),
                endpoints: rec
                    .map(|r| {
                        r.endpoints
                            .iter()
                            .take(MAX_LIST)
                            .map(|e| e.to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
                candidates: rec
                    .map(|r| {
                        r.candidates
                            .iter()
                            .take(MAX_LIST)
                            .map(|c| format!("{:?} {}", c.kind, c.addr).to_lowercase())
                            .collect()
                    })
                    .unwrap_or_default(),
                now: 0,
                peers: sum.map(|s| s.peers.clone()).unwrap_or_default(),
            },
        );
        nodes.push(v);
    }
    let up: HashMap<&str, bool> = nodes.iter().map(|n| (n.name.as_str(), n.up)).collect();
    // One edge per pair: the lower-named live node's report, else the other's.
    let mut edges: BTreeMap<(String, String), EdgeView> = BTreeMap::new();
    for (reporter, s) in summaries {
        if up.get(reporter.as_str()) != Some(&true) {
            continue;
        }
        for p in &s.peers {
            if !up.contains_key(p.peer.as_str()) || p.peer == *reporter {
                continue;
            }
            let (a, b) = if *reporter < p.peer {
                (reporter.clone(), p.peer.clone())
            } else {
                (p.peer.clone(), reporter.clone())
            };
            let e = EdgeView {
                a: a.clone(),
                b: b.clone(),
                kind: p.kind.clone(),
                rtt_ms: p.rtt_ms,
                rate: p.rx_rate.saturating_add(p.tx_rate),
                reporter: reporter.clone(),
            };
            match edges.get(&(a.clone(), b.clone())) {
                Some(old) if old.reporter == a => {}
                _ => {
                    edges.insert((a, b), e);
                }
            }
        }
    }
    (
        Topology {
            version: 0,
            etcd_connected,
            nodes,
            edges: edges.into_values().collect(),
        },
        details,
    )
}

/// Reads everything the page needs from etcd.
async fn read(store: &Store) -> Result<(Topology, HashMap<String, NodeDetail>)> {
    let snap = store.snapshot().await?;
    let mut c = store.client();
    let resp = tokio::time::timeout(
        store.timeout(),
        c.get(keys::PATHS, Some(GetOptions::new().with_prefix())),
    )
    .await
    .context("reading path summaries: timed out")??;
    let mut summaries = BTreeMap::new();
    for kv in resp.kvs() {
        let Some(node) = kv.key_str().ok().and_then(|k| k.strip_prefix(keys::PATHS)) else {
            continue;
        };
        if let Some(s) = parse_summary(node, kv.value()) {
            summaries.insert(node.to_string(), s);
        }
    }
    let mut claimed: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for a in &snap.addresses {
        claimed.entry(a.node.clone()).or_default().0 = Some(a.address.to_string());
    }
    for s in &snap.subnets {
        claimed.entry(s.node.clone()).or_default().1 = Some(s.subnet.to_string());
    }
    let claimed: Vec<_> = claimed.into_iter().map(|(n, (a, s))| (n, a, s)).collect();
    Ok(build(&snap.nodes, &claimed, &summaries, true))
}

impl AppState {
    fn publish(&self, mut topo: Topology, details: HashMap<String, NodeDetail>) {
        let mut m = self.model.write().unwrap_or_else(|e| e.into_inner());
        topo.version = m.topology.version;
        if m.topology == topo && m.details == details {
            return;
        }
        topo.version += 1;
        let v = topo.version;
        m.topology = topo;
        m.details = details;
        drop(m);
        self.changes.send_replace(v);
    }

    fn set_disconnected(&self) {
        let m = self.model.read().unwrap_or_else(|e| e.into_inner());
        let mut t = m.topology.clone();
        let d = m.details.clone();
        drop(m);
        t.etcd_connected = false;
        self.publish(t, d);
    }
}

/// Keeps the model current: a watch on the evio prefix says when to read again (debounced); a periodic read
/// covers a watch that died quietly.
async fn refresher(state: Arc<AppState>, opts: evio_store::EtcdOptions) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let store = match Store::connect(&opts).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("etcd: {e}");
                state.set_disconnected();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
                continue;
            }
        };
        let mut c = store.client();
        let mut stream = match c
            .watch(keys::ROOT, Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("etcd watch: {e}");
                state.set_disconnected();
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        // The pause after a change before reading: at least 150 ms (a burst of writes settles), twice the
        // last read's duration (reading a large cluster takes at most a third of the time), at most 1 s.
        loop {
            let started = tokio::time::Instant::now();
            let res = read(&store).await;
            let settle =
                (started.elapsed() * 2).clamp(Duration::from_millis(150), Duration::from_secs(1));
            match res {
                Ok((t, d)) => state.publish(t, d),
                Err(e) => {
                    tracing::warn!("reading etcd: {e:#}");
                    state.set_disconnected();
                    break;
                }
            }
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(_))) => {
                    tokio::time::sleep(settle).await;
                }
                Ok(_) => break,
                Err(_) => {}
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

fn asset(ctype: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// JSON safe inside an HTML `<script type="application/json">` block: `<`, `>` and `&` escaped, so no value
/// can close the block or open a comment.
pub fn json_for_html<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// The page, with the current topology embedded for the first paint.
async fn index(State(s): State<Arc<AppState>>) -> Response {
    let data = {
        let m = s.model.read().unwrap_or_else(|e| e.into_inner());
        json_for_html(&m.topology)
    };
    let block = format!(r#"<script id="initial" type="application/json">{data}</script>"#);
    let mut r = asset("text/html; charset=utf-8", "");
    *r.body_mut() = axum::body::Body::from(INDEX_HTML.replacen("<!--INITIAL-->", &block, 1));
    r
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn topology(State(s): State<Arc<AppState>>) -> Response {
    let m = s.model.read().unwrap_or_else(|e| e.into_inner());
    json(&m.topology)
}

async fn node(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if !keys::valid_node_name(&name) {
        return (StatusCode::BAD_REQUEST, "invalid node name\n").into_response();
    }
    let m = s.model.read().unwrap_or_else(|e| e.into_inner());
    match m.details.get(&name) {
        Some(d) => {
            let mut d = d.clone();
            d.now = unix_now();
            json(&d)
        }
        None => (StatusCode::NOT_FOUND, "no such node\n").into_response(),
    }
}

async fn events(
    State(s): State<Arc<AppState>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let rx = s.changes.subscribe();
    let stream = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let v = *rx.borrow_and_update();
        Some((
            Ok(Event::default().event("topology").data(v.to_string())),
            (rx, false),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route("/api/topology", get(topology))
        .route("/api/nodes/{name}", get(node))
        .route("/api/events", get(events))
        .with_state(state)
}

pub fn run(args: Args) -> Result<()> {
    let opts = args.etcd.options(None)?;
    // Bound here, before any namespace change: the listener stays where evioctl was started, the runtime's
    // threads (and so the etcd connection) start in --etcd-netns.
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listening on {}", args.listen))?;
    listener.set_nonblocking(true)?;
    if let Some(ns) = &args.etcd_netns {
        enter_netns(ns)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let state = Arc::new(AppState {
            model: RwLock::new(Model::default()),
            changes: tx,
        });
        let listener = tokio::net::TcpListener::from_std(listener)?;
        eprintln!("evioctl ui: serving http://{}/", listener.local_addr()?);
        tokio::spawn(refresher(state.clone(), opts));
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, srflx: Option<&str>) -> NodeRecord {
        let mut r = NodeRecord::new(name);
        r.address = "10.10.0.1".parse().unwrap();
        r.endpoints = vec!["192.168.1.2:51820".parse().unwrap()];
        if let Some(a) = srflx {
            r.candidates.push(evio_store::Candidate {
                kind: CandidateKind::Srflx,
                addr: a.parse().unwrap(),
            });
        }
        r
    }

    #[test]
    fn nat_kind_from_the_published_candidates() {
        let mut relay_only = rec("r", None);
        relay_only.candidates.push(evio_store::Candidate {
            kind: CandidateKind::Relay,
            addr: "198.18.0.3:49160".parse().unwrap(),
        });
        let kinds: Vec<_> = [
            rec("n", Some("203.0.113.1:4000")),
            rec("h", Some("192.168.1.2:51820")),
            relay_only,
            rec("u", None),
        ]
        .iter()
        .map(|r| node_view(&r.node, Some(r), None).nat)
        .collect();
        assert_eq!(kinds, ["nat", "none", "none", "unknown"]);
    }

    #[test]
    fn embedded_json_cannot_leave_its_script_block() {
        let v = serde_json::json!({"name": "</script><script>alert(1)</script><!--&"});
        let s = json_for_html(&v);
        assert!(
            !s.contains('<') && !s.contains('>') && !s.contains('&'),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&s).unwrap(), v);
    }

    #[test]
    fn summaries_are_validated_and_bounded() {
        let ok = br#"{"node":"a","version":"0.1.0\u0007<b>","time":5,"peers":[
            {"peer":"b","kind":"direct","endpoint":"10.0.0.2:51820","rttMs":1.5,"rxBytes":1,"txBytes":2,"rxRate":3,"txRate":4},
            {"peer":"<img src=x>","kind":"direct"},
            {"peer":"c","kind":"evil","endpoint":"javascript:alert(1)","rttMs":-3}]}"#;
        let s = parse_summary("a", ok).unwrap();
        assert_eq!(s.version, "0.1.0<b>");
        assert_eq!(s.peers.len(), 2, "{s:?}");
        assert_eq!(s.peers[0].rtt_ms, Some(1.5));
        assert_eq!(s.peers[1].kind, "unknown");
        assert_eq!(s.peers[1].endpoint, None);
        assert_eq!(s.peers[1].rtt_ms, None);
        // Another node's summary under our key, junk, and an oversized value are refused.
        assert!(parse_summary("b", ok).is_none());
        assert!(parse_summary("a", b"{").is_none());
        let big = format!(
            r#"{{"node":"a","version":"{}"}}"#,
            "x".repeat(PathSummary::MAX_BYTES)
        );
        assert!(parse_summary("a", big.as_bytes()).is_none());
    }

    #[test]
    fn nodes_and_edges_come_from_records_claims_and_summaries() {
        let entry = |peer: &str, kind: &str| PathEntry {
            peer: peer.into(),
            kind: kind.into(),
            rx_rate: 10,
            tx_rate: 5,
            rtt_ms: Some(2.0),
            ..Default::default()
        };
        let mut sums = BTreeMap::new();
        sums.insert(
            "a".to_string(),
            PathSummary {
                node: "a".into(),
                version: "9".into(),
                time: 1,
                peers: vec![entry("b", "relay"), entry("c", "connecting")],
            },
        );
        sums.insert(
            "b".to_string(),
            PathSummary {
                node: "b".into(),
                version: "9".into(),
                time: 1,
                peers: vec![entry("a", "direct")],
            },
        );
        let records = vec![
            rec("a", Some("203.0.113.1:4000")),
            rec("b", Some("192.168.1.2:51820")),
        ];
        let claimed = vec![("c".to_string(), Some("10.10.0.3".to_string()), None)];
        let (t, d) = build(&records, &claimed, &sums, true);
        let names: Vec<_> = t
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.up, n.nat))
            .collect();
        assert_eq!(
            names,
            [
                ("a", true, "nat"),
                ("b", true, "none"),
                ("c", false, "unknown")
            ]
        );
        assert_eq!(t.nodes[2].address.as_deref(), Some("10.10.0.3"));
        assert_eq!(t.nodes[0].version.as_deref(), Some("9"));
        // a-b from a's report (the lower name), a-c from a although c is down.
        let edges: Vec<_> = t
            .edges
            .iter()
            .map(|e| (e.a.as_str(), e.b.as_str(), e.kind.as_str(), e.rate))
            .collect();
        assert_eq!(
            edges,
            [("a", "b", "relay", 15), ("a", "c", "connecting", 15)]
        );
        assert_eq!(d["a"].peers.len(), 2);
        assert!(d["c"].peers.is_empty());
    }
}
