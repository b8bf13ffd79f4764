//! `evio-cni`: evio's CNI plugin (spec 1.1.0 and 0.3.0, 0.3.1, 0.4.0, 1.0.0): ADD, DEL, CHECK, STATUS, GC,
//! VERSION. Pods get a veth pair whose host end is a port of the node's pod bridge (Linux or Open vSwitch),
//! addresses from the delegated IPAM plugin, a default route via the bridge's gateway address, and
//! optionally IP masquerade for traffic leaving the cluster. See docs/cni.md.
//!
//! Output contract: on success the result (ADD), the VERSION answer, or nothing; on failure exactly one CNI
//! error object, exit status 1. Logs go only to `logFile`. A panic is caught and reported as an error.
//!
//! Testing hook: `EVIO_CNI_FAIL_AFTER=<step>` makes ADD fail right after that step (`veth`, `ipam`,
//! `bridge`, `attach`, `gateway`, `address`, `routes`, `masq`, `state`) so tests can check the rollback.
//! Compiled only into debug builds (`cargo test`, `make test`) or with the `test-hooks` feature: the release
//! binary does not read the variable.
//!
//! Dependencies: the workspace's evio crates; `tracing`/`tracing-subscriber` (fmt only) for the log file;
//! `serde_json` for the protocol; `getrandom` (in the lockfile through `rand`) for veth names.

mod add;
mod check;
mod common;
mod del;
mod delegate;
#[cfg(test)]
mod fake;
mod gc;
mod host;
mod plugin;
mod state;
mod status;

use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;

use evio_cni_types::env::{Command, Env};
use evio_cni_types::version::{self, LATEST};
use evio_cni_types::{CniError, ErrorCode};

use crate::common::Output;

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).map_err(|e| {
        CniError::with_details(
            ErrorCode::Io,
            "cannot read the config from stdin",
            e.to_string(),
        )
    })?;
    Ok(buf)
}

/// The `cniVersion` of the stdin config, if it has a readable one (for the error object's version).
fn stdin_version(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let s = v.get("cniVersion")?.as_str()?;
    version::SUPPORTED.contains(&s).then(|| s.to_string())
}

fn run(stdin: &[u8]) -> Result<Output, CniError> {
    let env = Env::from_lookup(|k| std::env::var(k).ok())?;
    if env.command == Command::Version {
        // VERSION may come with a config naming a version, or with none at all.
        let v = stdin_version(stdin).unwrap_or_else(|| LATEST.to_string());
        return Ok(Output::Json(version::version_info(&v)));
    }
    plugin::dispatch(&env, stdin)
}

fn main() {
    // Panics are reported as a CNI error below; keep their text out of stdout.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
    let stdin = match read_stdin() {
        Ok(b) => b,
        Err(e) => finish(Err(e), None),
    };
    let ver = stdin_version(&stdin);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| run(&stdin)));
    let r = match r {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(CniError::raw(999, "internal error in evio-cni", what))
        }
    };
    finish(r, ver)
}

fn finish(r: Result<Output, CniError>, ver: Option<String>) -> ! {
    let mut out = std::io::stdout().lock();
    match r {
        Ok(Output::Json(s)) => {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            std::process::exit(0)
        }
        Ok(Output::Nothing) => std::process::exit(0),
        Err(e) => {
            tracing::error!(code = e.code, "{e}");
            let _ = out.write_all(e.to_json(ver.as_deref().unwrap_or(LATEST)).as_bytes());
            let _ = out.flush();
            std::process::exit(1)
        }
    }
}
