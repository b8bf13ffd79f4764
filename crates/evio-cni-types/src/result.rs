//! One internal result model, read from and written to every CNI version we speak.
//!
//! 0.3.0/0.3.1/0.4.0 put `"version": "4"|"6"` on each IP; 1.0.0 dropped it; 1.1.0 added interface `mtu`,
//! `socketPath`, `pciID` and route `mtu`, `advmss`, `priority`, `table`, `scope`. Fields a version does not
//! know are left out when writing it.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use crate::error::{CniError, ErrorCode};
use crate::version::{self, Version};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub sandbox: Option<String>,
    pub socket_path: Option<String>,
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with prefix length (`10.244.3.5/24`).
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u32>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

fn decode(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Decode, msg)
}

fn opt_str(m: &Map<String, Value>, k: &str) -> Result<Option<String>, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(decode(format!(
            "result field {k:?} must be a string, got {v}"
        ))),
    }
}

fn opt_u32(m: &Map<String, Value>, k: &str) -> Result<Option<u32>, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| decode(format!("bad {k}: {n}"))),
        Some(v) => Err(decode(format!(
            "result field {k:?} must be a number, got {v}"
        ))),
    }
}

fn str_list(m: &Map<String, Value>, k: &str) -> Result<Vec<String>, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| decode(format!("{k} entries must be strings")))
            })
            .collect(),
        Some(v) => Err(decode(format!(
            "result field {k:?} must be an array, got {v}"
        ))),
    }
}

fn objects<'a>(
    m: &'a Map<String, Value>,
    k: &str,
) -> Result<Vec<&'a Map<String, Value>>, CniError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_object()
                    .ok_or_else(|| decode(format!("{k} entries must be objects")))
            })
            .collect(),
        Some(v) => Err(decode(format!(
            "result field {k:?} must be an array, got {v}"
        ))),
    }
}

