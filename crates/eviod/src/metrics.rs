//! Prometheus metrics over a minimal HTTP/1.0 server (`GET /metrics`) on `--metrics-addr`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use crate::state::Shared;

pub fn serve(shared: Arc<Shared>, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    std::thread::Builder::new().name("evio-metrics".into()).spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
            let mut req = [0u8; 2048];
            let n = c.read(&mut req).unwrap_or(0);
            let head = String::from_utf8_lossy(&req[..n]);
            let (status, ctype, body) = if head.starts_with("GET /metrics") || head.starts_with("GET / ") {
                ("200 OK", "text/plain; version=0.0.4", shared.metrics())
            } else if head.starts_with("GET /status") {
                ("200 OK", "application/json", serde_json::to_string(&shared.status()).unwrap_or_default())
            } else {
                ("404 Not Found", "text/plain", "not found\n".to_string())
            };
            let _ = write!(
                c,
                "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}
