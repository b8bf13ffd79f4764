//! `evioctl status --state-dir DIR [--json]`: asks the local agent over `<state-dir>/eviod.sock` and prints
//! its overlay state: the JSON of docs/overlay.md ("Status and metrics") with `--json`, a table otherwise.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The agent's state directory (holds eviod.sock).
    #[arg(long)]
    state_dir: PathBuf,
    /// Print the agent's status as one JSON object.
    #[arg(long, conflicts_with = "address")]
    json: bool,
    /// Print only the host's overlay address (VIP), e.g. for the kubelet's --node-ip.
    #[arg(long)]
    address: bool,
    /// Wait up to this many seconds for the agent to answer (and, with --address, to have its VIP).
    #[arg(long, default_value_t = 0)]
    wait: u64,
}

/// The status document (the contract with eviod lives in `evio-api`).
pub use evio_api::Status;

fn query(args: &Args) -> Result<Status> {
    query_dir(&args.state_dir)
}

fn query_dir(state_dir: &std::path::Path) -> Result<Status> {
    Ok(evio_api::query_status(state_dir, Duration::from_secs(5))?)
}

fn ago(now: u64, t: Option<u64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => format!("{}s ago", now.saturating_sub(t)),
    }
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn render(st: &Status, now: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "node:       {}", st.node);
    let _ = writeln!(o, "address:    {}", st.address.as_deref().unwrap_or("-"));
    let _ = writeln!(o, "pod subnet: {}", st.pod_subnet.as_deref().unwrap_or("-"));
    let _ = writeln!(o, "public key: {}", st.public_key);
    let _ = writeln!(o);
    let rows: Vec<[String; 8]> = st
        .peers
        .iter()
        .map(|p| {
            [
                p.node.clone(),
                p.address.clone(),
                p.pod_subnet.clone().unwrap_or_else(|| "-".into()),
                p.path.clone(),
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                ago(now, p.last_handshake),
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
            ]
        })
        .collect();
    let head = [
        "PEER",
        "ADDRESS",
        "POD SUBNET",
        "PATH",
        "ENDPOINT",
        "HANDSHAKE",
        "RX",
        "TX",
    ];
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{:<width$}  ", c, width = w[i]);
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(o, "{}", line(&head.map(String::from)));
    for r in &rows {
        let _ = writeln!(o, "{}", line(r));
    }
    if rows.is_empty() {
        let _ = writeln!(o, "(no peers)");
    }
    o
}

pub fn run(args: Args) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(args.wait);
    let st = loop {
        let res = query(&args).and_then(|st| {
            if args.address && st.address.is_none() {
                anyhow::bail!("the agent has no overlay address yet")
            }
            Ok(st)
        });
        match res {
            Ok(st) => break st,
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    if args.address {
        println!("{}", st.address.as_deref().unwrap_or_default());
    } else if args.json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        print!("{}", render(&st, now));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_with_the_contract_names() {
        let text = r#"{"node":"a","address":"10.10.0.1","podSubnet":"10.244.1.0/24","publicKey":"k","peers":[{"node":"b","address":"10.10.0.2","podSubnet":null,"path":"direct","endpoint":"192.0.2.2:51820","lastHandshake":100,"rxBytes":5,"txBytes":2048}]}"#;
        let st: Status = serde_json::from_str(text).unwrap();
        let back: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
        let table = render(&st, 130);
        assert!(table.contains("PEER"), "{table}");
        assert!(table.contains("b  "), "{table}");
        assert!(table.contains("30s ago"), "{table}");
        assert!(table.contains("2.0 KiB"), "{table}");
    }
}
