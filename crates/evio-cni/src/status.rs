//! STATUS: whether the plugin can take ADDs (IPAM plugin found and ready, bridge backend available).

use evio_cni_types::config::{BridgeKind, NetConf};
use evio_cni_types::env::Env;
use evio_cni_types::{CniError, ErrorCode};

use crate::common::Output;
use crate::delegate;
use crate::host::Host;

pub fn status(env: &Env, conf: &NetConf, host: &dyn Host) -> Result<Output, CniError> {
    if let Some(ipam) = &conf.ipam {
        delegate::find(&ipam.kind, env).map_err(|e| {
            CniError::with_details(
                ErrorCode::NotAvailable,
                format!("IPAM plugin {} is not available", ipam.kind),
                e.to_string(),
            )
        })?;
        let d = host.ipam(conf, env)?;
        if d.speaks_at_least("1.1.0") {
            d.run("STATUS", &conf.for_delegate(d.version(), None), None)?;
        }
    }
    if let Err(e) = host.bridge() {
        return Err(CniError::with_details(
            ErrorCode::NotAvailable,
            "the bridge backend is not available",
            e.to_string(),
        ));
    }
    if conf.bridge_kind == BridgeKind::Ovs && !conf.ovsdb_socket.exists() {
        return Err(CniError::with_details(
            ErrorCode::NotAvailable,
            "Open vSwitch is not available",
            format!("no OVSDB socket at {}", conf.ovsdb_socket.display()),
        ));
    }
    Ok(Output::Nothing)
}
