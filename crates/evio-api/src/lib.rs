//! The contracts between evio's binaries, in one place so they cannot drift apart:
//!
//! - eviod's control socket (`<state-dir>/eviod.sock`, [`CONTROL_SOCKET`]): one command line in, one JSON
//!   document out, the socket closed. The only command is [`STATUS_COMMAND`]; its answer is [`Status`],
//!   the document `evioctl status --json` prints (docs/overlay.md; scripts and tests depend on its names).
//! - Node names ([`valid_node_name`]): they become etcd key segments and certificate subjects, so the
//!   store, the CA and the agents must agree on them.
//!
//! The node record and claims live in `evio-store` (the etcd layout), certificates and tokens in
//! `evio-trust`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The control socket's file name in the agent's state directory.
pub const CONTROL_SOCKET: &str = "eviod.sock";

/// The command that asks for [`Status`] (an empty line asks for it too).
pub const STATUS_COMMAND: &str = "status";

/// The longest answer a client reads (a status with thousands of peers is far below it).
pub const MAX_ANSWER: u64 = 64 << 20;

/// The agent's status: `evioctl status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub address: Option<String>,
    pub pod_subnet: Option<String>,
    pub public_key: String,
    pub peers: Vec<PeerStatus>,
}

/// One peer in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub node: String,
    pub address: String,
    pub pod_subnet: Option<String>,
    /// `direct`, `relay` or `connecting`.
    pub path: String,
    pub endpoint: Option<String>,
    /// Unix seconds, or null before the first handshake.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the agent at {path} (is eviod running with this --state-dir?): {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected answer from the agent: {0}")]
    BadAnswer(String),
}

/// Asks the agent whose state directory is `state_dir` for its status, waiting at most `timeout` for the
/// answer.
pub fn query_status(state_dir: &Path, timeout: Duration) -> Result<Status, ApiError> {
    let path = state_dir.join(CONTROL_SOCKET);
    let shown = path.display().to_string();
    let mut s = UnixStream::connect(&path).map_err(|source| ApiError::Unreachable {
        path: shown.clone(),
        source,
    })?;
    let io = |source| ApiError::Io {
        path: shown.clone(),
        source,
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.write_all(format!("{STATUS_COMMAND}\n").as_bytes())
        .map_err(io)?;
    let mut body = String::new();
    s.take(MAX_ANSWER).read_to_string(&mut body).map_err(io)?;
    serde_json::from_str(&body).map_err(|e| {
        let head: String = body.chars().take(200).collect();
        ApiError::BadAnswer(format!("{e}: {head}"))
    })
}

/// Node names become etcd key segments and certificate subjects: 1-253 characters of `[A-Za-z0-9._-]`
/// (Kubernetes node names are DNS subdomains, a subset), not `.` or `..`.
pub fn valid_node_name(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 253
        && node != "."
        && node != ".."
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_with_the_contract_names() {
        let text = r#"{"node":"a","address":"10.10.0.1","podSubnet":"10.244.1.0/24","publicKey":"k","peers":[{"node":"b","address":"10.10.0.2","podSubnet":null,"path":"direct","endpoint":"192.0.2.2:51820","lastHandshake":100,"rxBytes":5,"txBytes":2048}]}"#;
        let st: Status = serde_json::from_str(text).unwrap();
        assert_eq!(st.peers[0].path, "direct");
        let back = serde_json::to_value(&st).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
    }

    #[test]
    fn node_names() {
        for ok in ["edge-1", "a", "n.example.com", "x_y", &"a".repeat(253)] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"a".repeat(254)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn an_absent_agent_is_unreachable() {
        let d = std::env::temp_dir().join(format!("evio-api-none-{}", std::process::id()));
        let e = query_status(&d, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ApiError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("is eviod running"), "{e}");
    }
}
