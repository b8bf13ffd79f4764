//! A small synchronous OVSDB client (RFC 7047): JSON-RPC 1.0 over a unix or TCP stream.
//!
//! Only what the bridge backend needs: `transact` (with `wait` operations, which the server evaluates
//! and, with a timeout, delays until they hold) and answering the server's `echo` keep-alives. Messages
//! are JSON values written back to back with no framing, so replies are parsed incrementally from a
//! buffer. Every read and write is bounded by a deadline.

use serde_json::{Value, json};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The database the bridge backend talks to.
pub const DB: &str = "Open_vSwitch";

/// What went wrong talking to ovsdb-server.
#[derive(Debug, thiserror::Error)]
pub enum OvsdbError {
    /// The connection failed (connect, read, write, timeout, server closed it).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server said something this client does not understand, or answered an RPC with an error.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A transaction was aborted: `error` is the RFC 7047 error tag (e.g. `timed out`,
    /// `constraint violation`), `details` the server's explanation, `op` the index of the failed
    /// operation (None for a commit-time error such as a referential integrity violation).
    #[error("transaction failed: {error}{}", details.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Txn {
        error: String,
        details: Option<String>,
        op: Option<usize>,
    },
}

impl OvsdbError {
    /// True for failures of the conversation itself (not a transaction the server refused).
    pub fn is_transport(&self) -> bool {
        matches!(self, OvsdbError::Io(_) | OvsdbError::Protocol(_))
    }
}

trait Stream: Read + Write + Send {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// One connection to ovsdb-server.
pub struct Ovsdb {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    next_id: u64,
}

impl std::fmt::Debug for Ovsdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ovsdb")
            .field("next_id", &self.next_id)
            .finish()
    }
}

/// Where to connect: `unix:PATH`, `tcp:IP:PORT`, or a bare socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, OvsdbError> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Target::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(Target::Tcp(a.to_string()))
        } else if s.starts_with("ssl:") || s.starts_with("punix:") || s.starts_with("ptcp:") {
            Err(OvsdbError::Protocol(format!(
                "unsupported OVSDB remote {s:?} (use unix:PATH or tcp:IP:PORT)"
            )))
        } else {
            Ok(Target::Unix(s.into()))
        }
    }

    /// The form `ovs-vsctl --db=` takes.
    pub fn vsctl_db(&self) -> String {
        match self {
            Target::Unix(p) => format!("unix:{}", p.display()),
            Target::Tcp(a) => format!("tcp:{a}"),
        }
    }
}

impl Ovsdb {
    /// Connects to `target`, giving up after `timeout`.
    pub fn connect(target: &Target, timeout: Duration) -> Result<Ovsdb, OvsdbError> {
        let stream: Box<dyn Stream> = match target {
            Target::Unix(p) => Box::new(UnixStream::connect(p)?),
            Target::Tcp(a) => {
                let addr = a
                    .parse::<std::net::SocketAddr>()
                    .map_err(|e| OvsdbError::Protocol(format!("bad tcp address {a:?}: {e}")))?;
                Box::new(TcpStream::connect_timeout(&addr, timeout)?)
            }
        };
        Ok(Ovsdb {
            stream,
            buf: Vec::with_capacity(4096),
            next_id: 1,
        })
    }

