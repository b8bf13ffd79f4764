//! The `CNI_*` environment variables, checked per verb (code 4 when one a verb needs is missing or bad).

use crate::args::CniArgs;
use crate::config::check_ifname;
use crate::error::{CniError, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// The validated environment of one invocation.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime gave none (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    /// Directories of `CNI_PATH`, in order.
    pub path: Vec<String>,
}

fn missing(var: &str, cmd: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnv,
        format!("{var} is required for {cmd}"),
    )
}

/// Checks a container id: non-empty, letters, digits, `_`, `-`, `.` (what the spec allows).
pub fn check_container_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("container id is empty".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(format!(
            "container id {id:?} may only hold letters, digits, '_', '-', '.'"
        ));
    }
    Ok(())
}

impl Env {
    /// Reads the variables through `get` (so tests need no process environment).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let cmd_s = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(ErrorCode::InvalidEnv, "CNI_COMMAND is not set"))?;
        let command = Command::parse(&cmd_s).ok_or_else(|| {
            CniError::with_details(
                ErrorCode::InvalidEnv,
                "unknown CNI_COMMAND",
                format!("{cmd_s:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
            )
        })?;
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let needs_path = !matches!(command, Command::Version);
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        if needs_attachment {
            if container_id.is_empty() {
                return Err(missing("CNI_CONTAINERID", &cmd_s));
            }
            check_container_id(&container_id).map_err(|e| {
                CniError::with_details(ErrorCode::InvalidEnv, "invalid CNI_CONTAINERID", e)
            })?;
        }
        let netns = get("CNI_NETNS").unwrap_or_default();
        if needs_netns && netns.is_empty() {
            return Err(missing("CNI_NETNS", &cmd_s));
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        if needs_attachment {
            if ifname.is_empty() {
                return Err(missing("CNI_IFNAME", &cmd_s));
            }
            check_ifname(&ifname).map_err(|e| {
                CniError::with_details(ErrorCode::InvalidEnv, "invalid CNI_IFNAME", e)
            })?;
        }
        let path_s = get("CNI_PATH").unwrap_or_default();
        let path: Vec<String> = path_s
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if needs_path && path.is_empty() {
            return Err(missing("CNI_PATH", &cmd_s));
        }
        let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn per_verb_requirements() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni:/opt/cni/bin"),
            ("CNI_ARGS", "IgnoreUnknown=1"),
        ];
        let e = env(&full).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path, vec!["/usr/lib/cni", "/opt/cni/bin"]);
        for skip in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            let v: Vec<_> = full.iter().copied().filter(|(k, _)| *k != skip).collect();
            assert_eq!(env(&v).unwrap_err().code, 4, "ADD without {skip}");
        }
        // DEL without a netns is fine (containerd does that).
        let del: Vec<_> = full
            .iter()
            .copied()
            .map(|(k, v)| {
                if k == "CNI_COMMAND" {
                    (k, "DEL")
                } else {
                    (k, v)
                }
            })
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert_eq!(env(&del).unwrap().netns, "");
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        assert_eq!(env(&[("CNI_COMMAND", "GC")]).unwrap_err().code, 4);
        assert_eq!(
            env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")])
                .unwrap()
                .command,
            Command::Gc
        );
        assert_eq!(env(&[]).unwrap_err().code, 4);
        assert_eq!(env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code, 4);
        // One bad variable in an otherwise complete environment: code 4.
        for (key, value) in [
            ("CNI_IFNAME", "x/y"),
            ("CNI_CONTAINERID", "a b"),
            ("CNI_ARGS", "x"),
        ] {
            let bad: Vec<_> = full
                .iter()
                .map(|&(k, v)| if k == key { (k, value) } else { (k, v) })
                .collect();
            assert_eq!(env(&bad).unwrap_err().code, 4, "{key}={value}");
        }
    }
}
