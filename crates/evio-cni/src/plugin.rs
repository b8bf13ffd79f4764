//! Dispatch: the config parsed, the log opened, the version checked, the verb run against the host.
//! The verbs are one module each: `add`, `del`, `check`, `status`, `gc` (VERSION is answered in `main`);
//! what they share is in `common`.

use evio_cni_types::config::{LogLevel, NetConf};
use evio_cni_types::env::{Command, Env};
use evio_cni_types::version::Version;
use evio_cni_types::{CniError, ErrorCode};
use tracing::debug;

use crate::common::Output;
use crate::host::{Host, Real};

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
