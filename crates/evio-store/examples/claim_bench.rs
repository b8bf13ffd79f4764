//! Benchmark: N nodes claim a pod subnet, or a host overlay address (VIP), at once against one real etcd
//! (started here on loopback, a fresh one per mode).
//!
//!   cargo run --release -p evio-store --example claim_bench -- [NODES] [PATH/TO/evioctl]
//!
//! Mode "tasks": N concurrent tokio tasks in this process sharing one etcd connection, each claiming a pod
//! subnet in a pool of exactly N subnets.
//! Mode "vip-full": N concurrent tasks claim an address in the smallest overlay CIDR that holds N, whose
//! surplus addresses (every other one from the bottom) were claimed explicitly beforehand, so that exactly N
//! are free and the pool fills; one more claim must be refused.
//! Mode "vip-wide": N concurrent tasks claim an address in the default overlay CIDR 10.10.0.0/16.
//! Mode "held" (`claim_bench held N H1,H2,...`): for each H, N concurrent address claims in 10.10.0.0/16 and
//! N concurrent subnet claims in 10.0.0.0/8 with nodeBits 16, after H claims of the lowest items were
//! written directly (both keys, as a claim writes them), each kind with its own etcd.
//! Mode "processes" (when an evioctl path is given): N concurrent `evioctl cni-config` processes, each with
//! its own connection and conf dir, as N nodes' init containers would run.

use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use evio_store::{EtcdOptions, Store, StoreError, SubnetPlan, host_range};
use evio_testbed::Etcd;
use ipnet::Ipv4Net;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn report(mode: &str, n: usize, total: Duration, lat: &mut [Duration]) {
    println!(
        "{mode}: {n} concurrent claims in {:.3} s; per claim p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        total.as_secs_f64(),
        pct(lat, 0.5).as_secs_f64() * 1e3,
        pct(lat, 0.99).as_secs_f64() * 1e3,
        pct(lat, 1.0).as_secs_f64() * 1e3
    );
}

/// Runs `claim(i)` for every i below n as concurrent tasks; returns the time they took together, what they
/// claimed (checked distinct) and each one's latency.
async fn concurrently<T, F, Fut>(n: usize, claim: F) -> (Duration, HashSet<T>, Vec<Duration>)
where
    T: Eq + Hash + Debug + Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = claim(i);
            tokio::spawn(async move {
                let t = Instant::now();
                (c.await, t.elapsed())
            })
        })
        .collect();
    let (mut set, mut lat) = (HashSet::new(), Vec::new());
    for t in tasks {
        let (item, d) = t.await.unwrap();
        lat.push(d);
        assert!(set.insert(item));
    }
    (start.elapsed(), set, lat)
}

/// N concurrent VIP claims in `pool` after `held` addresses were claimed explicitly; returns the time of the
/// N claims and each claim's latency; checks that all addresses are distinct and that a full pool refuses
/// one more.
fn vip_mode(
    rt: &tokio::runtime::Runtime,
    n: usize,
    pool: Ipv4Net,
    held: Vec<Ipv4Addr>,
) -> (Duration, Vec<Duration>) {
    let etcd = Etcd::start();
    rt.block_on(async {
        let store = Store::connect(&EtcdOptions::new([etcd.endpoint()]))
            .await
            .unwrap();
        let (_, fixed, _) = concurrently(held.len(), |i| {
            let (s, a) = (store.clone(), held[i]);
            async move {
                s.claim_address(&pool, &format!("held{i}"), Some(a))
                    .await
                    .unwrap()
                    .address
            }
        })
        .await;
        let (total, free, lat) = concurrently(n, |i| {
            let s = store.clone();
            async move {
                s.claim_address(&pool, &format!("v{i}"), None)
                    .await
                    .unwrap()
                    .address
            }
        })
        .await;
        assert!(fixed.is_disjoint(&free));
        let (first, last) = host_range(&pool);
        if (fixed.len() + free.len()) as u32 == last - first + 1 {
            let e = store.claim_address(&pool, "one-more", None).await;
            assert!(
                matches!(e, Err(StoreError::AddressesExhausted { .. })),
                "{e:?}"
            );
        }
        (total, lat)
    })
}

