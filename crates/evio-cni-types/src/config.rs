//! The plugin's network configuration, as the runtime passes it on stdin, and conflists.
//!
//! Keys (see docs/cni.md): `cniVersion`, `name`, `type`, `bridge`, `bridgeType` (`linux`/`LXBR`,
//! `ovs`/`OVS`), `ovsDatapathType`, `ovsdbSocket`, `isGateway`, `isDefaultGateway`, `ipMasq` (legacy
//! `isIPMasq`), `mtu`, `hairpinMode`, `logFile`, `logLevel`, `ipam`, `stateDir`, `podCIDR`, `clusterCIDRs`,
//! `prevResult`, `cni.dev/valid-attachments`. Unknown keys are ignored; a known key with a bad value is
//! rejected with code 7 and a message naming the key.

use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::error::{CniError, ErrorCode};
use crate::version;

pub const DEFAULT_BRIDGE: &str = "eviobr0";
/// Where Open vSwitch's ovsdb-server listens by default (the one default: evio-bridge uses it too).
pub const DEFAULT_OVSDB_SOCKET: &str = "/var/run/openvswitch/db.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cni/evio";

/// Bytes the evio tunnel adds to an inner packet: WireGuard data header and tag (32), UDP (8) and IPv6 (40)
/// headers: the same sum as `evio_tunnel::OVERHEAD`. Kept here so that config generators (`evioctl
/// cni-config`) get the pod MTU without depending on the tunnel crate and its crypto (boringtun, ring).
pub const TUNNEL_OVERHEAD: u32 = 32 + 8 + 40;

/// The underlay MTU assumed when nothing else is known (Ethernet).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// The pod MTU for an underlay of `underlay` bytes: what fits in one tunnel packet.
pub const fn overlay_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(TUNNEL_OVERHEAD)
}

/// The pod MTU a generated config gets when it names none: [`overlay_mtu`] of [`DEFAULT_UNDERLAY_MTU`].
pub const DEFAULT_MTU: u32 = overlay_mtu(DEFAULT_UNDERLAY_MTU);

/// The file `evioctl cni-config` writes into the CNI configuration directory (read back by the demo).
pub const CONFLIST: &str = "10-evio.conflist";

/// Which bridge backend the config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeKind {
    Linux,
    Ovs,
}

/// OVS datapath type of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathType {
    System,
    Netdev,
}

impl DatapathType {
    /// Reads a datapath type as configs and OVS write it: `system` (or empty, OVS's own spelling of the
    /// default) or `netdev`.
    pub fn parse(s: &str) -> Option<DatapathType> {
        match s {
            "system" | "" => Some(DatapathType::System),
            "netdev" => Some(DatapathType::Netdev),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DatapathType::System => "system",
            DatapathType::Netdev => "netdev",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The delegated IPAM section: its `type` (checked to be a plain file name) and the raw object.
#[derive(Debug, Clone, PartialEq)]
pub struct Ipam {
    pub kind: String,
    pub raw: Value,
}

/// One entry of `cni.dev/valid-attachments` (CNI GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's parsed network configuration. `raw` keeps the whole object (for delegating to IPAM).
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub bridge: String,
    pub bridge_kind: BridgeKind,
    pub ovs_datapath_type: DatapathType,
    pub ovsdb_socket: PathBuf,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub ip_masq: bool,
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
    pub ipam: Option<Ipam>,
    pub state_dir: PathBuf,
    /// Destinations never masqueraded (besides the pod's own subnet): `podCIDR` and `clusterCIDRs`.
    pub no_masq: Vec<IpNet>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    pub raw: Value,
}

fn invalid(key: &str, msg: impl std::fmt::Display) -> CniError {
    CniError::with_details(
        ErrorCode::InvalidConfig,
        format!("invalid network config: key {key:?}"),
        msg.to_string(),
    )
}

fn get_str<'a>(m: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(key, format!("must be a string, got {other}"))),
    }
}

