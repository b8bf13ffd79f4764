//! Benchmark: N nodes claim a pod subnet at once against one real etcd (started here on loopback).
//!
//!   cargo run --release -p evio-store --example claim_bench -- [NODES] [PATH/TO/evioctl]
//!
//! Mode "tasks": N concurrent tokio tasks in this process sharing one etcd connection.
//! Mode "processes" (when an evioctl path is given): N concurrent `evioctl cni-config` processes, each with
//! its own connection and conf dir, as N nodes' init containers would run.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evio_store::{EtcdOptions, Store, SubnetPlan};
use evio_testbed::Etcd;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
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
    let (total, mut lat) = rt.block_on(async {
        let store = Store::connect(&EtcdOptions::new([etcd.endpoint()]))
            .await
            .unwrap();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let c = s.claim_subnet(&plan, &format!("t{i}")).await.unwrap();
                (c.subnet, t.elapsed())
            }));
        }
        let mut set = HashSet::new();
        let mut lat = Vec::new();
        for t in tasks {
            let (s, d) = t.await.unwrap();
            assert!(set.insert(s));
            lat.push(d);
        }
        (start.elapsed(), lat)
    });
    println!(
        "tasks: {n} concurrent claims in {:.3} s; per claim p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        total.as_secs_f64(),
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3,
        pct(&mut lat, 1.0).as_secs_f64() * 1e3
    );
    drop(etcd);

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
