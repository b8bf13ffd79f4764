//! The `ovs-vsctl` fallback: the same four operations through the command-line client, used only when
//! the JSON-RPC conversation fails. Every call passes `--db` and `--timeout`.

use super::{
    CONTAINER_KEY, IFNAME_KEY, OWNER_KEY, OWNER_VALUE, OvsBridge, Target, is_valid, netdev,
    random_mac,
};
use crate::{BridgeError, PortOwner};
use serde_json::Value;
use std::process::Command;
use std::time::Instant;

/// True when `ovs-vsctl` is on PATH.
pub fn available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("ovs-vsctl").is_file()))
        .unwrap_or(false)
}

/// An OVSDB string atom in ovs-vsctl syntax (always quoted, so any value is taken literally).
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn tag_args(owner: &PortOwner) -> Vec<String> {
    vec![
        format!("external_ids:{OWNER_KEY}={}", quote(OWNER_VALUE)),
        format!(
            "external_ids:{CONTAINER_KEY}={}",
            quote(&owner.container_id)
        ),
        format!("external_ids:{IFNAME_KEY}={}", quote(&owner.ifname)),
    ]
}

/// A port name and its `external_ids`.
type NamedIds = (String, Vec<(String, String)>);

pub struct Vsctl<'a> {
    b: &'a OvsBridge,
}

