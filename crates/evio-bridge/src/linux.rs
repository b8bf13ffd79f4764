//! Linux bridge backend, over synchronous netlink in the caller's (node) network namespace.
//!
//! - `ensure`: creates the bridge if missing with a fixed MAC derived from its name (a bridge otherwise
//!   takes the lowest MAC of its ports, so the gateway's MAC would change as pods come and go), turns IPv6
//!   router advertisements off on it, sets the MTU and brings it up. Concurrent creators race safely: the
//!   loser sees EEXIST and just checks the link is a bridge.
//! - `attach`: makes the host veth a port, brings it up and tags it with the owner in its `ifalias`.
//! - `detach`/`gc`: find ports by that tag and delete the veth (which removes the pod side too).

use evio_netlink::{LinkChange, Netlink, sysctl};

use crate::{Bridge, BridgeError, BridgeSpec, PortOwner};

pub struct LinuxBridge {
    spec: BridgeSpec,
}

/// A locally administered unicast MAC derived from the bridge name (stable across restarts).
pub fn stable_mac(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[3], b[4], b[5], b[6], b[7]]
}

impl LinuxBridge {
    pub fn new(spec: BridgeSpec) -> LinuxBridge {
        LinuxBridge { spec }
    }

    fn err(&self, e: impl std::fmt::Display) -> BridgeError {
        BridgeError::Bridge {
            bridge: self.spec.name.clone(),
            msg: e.to_string(),
        }
    }

    fn nl(&self) -> Result<Netlink, BridgeError> {
        Netlink::new().map_err(|e| self.err(e))
    }

    /// Deletes the ports tagged with a tag for which `doomed` is true. Returns how many.
    /// With `only_ours`, only ports of this bridge are considered.
    fn delete_tagged(
        &self,
        only_ours: bool,
        doomed: impl Fn(&str) -> bool,
    ) -> Result<usize, BridgeError> {
        let mut nl = self.nl()?;
        let links = nl.links().map_err(|e| self.err(e))?;
        let br = links
            .iter()
            .find(|l| l.name == self.spec.name)
            .map(|l| l.index);
        if only_ours && br.is_none() {
            return Ok(0);
        }
        let mut n = 0;
        for l in links {
            let Some(alias) = &l.alias else { continue };
            if only_ours && l.master != br {
                continue;
            }
            if alias.starts_with("evio ")
                && doomed(alias)
                && l.kind.as_deref() == Some("veth")
                && nl.delete_link(l.index).map_err(|e| self.err(e))?
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Bridge for LinuxBridge {
    fn ensure(&self) -> Result<(), BridgeError> {
        let name = &self.spec.name;
        let mut nl = self.nl()?;
        let created = nl
            .create_bridge(name, stable_mac(name), self.spec.mtu)
            .map_err(|e| self.err(e))?;
        let link = nl
            .link_by_name(name)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err("vanished right after creation"))?;
        if link.kind.as_deref() != Some("bridge") {
            return Err(self.err(format!(
                "a link of this name exists but is a {:?}, not a bridge",
                link.kind
            )));
        }
        if created {
            sysctl::disable_ipv6_ra(name).map_err(|e| self.err(e))?;
        }
        let mtu = self.spec.mtu.filter(|m| *m != link.mtu);
        if !link.up || mtu.is_some() {
            nl.set_link(
                link.index,
                &LinkChange {
                    up: true,
                    mtu,
                    ..Default::default()
                },
            )
            .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn attach(&self, port: &str, owner: &PortOwner) -> Result<(), BridgeError> {
        let perr = |e: &dyn std::fmt::Display| BridgeError::Port {
            bridge: self.spec.name.clone(),
            port: port.to_string(),
            msg: e.to_string(),
        };
        let mut nl = self.nl()?;
        let br = nl
            .link_by_name(&self.spec.name)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err("missing"))?;
        let p = nl
            .link_by_name(port)
            .map_err(|e| perr(&e))?
            .ok_or_else(|| perr(&"no such link"))?;
        nl.set_link(
            p.index,
            &LinkChange {
                up: true,
                mtu: self.spec.mtu,
                master: Some(br.index),
                alias: Some(owner.tag()),
                mac: None,
            },
        )
        .map_err(|e| perr(&e))
    }

    fn detach(&self, owner: &PortOwner) -> Result<(), BridgeError> {
        let tag = owner.tag();
        self.delete_tagged(false, |a| a == tag).map(|_| ())
    }

    fn gc(&self, valid: &[PortOwner]) -> Result<(), BridgeError> {
        let keep: std::collections::HashSet<String> = valid.iter().map(PortOwner::tag).collect();
        self.delete_tagged(true, |a| !keep.contains(a)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mac_is_stable_local_unicast() {
        let a = super::stable_mac("eviobr0");
        assert_eq!(a, super::stable_mac("eviobr0"));
        assert_ne!(a, super::stable_mac("eviobr1"));
        assert_eq!(a[0] & 0x03, 0x02);
    }
}