fn get_bool(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, CniError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        // Some generators write booleans as strings; accept the unambiguous spellings.
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(invalid(key, format!("must be true or false, got {other}"))),
    }
}

/// Checks a Linux interface name: 1..=15 bytes, no `/`, `:`, whitespace or NUL, not `.`/`..`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > 15 {
        return Err(format!("interface name {name:?} is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is not allowed"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0' || c.is_control())
    {
        return Err(format!(
            "interface name {name:?} contains '/', ':', whitespace or control characters"
        ));
    }
    Ok(())
}

/// Checks a delegated plugin's `type`: a plain file name (no path separators, not `.`/`..`).
pub fn check_plugin_type(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("plugin type is empty".into());
    }
    if t.contains('/') || t.contains('\\') || t.contains('\0') || t == "." || t == ".." {
        return Err(format!(
            "plugin type {t:?} must be a plain file name found on CNI_PATH"
        ));
    }
    Ok(())
}

fn parse_cidr(key: &str, s: &str) -> Result<IpNet, CniError> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| invalid(key, format!("{s:?} is not a CIDR")))
}

impl NetConf {
    /// Parses the config bytes a runtime wrote on stdin. Code 6 when it is not a JSON object, 1 when the
    /// version is missing or unsupported, 7 when a known key has a bad value.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::with_details(
                ErrorCode::Decode,
                "cannot decode the network config",
                e.to_string(),
            )
        })?;
        let Value::Object(m) = &raw else {
            return Err(CniError::new(
                ErrorCode::Decode,
                "the network config is not a JSON object",
            ));
        };
        let cni_version = match m.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => {
                return Err(CniError::new(
                    ErrorCode::IncompatibleVersion,
                    "the network config has no cniVersion",
                ));
            }
            Some(other) => {
                return Err(invalid(
                    "cniVersion",
                    format!("must be a string, got {other}"),
                ));
            }
        };
        version::check_supported(&cni_version)?;
        let name = get_str(m, "name")?
            .ok_or_else(|| invalid("name", "missing"))?
            .to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(invalid(
                "name",
                format!("{name:?} must be non-empty: letters, digits, '_', '-', '.'"),
            ));
        }
        let plugin_type = get_str(m, "type")?.unwrap_or("evio-cni").to_string();
        let bridge = get_str(m, "bridge")?.unwrap_or(DEFAULT_BRIDGE).to_string();
        check_ifname(&bridge).map_err(|e| invalid("bridge", e))?;
        let bridge_kind = match get_str(m, "bridgeType")?.unwrap_or("linux") {
            "linux" | "Linux" | "LXBR" | "lxbr" => BridgeKind::Linux,
            "ovs" | "OVS" => BridgeKind::Ovs,
            other => {
                return Err(invalid(
                    "bridgeType",
                    format!("{other:?} is not linux, LXBR, ovs or OVS"),
                ));
            }
        };
        let dp = get_str(m, "ovsDatapathType")?.unwrap_or("system");
        let ovs_datapath_type = DatapathType::parse(dp)
            .ok_or_else(|| invalid("ovsDatapathType", format!("{dp:?} is not system or netdev")))?;
        let ovsdb_socket = match get_str(m, "ovsdbSocket")? {
            None => PathBuf::from(DEFAULT_OVSDB_SOCKET),
            Some(s) => {
                let p = s.strip_prefix("unix:").unwrap_or(s);
                if !p.starts_with('/') {
                    return Err(invalid(
                        "ovsdbSocket",
                        format!("{s:?} is not an absolute unix socket path"),
                    ));
                }
                PathBuf::from(p)
            }
        };
        let is_default_gateway = get_bool(m, "isDefaultGateway")?.unwrap_or(true);
        // A default gateway is necessarily a gateway (as in the reference bridge plugin).
        let is_gateway = get_bool(m, "isGateway")?.unwrap_or(true) || is_default_gateway;
        let ip_masq = match (get_bool(m, "ipMasq")?, get_bool(m, "isIPMasq")?) {
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => false,
        };
        let mtu = match m.get("mtu") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => None,
                Some(v) if (68..=65535).contains(&v) => Some(v as u32),
                _ => {
                    return Err(invalid(
                        "mtu",
                        format!("{n} is not an integer in 68..=65535 (or 0 for unset)"),
                    ));
                }
            },
            Some(other) => return Err(invalid("mtu", format!("must be an integer, got {other}"))),
        };
        let hairpin_mode = get_bool(m, "hairpinMode")?.unwrap_or(false);
        let log_file = get_str(m, "logFile")?
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let log_level = match get_str(m, "logLevel")?
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("") | Some("info") => LogLevel::Info,
            Some("error" | "panic" | "fatal") => LogLevel::Error,
            Some("warn" | "warning") => LogLevel::Warn,
            Some("debug") => LogLevel::Debug,
            Some("trace") => LogLevel::Trace,
            Some(other) => {
                return Err(invalid(
                    "logLevel",
                    format!("{other:?} is not error, warn, info, debug or trace"),
                ));
            }
        };
        let ipam = match m.get("ipam") {
            None | Some(Value::Null) => None,
            Some(Value::Object(im)) if im.is_empty() => None,
            Some(v @ Value::Object(im)) => {
                let kind = match im.get("type") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(invalid("ipam", "ipam.type must be a string")),
                };
                check_plugin_type(&kind).map_err(|e| invalid("ipam.type", e))?;
                Some(Ipam {
                    kind,
                    raw: v.clone(),
                })
            }
            Some(other) => return Err(invalid("ipam", format!("must be an object, got {other}"))),
        };
        let state_dir = match get_str(m, "stateDir")? {
            None | Some("") => PathBuf::from(DEFAULT_STATE_DIR),
            Some(s) if s.starts_with('/') => PathBuf::from(s),
            Some(s) => {
                return Err(invalid(
                    "stateDir",
                    format!("{s:?} is not an absolute path"),
                ));
            }
        };
        let mut no_masq = Vec::new();
        if let Some(s) = get_str(m, "podCIDR")? {
            no_masq.push(parse_cidr("podCIDR", s)?);
        }
        match m.get("clusterCIDRs") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for v in a {
                    let Value::String(s) = v else {
                        return Err(invalid(
                            "clusterCIDRs",
                            format!("entries must be strings, got {v}"),
                        ));
                    };
                    no_masq.push(parse_cidr("clusterCIDRs", s)?);
                }
            }
            Some(other) => {
                return Err(invalid(
                    "clusterCIDRs",
                    format!("must be an array, got {other}"),
                ));
            }
        }
        let prev_result = match m.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(invalid(
                    "prevResult",
                    format!("must be an object, got {other}"),
                ));
            }
        };
        let valid_attachments = match m.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for v in a {
                    let cid = v.get("containerID").and_then(Value::as_str);
                    let ifn = v.get("ifname").and_then(Value::as_str);
                    match (cid, ifn) {
                        (Some(c), Some(i)) => out.push(Attachment {
                            container_id: c.to_string(),
                            ifname: i.to_string(),
                        }),
                        _ => {
                            return Err(invalid(
                                "cni.dev/valid-attachments",
                                format!("entry {v} needs string containerID and ifname"),
                            ));
                        }
                    }
                }
                Some(out)
            }
            Some(other) => {
                return Err(invalid(
                    "cni.dev/valid-attachments",
                    format!("must be an array, got {other}"),
                ));
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            bridge,
            bridge_kind,
            ovs_datapath_type,
            ovsdb_socket,
            is_gateway,
            is_default_gateway,
            ip_masq,
            mtu,
            hairpin_mode,
            log_file,
            log_level,
            ipam,
            state_dir,
            no_masq,
            prev_result,
            valid_attachments,
            raw,
        })
    }

    /// The config to hand to the delegated IPAM plugin: ours, with `cniVersion` set to `version` (the one
    /// negotiated with the delegate) and, if our prevResult is present, it converted to that version.
    pub fn for_delegate(&self, version: &str, prev_result: Option<Value>) -> Vec<u8> {
        let mut v = self.raw.clone();
        if let Value::Object(m) = &mut v {
            m.insert("cniVersion".into(), Value::String(version.into()));
            match prev_result {
                Some(p) => {
                    m.insert("prevResult".into(), p);
                }
                None => {
                    m.remove("prevResult");
                }
            }
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// The evio-cni keys a config generator (`evioctl cni-config`) may set, in the spelling it was given, so
/// the conflist carries them as written. The generator builds the plugin entry from this (serialised with
/// [`PluginKeys::to_map`]) and checks it with [`PluginKeys::check`], i.e. with [`NetConf::parse`], the
/// parser the plugin runs: what is written is exactly what the plugin accepts.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ovs_datapath_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ovsdb_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_gateway: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_default_gateway: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_masq: Option<bool>,
    /// `None` also for `mtu: 0`, which the plugin reads as unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hairpin_mode: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    #[serde(rename = "clusterCIDRs", skip_serializing_if = "Option::is_none")]
    pub cluster_cidrs: Option<Vec<String>>,
}

impl PluginKeys {
    /// Reads the plugin keys out of a generator's input object (unknown keys are ignored), with the
    /// plugin's own readers: booleans may be written as strings, the legacy `isIPMasq` stands for `ipMasq`.
    /// One input convenience the plugin does not have: `mtu` may be a string of digits (the original
    /// ConfigMap wrote numbers as strings); it is written as a number. Values are checked by [`Self::check`].
    pub fn from_object(m: &Map<String, Value>) -> Result<PluginKeys, CniError> {
        let s = |k: &str| get_str(m, k).map(|o| o.map(str::to_string));
        let mtu = match m.get("mtu") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64()),
            Some(Value::String(t)) => Some(t.trim().parse::<u64>().ok()),
            Some(_) => Some(None),
        };
        let mtu = match mtu {
            None | Some(Some(0)) => None,
            Some(Some(n)) if n <= u64::from(u32::MAX) => Some(n as u32),
            _ => {
                return Err(invalid(
                    "mtu",
                    format!(
                        "{} is not an integer in 68..=65535 (or 0 for unset)",
                        m.get("mtu").cloned().unwrap_or_default()
                    ),
                ));
            }
        };
        let cluster_cidrs = match m.get("clusterCIDRs") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        other => Err(invalid(
                            "clusterCIDRs",
                            format!("entries must be strings, got {other}"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(invalid(
                    "clusterCIDRs",
                    format!("must be an array, got {other}"),
                ));
            }
        };
        Ok(PluginKeys {
            bridge: s("bridge")?,
            bridge_type: s("bridgeType")?,
            ovs_datapath_type: s("ovsDatapathType")?,
            ovsdb_socket: s("ovsdbSocket")?,
            is_gateway: get_bool(m, "isGateway")?,
            is_default_gateway: get_bool(m, "isDefaultGateway")?,
            ip_masq: get_bool(m, "ipMasq")?.or(get_bool(m, "isIPMasq")?),
            mtu,
            hairpin_mode: get_bool(m, "hairpinMode")?,
            log_file: s("logFile")?,
            log_level: s("logLevel")?,
            state_dir: s("stateDir")?,
            cluster_cidrs,
        })
    }

    /// The keys as the JSON object the plugin reads (only those set).
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    /// Parses `plugin` (one plugin entry of a conflist, without `cniVersion` and `name`) the way the plugin
    /// will see it: with the list's `cni_version` and `name` added, through [`NetConf::parse`].
    pub fn check_entry(
        plugin: &Map<String, Value>,
        cni_version: &str,
        name: &str,
    ) -> Result<NetConf, CniError> {
        let mut m = plugin.clone();
        m.insert("cniVersion".into(), Value::String(cni_version.into()));
        m.insert("name".into(), Value::String(name.into()));
        NetConf::parse(&serde_json::to_vec(&Value::Object(m)).unwrap_or_default())
    }

    /// Checks these keys with the plugin's parser, as a config of network `name` and version `cni_version`.
    pub fn check(&self, cni_version: &str, name: &str) -> Result<NetConf, CniError> {
        Self::check_entry(&self.to_map(), cni_version, name)
    }
}

