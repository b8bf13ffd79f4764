//! Open vSwitch backend: talks OVSDB JSON-RPC (RFC 7047) to ovsdb-server on `ovsdbSocket`, with
//! `ovs-vsctl` only as a fallback when the JSON-RPC conversation itself fails.
//!
//! * `ensure` creates Bridge + Port + Interface (type `internal`) in one transaction guarded by a `wait`
//!   (no bridge of that name yet) and the schema's unique name index, so racing plugin processes create
//!   it exactly once; the bridge gets the configured `datapath_type` and a stable random MAC
//!   (`other_config:hwaddr`; otherwise OVS takes the lowest port MAC and the gateway MAC changes as pods
//!   come and go). It then waits, bounded, until ovs-vswitchd has applied the configuration (the
//!   `next_cfg`/`cur_cfg` handshake `ovs-vsctl` uses), checks `Interface.error`/`ofport` and that the
//!   device exists in this network namespace, and sets it up.
//! * `attach` inserts Port + Interface for the host veth, tagged in `external_ids` with
//!   `evio-owner=evio-cni`, the container id and the interface name, in ONE transaction; waits until
//!   ovs-vswitchd applied it and verifies an OpenFlow port was assigned without `error`; otherwise it
//!   deletes what it inserted and fails.
//! * `detach` removes the ports tagged with that owner; `gc` removes our tagged ports on this bridge whose
//!   owner is not valid. Untagged ports are never touched.
//!
//! Dependencies: no maintained synchronous OVSDB client crate exists for Rust, and the plugin needs only
//! `transact` with `wait`, so `ovsdb` here is a ~200-line client on `serde_json` (the de-facto JSON crate,
//! whose `StreamDeserializer` parses the unframed message stream) over std's `UnixStream`/`TcpStream`.
//! The device's index and link state go through `evio-netlink`; `getrandom` (in the lockfile through
//! `rand`) makes MACs.

mod ovsdb;
mod vsctl;

pub use ovsdb::{Ovsdb, OvsdbError, Target};

use crate::{Bridge, BridgeError, BridgeSpec, PortOwner};
use ovsdb::{map, map_pairs, named, opt_int, opt_str, rows, set_members, uuid, uuid_str};
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `external_ids` key marking a port as created by this plugin.
pub const OWNER_KEY: &str = "evio-owner";
/// Value of [`OWNER_KEY`].
pub const OWNER_VALUE: &str = "evio-cni";
/// `external_ids` key holding the CNI container id.
pub const CONTAINER_KEY: &str = "evio-container-id";
/// `external_ids` key holding the CNI interface name (`CNI_IFNAME`).
pub const IFNAME_KEY: &str = "evio-ifname";

/// Default ovsdb-server socket.
pub const DEFAULT_SOCKET: &str = evio_cni_types::config::DEFAULT_OVSDB_SOCKET;

/// Which client to use for OVSDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OvsClient {
    /// JSON-RPC; `ovs-vsctl` when the JSON-RPC conversation fails (I/O or protocol error).
    Auto,
    /// JSON-RPC only.
    JsonRpc,
    /// `ovs-vsctl` only.
    Vsctl,
}

/// An Open vSwitch bridge reached through ovsdb-server.
#[derive(Debug)]
pub struct OvsBridge {
    spec: BridgeSpec,
    timeout: Duration,
    client: OvsClient,
    conn: Mutex<Option<Ovsdb>>,
}

/// How a JSON-RPC attempt failed: the conversation (may fall back to ovs-vsctl) or the operation.
#[derive(Debug)]
enum Fail {
    Transport(String),
    Final(BridgeError),
}

impl OvsBridge {
    /// A backend for `spec.name`; nothing is contacted until a method is called. An empty
    /// `ovsdb_socket` means [`DEFAULT_SOCKET`].
    pub fn new(spec: BridgeSpec) -> OvsBridge {
        OvsBridge {
            spec,
            timeout: Duration::from_secs(10),
            client: OvsClient::Auto,
            conn: Mutex::new(None),
        }
    }

