//! The control socket `<state-dir>/eviod.sock`: a client connects, optionally writes a command line
//! (`status`, the default), and reads one JSON document; the server then closes the connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Shared;

/// File name of the control socket inside the state directory.
pub const SOCKET: &str = evio_api::CONTROL_SOCKET;

pub fn serve(shared: Arc<Shared>, state_dir: &Path) -> anyhow::Result<()> {
    let path = state_dir.join(SOCKET);
    // The socket appears at its path only once it listens and has its mode: clients (evioctl, scripts,
    // tests) take its existence as "the agent is up". bind(2) creates the file before listen(2), and a
    // connect in between is refused, so bind under a temporary name and rename(2) it into place.
    let tmp = state_dir.join(format!(".{SOCKET}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::thread::Builder::new()
        .name("evio-ctl".into())
        .spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                // The command is optional: a client that only reads gets the status.
                let mut line = String::new();
                let _ = BufReader::new(&c).read_line(&mut line);
                let body = match line.trim() {
                    "" | evio_api::STATUS_COMMAND => {
                        serde_json::to_string(&shared.status()).unwrap_or_default()
                    }
                    "metrics" => {
                        serde_json::to_string(&crate::metrics::render(&shared)).unwrap_or_default()
                    }
                    other => serde_json::json!({ "error": format!("unknown command {other:?}") })
                        .to_string(),
                };
                let _ = c.write_all(body.as_bytes());
                let _ = c.write_all(b"\n");
            }
        })?;
    Ok(())
}
