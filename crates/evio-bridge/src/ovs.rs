//! Open vSwitch backend (OVSDB JSON-RPC, RFC 7047; `ovs-vsctl` only as a fallback). Placeholder.
