//! What DEL needs to undo an ADD, kept per attachment in `<stateDir>/<network>/<containerID>-<ifname>.json`
//! (written atomically). DEL also works without it: the host veth carries its owner in `ifalias` and the
//! masquerade entries carry it as nftables comment.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_veth: String,
    pub ips: Vec<IpAddr>,
    pub masq: bool,
}

pub fn dir(state_dir: &Path, network: &str) -> PathBuf {
    state_dir.join(network)
}

pub fn path(state_dir: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    dir(state_dir, network).join(format!("{container_id}-{ifname}.json"))
}

impl State {
    pub fn to_json(&self) -> String {
        json!({
            "containerID": self.container_id, "ifname": self.ifname, "netns": self.netns,
            "hostVeth": self.host_veth, "ips": self.ips, "masq": self.masq,
        })
        .to_string()
    }

    pub fn from_json(b: &[u8]) -> Option<State> {
        let v: Value = serde_json::from_slice(b).ok()?;
        Some(State {
            container_id: v.get("containerID")?.as_str()?.to_string(),
            ifname: v.get("ifname")?.as_str()?.to_string(),
            netns: v
                .get("netns")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            host_veth: v
                .get("hostVeth")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            ips: v
                .get("ips")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
                .unwrap_or_default(),
            masq: v.get("masq").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// Writes the state atomically (temp file + rename), directories mode 0700.
    pub fn save(&self, state_dir: &Path, network: &str) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let d = dir(state_dir, network);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)?;
        let p = path(state_dir, network, &self.container_id, &self.ifname);
        let tmp = d.join(format!(
            ".{}-{}.{}.tmp",
            self.container_id,
            self.ifname,
            std::process::id()
        ));
        std::fs::write(&tmp, self.to_json())?;
        std::fs::rename(&tmp, &p)
    }

    pub fn load(
        state_dir: &Path,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Option<State> {
        State::from_json(&std::fs::read(path(state_dir, network, container_id, ifname)).ok()?)
    }

    /// Every attachment recorded for `network`.
    pub fn all(state_dir: &Path, network: &str) -> Vec<State> {
        let Ok(rd) = std::fs::read_dir(dir(state_dir, network)) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| State::from_json(&std::fs::read(e.path()).ok()?))
            .collect()
    }

    pub fn remove(state_dir: &Path, network: &str, container_id: &str, ifname: &str) {
        let _ = std::fs::remove_file(path(state_dir, network, container_id, ifname));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_listing() {
        let d = tempfile::tempdir().unwrap();
        let s = State {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            host_veth: "veth1234".into(),
            ips: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            masq: true,
        };
        s.save(d.path(), "net").unwrap();
        assert_eq!(State::load(d.path(), "net", "c1", "eth0"), Some(s.clone()));
        assert_eq!(State::all(d.path(), "net"), vec![s]);
        State::remove(d.path(), "net", "c1", "eth0");
        assert_eq!(State::load(d.path(), "net", "c1", "eth0"), None);
        assert!(State::from_json(b"garbage").is_none());
    }
}
