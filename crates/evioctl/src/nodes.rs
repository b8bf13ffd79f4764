//! `evioctl nodes`: the pod subnet claims (node, subnet, since when), each node's host overlay address and
//! whether its agent is alive (registered with a live lease). Registered nodes without a claim are listed
//! too, with no subnet.

use std::collections::BTreeMap;

use anyhow::Result;
use evio_store::Store;
use serde_json::{Value, json};

use crate::cni_config::{EtcdArgs, runtime};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Row {
    subnet: Option<String>,
    since: Option<u64>,
    address: Option<String>,
    alive: bool,
}

pub fn run(args: Args) -> Result<()> {
    let opts = args.etcd.options(None)?;
    let (claims, addresses, nodes) = runtime()?.block_on(async {
        let store = Store::connect(&opts).await?;
        let snap = store.snapshot().await?;
        anyhow::Ok((snap.subnets, snap.addresses, snap.nodes))
    })?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let blank = || Row {
        subnet: None,
        since: None,
        address: None,
        alive: false,
    };
    for c in &claims {
        let r = rows.entry(c.node.clone()).or_insert_with(blank);
        r.subnet = Some(c.subnet.to_string());
        r.since = Some(c.since);
    }
    for a in &addresses {
        rows.entry(a.node.clone()).or_insert_with(blank).address = Some(a.address.to_string());
    }
    for n in &nodes {
        rows.entry(n.node.clone()).or_insert_with(blank).alive = true;
    }
    // Lowest subnet first, unclaimed nodes last.
    let mut sorted: Vec<(String, Row)> = rows.into_iter().collect();
    let key = |r: &Row| {
        r.subnet
            .as_ref()
            .and_then(|s| s.parse::<ipnet::Ipv4Net>().ok())
            .map(|n| u32::from(n.network()))
            .unwrap_or(u32::MAX)
    };
    sorted.sort_by_key(|(name, r)| (key(r), name.clone()));
    if args.json {
        let v: Vec<Value> = sorted
            .iter()
            .map(|(n, r)| json!({"node": n, "subnet": r.subnet, "since": r.since, "address": r.address, "alive": r.alive}))
            .collect();
        println!("{}", Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<24} {:<18} {:<20} {:<15} ALIVE",
        "NODE", "SUBNET", "SINCE (UTC)", "ADDRESS"
    );
    for (n, r) in &sorted {
        println!(
            "{:<24} {:<18} {:<20} {:<15} {}",
            n,
            r.subnet.as_deref().unwrap_or("-"),
            r.since.map(format_utc).unwrap_or_else(|| "-".into()),
            r.address.as_deref().unwrap_or("-"),
            if r.alive { "yes" } else { "no" }
        );
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` for Unix seconds (UTC), via the days-to-civil algorithm.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_format() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::format_utc(1_700_000_000), "2023-11-14 22:13:20");
    }
}