/// A network configuration list (`.conflist`).
#[derive(Debug, Clone)]
pub struct ConfList {
    pub cni_version: String,
    pub name: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    pub plugins: Vec<Value>,
}

impl ConfList {
    /// Parses a conflist; every plugin entry must be an object with a plain-file-name `type`.
    pub fn parse(bytes: &[u8]) -> Result<ConfList, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::with_details(
                ErrorCode::Decode,
                "cannot decode the network config list",
                e.to_string(),
            )
        })?;
        let Value::Object(m) = &raw else {
            return Err(CniError::new(
                ErrorCode::Decode,
                "the network config list is not a JSON object",
            ));
        };
        let cni_version = get_str(m, "cniVersion")?
            .ok_or_else(|| invalid("cniVersion", "missing"))?
            .to_string();
        version::check_supported(&cni_version)?;
        let name = get_str(m, "name")?
            .ok_or_else(|| invalid("name", "missing"))?
            .to_string();
        let disable_check = get_bool(m, "disableCheck")?.unwrap_or(false);
        let disable_gc = get_bool(m, "disableGC")?.unwrap_or(false);
        let plugins = match m.get("plugins") {
            Some(Value::Array(a)) if !a.is_empty() => a.clone(),
            _ => return Err(invalid("plugins", "must be a non-empty array")),
        };
        for p in &plugins {
            let t = p
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("plugins", "entry without type"))?;
            check_plugin_type(t).map_err(|e| invalid("plugins[].type", e))?;
        }
        Ok(ConfList {
            cni_version,
            name,
            disable_check,
            disable_gc,
            plugins,
        })
    }

    /// The config the runtime passes to plugin `i`: the entry plus the list's `cniVersion` and `name`.
    pub fn plugin_config(&self, i: usize) -> Option<Value> {
        let mut p = self.plugins.get(i)?.clone();
        if let Value::Object(m) = &mut p {
            m.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
            m.insert("name".into(), Value::String(self.name.clone()));
        }
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn defaults() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"evio","type":"evio-cni","ipam":{"type":"host-local"}}"#)
            .unwrap();
        assert_eq!(c.bridge, "eviobr0");
        assert_eq!(c.bridge_kind, BridgeKind::Linux);
        assert_eq!(c.ovs_datapath_type, DatapathType::System);
        assert!(c.is_gateway && c.is_default_gateway && !c.ip_masq && !c.hairpin_mode);
        assert_eq!(c.mtu, None);
        assert_eq!(c.ipam.unwrap().kind, "host-local");
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.ovsdb_socket, PathBuf::from(DEFAULT_OVSDB_SOCKET));
    }

    #[test]
    fn all_keys_and_legacy_spellings() {
        let c = parse(
            r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"evio-cni","bridge":"br1",
            "bridgeType":"OVS","ovsDatapathType":"netdev","ovsdbSocket":"unix:/tmp/x/db.sock",
            "isGateway":false,"isDefaultGateway":false,"isIPMasq":true,"mtu":1410,"hairpinMode":true,
            "logFile":"/tmp/l.log","logLevel":"DEBUG","stateDir":"/tmp/s","podCIDR":"10.244.0.0/16",
            "clusterCIDRs":["10.10.0.5/16"],"someFutureKey":{"x":1},
            "ipam":{"type":"host-local","subnet":"10.244.3.0/24"}}"#,
        )
        .unwrap();
        assert_eq!(c.bridge, "br1");
        assert_eq!(c.bridge_kind, BridgeKind::Ovs);
        assert_eq!(c.ovs_datapath_type, DatapathType::Netdev);
        assert_eq!(c.ovsdb_socket, PathBuf::from("/tmp/x/db.sock"));
        assert!(!c.is_gateway && !c.is_default_gateway && c.ip_masq && c.hairpin_mode);
        assert_eq!(c.mtu, Some(1410));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(
            c.no_masq,
            vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.10.0.0/16".parse::<IpNet>().unwrap()
            ]
        );
        let c = parse(r#"{"cniVersion":"1.1.0","name":"n","bridgeType":"LXBR","ipMasq":false,"isIPMasq":true}"#)
            .unwrap();
        assert_eq!(c.bridge_kind, BridgeKind::Linux);
        assert!(!c.ip_masq, "ipMasq wins over the legacy isIPMasq");
        let c = parse(r#"{"cniVersion":"1.1.0","name":"n","isGateway":false}"#).unwrap();
        assert!(
            c.is_gateway,
            "isDefaultGateway (default true) implies isGateway"
        );
    }

    #[test]
    fn rejects_bad_values_with_clear_messages() {
        let cases: &[(&str, u32, &str)] = &[
            (r#"not json"#, 6, "decode"),
            (r#"[1,2]"#, 6, "object"),
            (r#"{"name":"n"}"#, 1, "cniVersion"),
            (r#"{"cniVersion":"0.2.0","name":"n"}"#, 1, "incompatible"),
            (r#"{"cniVersion":"1.0.0"}"#, 7, "name"),
            (r#"{"cniVersion":"1.0.0","name":"a b"}"#, 7, "name"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","bridge":"abcdefghijklmnop"}"#,
                7,
                "bridge",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","bridge":"a/b"}"#,
                7,
                "bridge",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","bridgeType":"vpp"}"#,
                7,
                "bridgeType",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ovsDatapathType":"dpdk"}"#,
                7,
                "ovsDatapathType",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":"1500"}"#,
                7,
                "mtu",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n","mtu":20}"#, 7, "mtu"),
            (r#"{"cniVersion":"1.0.0","name":"n","mtu":1.5}"#, 7, "mtu"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","isGateway":"yes"}"#,
                7,
                "isGateway",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"../host-local"}}"#,
                7,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"/usr/bin/x"}}"#,
                7,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"subnet":"x"}}"#,
                7,
                "ipam",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDR":"10.0.0.0/33"}"#,
                7,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","clusterCIDRs":"10.0.0.0/8"}"#,
                7,
                "clusterCIDRs",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","logLevel":"loud"}"#,
                7,
                "logLevel",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","stateDir":"rel"}"#,
                7,
                "stateDir",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ovsdbSocket":"tcp:1.2.3.4:6640"}"#,
                7,
                "ovsdbSocket",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","prevResult":[]}"#,
                7,
                "prevResult",
            ),
        ];
        for (input, code, word) in cases {
            let e = parse(input).expect_err(input);
            assert_eq!(e.code, *code, "{input}: {e}");
            assert!(
                e.to_string().to_lowercase().contains(&word.to_lowercase()),
                "{input}: message {e} lacks {word}"
            );
        }
    }

    #[test]
    fn gc_attachments() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }]
        );
        let e = parse(
            r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":1}]}"#,
        );
        assert_eq!(e.unwrap_err().code, 7);
    }

    #[test]
    fn delegate_config_carries_negotiated_version() {
        let c = parse(r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"host-local"},"prevResult":{"ips":[]}}"#)
            .unwrap();
        let d: Value = serde_json::from_slice(&c.for_delegate("1.0.0", None)).unwrap();
        assert_eq!(d["cniVersion"], "1.0.0");
        assert!(d.get("prevResult").is_none());
        assert_eq!(d["ipam"]["type"], "host-local");
    }

    #[test]
    fn conflist() {
        let l = ConfList::parse(
            br#"{"cniVersion":"1.1.0","name":"evio","plugins":[{"type":"evio-cni","bridge":"b"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let p = l.plugin_config(0).unwrap();
        assert_eq!(p["name"], "evio");
        assert_eq!(p["cniVersion"], "1.1.0");
        NetConf::parse(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert!(l.plugin_config(2).is_none());
        assert_eq!(
            ConfList::parse(br#"{"cniVersion":"1.1.0","name":"e","plugins":[]}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            ConfList::parse(br#"{"cniVersion":"1.1.0","name":"e","plugins":[{"type":"a/b"}]}"#)
                .unwrap_err()
                .code,
            7
        );
    }

    #[test]
    fn default_mtu_is_the_tunnels_inner_mtu() {
        assert_eq!(TUNNEL_OVERHEAD, 80);
        assert_eq!(DEFAULT_MTU, 1420);
        assert_eq!(overlay_mtu(9000), 8920);
        assert_eq!(overlay_mtu(10), 0);
    }

    fn keys(s: &str) -> Result<PluginKeys, CniError> {
        match serde_json::from_str::<Value>(s).unwrap() {
            Value::Object(m) => PluginKeys::from_object(&m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn plugin_keys_round_trip_through_the_plugin_parser() {
        let k = keys(
            r#"{"bridge":"br1","bridgeType":"lxbr","isIPMasq":"true","mtu":"1400","hairpinMode":false,
                "clusterCIDRs":["10.10.0.0/16"],"stateDir":"/tmp/s","other":1}"#,
        )
        .unwrap();
        let m = k.to_map();
        assert_eq!(m["bridgeType"], "lxbr", "written as given");
        assert_eq!(m["ipMasq"], true);
        assert_eq!(m["mtu"], 1400);
        assert!(!m.contains_key("other") && !m.contains_key("isIPMasq"));
        let c = k.check("1.0.0", "evio").unwrap();
        assert_eq!(c.bridge_kind, BridgeKind::Linux);
        assert!(c.ip_masq && !c.hairpin_mode);
        assert_eq!(c.mtu, Some(1400));
        // Every spelling the plugin accepts, the generator accepts; mtu 0 is unset for both.
        for t in ["linux", "Linux", "LXBR", "lxbr", "ovs", "OVS"] {
            let k = keys(&format!(r#"{{"bridgeType":"{t}"}}"#)).unwrap();
            k.check("1.1.0", "n").unwrap();
        }
        let k = keys(r#"{"mtu":0}"#).unwrap();
        assert_eq!(k.mtu, None);
        assert_eq!(k.check("1.1.0", "n").unwrap().mtu, None);
    }

    #[test]
    fn plugin_keys_rejected_as_the_plugin_rejects_them() {
        for (input, key) in [
            (r#"{"bridgeType":"vxlan"}"#, "bridgeType"),
            (r#"{"mtu":10}"#, "mtu"),
            (r#"{"mtu":"big"}"#, "mtu"),
            (r#"{"mtu":1.5}"#, "mtu"),
            (r#"{"mtu":70000}"#, "mtu"),
            (r#"{"bridge":"a/b"}"#, "bridge"),
            (r#"{"ovsdbSocket":"rel/db.sock"}"#, "ovsdbSocket"),
            (r#"{"logLevel":"loud"}"#, "logLevel"),
            (r#"{"isGateway":"yes"}"#, "isGateway"),
            (r#"{"clusterCIDRs":["x"]}"#, "clusterCIDRs"),
            (r#"{"clusterCIDRs":"10.0.0.0/8"}"#, "clusterCIDRs"),
        ] {
            let e = keys(input).and_then(|k| k.check("1.0.0", "n")).unwrap_err();
            assert_eq!(e.code, 7, "{input}: {e}");
            assert!(e.to_string().contains(key), "{input}: {e}");
        }
    }

    #[test]
    fn ifname_rules() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("123456789012345").is_ok());
        assert!(check_ifname("1234567890123456").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("..").is_err());
        assert!(check_ifname("a b").is_err());
    }
}