impl<'a> Vsctl<'a> {
    pub fn new(b: &'a OvsBridge) -> Vsctl<'a> {
        Vsctl { b }
    }

    fn db(&self) -> Result<String, BridgeError> {
        Target::parse(&self.b.socket_str())
            .map(|t| t.vsctl_db())
            .map_err(|e| self.b.ovsdb_err(e))
    }

    /// Runs ovs-vsctl; Ok(stdout) on exit 0, Err((code, stderr)) otherwise.
    fn run(&self, args: &[String]) -> Result<Result<String, (i32, String)>, BridgeError> {
        let secs = self.b.timeout.as_secs().max(1);
        let out = Command::new("ovs-vsctl")
            .arg(format!("--db={}", self.db()?))
            .arg(format!("--timeout={secs}"))
            .args(args)
            .output()
            .map_err(|e| self.b.ovsdb_err(format!("cannot run ovs-vsctl: {e}")))?;
        if out.status.success() {
            Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
        } else {
            Ok(Err((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            )))
        }
    }

    fn run_ok(&self, args: &[String]) -> Result<String, BridgeError> {
        self.run(args)?.map_err(|(code, err)| {
            self.b
                .ovsdb_err(format!("ovs-vsctl {args:?} exited {code}: {err}"))
        })
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    pub fn ensure(&self) -> Result<(), BridgeError> {
        let deadline = Instant::now() + self.b.timeout;
        let br = self.b.spec.name.as_str();
        let dp = self.b.datapath();
        match self.run(&Self::s(&["br-exists", br]))? {
            Ok(_) => {
                let have = self.run_ok(&Self::s(&["get", "Bridge", br, "datapath_type"]))?;
                let have = super::normalize_dp(have.trim().trim_matches('"'));
                if have != dp {
                    return Err(self.b.bridge_err(format!(
                        "exists with datapath_type {have:?} but the configuration asks for {dp:?}"
                    )));
                }
                if let Some(mtu) = self.b.spec.mtu {
                    self.run_ok(&[
                        s("set"),
                        s("Interface"),
                        s(br),
                        format!("mtu_request={mtu}"),
                    ])?;
                }
            }
            Err((2, _)) => {
                let mac = random_mac().map_err(|e| self.b.bridge_err(e))?;
                let mut args = vec![
                    s("--may-exist"),
                    s("add-br"),
                    s(br),
                    s("--"),
                    s("set"),
                    s("Bridge"),
                    s(br),
                    format!("datapath_type={dp}"),
                    format!("other_config:hwaddr={}", quote(&mac)),
                    format!("external_ids:{OWNER_KEY}={}", quote(OWNER_VALUE)),
                ];
                if let Some(mtu) = self.b.spec.mtu {
                    args.extend([
                        s("--"),
                        s("set"),
                        s("Interface"),
                        s(br),
                        format!("mtu_request={mtu}"),
                    ]);
                }
                // ovs-vsctl exits non-zero when ovs-vswitchd reports an error for the new interface; the
                // checks below give the reason.
                if let Err((code, err)) = self.run(&args)? {
                    tracing::debug!(code, error = %err, "ovs-vsctl add-br");
                }
            }
            Err((code, err)) => {
                return Err(self
                    .b
                    .ovsdb_err(format!("ovs-vsctl br-exists exited {code}: {err}")));
            }
        }
        let row = self.run_ok(&Self::s(&[
            "--format=json",
            "--columns=ofport,error",
            "find",
            "Interface",
            &format!("name={}", quote(br)),
        ]))?;
        let (ofport, error) = ofport_error(&row);
        if let Some(e) = error {
            return Err(self.b.bridge_err(format!("ovs-vswitchd: {e}")));
        }
        if !matches!(ofport, Some(p) if p >= 0) {
            return Err(self
                .b
                .bridge_err("ovs-vswitchd could not set up the bridge; see the ovs-vswitchd log"));
        }
        netdev::wait_and_up(br, deadline).map_err(|m| self.b.bridge_err(m))
    }

    pub fn attach(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError> {
        let br = self.b.spec.name.as_str();
        let mut args = vec![
            s("add-port"),
            s(br),
            s(port),
            s("--"),
            s("set"),
            s("Port"),
            s(port),
        ];
        args.extend(tag_args(owner));
        args.extend([s("--"), s("set"), s("Interface"), s(port)]);
        args.extend(tag_args(owner));
        let added = self.run(&args)?;
        let verdict = match added {
            Err((_, err)) => Err(err),
            Ok(_) => {
                let row = self.run_ok(&Self::s(&[
                    "--format=json",
                    "--columns=ofport,error",
                    "find",
                    "Interface",
                    &format!("name={}", quote(port)),
                ]))?;
                match ofport_error(&row) {
                    (_, Some(e)) => Err(e),
                    (Some(p), None) if p >= 1 => Ok(()),
                    (p, None) => Err(format!(
                        "ovs-vswitchd assigned no OpenFlow port (ofport {p:?})"
                    )),
                }
            }
        };
        verdict.map_err(|msg| {
            // Remove only a port that carries our tags (not one somebody else already had by that name).
            let _ = self.detach(owner);
            self.b.port_err(port, format!("cannot be attached: {msg}"))
        })
    }

    fn find_ports(&self, conditions: Vec<String>) -> Result<Vec<NamedIds>, BridgeError> {
        let mut args = vec![
            s("--format=json"),
            s("--columns=name,external_ids"),
            s("find"),
            s("Port"),
        ];
        args.extend(conditions);
        let out = self.run_ok(&args)?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| self.b.ovsdb_err(format!("ovs-vsctl find: {e}")))?;
        Ok(v["data"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| {
                        Some((r.get(0)?.as_str()?.to_string(), super::map_pairs(r.get(1)?)))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn del_ports(&self, names: &[String]) -> Result<(), BridgeError> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = Vec::new();
        for n in names {
            args.extend([s("--"), s("--if-exists"), s("del-port"), n.clone()]);
        }
        self.run_ok(&args).map(|_| ())
    }

    pub fn detach(&self, owner: &PortOwner) -> Result<Vec<String>, BridgeError> {
        let ports: Vec<String> = self
            .find_ports(tag_args(owner))?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        self.del_ports(&ports)?;
        Ok(ports)
    }

    pub fn gc(&self, valid: &[PortOwner]) -> Result<Vec<String>, BridgeError> {
        let br = self.b.spec.name.as_str();
        if let Err((2, _)) = self.run(&Self::s(&["br-exists", br]))? {
            return Ok(Vec::new());
        }
        let on_bridge: Vec<String> = self
            .run_ok(&Self::s(&["list-ports", br]))?
            .lines()
            .map(str::to_string)
            .collect();
        let ours = self.find_ports(vec![format!(
            "external_ids:{OWNER_KEY}={}",
            quote(OWNER_VALUE)
        )])?;
        let stale: Vec<String> = ours
            .into_iter()
            .filter(|(n, ids)| on_bridge.contains(n) && !is_valid(ids, valid))
            .map(|(n, _)| n)
            .collect();
        self.del_ports(&stale)?;
        Ok(stale)
    }
}

fn s(v: &str) -> String {
    v.to_string()
}

/// `ofport` and `error` from `ovs-vsctl --format=json --columns=ofport,error find Interface ...`.
fn ofport_error(out: &str) -> (Option<i64>, Option<String>) {
    let v: Value = serde_json::from_str(out).unwrap_or(Value::Null);
    let row = &v["data"][0];
    (row[0].as_i64(), row[1].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("abc"), "\"abc\"");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn parses_find_output() {
        let out = r#"{"data":[[5,["set",[]]]],"headings":["ofport","error"]}"#;
        assert_eq!(ofport_error(out), (Some(5), None));
        let out = r#"{"data":[[-1,"could not open network device x (No such device)"]],"headings":["ofport","error"]}"#;
        assert_eq!(ofport_error(out).0, Some(-1));
        assert!(ofport_error(out).1.unwrap().contains("No such device"));
        assert_eq!(ofport_error(""), (None, None));
    }
}