    /// Upper bound for each call, including waiting for ovs-vswitchd (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> OvsBridge {
        self.timeout = timeout;
        self
    }

    /// Chooses the client (default [`OvsClient::Auto`]).
    pub fn with_client(mut self, client: OvsClient) -> OvsBridge {
        self.client = client;
        self
    }

    fn socket_str(&self) -> String {
        let s = self.spec.ovsdb_socket.to_string_lossy();
        if s.is_empty() {
            DEFAULT_SOCKET.to_string()
        } else {
            s.into_owned()
        }
    }

    /// True when the OVSDB target is a unix socket path that does not exist.
    fn socket_missing(&self) -> bool {
        matches!(Target::parse(&self.socket_str()), Ok(Target::Unix(p)) if !p.exists())
    }

    fn datapath(&self) -> &'static str {
        self.spec.ovs_datapath_type.as_str()
    }

    fn ovsdb_err(&self, msg: impl std::fmt::Display) -> BridgeError {
        BridgeError::Ovsdb {
            socket: self.socket_str(),
            msg: msg.to_string(),
        }
    }

    fn bridge_err(&self, msg: impl std::fmt::Display) -> BridgeError {
        BridgeError::Bridge {
            bridge: self.spec.name.clone(),
            msg: msg.to_string(),
        }
    }

    fn port_err(&self, port: &str, msg: impl std::fmt::Display) -> BridgeError {
        BridgeError::Port {
            bridge: self.spec.name.clone(),
            port: port.to_string(),
            msg: msg.to_string(),
        }
    }

    /// Maps an OVSDB error: transport failures may fall back, refused transactions are final.
    fn fail(&self, e: OvsdbError) -> Fail {
        if e.is_transport() {
            Fail::Transport(e.to_string())
        } else {
            Fail::Final(self.ovsdb_err(e))
        }
    }

    fn vsctl(&self) -> vsctl::Vsctl<'_> {
        vsctl::Vsctl::new(self)
    }

    /// Runs `json` on the (cached) connection, and `fallback` (ovs-vsctl) when allowed and the
    /// JSON-RPC conversation failed.
    fn dispatch<T>(
        &self,
        what: &str,
        json: impl FnOnce(&Self, &mut Ovsdb) -> Result<T, Fail>,
        fallback: impl FnOnce() -> Result<T, BridgeError>,
    ) -> Result<T, BridgeError> {
        if self.client == OvsClient::Vsctl {
            return fallback();
        }
        let r = {
            let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let r = match guard.as_mut() {
                Some(db) => json(self, db),
                None => match Target::parse(&self.socket_str())
                    .and_then(|t| Ovsdb::connect(&t, self.timeout))
                {
                    Ok(db) => json(self, guard.insert(db)),
                    Err(e) => Err(self.fail(e)),
                },
            };
            if matches!(r, Err(Fail::Transport(_))) {
                *guard = None;
            }
            r
        };
        match r {
            Ok(v) => Ok(v),
            Err(Fail::Final(e)) => Err(e),
            Err(Fail::Transport(msg)) if self.client == OvsClient::Auto && vsctl::available() => {
                tracing::warn!(bridge = %self.spec.name, error = %msg, "{what}: OVSDB JSON-RPC failed, falling back to ovs-vsctl");
                fallback().map_err(|e| {
                    self.ovsdb_err(format!(
                        "JSON-RPC failed ({msg}); ovs-vsctl fallback failed too: {e}"
                    ))
                })
            }
            Err(Fail::Transport(msg)) => Err(self.ovsdb_err(msg)),
        }
    }

    // ---- JSON-RPC implementations ----

    fn ensure_json(&self, db: &mut Ovsdb) -> Result<(), Fail> {
        let deadline = Instant::now() + self.timeout;
        let br = self.spec.name.as_str();
        let dp = self.datapath();
        let state = db
            .transact(
                vec![
                    select("Open_vSwitch", json!([]), &["_uuid"]),
                    select("Bridge", eq("name", br), &["_uuid", "datapath_type"]),
                    select(
                        "Interface",
                        eq("name", br),
                        &["mtu_request", "ofport", "error"],
                    ),
                ],
                self.timeout,
            )
            .map_err(|e| self.fail(e))?;
        if rows(&state[0]).is_empty() {
            // A database nobody initialised: add the root row (what `ovs-vsctl init` does), once.
            let init = vec![
                json!({"op": "wait", "table": "Open_vSwitch", "where": [], "columns": ["_uuid"],
                       "until": "==", "rows": [], "timeout": 0}),
                json!({"op": "insert", "table": "Open_vSwitch", "row": {}}),
            ];
            match db.transact(init, self.timeout) {
                Ok(_) | Err(OvsdbError::Txn { op: Some(0), .. }) => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        let mut created: Option<String> = None;
        let mut cfg: Option<i64> = None;
        if let Some(b) = rows(&state[1]).first() {
            let have = normalize_dp(opt_str(&b["datapath_type"]).unwrap_or(""));
            if have != dp {
                return Err(Fail::Final(self.bridge_err(format!(
                    "exists with datapath_type {have:?} but the configuration asks for {dp:?}"
                ))));
            }
            let iface = rows(&state[2])
                .first()
                .map(|r| (*r).clone())
                .unwrap_or(Value::Null);
            let mtu_ok = self
                .spec
                .mtu
                .is_none_or(|m| opt_int(&iface["mtu_request"]) == Some(i64::from(m)));
            let healthy = matches!(opt_int(&iface["ofport"]), Some(p) if p >= 0)
                && opt_str(&iface["error"]).is_none();
            if mtu_ok && healthy && netdev::index(br).is_some() {
                // Applied by ovs-vswitchd earlier and present here: no need to wait for a new round.
                return netdev::set_up(br).map_err(|e| {
                    Fail::Final(self.bridge_err(format!("cannot set the device up: {e}")))
                });
            }
            if let Some(mtu) = self.spec.mtu
                && !mtu_ok
            {
                let mut ops = vec![
                    json!({"op": "update", "table": "Interface", "where": eq("name", br),
                                              "row": {"mtu_request": mtu}}),
                ];
                ops.extend(bump_cfg());
                let r = db.transact(ops, self.timeout).map_err(|e| self.fail(e))?;
                cfg = next_cfg(&r[2]);
            }
        } else {
            let mut iface = json!({"name": br, "type": "internal"});
            if let Some(mtu) = self.spec.mtu {
                iface["mtu_request"] = json!(mtu);
            }
            let mac = random_mac().map_err(|e| Fail::Final(self.bridge_err(e)))?;
            let mut ops = vec![
                json!({"op": "wait", "table": "Bridge", "where": eq("name", br), "columns": ["name"],
                       "until": "==", "rows": [], "timeout": 0}),
                json!({"op": "insert", "table": "Interface", "row": iface, "uuid-name": "iface"}),
                json!({"op": "insert", "table": "Port", "uuid-name": "port",
                       "row": {"name": br, "interfaces": named("iface")}}),
                json!({"op": "insert", "table": "Bridge", "uuid-name": "br",
                       "row": {"name": br, "ports": named("port"), "datapath_type": dp,
                               "other_config": map([("hwaddr", mac.as_str())]),
                               "external_ids": map([(OWNER_KEY, OWNER_VALUE)])}}),
                json!({"op": "mutate", "table": "Open_vSwitch", "where": [],
                       "mutations": [["bridges", "insert", ["set", [named("br")]]]]}),
                json!({"op": "comment", "comment": format!("evio-cni: create bridge {br}")}),
            ];
            ops.extend(bump_cfg());
            match db.transact(ops, self.timeout) {
                Ok(r) => {
                    if r[4]["count"].as_i64() != Some(1) {
                        return Err(Fail::Final(
                            self.ovsdb_err("no Open_vSwitch root row to attach the bridge to"),
                        ));
                    }
                    created = uuid_str(&r[3]["uuid"]).map(str::to_string);
                    cfg = next_cfg(&r[7]);
                    tracing::info!(bridge = br, datapath = dp, "created OVS bridge");
                }
                // Another process created it between our select and this transaction.
                Err(OvsdbError::Txn { error, .. })
                    if error == "timed out" || error == "constraint violation" => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        let result = self.bridge_up_check(db, cfg, deadline);
        if let (Err(_), Some(b)) = (&result, &created) {
            // Do not leave a bridge behind that we created and that does not work.
            let undo = vec![
                json!({"op": "mutate", "table": "Open_vSwitch", "where": [],
                       "mutations": [["bridges", "delete", ["set", [uuid(b)]]]]}),
                json!({"op": "delete", "table": "Bridge", "where": [["_uuid", "==", uuid(b)]]}),
            ];
            if let Err(e) = self.transact_fresh(db, undo) {
                tracing::warn!(bridge = br, error = %e, "could not remove the bridge that failed to come up");
            }
        }
        result
    }

    /// Waits until ovs-vswitchd applied configuration `cfg` (or, if None, everything committed so far),
    /// then checks the bridge's interface and device and sets the device up.
    fn bridge_up_check(
        &self,
        db: &mut Ovsdb,
        cfg: Option<i64>,
        deadline: Instant,
    ) -> Result<(), Fail> {
        let br = self.spec.name.as_str();
        let cfg = match cfg {
            Some(c) => c,
            None => {
                let r = db
                    .transact(bump_cfg(), self.timeout)
                    .map_err(|e| self.fail(e))?;
                next_cfg(&r[1]).ok_or_else(|| Fail::Final(self.ovsdb_err("no Open_vSwitch row")))?
            }
        };
        let iface = self
            .wait_applied(db, cfg, eq("name", br), deadline)
            .map_err(|e| match e {
                Fail::Final(BridgeError::Other(m)) => Fail::Final(self.bridge_err(m)),
                other => other,
            })?;
        let Some(iface) = iface else {
            return Err(Fail::Final(
                self.bridge_err("its interface row disappeared"),
            ));
        };
        if let Some(err) = opt_str(&iface["error"]) {
            return Err(Fail::Final(self.bridge_err(format!("ovs-vswitchd: {err}"))));
        }
        match opt_int(&iface["ofport"]) {
            Some(p) if p >= 0 => {}
            _ => {
                let hint = if self.datapath() == "system" {
                    " (datapath_type \"system\" needs the openvswitch kernel module; set ovsDatapathType \"netdev\" for the userspace datapath)"
                } else {
                    ""
                };
                return Err(Fail::Final(self.bridge_err(format!(
                    "ovs-vswitchd could not set up the bridge{hint}; see the ovs-vswitchd log"
                ))));
            }
        }
        netdev::wait_and_up(br, deadline).map_err(|m| Fail::Final(self.bridge_err(m)))
    }

    /// Waits (server side, bounded by `deadline`) until `cur_cfg >= cfg`, then returns the Interface
    /// row matching `iface_where` (columns `ofport`, `error`).
    fn wait_applied(
        &self,
        db: &mut Ovsdb,
        cfg: i64,
        iface_where: Value,
        deadline: Instant,
    ) -> Result<Option<Value>, Fail> {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i64::MAX as u128) as i64;
        let ops = vec![
            json!({"op": "wait", "table": "Open_vSwitch", "where": [["cur_cfg", ">=", cfg]],
                   "columns": ["cur_cfg"], "until": "!=", "rows": [], "timeout": ms}),
            select("Interface", iface_where, &["ofport", "error"]),
        ];
        match db.transact(ops, left + Duration::from_secs(2)) {
            Ok(r) => Ok(rows(&r[1]).first().map(|v| (*v).clone())),
            Err(OvsdbError::Txn { op: Some(0), .. }) => {
                Err(Fail::Final(BridgeError::Other(format!(
                    "ovs-vswitchd did not apply the configuration within {:?} (is ovs-vswitchd running and connected to {}?)",
                    self.timeout,
                    self.socket_str()
                ))))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Runs `ops` on `db`, or on a new connection when `db` failed (for clean-up after errors).
    fn transact_fresh(&self, db: &mut Ovsdb, ops: Vec<Value>) -> Result<Vec<Value>, OvsdbError> {
        match db.transact(ops.clone(), self.timeout) {
            Err(e) if e.is_transport() => {
                let mut fresh = Ovsdb::connect(&Target::parse(&self.socket_str())?, self.timeout)?;
                let r = fresh.transact(ops, self.timeout);
                *db = fresh;
                r
            }
            r => r,
        }
    }

    fn attach_json(&self, db: &mut Ovsdb, port: &str, owner: &PortOwner) -> Result<(), Fail> {
        let deadline = Instant::now() + self.timeout;
        let br = self.spec.name.as_str();
        let tags = map(owner_tags(owner));
        let mut ops = vec![
            // The bridge must exist, else the Port would be garbage-collected at commit and we would
            // "succeed" with nothing attached.
            json!({"op": "wait", "table": "Bridge", "where": eq("name", br), "columns": ["name"],
                   "until": "==", "rows": [{"name": br}], "timeout": 0}),
            json!({"op": "insert", "table": "Interface", "uuid-name": "iface",
                   "row": {"name": port, "external_ids": tags}}),
            json!({"op": "insert", "table": "Port", "uuid-name": "port",
                   "row": {"name": port, "interfaces": named("iface"), "external_ids": tags}}),
            json!({"op": "mutate", "table": "Bridge", "where": eq("name", br),
                   "mutations": [["ports", "insert", ["set", [named("port")]]]]}),
            json!({"op": "comment", "comment": format!("evio-cni: attach {port} for {}/{}", owner.container_id, owner.ifname)}),
        ];
        ops.extend(bump_cfg());
        let r = match db.transact(ops, self.timeout) {
            Ok(r) => r,
            Err(OvsdbError::Txn { op: Some(0), .. }) => {
                return Err(Fail::Final(
                    self.port_err(port, "the bridge does not exist"),
                ));
            }
            Err(OvsdbError::Txn { error, details, .. }) if error == "constraint violation" => {
                return Err(Fail::Final(self.port_err(
                    port,
                    format!(
                        "a port or interface with this name already exists ({})",
                        details.unwrap_or_default()
                    ),
                )));
            }
            Err(e) => return Err(self.fail(e)),
        };
        let (Some(iface_uuid), Some(port_uuid)) =
            (uuid_str(&r[1]["uuid"]), uuid_str(&r[2]["uuid"]))
        else {
            return Err(Fail::Final(
                self.ovsdb_err(format!("insert returned no uuids: {r:?}")),
            ));
        };
        let cfg = next_cfg(&r[6]).unwrap_or(0);
        let verdict = match self.wait_applied(
            db,
            cfg,
            json!([["_uuid", "==", uuid(iface_uuid)]]),
            deadline,
        ) {
            Ok(Some(row)) => {
                if let Some(err) = opt_str(&row["error"]) {
                    Err(format!("ovs-vswitchd: {err}"))
                } else {
                    match opt_int(&row["ofport"]) {
                        Some(p) if p >= 1 => Ok(()),
                        p => Err(format!(
                            "ovs-vswitchd assigned no OpenFlow port (ofport {p:?})"
                        )),
                    }
                }
            }
            Ok(None) => Err("the interface row disappeared".to_string()),
            Err(Fail::Final(e)) => Err(match e {
                BridgeError::Other(m) => m,
                e => e.to_string(),
            }),
            Err(Fail::Transport(m)) => Err(format!("lost ovsdb-server while verifying: {m}")),
        };
        match verdict {
            Ok(()) => {
                tracing::debug!(bridge = br, port, "attached OVS port");
                Ok(())
            }
            Err(msg) => {
                let undo = vec![
                    json!({"op": "mutate", "table": "Bridge", "where": [["ports", "includes", uuid(port_uuid)]],
                           "mutations": [["ports", "delete", uuid(port_uuid)]]}),
                    json!({"op": "delete", "table": "Port", "where": [["_uuid", "==", uuid(port_uuid)]]}),
                    json!({"op": "delete", "table": "Interface", "where": [["_uuid", "==", uuid(iface_uuid)]]}),
                ];
                let cleanup = match self.transact_fresh(db, undo) {
                    Ok(_) => String::new(),
                    Err(e) => {
                        format!("; removing the port failed too ({e}); DEL or GC will remove it")
                    }
                };
                Err(Fail::Final(self.port_err(
                    port,
                    format!("cannot be attached: {msg}{cleanup}"),
                )))
            }
        }
    }

    fn detach_json(&self, db: &mut Ovsdb, owner: &PortOwner) -> Result<Vec<String>, Fail> {
        let r = db
            .transact(
                vec![select(
                    "Port",
                    json!([["external_ids", "includes", map(owner_tags(owner))]]),
                    &["_uuid", "name"],
                )],
                self.timeout,
            )
            .map_err(|e| self.fail(e))?;
        let ports: Vec<(String, String)> = rows(&r[0]).into_iter().filter_map(port_id).collect();
        self.remove_ports(db, &ports)
    }

    /// Removes ports (uuid, name) in one transaction (their interfaces go with them: they are not root
    /// rows). Returns the names.
    fn remove_ports(
        &self,
        db: &mut Ovsdb,
        ports: &[(String, String)],
    ) -> Result<Vec<String>, Fail> {
        if ports.is_empty() {
            return Ok(Vec::new());
        }
        let mut ops = Vec::new();
        for (u, _) in ports {
            ops.push(
                json!({"op": "mutate", "table": "Bridge", "where": [["ports", "includes", uuid(u)]],
                            "mutations": [["ports", "delete", uuid(u)]]}),
            );
            ops.push(json!({"op": "delete", "table": "Port", "where": [["_uuid", "==", uuid(u)]]}));
        }
        ops.extend(bump_cfg());
        db.transact(ops, self.timeout).map_err(|e| self.fail(e))?;
        tracing::debug!(bridge = %self.spec.name, count = ports.len(), "removed OVS ports");
        Ok(ports.iter().map(|(_, n)| n.clone()).collect())
    }

    fn gc_json(&self, db: &mut Ovsdb, valid: &[PortOwner]) -> Result<Vec<String>, Fail> {
        let r = db
            .transact(
                vec![
                    select("Bridge", eq("name", &self.spec.name), &["ports"]),
                    select(
                        "Port",
                        json!([["external_ids", "includes", map([(OWNER_KEY, OWNER_VALUE)])]]),
                        &["_uuid", "name", "external_ids"],
                    ),
                ],
                self.timeout,
            )
            .map_err(|e| self.fail(e))?;
        let Some(b) = rows(&r[0]).first().map(|b| (*b).clone()) else {
            return Ok(Vec::new());
        };
        let on_bridge: Vec<&str> = set_members(&b["ports"])
            .into_iter()
            .filter_map(uuid_str)
            .collect();
        let stale: Vec<(String, String)> = rows(&r[1])
            .into_iter()
            .filter(|p| {
                uuid_str(&p["_uuid"]).is_some_and(|u| on_bridge.contains(&u))
                    && !is_valid(&map_pairs(&p["external_ids"]), valid)
            })
            .filter_map(port_id)
            .collect();
        self.remove_ports(db, &stale)
    }
}

impl OvsBridge {
    fn check_json(&self, db: &mut Ovsdb, port: &str, owner: &PortOwner) -> Result<(), Fail> {
        let r = db
            .transact(
                vec![
                    select("Bridge", eq("name", &self.spec.name), &["ports"]),
                    select("Port", eq("name", port), &["_uuid", "external_ids"]),
                    select("Interface", eq("name", port), &["ofport", "error"]),
                ],
                self.timeout,
            )
            .map_err(|e| self.fail(e))?;
        let bad = |m: &str| Err(Fail::Final(self.port_err(port, m)));
        let Some(b) = rows(&r[0]).first().map(|b| (*b).clone()) else {
            return bad("the bridge does not exist");
        };
        let Some(p) = rows(&r[1]).first().map(|p| (*p).clone()) else {
            return bad("not in OVSDB");
        };
        let on_bridge = uuid_str(&p["_uuid"]).is_some_and(|u| {
            set_members(&b["ports"])
                .into_iter()
                .any(|m| uuid_str(m) == Some(u))
        });
        if !on_bridge {
            return bad("not a port of this bridge");
        }
        if !is_valid(&map_pairs(&p["external_ids"]), std::slice::from_ref(owner)) {
            return bad("tagged for another owner");
        }
        let iface = rows(&r[2])
            .first()
            .map(|i| (*i).clone())
            .unwrap_or(Value::Null);
        if let Some(e) = opt_str(&iface["error"]) {
            return Err(Fail::Final(
                self.port_err(port, format!("ovs-vswitchd: {e}")),
            ));
        }
        match opt_int(&iface["ofport"]) {
            Some(n) if n >= 1 => Ok(()),
            n => Err(Fail::Final(
                self.port_err(port, format!("no OpenFlow port (ofport {n:?})")),
            )),
        }
    }
}

impl Bridge for OvsBridge {
    fn ensure(&self) -> Result<(), BridgeError> {
        self.dispatch(
            "ensure",
            |s, db| s.ensure_json(db),
            || self.vsctl().ensure(),
        )
    }

    fn attach(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError> {
        netdev::prepare_port(port, owner, self.spec.mtu)
            .map_err(|e| self.port_err(port, format!("cannot be attached: {e}")))?;
        self.dispatch(
            "attach",
            |s, db| s.attach_json(db, port, owner),
            || self.vsctl().attach(port, owner),
        )
    }

    /// Removes the owner's OVS ports, then the owner's host veth(s) (the ports' devices if they still
    /// carry the owner tag, else any veth with that `ifalias` tag, as the Linux bridge backend does), so
    /// DEL works without plugin state.
    fn detach(&self, owner: &PortOwner) -> Result<(), BridgeError> {
        let ports = match self.dispatch(
            "detach",
            |s, db| s.detach_json(db, owner),
            || self.vsctl().detach(owner),
        ) {
            Ok(p) => p,
            // No OVSDB socket at all (OVS stopped for good or removed): there is no port record to
            // remove; DEL still removes the veth. A socket that exists but does not answer stays an error
            // (the runtime retries), so records are never silently leaked while OVS is merely restarting.
            Err(e) if self.socket_missing() => {
                tracing::warn!(bridge = %self.spec.name, error = %e, "detach without OVSDB: no socket");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let tag = owner.tag();
        let r = if ports.is_empty() {
            // No OVS record (already removed, or lost): look for the tagged veth among all links.
            netdev::delete_tagged_veths(|a| a == tag)
        } else {
            ports
                .iter()
                .try_for_each(|p| netdev::delete_tagged_veth(p, |a| a == tag))
        };
        r.map_err(|e| self.bridge_err(e))
    }

    /// The port must be on this bridge, tagged for `owner`, with an OpenFlow port and no error, and its
    /// device must carry the owner tag.
    fn check_port(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError> {
        netdev::check_tag(port, &owner.tag()).map_err(|e| self.port_err(port, e))?;
        self.dispatch(
            "check",
            |s, db| s.check_json(db, port, owner),
            || self.vsctl().check(port, owner),
        )
    }

    /// Removes our stale ports on this bridge, and their host veths when they still carry a stale tag.
    fn gc(&self, valid: &[PortOwner]) -> Result<(), BridgeError> {
        let removed = self.dispatch(
            "gc",
            |s, db| s.gc_json(db, valid),
            || self.vsctl().gc(valid),
        )?;
        let keep: Vec<String> = valid.iter().map(PortOwner::tag).collect();
        let mut errors = Vec::new();
        for name in removed {
            if let Err(e) = netdev::delete_tagged_veth(&name, |a| !keep.iter().any(|k| k == a)) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(self.bridge_err(errors.join("; ")))
        }
    }
}

/// (uuid, name) of a Port row.
fn port_id(row: &Value) -> Option<(String, String)> {
    Some((
        uuid_str(&row["_uuid"])?.to_string(),
        row["name"].as_str()?.to_string(),
    ))
}

/// The `external_ids` tags of an owner's port.
fn owner_tags(owner: &PortOwner) -> [(&str, &str); 3] {
    [
        (OWNER_KEY, OWNER_VALUE),
        (CONTAINER_KEY, owner.container_id.as_str()),
        (IFNAME_KEY, owner.ifname.as_str()),
    ]
}

/// True when the tags name an owner in `valid`.
fn is_valid(ids: &[(String, String)], valid: &[PortOwner]) -> bool {
    let get = |k: &str| ids.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
    let (Some(c), Some(i)) = (get(CONTAINER_KEY), get(IFNAME_KEY)) else {
        return false;
    };
    valid.iter().any(|o| o.container_id == c && o.ifname == i)
}

/// `""` and `"system"` are the same datapath type in OVS (for what OVS reports of an existing bridge).
fn normalize_dp(dp: &str) -> &str {
    if dp.is_empty() { "system" } else { dp }
}

fn select(table: &str, where_: Value, columns: &[&str]) -> Value {
    json!({"op": "select", "table": table, "where": where_, "columns": columns})
}

fn eq(column: &str, value: &str) -> Value {
    json!([[column, "==", value]])
}

/// Operations that bump `next_cfg` (asking ovs-vswitchd to report when it applied everything so far)
/// and read the new value back.
fn bump_cfg() -> Vec<Value> {
    vec![
        json!({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": [["next_cfg", "+=", 1]]}),
        select("Open_vSwitch", json!([]), &["next_cfg"]),
    ]
}

fn next_cfg(select_result: &Value) -> Option<i64> {
    rows(select_result)
        .first()
        .and_then(|r| r["next_cfg"].as_i64())
}

/// A random locally administered unicast MAC, `xx:xx:xx:xx:xx:xx`.
fn random_mac() -> Result<String, String> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| format!("getrandom: {e}"))?;
    b[0] = (b[0] & 0xfe) | 0x02;
    Ok(b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Network devices in the caller's (node's) network namespace, over netlink.
mod netdev {
    use crate::PortOwner;
    use evio_netlink::{LinkChange, Netlink};
    use std::time::{Duration, Instant};

    fn nl() -> Result<Netlink, String> {
        Netlink::new().map_err(|e| format!("netlink: {e}"))
    }

    /// The interface index of `name` in this network namespace, if it exists.
    pub fn index(name: &str) -> Option<u32> {
        nl().ok()?
            .link_by_name(name)
            .ok()
            .flatten()
            .map(|l| l.index)
    }

    /// Waits (until `deadline`) for device `name` to exist, then sets it up.
    pub fn wait_and_up(name: &str, deadline: Instant) -> Result<(), String> {
        while index(name).is_none() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "ovs-vswitchd reports the bridge set up but device {name} does not exist in this network namespace \
                     (does ovs-vswitchd run in another one?)"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        set_up(name).map_err(|e| format!("cannot set device {name} up: {e}"))
    }

    /// Sets `name` up (if it is not already).
    pub fn set_up(name: &str) -> Result<(), String> {
        let mut nl = nl()?;
        let l = nl
            .link_by_name(name)
            .map_err(|e| e.to_string())?
            .ok_or("no such device")?;
        if l.up {
            return Ok(());
        }
        nl.set_link(
            l.index,
            &LinkChange {
                up: true,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())
    }

    /// Prepares the host veth before it becomes a port: up, the configured MTU, and the owner tag in its
    /// `ifalias` (as the Linux bridge backend does, so DEL can find it without state).
    pub fn prepare_port(port: &str, owner: &PortOwner, mtu: Option<u32>) -> Result<(), String> {
        let mut nl = nl()?;
        let l = nl
            .link_by_name(port)
            .map_err(|e| e.to_string())?
            .ok_or("no such device in this network namespace")?;
        let tag = owner.tag();
        if let Some(other) = l
            .alias
            .as_deref()
            .filter(|a| a.starts_with("evio ") && *a != tag)
        {
            return Err(format!(
                "the device already belongs to another attachment ({other:?})"
            ));
        }
        let change = LinkChange {
            up: true,
            mtu: mtu.filter(|m| *m != l.mtu),
            alias: Some(tag),
            ..Default::default()
        };
        nl.set_link(l.index, &change).map_err(|e| e.to_string())
    }

    /// Checks that device `name` exists here and carries owner tag `tag`.
    pub fn check_tag(name: &str, tag: &str) -> Result<(), String> {
        let l = nl()?
            .link_by_name(name)
            .map_err(|e| e.to_string())?
            .ok_or("no such device")?;
        if l.alias.as_deref() != Some(tag) {
            return Err(format!("owner tag is {:?}, not {tag:?}", l.alias));
        }
        if !l.up {
            return Err("device is down".into());
        }
        Ok(())
    }

    /// Deletes every veth whose `ifalias` is an evio owner tag accepted by `ours`.
    pub fn delete_tagged_veths(ours: impl Fn(&str) -> bool) -> Result<(), String> {
        let mut nl = nl()?;
        for l in nl.links().map_err(|e| e.to_string())? {
            if l.kind.as_deref() == Some("veth")
                && l.alias
                    .as_deref()
                    .is_some_and(|a| a.starts_with("evio ") && ours(a))
            {
                nl.delete_link(l.index)
                    .map_err(|e| format!("delete {}: {e}", l.name))?;
            }
        }
        Ok(())
    }

    /// Deletes veth `name` if its `ifalias` carries an evio owner tag accepted by `ours` (never a
    /// device somebody else owns). Missing devices are fine.
    pub fn delete_tagged_veth(name: &str, ours: impl Fn(&str) -> bool) -> Result<(), String> {
        let mut nl = nl()?;
        let Some(l) = nl.link_by_name(name).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if l.kind.as_deref() == Some("veth")
            && l.alias
                .as_deref()
                .is_some_and(|a| a.starts_with("evio ") && ours(a))
        {
            nl.delete_link(l.index)
                .map_err(|e| format!("delete {name}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_uses_both_keys() {
        let ids = vec![
            (OWNER_KEY.to_string(), OWNER_VALUE.to_string()),
            (CONTAINER_KEY.to_string(), "c1".to_string()),
            (IFNAME_KEY.to_string(), "eth0".to_string()),
        ];
        let o = |c: &str, i: &str| PortOwner {
            container_id: c.into(),
            ifname: i.into(),
        };
        assert!(is_valid(&ids, &[o("c2", "eth0"), o("c1", "eth0")]));
        assert!(!is_valid(&ids, &[o("c1", "eth1")]));
        assert!(!is_valid(&ids, &[]));
        assert!(!is_valid(&ids[..1], &[o("c1", "eth0")]));
    }

    #[test]
    fn mac_is_local_unicast() {
        let m = random_mac().unwrap();
        let first = u8::from_str_radix(&m[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{m}");
        assert_eq!(m.len(), 17);
        assert_ne!(m, random_mac().unwrap());
    }

    #[test]
    fn datapath_normalisation() {
        assert_eq!(normalize_dp(""), "system");
        assert_eq!(normalize_dp("netdev"), "netdev");
    }
}
