//! The node's pod bridge, behind one trait with two backends: a Linux bridge (netlink) and an Open vSwitch
//! bridge (OVSDB JSON-RPC, RFC 7047). All calls run in the node (host) network namespace of the caller.

pub mod linux;
pub mod ovs;

use std::path::PathBuf;

pub use evio_cni_types::config::DatapathType;
pub use linux::LinuxBridge;
pub use ovs::OvsBridge;

/// Which kind of bridge holds the pods' veths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeType {
    Linux,
    Ovs,
}

/// What the plugin's configuration says about the bridge.
#[derive(Debug, Clone)]
pub struct BridgeSpec {
    /// Interface name of the bridge (at most 15 bytes).
    pub name: String,
    /// MTU to set on the bridge, if configured.
    pub mtu: Option<u32>,
    /// OVS only: `system` or `netdev` (the userspace datapath); the config's own type, never re-read.
    pub ovs_datapath_type: DatapathType,
    /// OVS only: the ovsdb-server unix socket.
    pub ovsdb_socket: PathBuf,
}

/// Identifies the attachment a port belongs to (the CNI attachment key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortOwner {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge {bridge}: {msg}")]
    Bridge { bridge: String, msg: String },
    #[error("port {port} on bridge {bridge}: {msg}")]
    Port {
        bridge: String,
        port: String,
        msg: String,
    },
    #[error("OVSDB at {socket}: {msg}")]
    Ovsdb { socket: String, msg: String },
    #[error("{0}")]
    Other(String),
}

/// A pod bridge backend.
pub trait Bridge {
    /// Makes sure the bridge exists and is up (creating it if missing); idempotent and safe under
    /// concurrent calls from parallel plugin invocations.
    fn ensure(&self) -> Result<(), BridgeError>;
    /// Attaches the host-side veth `port` to the bridge, recording `owner`. Fails, leaving nothing behind,
    /// when the port cannot be attached.
    fn attach(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError>;
    /// Detaches whatever port `owner` holds. Succeeds when there is nothing to detach.
    fn detach(&self, owner: &PortOwner) -> Result<(), BridgeError>;
    /// Removes the ports this plugin created whose owner is not in `valid` (CNI GC).
    fn gc(&self, valid: &[PortOwner]) -> Result<(), BridgeError>;
    /// Verifies (CNI CHECK) that `port` is still a working port of this bridge held by `owner`.
    fn check_port(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError>;
}

impl PortOwner {
    /// The tag stored on the port (Linux: the host veth's `ifalias`; OVS: an `external_ids` value).
    pub fn tag(&self) -> String {
        format!("evio {} {}", self.container_id, self.ifname)
    }
}

/// The backend for `kind`. Each backend connects lazily, so building one is cheap.
pub fn backend(kind: BridgeType, spec: BridgeSpec) -> Result<Box<dyn Bridge>, BridgeError> {
    match kind {
        BridgeType::Linux => Ok(Box::new(LinuxBridge::new(spec))),
        BridgeType::Ovs => Ok(Box::new(OvsBridge::new(spec))),
    }
}