    /// Runs one transaction on the `Open_vSwitch` database and returns the per-operation results.
    /// Fails with [`OvsdbError::Txn`] when any operation (or the commit) failed; the server then
    /// applied nothing.
    pub fn transact(
        &mut self,
        ops: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<Value>, OvsdbError> {
        let n = ops.len();
        let mut params = Vec::with_capacity(n + 1);
        params.push(json!(DB));
        params.extend(ops);
        let result = self.call("transact", Value::Array(params), timeout)?;
        let Value::Array(results) = result else {
            return Err(OvsdbError::Protocol(format!(
                "transact result is not an array: {result}"
            )));
        };
        for (i, r) in results.iter().enumerate() {
            if let Some(err) = r.get("error").and_then(Value::as_str) {
                return Err(OvsdbError::Txn {
                    error: err.to_string(),
                    details: r.get("details").and_then(Value::as_str).map(str::to_string),
                    op: (i < n).then_some(i),
                });
            }
        }
        if results.len() < n {
            return Err(OvsdbError::Protocol(format!(
                "{} results for {n} operations",
                results.len()
            )));
        }
        Ok(results)
    }

    /// Sends one request and waits (until `timeout`) for its response, answering `echo` requests and
    /// skipping notifications in between.
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, OvsdbError> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        self.send(
            &json!({"method": method, "params": params, "id": id}),
            deadline,
        )?;
        loop {
            let msg = self.recv(deadline)?;
            if let Some(m) = msg.get("method").and_then(Value::as_str) {
                if m == "echo" {
                    let reply = json!({"id": msg.get("id").cloned().unwrap_or(Value::Null),
                        "result": msg.get("params").cloned().unwrap_or(json!([])), "error": null});
                    self.send(&reply, deadline)?;
                }
                continue; // notifications (e.g. "update") and other requests are not for us
            }
            if msg.get("id") != Some(&json!(id)) {
                continue; // a stale reply to an earlier, abandoned request
            }
            match msg.get("error") {
                None | Some(Value::Null) => {}
                Some(e) => return Err(OvsdbError::Protocol(format!("{method} failed: {e}"))),
            }
            return msg
                .get("result")
                .cloned()
                .ok_or_else(|| OvsdbError::Protocol(format!("reply without result: {msg}")));
        }
    }

    fn remaining(deadline: Instant) -> io::Result<Duration> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for ovsdb-server",
            ));
        }
        Ok(left)
    }

    fn send(&mut self, v: &Value, deadline: Instant) -> Result<(), OvsdbError> {
        let bytes = serde_json::to_vec(v).map_err(|e| OvsdbError::Protocol(e.to_string()))?;
        self.stream.set_timeouts(Some(Self::remaining(deadline)?))?;
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    /// The next complete JSON value from the stream.
    fn recv(&mut self, deadline: Instant) -> Result<Value, OvsdbError> {
        loop {
            // Skip whitespace between messages.
            let start = self
                .buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.buf.len());
            self.buf.drain(..start);
            if !self.buf.is_empty() {
                let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                match it.next() {
                    Some(Ok(v)) => {
                        let used = it.byte_offset();
                        self.buf.drain(..used);
                        return Ok(v);
                    }
                    Some(Err(e)) if e.is_eof() => {}
                    Some(Err(e)) => {
                        return Err(OvsdbError::Protocol(format!("bad JSON from server: {e}")));
                    }
                    None => {}
                }
            }
            self.stream.set_timeouts(Some(Self::remaining(deadline)?))?;
            let mut chunk = [0u8; 8192];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "timed out waiting for ovsdb-server",
                    )
                    .into());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "ovsdb-server closed the connection",
                )
                .into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

// ---- helpers for the RFC 7047 JSON notation ----

/// `["map", [[k, v], ...]]` for string maps.
pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    json!([
        "map",
        pairs
            .into_iter()
            .map(|(k, v)| json!([k, v]))
            .collect::<Vec<_>>()
    ])
}

/// `["uuid", u]`.
pub fn uuid(u: &str) -> Value {
    json!(["uuid", u])
}

/// `["named-uuid", n]`.
pub fn named(n: &str) -> Value {
    json!(["named-uuid", n])
}

/// The members of a set value: an atom is a one-element set, `["set", [...]]` a set.
pub fn set_members(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) if a.len() == 2 && a[0] == "set" => a[1]
            .as_array()
            .map(|x| x.iter().collect())
            .unwrap_or_default(),
        other => vec![other],
    }
}

/// The uuid string inside `["uuid", u]`.
pub fn uuid_str(v: &Value) -> Option<&str> {
    match v {
        Value::Array(a) if a.len() == 2 && a[0] == "uuid" => a[1].as_str(),
        _ => None,
    }
}

