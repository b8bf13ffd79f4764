//! Latency of the OVS backend's calls, JSON-RPC vs the ovs-vsctl fallback, against real OVS (userspace
//! datapath) in a throw-away netns. Not part of the suite (ignored); run with
//! `cargo test --release -p evio-bridge --test ovs_bench -- --ignored --nocapture`.

use evio_bridge::ovs::{OvsBridge, OvsClient};
use evio_bridge::{Bridge, BridgeSpec, DatapathType, PortOwner};
use evio_testbed::ovs::{Ovs, in_netns};
use evio_testbed::{Netns, unique};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore]
fn attach_detach_latency() {
    let node = Netns::new("obn");
    let ovs = Ovs::start(&node);
    let n = 31;
    for client in [OvsClient::JsonRpc, OvsClient::Vsctl] {
        let spec = BridgeSpec {
            name: unique("ob"),
            mtu: None,
            ovs_datapath_type: DatapathType::Netdev,
            ovsdb_socket: ovs.socket(),
        };
        let (ens, att, det) = in_netns(node.name(), move || {
            let (mut ens, mut att, mut det) = (vec![], vec![], vec![]);
            OvsBridge::new(spec.clone())
                .with_client(client)
                .ensure()
                .expect("create");
            for i in 0..n {
                // A fresh backend per iteration, as each plugin invocation is a new process.
                let o = PortOwner {
                    container_id: format!("c{i}"),
                    ifname: "eth0".into(),
                };
                let t = Instant::now();
                let b = OvsBridge::new(spec.clone()).with_client(client);
                b.ensure().expect("ensure");
                ens.push(t.elapsed());
                // The host veth, as the plugin creates it (not timed); detach deletes it again.
                let ok = std::process::Command::new("ip")
                    .args(["link", "add", "bv0", "type", "veth", "peer", "name", "bv0p"])
                    .status()
                    .expect("ip");
                assert!(ok.success());
                let t = Instant::now();
                b.attach("bv0", &o).expect("attach");
                att.push(t.elapsed());
                let t = Instant::now();
                OvsBridge::new(spec.clone())
                    .with_client(client)
                    .detach(&o)
                    .expect("detach");
                det.push(t.elapsed());
            }
            (ens, att, det)
        });
        println!(
            "{client:?}: N={n} median ensure(existing) {:?}, attach {:?}, detach {:?}",
            median(ens),
            median(att),
            median(det)
        );
    }
}