/// Writes `held` claims of the lowest items directly (both index keys per claim), 64 claims per transaction.
async fn preload(store: &Store, subnets: bool, held: usize) {
    use evio_store::etcd_client::{Txn, TxnOp};
    use evio_store::{AddressClaim, SubnetClaim, keys};
    let mut c = store.client();
    for chunk in (0..held as u32).collect::<Vec<_>>().chunks(64) {
        let mut ops = Vec::new();
        for &i in chunk {
            let node = format!("held{i}");
            let (item_key, node_key, value) = if subnets {
                let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
                let v = serde_json::to_string(&SubnetClaim {
                    node: node.clone(),
                    subnet,
                    since: 1,
                });
                (
                    keys::subnet_by_subnet(&subnet),
                    keys::subnet_by_node(&node),
                    v.unwrap(),
                )
            } else {
                let address = Ipv4Addr::from(0x0a0a_0001 + i);
                let v = serde_json::to_string(&AddressClaim {
                    node: node.clone(),
                    address,
                    since: 1,
                });
                (
                    keys::address_by_address(address),
                    keys::address_by_node(&node),
                    v.unwrap(),
                )
            };
            ops.push(TxnOp::put(item_key, value.clone(), None));
            ops.push(TxnOp::put(node_key, value, None));
        }
        c.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// N concurrent claims (addresses in 10.10.0.0/16, or subnets of 10.0.0.0/8 nodeBits 16) after `held`.
fn held_mode(rt: &tokio::runtime::Runtime, n: usize, subnets: bool, held: usize) {
    let etcd = Etcd::start();
    let (total, mut lat) = rt.block_on(async {
        let store = Store::connect(&EtcdOptions::new([etcd.endpoint()]))
            .await
            .unwrap();
        preload(&store, subnets, held).await;
        let plan = SubnetPlan::parse("10.0.0.0/8", 16).unwrap();
        let wide: Ipv4Net = "10.10.0.0/16".parse().unwrap();
        let (total, got, lat) = concurrently(n, |i| {
            let (s, plan) = (store.clone(), plan);
            async move {
                if subnets {
                    s.claim_subnet(&plan, &format!("t{i}"))
                        .await
                        .unwrap()
                        .subnet
                } else {
                    let a = s
                        .claim_address(&wide, &format!("t{i}"), None)
                        .await
                        .unwrap();
                    Ipv4Net::new(a.address, 32).unwrap()
                }
            }
        })
        .await;
        // None of the new claims took a held item.
        let first = if subnets {
            0x0a00_0000 + ((held as u32) << 8)
        } else {
            0x0a0a_0001 + held as u32
        };
        assert!(
            got.iter().all(|g| u32::from(g.network()) >= first),
            "a held item was handed out"
        );
        (total, lat)
    });
    let what = if subnets {
        "subnets (10.0.0.0/8, nodeBits 16)"
    } else {
        "vip (10.10.0.0/16)"
    };
    report(&format!("held {held}: {what}"), n, total, &mut lat);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("held") {
        let n: usize = args.get(2).map_or(256, |s| s.parse().expect("N"));
        let helds: Vec<usize> = args
            .get(3)
            .map_or("0,1000", String::as_str)
            .split(',')
            .map(|h| h.parse().expect("H1,H2,..."))
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for &h in &helds {
            held_mode(&rt, n, false, h);
            held_mode(&rt, n, true, h);
        }
        return;
    }
    let n: usize = args
        .get(1)
        .map(|s| s.parse().expect("NODES"))
        .unwrap_or(256);
    let evioctl = args.get(2).cloned();
    let bits = (n as f64).log2().ceil() as u8;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let etcd = Etcd::start();
    let plan = SubnetPlan::parse("10.244.0.0/16", bits.max(1)).unwrap();
    let (total, _, mut lat) = rt.block_on(async {
        let store = Store::connect(&EtcdOptions::new([etcd.endpoint()]))
            .await
            .unwrap();
        concurrently(n, |i| {
            let s = store.clone();
            async move {
                s.claim_subnet(&plan, &format!("t{i}"))
                    .await
                    .unwrap()
                    .subnet
            }
        })
        .await
    });
    report("tasks", n, total, &mut lat);
    drop(etcd);

    // The smallest overlay CIDR with at least n host addresses; its surplus held by explicit claims.
    let host_bits = (1..=30u8).find(|b| (1u64 << b) - 2 >= n as u64).unwrap();
    let pool = Ipv4Net::new(Ipv4Addr::new(10, 77, 0, 0), 32 - host_bits).unwrap();
    let (first, last) = host_range(&pool);
    let surplus = (last - first + 1) as usize - n;
    let held = (0..surplus as u32)
        .map(|i| Ipv4Addr::from(first + 2 * i + 1))
        .collect();
    let (total, mut lat) = vip_mode(&rt, n, pool, held);
    report(
        &format!("vip-full ({pool}, {surplus} held)"),
        n,
        total,
        &mut lat,
    );
    let wide = "10.10.0.0/16".parse().unwrap();
    let (total, mut lat) = vip_mode(&rt, n, wide, Vec::new());
    report("vip-wide (10.10.0.0/16)", n, total, &mut lat);

    let Some(evioctl) = evioctl else { return };
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("net-conf.json");
    std::fs::write(
        &conf,
        format!(
            r#"{{"podCIDR":"10.244.0.0/16","nodeBits":{}}}"#,
            bits.max(1)
        ),
    )
    .unwrap();
    let plugin = dir.path().join("evio-cni");
    std::fs::write(&plugin, b"#!/bin/sh\n").unwrap();
    let start = Instant::now();
    let mut kids = Vec::new();
    for i in 0..n {
        let d = dir.path().join(format!("n{i}"));
        std::fs::create_dir(&d).unwrap();
        let child = Command::new(&evioctl)
            .arg("cni-config")
            .arg("--net-conf")
            .arg(&conf)
            .args([
                "--node-name",
                &format!("p{i}"),
                "--etcd-endpoints",
                &etcd.endpoint(),
                "--etcd-timeout",
                "60",
            ])
            .arg("--cni-conf-dir")
            .arg(d.join("net.d"))
            .arg("--cni-bin-dir")
            .arg(d.join("bin"))
            .arg("--plugin-binary")
            .arg(&plugin)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kids.push(child);
    }
    let mut set = HashSet::new();
    for k in kids {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success());
        assert!(
            set.insert(
                String::from_utf8(o.stdout)
                    .unwrap()
                    .split('"')
                    .nth(7)
                    .unwrap()
                    .to_string()
            )
        );
    }
    println!(
        "processes: {n} concurrent `evioctl cni-config` runs (claim + conflist + plugin install) in {:.3} s",
        start.elapsed().as_secs_f64()
    );
}
