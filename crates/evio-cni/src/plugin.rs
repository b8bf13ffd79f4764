//! What every verb shares: dispatch, the attachment's identity, the bridge backend, errors, the log.
//! The verbs are one module each: `add`, `del`, `check`, `status`, `gc` (VERSION is answered in `main`).

use std::fs::File;
use std::path::Path;

use evio_bridge::{Bridge, BridgeSpec, BridgeType, PortOwner};
use evio_cni_types::config::{BridgeKind, LogLevel, NetConf};
use evio_cni_types::env::{Command, Env};
use evio_cni_types::version::Version;
use evio_cni_types::{CniError, ErrorCode};
use evio_netlink::netns;
use tracing::debug;

use crate::Output;
use crate::host::{Host, Real};

pub fn io_err(msg: impl Into<String>, e: impl std::fmt::Display) -> CniError {
    CniError::with_details(ErrorCode::Io, msg, e.to_string())
}

fn init_log(conf: &NetConf) {
    let Some(path) = &conf.log_file else { return };
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let level = match conf.log_level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

fn require_version(conf: &NetConf, min: &str, verb: &str) -> Result<(), CniError> {
    let have = Version::parse(&conf.cni_version);
    let need = Version::parse(min);
    if have < need {
        return Err(CniError::with_details(
            ErrorCode::IncompatibleVersion,
            format!("{verb} needs cniVersion {min} or later"),
            format!("config is {}", conf.cni_version),
        ));
    }
    Ok(())
}

pub fn dispatch(env: &Env, stdin: &[u8]) -> Result<Output, CniError> {
    let conf = NetConf::parse(stdin)?;
    init_log(&conf);
    debug!(command = ?env.command, container = %env.container_id, ifname = %env.ifname, netns = %env.netns, "invoked");
    let host = Real::new(&conf);
    run(env, &conf, &host)
}

/// Runs the verb of `env` against `host`.
pub fn run(env: &Env, conf: &NetConf, host: &dyn Host) -> Result<Output, CniError> {
    match env.command {
        Command::Add => crate::add::add(env, conf, host),
        Command::Del => crate::del::del(env, conf, host),
        Command::Check => {
            require_version(conf, "0.4.0", "CHECK")?;
            crate::check::check(env, conf, host)
        }
        Command::Status => {
            require_version(conf, "1.1.0", "STATUS")?;
            crate::status::status(env, conf, host)
        }
        Command::Gc => {
            require_version(conf, "1.1.0", "GC")?;
            crate::gc::gc(env, conf, host)
        }
        Command::Version => unreachable!("handled in main"),
    }
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
        ovs_datapath_type: conf.ovs_datapath_type.as_str().to_string(),
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
