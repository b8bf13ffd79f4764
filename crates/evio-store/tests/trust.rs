//! A node speaks only for itself: registrations bound to their first key, and records and claims that do
//! not match the key they are stored under ignored. Against a real etcd (evio_testbed::Etcd).

use std::time::{Duration, Instant};

use evio_store::{NodeRecord, Store, StoreError, StoreEvent, SubnetPlan, keys};
use evio_testbed::Etcd;

async fn connect(etcd: &Etcd) -> Store {
    Store::connect(&evio_store::EtcdOptions::new([etcd.endpoint()]))
        .await
        .expect("connect")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn record(name: &str, key: &str) -> NodeRecord {
    let mut r = NodeRecord::new(name);
    r.public_key = key.into();
    r
}

#[test]
fn a_name_belongs_to_the_first_key_while_its_lease_lives() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let first = store
            .register(record("n1", "KEY-A"), Duration::from_secs(2))
            .await
            .unwrap();
        // Another key for the live name is refused, and the record is untouched.
        let e = match store
            .register(record("n1", "KEY-B"), Duration::from_secs(2))
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("a second key took a live name"),
        };
        assert!(
            matches!(&e, StoreError::NameTaken { node, holder_key } if node == "n1" && holder_key == "KEY-A"),
            "{e}"
        );
        assert!(e.to_string().contains("another public key"), "{e}");
        assert_eq!(store.node("n1").await.unwrap().unwrap().public_key, "KEY-A");
        // The refused attempt left no lease behind (it revoked the one it was granted).
        let mut c = store.client();
        assert_eq!(c.leases().await.unwrap().leases().len(), 1);
        // The same key may register again (an agent restarting before its old lease expired).
        let again = store
            .register(record("n1", "KEY-A"), Duration::from_secs(2))
            .await
            .unwrap();
        drop(first);
        let mut r = again.record();
        r.listen_port = 9;
        again.update(r).await.unwrap();
        assert_eq!(store.node("n1").await.unwrap().unwrap().listen_port, 9);
        // Once the first key's registration is gone (its holder crashed: the lease expires), the name is
        // free for another key.
        again.abandon();
        let t = Instant::now();
        let second = loop {
            match store
                .register(record("n1", "KEY-B"), Duration::from_secs(2))
                .await
            {
                Ok(r) => break r,
                Err(StoreError::NameTaken { .. }) => {
                    assert!(t.elapsed() < Duration::from_secs(8), "name never freed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(t.elapsed() >= Duration::from_millis(500), "freed before the TTL");
        assert_eq!(store.node("n1").await.unwrap().unwrap().public_key, "KEY-B");
        second.revoke().await.unwrap();
    });
}

#[test]
fn records_and_claims_that_do_not_match_their_keys_are_ignored() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let plan = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        let pool = "10.10.0.0/16".parse().unwrap();
        let mut c = store.client();

        // Forgeries, written straight into etcd.
        async fn forge(c: &mut evio_store::etcd_client::Client, round: u32) {
            let put = |k: String, v: String| (k, v);
            let ops = [
                // A record under one name that speaks for another.
                put(
                    keys::node(&format!("mallory{round}")),
                    format!(r#"{{"node":"victim{round}","publicKey":"X"}}"#),
                ),
                // A claim under one node's key for another node (its by-item key agrees).
                put(
                    keys::subnet_by_subnet(&format!("10.244.9{round}.0/24").parse().unwrap()),
                    format!(r#"{{"node":"victim{round}","subnet":"10.244.9{round}.0/24"}}"#),
                ),
                put(
                    keys::subnet_by_node(&format!("m1-{round}")),
                    format!(r#"{{"node":"victim{round}","subnet":"10.244.9{round}.0/24"}}"#),
                ),
                // A claim whose by-item key does not exist.
                put(
                    keys::address_by_node(&format!("m2-{round}")),
                    format!(r#"{{"node":"m2-{round}","address":"10.10.9.{round}"}}"#),
                ),
                // A claim whose by-item key holds another value (claimed for someone else).
                put(
                    keys::subnet_by_subnet(&format!("10.244.8{round}.0/24").parse().unwrap()),
                    format!(r#"{{"node":"other","subnet":"10.244.8{round}.0/24"}}"#),
                ),
                put(
                    keys::subnet_by_node(&format!("m3-{round}")),
                    format!(r#"{{"node":"m3-{round}","subnet":"10.244.8{round}.0/24"}}"#),
                ),
                // A by-item key that names another item than its value, with a matching by-node key.
                put(
                    keys::address_by_address("10.10.7.7".parse().unwrap()),
                    format!(r#"{{"node":"m4-{round}","address":"10.10.7.{round}"}}"#),
                ),
                put(
                    keys::address_by_node(&format!("m4-{round}")),
                    format!(r#"{{"node":"m4-{round}","address":"10.10.7.{round}"}}"#),
                ),
            ];
            for (k, v) in ops {
                c.put(k, v, None).await.unwrap();
            }
        }
        forge(&mut c, 1).await;
        let sub = store.claim_subnet(&plan, "good1").await.unwrap();
        let addr = store.claim_address(&pool, "good1", None).await.unwrap();
        let _reg1 = store
            .register(record("good1", "G1"), Duration::from_secs(10))
            .await
            .unwrap();

        let (snap, mut w) = store.watch().await.unwrap();
        assert_eq!(
            snap.nodes
                .iter()
                .map(|r| r.node.as_str())
                .collect::<Vec<_>>(),
            ["good1"]
        );
        assert_eq!(snap.subnets, vec![sub]);
        assert_eq!(snap.addresses, vec![addr]);
        // Who claimed first, by etcd's create revision: only for the claims that were believed.
        assert_eq!(snap.address_revisions.len(), 1);
        assert!(
            snap.address_revisions["good1"] > 0 && snap.address_revisions["good1"] <= snap.revision
        );
        assert_eq!(
            store
                .nodes()
                .await
                .unwrap()
                .iter()
                .map(|r| r.node.clone())
                .collect::<Vec<_>>(),
            ["good1"]
        );

        // The same forgeries while watching: no events; the genuine changes after them come through.
        forge(&mut c, 2).await;
        let sub2 = store.claim_subnet(&plan, "good2").await.unwrap();
        let addr2 = store.claim_address(&pool, "good2", None).await.unwrap();
        let _reg2 = store
            .register(record("good2", "G2"), Duration::from_secs(10))
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(
                tokio::time::timeout(Duration::from_secs(5), w.next())
                    .await
                    .expect("event in time")
                    .unwrap(),
            );
        }
        assert_eq!(got[0], StoreEvent::SubnetClaimed(sub2));
        assert_eq!(got[1], StoreEvent::AddressClaimed(addr2));
        assert!(
            matches!(&got[2], StoreEvent::NodeUp(r) if r.node == "good2"),
            "{:?}",
            got[2]
        );
        assert!(w.try_next().is_none());
    });
}
