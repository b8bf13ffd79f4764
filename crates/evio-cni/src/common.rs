//! What the verbs and the host share: the attachment's identity, the bridge backend, the pod netns, errors.

use std::fs::File;
use std::path::Path;

use evio_bridge::{Bridge, BridgeSpec, BridgeType, PortOwner};
use evio_cni_types::config::{BridgeKind, NetConf};
use evio_cni_types::{CniError, ErrorCode};
use evio_netlink::netns;

/// What a successful run prints.
#[derive(Debug)]
pub enum Output {
    Json(String),
    Nothing,
}

pub fn io_err(msg: impl Into<String>, e: impl std::fmt::Display) -> CniError {
    CniError::with_details(ErrorCode::Io, msg, e.to_string())
}

/// One attachment's identity, computed once: the bridge port's owner and the masquerade entries' key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment {
    pub owner: PortOwner,
    pub key: String,
}

impl Attachment {
    pub fn new(conf: &NetConf, container_id: &str, ifname: &str) -> Attachment {
        Attachment {
            owner: PortOwner {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            },
            key: evio_firewall::attachment_key(&conf.name, container_id, ifname),
        }
    }
}

/// The bridge backend the config names (built once per run, by [`Real::new`]).
pub fn bridge_backend(conf: &NetConf) -> Result<Box<dyn Bridge>, CniError> {
    let kind = match conf.bridge_kind {
        BridgeKind::Linux => BridgeType::Linux,
        BridgeKind::Ovs => BridgeType::Ovs,
    };
    let spec = BridgeSpec {
        name: conf.bridge.clone(),
        mtu: conf.mtu,
        ovs_datapath_type: conf.ovs_datapath_type,
        ovsdb_socket: conf.ovsdb_socket.clone(),
    };
    evio_bridge::backend(kind, spec).map_err(|e| io_err(format!("bridge {}", conf.bridge), e))
}

pub fn open_netns(path: &str) -> Result<File, CniError> {
    if !netns::exists(Path::new(path)) {
        return Err(CniError::with_details(
            ErrorCode::InvalidEnv,
            "CNI_NETNS is not a network namespace",
            format!("{path:?} does not exist or is not a netns file"),
        ));
    }
    File::open(path).map_err(|e| io_err(format!("open netns {path}"), e))
}
