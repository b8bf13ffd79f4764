//! `/proc/sys/net` knobs. They apply to the network namespace of the calling thread.

use std::path::Path;

use crate::{Error, Result};

/// Writes `value` to `/proc/sys/<key>` (`key` separated by slashes, e.g. `net/ipv4/ip_forward`, so that
/// interface names with dots work) unless it already holds it.
pub fn set(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    if let Ok(cur) = std::fs::read_to_string(&path)
        && cur.trim() == value
    {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| Error::io(format!("sysctl {}", path.display()), e))
}

/// Turns IPv4 forwarding on.
pub fn enable_ipv4_forwarding() -> Result<()> {
    set("net/ipv4/ip_forward", "1")
}

/// Turns IPv6 forwarding on (all interfaces).
pub fn enable_ipv6_forwarding() -> Result<()> {
    set("net/ipv6/conf/all/forwarding", "1")
}

/// Stops `ifname` from accepting IPv6 router advertisements. A no-op where IPv6 is disabled.
pub fn disable_ipv6_ra(ifname: &str) -> Result<()> {
    let key = format!("net/ipv6/conf/{ifname}/accept_ra");
    if !Path::new("/proc/sys").join(&key).exists() {
        return Ok(());
    }
    set(&key, "0")
}