impl CniResult {
    /// Reads a result of any version we speak (the version is taken from the object's `cniVersion`; an
    /// object without one is read as 1.x).
    pub fn from_value(v: &Value) -> Result<CniResult, CniError> {
        let m = v
            .as_object()
            .ok_or_else(|| decode("a result must be a JSON object"))?;
        if let Some(ver) = m.get("cniVersion").and_then(Value::as_str) {
            match Version::parse(ver) {
                Some(x) if x >= Version(0, 3, 0) => {}
                _ => {
                    return Err(CniError::with_details(
                        ErrorCode::IncompatibleVersion,
                        "unsupported result version",
                        format!("result version {ver:?} is older than 0.3.0 or malformed"),
                    ));
                }
            }
        }
        let mut r = CniResult::default();
        for i in objects(m, "interfaces")? {
            r.interfaces.push(Interface {
                name: opt_str(i, "name")?.ok_or_else(|| decode("interface without name"))?,
                mac: opt_str(i, "mac")?,
                mtu: opt_u32(i, "mtu")?,
                sandbox: opt_str(i, "sandbox")?,
                socket_path: opt_str(i, "socketPath")?,
                pci_id: opt_str(i, "pciID")?,
            });
        }
        for ip in objects(m, "ips")? {
            let addr = opt_str(ip, "address")?.ok_or_else(|| decode("ip without address"))?;
            let address: IpNet = addr
                .parse()
                .map_err(|_| decode(format!("bad ip address {addr:?}")))?;
            let gateway = match opt_str(ip, "gateway")? {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| decode(format!("bad gateway {g:?}")))?,
                ),
                None => None,
            };
            let interface = match ip.get("interface") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(
                    n.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| decode(format!("bad interface index {n}")))?,
                ),
                Some(v) => return Err(decode(format!("bad interface index {v}"))),
            };
            if let Some(idx) = interface
                && idx >= r.interfaces.len()
                && !r.interfaces.is_empty()
            {
                return Err(decode(format!("interface index {idx} out of range")));
            }
            r.ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        for rt in objects(m, "routes")? {
            let dst = opt_str(rt, "dst")?.ok_or_else(|| decode("route without dst"))?;
            let dst: IpNet = dst
                .parse()
                .map_err(|_| decode(format!("bad route dst {dst:?}")))?;
            let gw = match opt_str(rt, "gw")? {
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| decode(format!("bad route gw {g:?}")))?,
                ),
                None => None,
            };
            r.routes.push(Route {
                dst,
                gw,
                mtu: opt_u32(rt, "mtu")?,
                advmss: opt_u32(rt, "advmss")?,
                priority: opt_u32(rt, "priority")?,
                table: opt_u32(rt, "table")?,
                scope: opt_u32(rt, "scope")?,
            });
        }
        if let Some(d) = m.get("dns").filter(|d| !d.is_null()) {
            let d = d
                .as_object()
                .ok_or_else(|| decode("dns must be an object"))?;
            r.dns = Dns {
                nameservers: str_list(d, "nameservers")?,
                domain: opt_str(d, "domain")?,
                search: str_list(d, "search")?,
                options: str_list(d, "options")?,
            };
        }
        Ok(r)
    }

    /// Parses result bytes (a delegate's stdout).
    pub fn from_slice(b: &[u8]) -> Result<CniResult, CniError> {
        let v: Value = serde_json::from_slice(b).map_err(|e| {
            CniError::with_details(ErrorCode::Decode, "cannot decode a result", e.to_string())
        })?;
        CniResult::from_value(&v)
    }

    /// Writes the result as `version` (one of [`version::SUPPORTED`]).
    pub fn to_value(&self, ver: &str) -> Result<Value, CniError> {
        version::check_supported(ver)?;
        let v1 = ver.starts_with("1.");
        let v11 = ver == "1.1.0";
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(ver));
        if !self.interfaces.is_empty() {
            let ifs: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut o = Map::new();
                    o.insert("name".into(), json!(i.name));
                    if let Some(m) = &i.mac {
                        o.insert("mac".into(), json!(m));
                    }
                    if v11 && let Some(m) = i.mtu {
                        o.insert("mtu".into(), json!(m));
                    }
                    if let Some(s) = &i.sandbox {
                        o.insert("sandbox".into(), json!(s));
                    }
                    if v11 && let Some(s) = &i.socket_path {
                        o.insert("socketPath".into(), json!(s));
                    }
                    if v11 && let Some(s) = &i.pci_id {
                        o.insert("pciID".into(), json!(s));
                    }
                    Value::Object(o)
                })
                .collect();
            out.insert("interfaces".into(), Value::Array(ifs));
        }
        if !self.ips.is_empty() {
            let ips: Vec<Value> = self
                .ips
                .iter()
                .map(|ip| {
                    let mut o = Map::new();
                    if !v1 {
                        o.insert(
                            "version".into(),
                            json!(if ip.address.addr().is_ipv4() {
                                "4"
                            } else {
                                "6"
                            }),
                        );
                    }
                    o.insert("address".into(), json!(ip.address.to_string()));
                    if let Some(g) = ip.gateway {
                        o.insert("gateway".into(), json!(g.to_string()));
                    }
                    if let Some(i) = ip.interface {
                        o.insert("interface".into(), json!(i));
                    }
                    Value::Object(o)
                })
                .collect();
            out.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            let routes: Vec<Value> = self
                .routes
                .iter()
                .map(|r| {
                    let mut o = Map::new();
                    o.insert("dst".into(), json!(r.dst.to_string()));
                    if let Some(g) = r.gw {
                        o.insert("gw".into(), json!(g.to_string()));
                    }
                    if v11 {
                        for (k, v) in [
                            ("mtu", r.mtu),
                            ("advmss", r.advmss),
                            ("priority", r.priority),
                            ("table", r.table),
                            ("scope", r.scope),
                        ] {
                            if let Some(v) = v {
                                o.insert(k.into(), json!(v));
                            }
                        }
                    }
                    Value::Object(o)
                })
                .collect();
            out.insert("routes".into(), Value::Array(routes));
        }
        if !self.dns.is_empty() || !v1 {
            let mut d = Map::new();
            if !self.dns.nameservers.is_empty() {
                d.insert("nameservers".into(), json!(self.dns.nameservers));
            }
            if let Some(x) = &self.dns.domain {
                d.insert("domain".into(), json!(x));
            }
            if !self.dns.search.is_empty() {
                d.insert("search".into(), json!(self.dns.search));
            }
            if !self.dns.options.is_empty() {
                d.insert("options".into(), json!(self.dns.options));
            }
            out.insert("dns".into(), Value::Object(d));
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_LOCAL_040: &str = r#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.2/24","gateway":"10.1.0.1"}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    #[test]
    fn reads_old_and_writes_every_version() {
        let r = CniResult::from_slice(HOST_LOCAL_040.as_bytes()).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
        assert_eq!(r.ips[0].gateway, Some("10.1.0.1".parse().unwrap()));
        for v in version::SUPPORTED {
            let out = r.to_value(v).unwrap();
            assert_eq!(out["cniVersion"], *v);
            let has_version = out["ips"][0].get("version").is_some();
            assert_eq!(has_version, v.starts_with("0."), "{v}");
            // Reading back gives the same model.
            assert_eq!(CniResult::from_value(&out).unwrap(), r, "{v}");
        }
    }

    #[test]
    fn v11_fields_only_in_v11() {
        let mut r = CniResult::default();
        r.interfaces.push(Interface {
            name: "eth0".into(),
            mtu: Some(1400),
            ..Default::default()
        });
        let mut rt = Route::new(
            "0.0.0.0/0".parse().unwrap(),
            Some("10.0.0.1".parse().unwrap()),
        );
        rt.table = Some(100);
        r.routes.push(rt);
        r.ips.push(IpConfig {
            address: "fd00::5/64".parse().unwrap(),
            gateway: None,
            interface: Some(0),
        });
        let v11 = r.to_value("1.1.0").unwrap();
        assert_eq!(v11["interfaces"][0]["mtu"], 1400);
        assert_eq!(v11["routes"][0]["table"], 100);
        let v10 = r.to_value("1.0.0").unwrap();
        assert!(v10["interfaces"][0].get("mtu").is_none());
        assert!(v10["routes"][0].get("table").is_none());
        let v03 = r.to_value("0.3.0").unwrap();
        assert_eq!(v03["ips"][0]["version"], "6");
        assert_eq!(r.to_value("0.2.0").unwrap_err().code, 1);
    }

    #[test]
    fn rejects_bad_results() {
        assert_eq!(CniResult::from_slice(b"{").unwrap_err().code, 6);
        assert_eq!(
            CniResult::from_slice(br#"{"ips":[{"address":"x"}]}"#)
                .unwrap_err()
                .code,
            6
        );
        assert_eq!(
            CniResult::from_slice(br#"{"cniVersion":"0.2.0","ip4":{}}"#)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(
            CniResult::from_slice(
                br#"{"interfaces":[{"name":"a"}],"ips":[{"address":"1.2.3.4/32","interface":3}]}"#
            )
            .unwrap_err()
            .code,
            6
        );
    }
}