/// A `["map", [[k, v], ...]]` value as (key, value) string pairs.
pub fn map_pairs(v: &Value) -> Vec<(String, String)> {
    let Some(Value::Array(pairs)) = v
        .as_array()
        .filter(|a| a.len() == 2 && a[0] == "map")
        .map(|a| &a[1])
    else {
        return Vec::new();
    };
    pairs
        .iter()
        .filter_map(|p| {
            Some((
                p.get(0)?.as_str()?.to_string(),
                p.get(1)?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// An optional (0 or 1 element) integer column.
pub fn opt_int(v: &Value) -> Option<i64> {
    v.as_i64()
}

/// An optional (0 or 1 element) string column.
pub fn opt_str(v: &Value) -> Option<&str> {
    v.as_str()
}

/// The rows of a `select` result.
pub fn rows(result: &Value) -> Vec<&Value> {
    result
        .get("rows")
        .and_then(Value::as_array)
        .map(|r| r.iter().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn target_parsing() {
        assert_eq!(
            Target::parse("/run/openvswitch/db.sock").unwrap(),
            Target::Unix("/run/openvswitch/db.sock".into())
        );
        assert_eq!(
            Target::parse("unix:/x/db.sock").unwrap(),
            Target::Unix("/x/db.sock".into())
        );
        assert_eq!(
            Target::parse("tcp:127.0.0.1:6640").unwrap(),
            Target::Tcp("127.0.0.1:6640".into())
        );
        assert!(Target::parse("ssl:1.2.3.4:6640").is_err());
        assert_eq!(Target::parse("unix:/x").unwrap().vsctl_db(), "unix:/x");
    }

    #[test]
    fn value_helpers() {
        let v = json!(["set", [["uuid", "a"], ["uuid", "b"]]]);
        let m: Vec<_> = set_members(&v).into_iter().filter_map(uuid_str).collect();
        assert_eq!(m, ["a", "b"]);
        assert_eq!(set_members(&json!(["uuid", "c"])).len(), 1);
        assert_eq!(set_members(&json!(["set", []])).len(), 0);
        let pairs = map_pairs(&map([("k", "v"), ("x", "y")]));
        assert_eq!(
            pairs,
            [
                ("k".to_string(), "v".to_string()),
                ("x".to_string(), "y".to_string())
            ]
        );
        assert!(map_pairs(&json!("nope")).is_empty());
        assert_eq!(opt_int(&json!(["set", []])), None);
        assert_eq!(opt_int(&json!(3)), Some(3));
    }

    /// A scripted peer on a unix socket: split writes, an echo request, a stale reply, then the answer.
    #[test]
    fn call_handles_echo_fragments_and_stale_replies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut de =
                serde_json::Deserializer::from_reader(s.try_clone().unwrap()).into_iter::<Value>();
            let req = de.next().unwrap().unwrap();
            assert_eq!(req["method"], "transact");
            assert_eq!(req["params"][0], DB);
            let id = req["id"].clone();
            s.write_all(br#"{"method":"echo","params":["x"],"id":"echo"}"#)
                .unwrap();
            let echo = de.next().unwrap().unwrap();
            assert_eq!(echo, json!({"id":"echo","result":["x"],"error":null}));
            s.write_all(br#"{"id":999,"result":[],"error":null}  "#)
                .unwrap();
            let reply =
                serde_json::to_vec(&json!({"id": id, "result": [{"count": 1}], "error": null}))
                    .unwrap();
            let (a, b) = reply.split_at(7);
            s.write_all(a).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b).unwrap();
            // A failing transaction next.
            let req = de.next().unwrap().unwrap();
            let reply = json!({"id": req["id"], "result": [{}, {"error": "constraint violation", "details": "dup"}], "error": null});
            s.write_all(&serde_json::to_vec(&reply).unwrap()).unwrap();
            // Then garbage.
            let _ = de.next();
            s.write_all(b"}{").unwrap();
        });
        let mut db = Ovsdb::connect(&Target::Unix(path), Duration::from_secs(5)).unwrap();
        let r = db
            .transact(
                vec![json!({"op": "comment", "comment": "x"})],
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(r, vec![json!({"count": 1})]);
        let e = db
            .transact(vec![json!({}), json!({})], Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&e, OvsdbError::Txn { error, op: Some(1), .. } if error == "constraint violation"),
            "{e}"
        );
        assert!(!e.is_transport());
        let e = db.transact(vec![], Duration::from_secs(5)).unwrap_err();
        assert!(e.is_transport(), "{e}");
        srv.join().unwrap();
    }

    #[test]
    fn call_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _l = UnixListener::bind(&path).unwrap();
        let mut db = Ovsdb::connect(&Target::Unix(path), Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let e = db.transact(vec![], Duration::from_millis(200)).unwrap_err();
        assert!(e.is_transport());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
